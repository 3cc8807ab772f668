"""A console a person can follow: the native libraries' start-up chatter kept off stderr, log
records in the workdir's log file, and one live line per stage trained in a worker process.

Importing TensorFlow prints absl's "All log messages before absl::InitializeLog()" banner, a
oneDNN notice and, on a machine without a GPU, the failed CUDA probe; initialising JAX's
backends with libtpu installed but no TPU attached prints libtpu's failed search for a TPU VM
and a log record "Unable to initialize backend 'tpu'". These are written by C++ straight to file
descriptor 2, where TF_CPP_MIN_LOG_LEVEL no longer reaches them, so the command-line programs
import TensorFlow and start JAX's backends inside `filtered_stderr`: what is written to stderr
meanwhile is held, and written back without the lines that match the known start-up notices.
Every other line, an error included, is written back as it was. The TPU and GPU notices are
dropped only when the machine has no TPU (no GPU) device: on a TPU VM a failed libtpu start is
an error worth seeing.

A command-line run's log records (`route_logs`) all go to `<workdir>/log.txt` (`WorkdirLog`, once
the run has claimed its workdir), and only warnings and errors to the console, each once, unless
--verbosity=1. A training loop in a worker process writes its progress to a small file
(`ProgressFile`, named by DRO_JAX_PROGRESS_FILE) that its parent shows as one line per stage
(`StageBoard`): rewritten in place on a terminal, printed every so often otherwise.

Imports nothing of dro_jax: anything may stand on it.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys
import tempfile
from typing import Iterator, Mapping, Sequence

# TensorFlow's and absl's start-up notices (any machine).
STARTUP_NOISE = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^WARNING: Logging before InitGoogle\(\) is written to STDERR",
    r"port\.cc:\d+\] oneDNN custom operations are on",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate",
    r"computation_placer\.cc:\d+\] computation placer already registered",
    r"Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory",
)
# A machine without a GPU: the CUDA probes of TensorFlow and of a CUDA plugin of JAX.
NO_GPU_NOISE = (
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"failed call to cuInit",
    r"CUDA backend failed to initialize",
    r"Unable to initialize backend '(cuda|rocm|gpu)'",
)
# A machine with libtpu installed and no TPU: libtpu's search for a TPU VM, JAX's record of it.
NO_TPU_NOISE = (
    r"^Failed to find host bounds for accelerator type",
    r"could not determine TPU (accelerator type|worker hostnames)",
    r"unexpected worker hostname",
    r"Unable to initialize backend 'tpu'",
    r"TPU initialization failed: No (jellyfish|ba16c7433) device found",
)
# A native error's trailer ("=== Source Location Trace: ===" and its file:line rows): dropped
# only right after a dropped line.
TRAILER = (r"^=== Source Location Trace: ===\s*$", r"^\S+\.(cc|h):\d+\s*$")


def has_tpu() -> bool:
  """Whether a TPU is attached (JAX's own probe of the PCI bus; /dev/accel* or /dev/vfio else)."""
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # JAX's probe moved: assume there may be one, and keep its messages
    return True


def has_gpu() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def noise_patterns() -> list[re.Pattern]:
  patterns = list(STARTUP_NOISE)
  if not has_gpu():
    patterns += NO_GPU_NOISE
  if not has_tpu():
    patterns += NO_TPU_NOISE
  return [re.compile(pattern) for pattern in patterns]


def without_noise(text: str, patterns: Sequence[re.Pattern]) -> str:
  """`text` less the lines matching `patterns` (and the trailers right after them)."""
  trailer = [re.compile(pattern) for pattern in TRAILER]
  kept, dropping = [], False
  for line in text.splitlines(keepends=True):
    if any(pattern.search(line) for pattern in patterns):
      dropping = True
      continue
    if dropping and any(pattern.search(line) for pattern in trailer):
      continue
    dropping = False
    kept.append(line)
  return "".join(kept)


@contextlib.contextmanager
def filtered_stderr(patterns: Sequence[re.Pattern] | None = None) -> Iterator[None]:
  """Holds what is written to file descriptor 2 meanwhile; writes it back less the noise."""
  patterns = noise_patterns() if patterns is None else patterns
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):  # no real stderr: nothing to filter
    yield
    return
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      try:
        sys.stderr.flush()
      except (OSError, ValueError):
        pass
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      text = without_noise(held.read().decode("utf-8", "replace"), patterns)
      if text:
        os.write(2, text.encode("utf-8"))


class _DropBackendNoise(logging.Filter):
  """JAX's records of an optional backend that is absent from this machine (INFO records)."""

  def __init__(self, patterns: Sequence[re.Pattern]):
    super().__init__()
    self.patterns = patterns

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      message = record.getMessage()
    except Exception:
      return True
    return not any(pattern.search(message) for pattern in self.patterns)


def quiet_backend_records() -> None:
  """Keeps JAX's "Unable to initialize backend" records of absent backends out of the logs."""
  logger = logging.getLogger("jax._src.xla_bridge")
  if not any(isinstance(f, _DropBackendNoise) for f in logger.filters):
    logger.addFilter(_DropBackendNoise(noise_patterns()))


def import_tensorflow():
  """TensorFlow, imported with its start-up notices dropped (a no-op when already imported); its
  devices are listed meanwhile, so that its CUDA probe ("failed call to cuInit" on a machine
  without a GPU) runs now, filtered, rather than at its first op."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  with filtered_stderr():
    import tensorflow
    try:
      tensorflow.config.list_physical_devices()
    except Exception:  # a TensorFlow without devices to list: its first op probes instead
      pass
  return tensorflow


def initialize_backends() -> None:
  """TensorFlow imported and JAX's backends started, without their start-up notices: a command
  line program calls this first; where the environment names several processes
  (dro_jax/distributed.py) jax.distributed.initialize comes before."""
  from dro_jax import distributed
  distributed.maybe_initialize()
  import_tensorflow()
  quiet_backend_records()
  with filtered_stderr():
    import jax
    jax.devices()


# ----------------------------------------------------------------------------------- durations


def format_duration(seconds: float) -> str:
  """`4.2 s`, `35 s`, `1 min 35 s`, `1 h 02 min`."""
  if seconds < 10:
    return f"{seconds:.1f} s"
  seconds = round(seconds)
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ---------------------------------------------------------------------------------------- logs

LOG_NAME = "log.txt"  # a run's log records, in its workdir


def log_path(workdir: str) -> str:
  """Where a run's log records go: `<workdir>/log.txt`, or for a workdir that is not a local
  folder (gs://...) a local file named after it in the temporary folder. Process I > 0 of a
  launch that names its processes (DRO_JAX_PROCESS_ID, launch/local.py) keeps its own
  `log.pI.txt` beside process 0's."""
  index = os.environ.get("DRO_JAX_PROCESS_ID", "0").strip()
  log_name = LOG_NAME if index in ("", "0") else f"log.p{index}.txt"
  if "://" not in workdir:
    return os.path.join(workdir, log_name)
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", workdir).strip("_")
  return os.path.join(tempfile.gettempdir(), "dro_jax_logs", f"{name}.{log_name}")


class WorkdirLog(logging.Handler):
  """Appends every record to the run's log file once the run has claimed its workdir (created
  it, or written its config.json); until then the records are held. A run refused before that
  (a mistake in what it was given, a changed config on an existing workdir) leaves no file
  behind and an existing workdir untouched: `discard()` drops what is held, and so does the
  exit of a run that never claimed its workdir. `claim()` writes what is held (a runner that
  finished in a workdir it neither created nor wrote config.json into, like a resumed demo)."""

  HELD = 10_000  # records held at most before the workdir is claimed

  def __init__(self, workdir: str, formatter: logging.Formatter | None = None):
    import time
    super().__init__(logging.DEBUG)
    self.workdir, self.path = workdir, log_path(workdir)
    self.remote = "://" in workdir
    self.since = time.time()
    self.existed = not self.remote and os.path.isdir(workdir)
    self.held: list[str] = []
    self.stream = None
    self.discarded = False
    if formatter is not None:
      self.setFormatter(formatter)

  def claimed(self) -> bool:
    """Whether this run has made the workdir its own: created it, or (re)written config.json."""
    if self.remote:
      return True
    if not os.path.isdir(self.workdir):
      return False
    if not self.existed:
      return True
    try:
      return os.path.getmtime(os.path.join(self.workdir, "config.json")) >= self.since - 1.0
    except OSError:
      return False

  def _open(self, force: bool = False) -> bool:
    if self.stream is not None:
      return True
    if self.discarded or not (force or self.claimed()):
      return False
    folder = os.path.dirname(self.path)
    if self.remote:
      os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
      return False
    self.stream = open(self.path, "a", encoding="utf-8")
    for text in self.held:
      self.stream.write(text)
    self.held = []
    return True

  def emit(self, record: logging.LogRecord) -> None:
    try:
      text = self.format(record) + "\n"
      if self._open():
        self.stream.write(text)
        self.stream.flush()
      elif not self.discarded and len(self.held) < self.HELD:
        self.held.append(text)
    except Exception:  # a log that cannot be written never stops the run
      self.handleError(record)

  def claim(self) -> None:
    """The run's records belong in its workdir (it exists): write what is held."""
    try:
      if self.remote or os.path.isdir(self.workdir):
        self._open(force=True)
    except OSError:
      pass

  def discard(self) -> None:
    """The run was refused: what is held is dropped, and nothing more is written unless the log
    is open already (the run had claimed its workdir)."""
    self.held = []
    if self.stream is None:
      self.discarded = True

  def close(self) -> None:
    try:
      if self.held:
        self._open()
      if self.stream is not None:
        self.stream.close()
        self.stream = None
    except OSError:
      pass
    super().close()


class ConsoleLevel(logging.Filter):
  """Lets through the records a person reads on the console: warnings and errors, each once
  (a record marked `extra={"printed": True}` was printed already, and goes to the log only)."""

  def __init__(self, level: int = logging.WARNING):
    super().__init__()
    self.level = level

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= self.level and not getattr(record, "printed", False)


def route_logs(workdir: str, verbose: bool = False) -> WorkdirLog:
  """The log records of a command-line run: all of them to the workdir's log file (`log_path`),
  only warnings and errors to the console, unless `verbose` (--verbosity=1): then all of them to
  the console too. Returns the file's handler (closed at exit)."""
  import atexit
  from absl import logging as absl_logging
  console_handler = absl_logging.get_absl_handler()
  root = logging.getLogger()
  for handler in list(root.handlers):
    if isinstance(handler, WorkdirLog):
      root.removeHandler(handler)
      handler.close()
  for old in [f for f in console_handler.filters if isinstance(f, ConsoleLevel)]:
    console_handler.removeFilter(old)
  console_handler.addFilter(ConsoleLevel(logging.NOTSET if verbose else logging.WARNING))
  formatter = getattr(console_handler, "formatter", None) or absl_logging.PythonFormatter()
  handler = WorkdirLog(workdir, formatter)
  root.addHandler(handler)
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)
  atexit.register(handler.close)
  return handler


# ---------------------------------------------------------------------------- stage progress

PROGRESS_ENV = "DRO_JAX_PROGRESS_FILE"  # a training loop's progress file, when set
PROGRESS_EVERY_S = 1.0  # how often the training loop rewrites it at most


class ProgressFile:
  """A training loop's progress as a small JSON file, rewritten atomically (at most once a
  second, and at the end): {"step", "total", "steps_per_second", "time"}. The rate is the recent
  one (the steps of the last RATE_WINDOW_S seconds, from the first step reported on: a first
  step's compile time does not count), else the loop's own. A parent process showing the
  progress of workers reads it (`StageBoard`)."""

  RATE_WINDOW_S = 30.0

  def __init__(self, path: str):
    import collections
    self.path, self.last = path, 0.0
    self.samples: collections.deque = collections.deque()  # (time, step), oldest first

  def rate(self, now: float, step: int, fallback: float) -> float:
    self.samples.append((now, step))
    while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW_S:
      self.samples.popleft()
    first_time, first_step = self.samples[0]
    if now > first_time and step > first_step:
      return (step - first_step) / (now - first_time)
    return fallback

  def write(self, step: int, total: int, steps_per_second: float, *, force: bool = False) -> None:
    import json
    import time
    now = time.time()
    rate = self.rate(now, int(step), float(steps_per_second))
    if not force and now - self.last < PROGRESS_EVERY_S:
      return
    self.last = now
    temporary = f"{self.path}.tmp{os.getpid()}"
    try:
      with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"step": int(step), "total": int(total), "steps_per_second": rate,
                   "time": now}, f)
      os.replace(temporary, self.path)
    except OSError:  # progress is for show: never stops the run
      pass


def progress_file() -> ProgressFile | None:
  """The progress file this process's training loop writes, when its parent asked for one."""
  path = os.environ.get(PROGRESS_ENV)
  return ProgressFile(path) if path else None


def _monotonic() -> float:
  import time
  return time.monotonic()


def read_progress(path: str) -> dict | None:
  import json
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class StageBoard:
  """One line per stage trained in a worker process: its step of the total, steps/s and the time
  left, read from each stage's progress file. On a terminal the lines are rewritten in place
  (at most once a second); otherwise they are printed as plain lines every `plain_every_s`
  seconds, for the stages whose step moved."""

  def __init__(self, stages: Mapping[str, tuple[str, int]], *, stream=None,
               plain_every_s: float = 30.0, tty: bool | None = None):
    self.stages = dict(stages)  # label -> (progress file, total steps)
    self.stream = sys.stdout if stream is None else stream
    if tty is None:
      try:
        tty = self.stream.isatty() and os.environ.get("TERM") != "dumb"
      except (AttributeError, ValueError):
        tty = False
    self.tty = tty
    self.every = 1.0 if tty else float(plain_every_s)
    self.drawn = 0  # lines drawn in place (terminal)
    self.shown: dict[str, int] = {}  # label -> the step last printed (plain)
    self.next = _monotonic() + (0.0 if tty else self.every)
    self.width = max(len(label) for label in self.stages) if self.stages else 0

  def line(self, label: str) -> str:
    path, total = self.stages[label]
    progress = read_progress(path)
    name = f"{label}:".ljust(self.width + 1)
    if progress is None:
      return f"  {name} waiting ({total} steps)"
    step, total = int(progress["step"]), int(progress.get("total") or total)
    rate = float(progress.get("steps_per_second") or 0.0)
    text = f"  {name} step {step}/{total}"
    if step >= total:
      return text + " trained"
    if rate > 0:
      text += f", {rate:.2f} steps/s, {format_duration((total - step) / rate)} left"
    return text

  def lines(self) -> dict[str, str]:
    return {label: self.line(label) for label in self.stages}

  def poll(self, force: bool = False) -> None:
    now = _monotonic()
    if not force and now < self.next:
      return
    self.next = now + self.every
    lines = self.lines()
    if self.tty:
      up = f"\x1b[{self.drawn}F" if self.drawn else ""
      self.stream.write(up + "".join(f"\x1b[2K{text}\n" for text in lines.values()))
      self.drawn = len(lines)
    else:
      for label, text in lines.items():
        progress = read_progress(self.stages[label][0])
        step = -1 if progress is None else int(progress["step"])
        if step >= 0 and self.shown.get(label) != step:
          self.shown[label] = step
          self.stream.write(text + "\n")
    self.stream.flush()

  def close(self) -> None:
    """The lines as they stand (a terminal's final state; no plain repeat of unmoved stages)."""
    if self.tty:
      self.poll(force=True)
      self.drawn = 0

"""A quiet console: the native libraries' start-up chatter kept off stderr, nothing else.

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
from typing import Iterator, Sequence

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
  """TensorFlow, imported with its start-up notices dropped (a no-op when already imported)."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  with filtered_stderr():
    import tensorflow
  return tensorflow


def initialize_backends() -> None:
  """TensorFlow imported and JAX's backends started, without their start-up notices: a command
  line program calls this first (after jax.distributed.initialize where that is needed)."""
  import_tensorflow()
  quiet_backend_records()
  with filtered_stderr():
    import jax
    jax.devices()

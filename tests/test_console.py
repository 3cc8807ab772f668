"""A console a person can follow: the demo's stages trained in worker processes show one live line
each; INFO records go to the workdir's log.txt, not the console (unless --verbosity=1); each
warning prints once; a refused run leaves no log behind."""

import hashlib
import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

from dro_jax import configs, console

from run_helpers import cli_env, shrink

ROOT = pathlib.Path(__file__).resolve().parents[1]
# absl's INFO prefix (I1207 01:48:33.125779 1396... train.py:366]), wherever it starts in a line
INFO_LINE = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+\.py:\d+\]")


# -------------------------------------------------------------------------------- stage lines


def test_a_stage_line_gives_step_total_rate_and_time_left(tmp_path):
  path = str(tmp_path / "progress.json")
  board = console.StageBoard({"[demo] DRO-V": (path, 400)}, stream=io.StringIO(), tty=False)
  assert board.line("[demo] DRO-V") == "  [demo] DRO-V: waiting (400 steps)"
  console.ProgressFile(path).write(100, 400, 2.5)
  assert board.line("[demo] DRO-V") == ("  [demo] DRO-V: step 100/400, 2.50 steps/s, 2 min 0 s "
                                        "left")
  console.ProgressFile(path).write(400, 400, 2.5)
  assert board.line("[demo] DRO-V") == "  [demo] DRO-V: step 400/400 trained"
  assert sorted(os.listdir(tmp_path)) == ["progress.json"]  # written atomically, nothing left


def test_the_rate_is_the_recent_one_without_the_first_steps_compile(tmp_path):
  progress = console.ProgressFile(str(tmp_path / "progress.json"))
  assert progress.rate(100.0, 1, 0.05) == 0.05  # one step so far (its compile): the loop's own
  assert progress.rate(102.0, 5, 0.3) == 2.0  # 4 steps in the 2 s since step 1
  assert progress.rate(140.0, 81, 1.5) == pytest.approx(76 / 38)  # the last 30 s or so


def test_plain_lines_every_interval_for_the_stages_that_moved(tmp_path, monkeypatch):
  clock = [1000.0]
  monkeypatch.setattr(console, "_monotonic", lambda: clock[0])
  files = {name: str(tmp_path / f"{name}.json") for name in ("dro", "kto")}
  out = io.StringIO()
  board = console.StageBoard({"DRO-V": (files["dro"], 10), "KTO": (files["kto"], 10)},
                             stream=out, tty=False, plain_every_s=30)
  console.ProgressFile(files["dro"]).write(3, 10, 1.0)
  board.poll()
  assert out.getvalue() == ""  # not yet 30 s
  clock[0] += 30
  board.poll()
  assert out.getvalue().splitlines() == ["  DRO-V: step 3/10, 1.00 steps/s, 7.0 s left"]
  clock[0] += 30
  board.poll()  # nothing moved: nothing printed
  assert len(out.getvalue().splitlines()) == 1
  console.ProgressFile(files["kto"]).write(5, 10, 2.0)
  clock[0] += 30
  board.poll()
  assert out.getvalue().splitlines()[1:] == ["  KTO:   step 5/10, 2.00 steps/s, 2.5 s left"]
  assert "\x1b" not in out.getvalue()  # no terminal codes in a log file


def test_on_a_terminal_the_lines_are_rewritten_in_place(tmp_path):
  path = str(tmp_path / "dro.json")
  out = io.StringIO()
  board = console.StageBoard({"DRO-V": (path, 10), "KTO": (str(tmp_path / "k.json"), 10)},
                             stream=out, tty=True)
  console.ProgressFile(path).write(3, 10, 1.0)
  board.poll(force=True)
  first = out.getvalue()
  assert first == ("\x1b[2K  DRO-V: step 3/10, 1.00 steps/s, 7.0 s left\n"
                   "\x1b[2K  KTO:   waiting (10 steps)\n")  # the labels' colons aligned
  console.ProgressFile(path).write(4, 10, 1.0, force=True)
  board.poll(force=True)
  assert out.getvalue()[len(first):].startswith("\x1b[2F\x1b[2K  DRO-V: step 4/10")


@pytest.mark.slow
def test_the_training_loop_writes_its_progress_file_when_asked(tmp_path, demo_cache,
                                                                monkeypatch):
  from dro_jax import train
  path = tmp_path / "progress.json"
  monkeypatch.setenv(console.PROGRESS_ENV, str(path))
  config = shrink(configs.load("sft", "size=tiny"), demo_cache, steps=3)
  config.eval_every = 0
  train.run(config, str(tmp_path / "run"))
  progress = json.loads(path.read_text())
  assert (progress["step"], progress["total"]) == (3, 3) and progress["steps_per_second"] > 0


@pytest.mark.slow
def test_the_demo_shows_a_live_line_per_stage_trained_in_workers(tmp_path, demo_cache, capsys,
                                                                  monkeypatch):
  """A miniature demo (30 SFT steps, 32 per method), workers=2, the console not a terminal: while
  the workers train, the main process prints each stage's step, steps/s and time left."""
  from dro_jax import demo
  monkeypatch.setattr(demo, "PROGRESS_EVERY_S", 0.5)
  config = configs.load("demo", "scale=0.02,methods=dro+kto,workers=2")
  config.data.cache_dir = demo_cache
  config.demo.align_steps, config.demo.eval_prompts, config.demo.evaluations = 32, 24, 1
  demo.run(config, str(tmp_path / "demo"))
  out = capsys.readouterr().out
  for label in ("DRO-V", "KTO"):
    lines = re.findall(rf"^  \[demo\] {label}: +step (\d+)/32(.*)$", out, re.MULTILINE)
    assert lines, out[-3000:]
    running = [rest for step, rest in lines if int(step) < 32]
    assert all(re.fullmatch(r", \d+\.\d\d steps/s, .+ left", rest) for rest in running), lines
    assert len(lines) >= 2, lines  # more than one line while it trained
  assert "\x1b" not in out


# ----------------------------------------------------------------------------------------- logs


def test_records_wait_for_the_run_to_claim_its_workdir(tmp_path):
  formatter = logging.Formatter("%(levelname)s %(message)s")
  record = lambda text: logging.LogRecord("x", logging.INFO, __file__, 1, text, (), None)
  new = tmp_path / "new"
  handler = console.WorkdirLog(str(new), formatter)
  handler.emit(record("before"))
  assert not new.exists()  # nothing is created for a log
  new.mkdir()  # the run creates its workdir
  handler.emit(record("after"))
  handler.close()
  assert (new / "log.txt").read_text() == "INFO before\nINFO after\n"

  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "config.json").write_text("{}")
  os.utime(existing / "config.json", (0, 0))  # written by an earlier run
  refused = console.WorkdirLog(str(existing), formatter)
  refused.emit(record("a refused resume"))
  refused.discard()
  refused.close()
  assert sorted(os.listdir(existing)) == ["config.json"]  # untouched
  resumed = console.WorkdirLog(str(existing), formatter)
  resumed.emit(record("held"))
  (existing / "config.json").write_text("{}")  # the run claims it
  resumed.emit(record("claimed"))
  resumed.close()
  assert (existing / "log.txt").read_text() == "INFO held\nINFO claimed\n"


def snapshot(folder: pathlib.Path) -> dict[str, str]:
  return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(folder.rglob("*")) if path.is_file()}


def driver(tmp_path, demo_cache, workdir, *overrides):
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/sft.py:size=tiny",
       f"--workdir={workdir}", "--config.batch_size=8", "--config.eval_every=0",
       "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
       "--config.log_every=1", *overrides],
      env=cli_env(tmp_path, demo_cache, "console_cache"), capture_output=True, text=True,
      timeout=600)
  return result, result.stdout + result.stderr


@pytest.mark.slow
def test_info_records_go_to_the_log_file_and_each_warning_prints_once(tmp_path, demo_cache):
  """Prompts cut to 6 tokens: the truncation warning prints once; the step and dataset-statistics
  INFO records are in <workdir>/log.txt, not on the console. A refused resume then leaves the
  workdir, its log included, byte-identical; --verbosity=1 shows the INFO records again."""
  workdir = tmp_path / "run"
  result, output = driver(tmp_path, demo_cache, workdir, "--config.total_steps=3",
                          "--config.max_input_length=6")
  assert result.returncode == 0, output[-3000:]
  assert not [line for line in output.splitlines() if INFO_LINE.search(line)], output[-3000:]
  train_cut = [line for line in output.splitlines() if "split train were cut" in line]
  assert len(train_cut) == 1 and train_cut[0].startswith("WARNING: "), output[-3000:]
  log = (workdir / "log.txt").read_text()
  assert re.search(r"^I\d{4} .* train\.py:\d+\] step 3: ", log, re.MULTILINE), log[-3000:]
  assert "Dataset statistics of" in log
  assert re.search(r"^W\d{4} .* split train were cut", log, re.MULTILINE)  # recorded too

  before = snapshot(workdir)
  refused, output = driver(tmp_path, demo_cache, workdir, "--config.total_steps=3",
                           "--config.max_input_length=6", "--config.optimizer.grad_clip_norm=3")
  assert refused.returncode == 2, output[-3000:]
  assert snapshot(workdir) == before

  verbose, output = driver(tmp_path, demo_cache, tmp_path / "verbose", "--config.total_steps=1",
                           "--verbosity=1")
  assert verbose.returncode == 0, output[-3000:]
  # (the progress bar may share the line: no ^)
  assert re.search(r"I\d{4} [^\n]* train\.py:\d+\] step 1: ", output), output[-3000:]
  assert "step 1: " in (tmp_path / "verbose" / "log.txt").read_text()


# ------------------------------------------------------------------------------------ notebook


def test_the_notebook_starts_the_backends_without_their_notices(tmp_path, demo_cache):
  """The notebook's set-up cells, then what the demo's first step does (TensorFlow's first op,
  JAX's devices), in a kernel: no start-up notice in any output ("failed call to cuInit",
  "Could not find cuda drivers", libtpu's search for a TPU). The stored notebook holds none."""
  import nbclient
  import nbformat
  stored = (ROOT / "notebooks" / "dro_demo.ipynb").read_text()
  patterns = console.noise_patterns() + [re.compile(r"cuInit|cuda drivers")]
  assert not [pattern.pattern for pattern in patterns if pattern.search(stored)]
  notebook = nbformat.reads(stored, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  setup = code[:2]  # Colab's install (a no-op here), then the imports and the config
  assert "demo.run(" not in "".join(cell.source for cell in setup)
  probe = nbformat.v4.new_code_cell("import jax\nimport tensorflow as tf\n"
                                    "print(jax.devices(), int(tf.constant(1)))")
  notebook.cells = setup + [probe]
  # The kernel runs as a user's would: every backend JAX has (libtpu's too, where installed), no
  # CUDA hidden, TensorFlow's log level unset (the suite sets all three for itself), and what
  # native code writes to its stderr shown in the cell (ipykernel does not under pytest).
  environment = {"DRO_JAX_NOTEBOOK_WORKDIR": str(tmp_path / "demo"), "DRO_JAX_CACHE": demo_cache,
                 "JAX_PLATFORMS": None, "CUDA_VISIBLE_DEVICES": None,
                 "TF_CPP_MIN_LOG_LEVEL": None, "PYTEST_CURRENT_TEST": None}
  saved = {key: os.environ.get(key) for key in environment}
  for key, value in environment.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  try:
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  texts = [output.get("text", "") for cell in notebook.cells for output in cell.outputs]
  lines = "".join(texts).splitlines()
  assert any("CpuDevice" in line or "Device" in line for line in lines), lines
  noise = [line for line in lines if any(pattern.search(line) for pattern in patterns)]
  assert not noise, noise

"""Never lose a run: a changed config or another recipe on a workdir is refused before anything is
written; Ctrl-C saves like SIGTERM; a damaged checkpoint (any file the restore reads) is set aside
intact and the run resumes from the previous one; quarantine never deletes; metrics.jsonl is only
appended to and its readers (and TensorBoard) take the last row per step."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dro_jax import checkpoint_manager, configs, files, resume, train
import run_helpers
from run_helpers import raw_metrics, read_metrics, shrink

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One small DRO-V run: checkpoints at 2, 4, 6; a frozen reference (its log-probs cached).
OVERRIDES = ("--config.total_steps=6", "--config.checkpoint_every=2", "--config.eval_every=0",
             "--config.log_every=1", "--config.batch_size=8", "--config.keep_last=3",
             "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1")


def cli_env(tmp_path, demo_cache: str) -> dict[str, str]:
  return run_helpers.cli_env(tmp_path, demo_cache, "never_lose_jax_cache")


def cli(recipe: str, workdir, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/{recipe}.py:size=tiny",
          f"--workdir={workdir}", *OVERRIDES, *overrides]


def snapshot(folder: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder`."""
  return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(folder.rglob("*")) if path.is_file()}


def small_dro(demo_cache: str, steps: int = 6, **changes):
  """In process, the run `cli("dro", ...)` makes (up to data.cache_dir, which may change)."""
  config = shrink(configs.load("dro", "size=tiny"), demo_cache, steps=steps)
  config.checkpoint_every, config.eval_every, config.log_every, config.keep_last = 2, 0, 1, 3
  for key, value in changes.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def dro_workdir(tmp_path_factory, demo_cache):
  workdir = tmp_path_factory.mktemp("never_lose") / "dro"
  train.run(small_dro(demo_cache), str(workdir))
  assert (workdir / "checkpoints" / "6").is_dir() and (workdir / "reference_cache").is_dir()
  return workdir


def copy_of(dro_workdir, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "dro"
  shutil.copytree(dro_workdir, workdir)
  return workdir


@pytest.mark.slow
def test_resume_with_a_changed_optimizer_option_is_refused_and_touches_nothing(
    dro_workdir, tmp_path, demo_cache):
  workdir = copy_of(dro_workdir, tmp_path)
  before = snapshot(workdir)
  result = subprocess.run(cli("dro", workdir, "--config.optimizer.grad_clip_norm=1.0",
                              "--config.total_steps=8"),
                          env=cli_env(tmp_path, demo_cache), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "optimizer.grad_clip_norm: 0.0 -> 1.0" in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "optimizer.grad_clip_norm" in errors[0]  # one line names it
  assert "total_steps" not in errors[0] and "cache_dir" not in errors[0]  # allowed changes
  assert "--config.accept_config_change=True" in result.stderr and "--workdir" in result.stderr
  assert "Traceback" not in result.stderr
  assert snapshot(workdir) == before  # checkpoints, metrics, config.json, reference cache


@pytest.mark.parametrize("recipe", ["kto", "dpo"])
def test_another_recipe_on_a_workdir_is_refused_naming_both(recipe, dro_workdir, tmp_path,
                                                             demo_cache):
  workdir = copy_of(dro_workdir, tmp_path)
  before = snapshot(workdir)
  config = shrink(configs.load(recipe, "size=tiny"), demo_cache, steps=6)
  with pytest.raises(resume.ConfigChangeError,
                     match=rf"holds a dro \(configs/dro.py\) run, and this command trains "
                           rf"{recipe} \(configs/{recipe}.py\)"):
    train.run(config, str(workdir))
  assert snapshot(workdir) == before


def test_an_accepted_change_resumes_and_keeps_the_old_config(dro_workdir, tmp_path, demo_cache,
                                                            capsys):
  workdir = copy_of(dro_workdir, tmp_path)
  old_config = (workdir / "config.json").read_text()
  config = small_dro(demo_cache, steps=8)
  config.optimizer.learning_rate = 5e-4
  with pytest.raises(resume.ConfigChangeError, match=r"optimizer.learning_rate: 0.0001 -> 0.0005"):
    train.run(config, str(workdir))
  config.accept_config_change = True
  state = train.run(config, str(workdir))
  assert int(state.step) == 8 and "resumed from step 6" in capsys.readouterr().out
  assert (workdir / "config.1.json").read_text() == old_config
  assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 5e-4


def test_resume_checks_are_unit_level():
  config = configs.load("dro", "size=tiny")
  old = resume.config_json(config)
  assert resume.changes(old, old) == []
  new = json.loads(json.dumps(old))
  new["total_steps"], new["evaluation"]["prompts"] = 7, 3
  new["dro"]["tau"] = 0.5
  listed = resume.changes(old, new)
  assert [key for key, _, _ in listed] == ["dro.tau", "evaluation.prompts", "total_steps"]
  assert [key for key, _, _ in listed if not resume._allowed(key)] == ["dro.tau"]


def test_a_workdir_from_before_a_new_key_resumes(dro_workdir, tmp_path, demo_cache):
  """A config.json that lacks a key added since (at its default now) is the same run; a
  non-default value of that key is a change."""
  workdir = copy_of(dro_workdir, tmp_path)
  saved = json.loads((workdir / "config.json").read_text())
  del saved["accept_config_change"]
  saved["optimizer"].pop("grad_clip_norm")
  (workdir / "config.json").write_text(json.dumps(saved))
  config = configs.load("dro", "size=tiny")
  for key in ("total_steps", "checkpoint_every", "eval_every", "log_every", "batch_size",
              "keep_last"):
    config[key] = saved[key]
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.data.cache_dir = saved["data"]["cache_dir"]
  assert resume.check(config, str(workdir)) == []
  config.optimizer.grad_clip_norm = 1.0
  with pytest.raises(resume.ConfigChangeError, match=r"optimizer.grad_clip_norm: \(absent\) -> 1.0"):
    resume.check(config, str(workdir))


def _start_and_interrupt(workdir, env, log, sig):
  with open(log, "w") as output:
    process = subprocess.Popen(cli("dro", workdir, "--config.total_steps=400",
                                   "--config.checkpoint_every=100"),
                               env=env, stdout=output, stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while process.poll() is None and time.time() < deadline:
    rows = raw_metrics(workdir) if (workdir / "metrics.jsonl").exists() else []
    if any(row.get("step", 0) >= 5 for row in rows):
      break
    time.sleep(0.05)
  process.send_signal(sig)
  process.wait(timeout=600)
  return process


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_a_restart_resumes(tmp_path, demo_cache):
  workdir = tmp_path / "interrupted"
  env = cli_env(tmp_path, demo_cache)
  process = _start_and_interrupt(workdir, env, tmp_path / "int.log", signal.SIGINT)
  log = (tmp_path / "int.log").read_text()
  assert process.returncode == 143, log[-3000:]
  assert "Traceback" not in log and "KeyboardInterrupt" not in log
  steps = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
  saved = max(steps)
  assert 5 <= saved < 400 and f"saved a checkpoint at step {saved}" in log
  result = subprocess.run(cli("dro", workdir, f"--config.total_steps={saved + 2}",
                              "--config.checkpoint_every=100"),
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {saved}" in result.stdout + result.stderr


# ------------------------------------------------------------------------------ faults on disk


def _damage(step_dir: pathlib.Path, kind: str) -> list[pathlib.Path]:
  """Truncates or deletes the files of one kind in one item of a step; returns them."""
  item = step_dir / "policy"
  if kind == "array chunks (truncated)":
    paths = [p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"]
    for path in paths:
      path.write_bytes(path.read_bytes()[:7])
  elif kind == "array chunks (deleted)":
    paths = [p for p in item.rglob("*") if p.is_file() and p.parent.name == "d"]
    for path in paths:
      path.unlink()
  elif kind == "manifest (truncated)":
    paths = [p for p in item.rglob("manifest.ocdbt")]
    for path in paths:
      path.write_bytes(path.read_bytes()[:5])
  elif kind == "item metadata (deleted)":
    paths = [item / "_METADATA"]
    paths[0].unlink()
  elif kind == "item metadata (truncated)":
    paths = [item / "_METADATA"]
    paths[0].write_bytes(paths[0].read_bytes()[:20])
  elif kind == "data position (deleted)":
    paths = [p for p in (step_dir / "data_position").rglob("*") if p.name != "commit_success.txt"]
    for path in paths:
      path.unlink()
  else:
    raise ValueError(kind)
  assert paths, kind
  return paths


@pytest.mark.parametrize("kind", ["array chunks (truncated)", "array chunks (deleted)",
                                  "manifest (truncated)", "item metadata (deleted)",
                                  "item metadata (truncated)", "data position (deleted)"])
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_intact_and_the_run_resumes(
    kind, dro_workdir, tmp_path, demo_cache, capsys):
  workdir = copy_of(dro_workdir, tmp_path)
  _damage(workdir / "checkpoints" / "6", kind)
  damaged = snapshot(workdir / "checkpoints" / "6")
  others = {step: snapshot(workdir / "checkpoints" / step) for step in ("2", "4")}
  # keep_last 5: no retention deletes, so every other checkpoint must stay byte-identical
  config = small_dro(demo_cache, steps=8, keep_last=5)
  capsys.readouterr()
  state = train.run(config, str(workdir))
  out = capsys.readouterr().out
  assert f"checkpoint {workdir / 'checkpoints' / '6'} is corrupt" in out
  assert "resumed from step 4" in out and int(state.step) == 8
  assert snapshot(workdir / "checkpoints_corrupt" / "6") == damaged  # set aside, intact
  assert snapshot(workdir / "checkpoints" / "2") == others["2"]  # untouched
  assert snapshot(workdir / "checkpoints" / "4") == others["4"]
  assert {row["step"] for row in read_metrics(workdir) if "loss" in row} == set(range(1, 9))


def test_a_checkpoint_that_reads_but_does_not_fit_is_an_error_not_corruption(dro_workdir,
                                                                             tmp_path,
                                                                             demo_cache):
  """The state of another config (gradient clipping adds optimizer state): nothing is moved."""
  from dro_jax import initialization, partitioning
  from dro_jax import step as step_lib
  workdir = copy_of(dro_workdir, tmp_path)
  before = snapshot(workdir)
  config = shrink(configs.load("dro", "size=tiny"), demo_cache)
  config.optimizer.grad_clip_norm = 1.0
  model_config = step_lib.t5_config(config)
  mesh = partitioning.mesh_from_config(config)
  rules = partitioning.rules_from_config(config)
  abstract, shardings = initialization.state_layout(config, model_config, mesh, rules,
                                                    with_reference=False)
  import jax
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
  manager = checkpoint_manager.Checkpointer(str(workdir))
  try:
    with pytest.raises(checkpoint_manager.CheckpointMismatchError, match="reads back intact"):
      manager.restore_latest_valid(like)
  finally:
    manager.close()
  assert snapshot(workdir) == before and not (workdir / "checkpoints_corrupt").exists()


def test_quarantine_never_deletes(dro_workdir, tmp_path):
  workdir = copy_of(dro_workdir, tmp_path)
  first = snapshot(workdir / "checkpoints" / "6")
  manager = checkpoint_manager.Checkpointer(str(workdir))
  try:
    assert manager.quarantine(6) == str(workdir / "checkpoints_corrupt" / "6")
    shutil.copytree(workdir / "checkpoints" / "4", workdir / "checkpoints" / "6")
    manager = checkpoint_manager.Checkpointer(str(workdir))
    assert manager.quarantine(6) == str(workdir / "checkpoints_corrupt" / "6.1")
  finally:
    manager.close()
  assert snapshot(workdir / "checkpoints_corrupt" / "6") == first
  assert (workdir / "checkpoints_corrupt" / "6.1" / "policy").is_dir()


def test_metrics_are_appended_and_readers_take_the_last_row_per_step(dro_workdir, tmp_path,
                                                                    demo_cache):
  """A resume from step 4 of a workdir that logged 1..6 replays 5 and 6: the file keeps every
  line written (the first run's are a prefix), readers and TensorBoard take the replayed ones."""
  import tensorflow as tf
  from tensorboard.backend.event_processing import plugin_event_accumulator
  workdir = copy_of(dro_workdir, tmp_path)
  first_text = (workdir / "metrics.jsonl").read_text()
  shutil.rmtree(workdir / "checkpoints" / "6")
  lines = first_text.splitlines()
  # Mark the first run's rows of steps 5 and 6 so the replay is visible.
  marked = [json.dumps({**json.loads(line), "loss": 1e6}) if json.loads(line)["step"] > 4
            else line for line in lines]
  (workdir / "metrics.jsonl").write_text("".join(line + "\n" for line in marked))
  train.run(small_dro(demo_cache), str(workdir))
  text = (workdir / "metrics.jsonl").read_text()
  assert text.startswith("".join(line + "\n" for line in marked))  # appended, never rewritten
  assert [row["step"] for row in raw_metrics(workdir)].count(5) == 2
  rows = {row["step"]: row for row in read_metrics(workdir) if "loss" in row}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6] and max(row["loss"] for row in rows.values()) < 1e6
  # The share of examples cut at the max lengths is logged (the demo data needs no cut).
  assert rows[6]["data/truncated_prompts"] == rows[6]["data/truncated_responses"] == 0.0
  accumulator = plugin_event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  accumulator.Reload()
  events = {event.step: float(tf.make_ndarray(event.tensor_proto))
            for event in accumulator.Tensors("loss")}
  assert events == pytest.approx({step: row["loss"] for step, row in rows.items()}, rel=1e-6)
  assert files.metrics_rows(str(workdir / "metrics.jsonl")) == read_metrics(workdir)

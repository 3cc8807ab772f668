"""The driver: every recipe runs, configs are strict, metrics agree, and a killed run resumes exactly."""

import glob
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dro_jax import configs, train

from run_helpers import read_metrics, shrink

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ("sft", "dro", "dro_p", "kto", "dpo", "ipo", "reward_model", "preference_model")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_three_steps_at_size_tiny(recipe, demo_cache, tmp_path):
  config = shrink(configs.load(recipe, "size=tiny"), demo_cache)
  config.max_input_length = 16  # reward_model / preference_model's own 1024 stays at size=tiny
  config.checkpoint_every, config.eval_every, config.log_every = 3, 3, 1
  if recipe == "dro":  # DRO-V's policy and value network, layers scanned and rematerialised
    config.model.num_encoder_layers = config.model.num_decoder_layers = 2
    config.model.scan_layers, config.model.remat = True, "full"
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 3
  rows = [row for row in read_metrics(tmp_path) if "loss" in row]
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert all(np.isfinite(row["loss"]) for row in rows)
  assert any("eval/loss" in row for row in read_metrics(tmp_path))
  assert os.path.isdir(tmp_path / "checkpoints" / "3" / "policy")
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["loss"] == recipe and saved["total_steps"] == 3
  if recipe == "dro":
    assert os.path.isdir(tmp_path / "checkpoints" / "3" / "value_opt")
    assert saved["model"]["scan_layers"] is True
    from dro_jax import checkpoint_manager
    from dro_jax.models import scan as scan_lib
    checkpointer = checkpoint_manager.Checkpointer(str(tmp_path))
    try:
      for item in ("policy", "value"):
        layers = checkpointer.restore_item(3, item)["encoder"]["layers"]
        assert np.shape(layers["mlp"]["wo"]["kernel"])[0] == 2, item  # [layers, ...]
      assert scan_lib.is_scanned(checkpointer.restore_item(3, "policy"))
    finally:
      checkpointer.close()


@pytest.mark.slow
def test_tensorboard_loss_equals_the_jsonl(demo_cache, tmp_path):
  import tensorflow as tf
  config = shrink(configs.load("sft", "size=tiny"), demo_cache, steps=4)
  config.log_every, config.eval_every = 2, 0
  train.run(config, str(tmp_path))
  jsonl = {row["step"]: row["loss"] for row in read_metrics(tmp_path) if "loss" in row}
  events = {}
  for path in glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "loss":
          events[event.step] = float(tf.make_ndarray(value.tensor))
  assert sorted(jsonl) == [2, 4]
  assert events == pytest.approx(jsonl, rel=1e-6)


def test_unknown_recipe_arg_names_the_key():
  with pytest.raises(ValueError, match="unknown arg 'vlaue'"):
    configs.load("dro", "size=tiny,vlaue=double_single")
  with pytest.raises(ValueError, match="size='huge'"):
    configs.load("dro", "size=huge")


def cli_env(tmp_path, demo_cache: str) -> dict[str, str]:
  return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)),
          "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "cli_jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TF_CPP_MIN_LOG_LEVEL": "3",
          "DRO_JAX_CACHE": demo_cache, "PYTHONPATH": str(ROOT)}


def cli(workdir, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/dro.py:size=tiny",
          f"--workdir={workdir}", *overrides]


def test_mistyped_override_fails_naming_the_key(tmp_path, demo_cache):
  result = subprocess.run(cli(tmp_path / "w", "--config.optimizer.learnig_rate=0.1"),
                          env=cli_env(tmp_path, demo_cache), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  assert "learnig_rate" in result.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


# One small configuration for the kill test: checkpoints every 4 steps, 60 steps in all.
KILL_OVERRIDES = ("--config.total_steps=60", "--config.checkpoint_every=4",
                  "--config.eval_every=0", "--config.log_every=1", "--config.batch_size=8",
                  "--config.keep_last=2", "--config.model.num_encoder_layers=1",
                  "--config.model.num_decoder_layers=1")


def _restored_items(workdir, step: int):
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  names = [name for name in ("policy", "policy_opt", "value", "value_opt", "reference", "rng_step")
           if os.path.isdir(os.path.join(workdir, "checkpoints", str(step), name))]
  items = manager.restore(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardRestore() for name in names},
      data_position=ocp.args.JsonRestore()))
  manager.close()
  return items


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_cache):
  """The kill tests' reference: the same small run, never stopped."""
  tmp_path = tmp_path_factory.mktemp("uninterrupted")
  workdir = tmp_path / "run"
  subprocess.run(cli(workdir, *KILL_OVERRIDES), env=cli_env(tmp_path, demo_cache), check=True,
                 capture_output=True, timeout=600)
  return workdir


def _start_and_stop_after_step_8(workdir, env, log, sig) -> subprocess.Popen:
  with open(log, "w") as output:  # a file: an unread pipe would block the run
    process = subprocess.Popen(cli(workdir, *KILL_OVERRIDES), env=env, stdout=output,
                               stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while not (workdir / "checkpoints" / "8").is_dir() and process.poll() is None:
    assert time.time() < deadline, "no checkpoint at step 8"
    time.sleep(0.02)
  process.send_signal(sig)
  process.wait(timeout=600)
  return process


def _assert_resumes_to_the_uninterrupted_run(workdir, uninterrupted, env, resumed_from):
  result = subprocess.run(cli(workdir, *KILL_OVERRIDES), env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {resumed_from}" in result.stdout + result.stderr
  rows = [row for row in read_metrics(workdir) if "loss" in row]
  reference_rows = [row for row in read_metrics(uninterrupted) if "loss" in row]
  assert [row["step"] for row in rows] == list(range(1, 61))  # no step twice, none missing
  for row, reference_row in zip(rows, reference_rows):
    row.pop("steps_per_second"), reference_row.pop("steps_per_second")
    assert row == reference_row
  resumed, straight = _restored_items(workdir, 60), _restored_items(uninterrupted, 60)
  assert resumed["data_position"] == straight["data_position"]
  import jax
  assert sorted(resumed) == sorted(straight)
  for name in sorted(set(resumed) - {"data_position"}):
    for a, b in zip(jax.tree.leaves(resumed[name]), jax.tree.leaves(straight[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  assert sorted(os.listdir(workdir / "checkpoints" / "60")) == sorted(
      os.listdir(uninterrupted / "checkpoints" / "60"))


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_the_same_command_resumes_exactly(
    tmp_path, demo_cache, uninterrupted):
  env = cli_env(tmp_path, demo_cache)
  killed = tmp_path / "killed"
  process = _start_and_stop_after_step_8(killed, env, tmp_path / "killed.log", signal.SIGKILL)
  assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  steps = [int(name) for name in os.listdir(killed / "checkpoints") if name.isdigit()]
  resumed_from = max(steps)
  assert 8 <= resumed_from < 60
  _assert_resumes_to_the_uninterrupted_run(killed, uninterrupted, env, resumed_from)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_143_and_resumes_exactly(
    tmp_path, demo_cache, uninterrupted):
  env = cli_env(tmp_path, demo_cache)
  workdir = tmp_path / "preempted"
  process = _start_and_stop_after_step_8(workdir, env, tmp_path / "term.log", signal.SIGTERM)
  log = (tmp_path / "term.log").read_text()
  assert process.returncode == 143, log[-3000:]
  last_step = max(row["step"] for row in read_metrics(workdir) if "loss" in row)
  steps = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
  assert max(steps) == last_step and 8 <= last_step < 60
  assert f"saved a checkpoint at step {last_step}" in log
  _assert_resumes_to_the_uninterrupted_run(workdir, uninterrupted, env, last_step)


@pytest.mark.slow
def test_a_nonfinite_loss_stops_the_cli_with_the_step_and_metric(tmp_path, demo_cache):
  result = subprocess.run(
      cli(tmp_path / "w", "--config.total_steps=6", "--config.eval_every=0",
          "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
          "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1"),
      env=cli_env(tmp_path, demo_cache), capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-2000:]
  assert re.search(r"stopped: step \d+: (loss|grad_norm|[\w/]+) is (nan|inf)", result.stderr)
  assert not (tmp_path / "w" / "checkpoints" / "6").exists()

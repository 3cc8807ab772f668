"""A pod on one machine (launch/local.py): the driver as N processes trains as one process does,
writes its files once, and stops and resumes together."""

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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import local  # noqa: E402  (launch/local.py)
from run_helpers import pid_of_process  # noqa: E402

from dro_jax import distributed  # noqa: E402

STEPS = 6
RECIPES = {"dro": "configs/dro.py:size=tiny",  # DRO-V: policy, value and both optimizers
           "tr_dpo": "configs/dpo.py:size=tiny,tr=soft,alpha=0.5,sync_every=2"}  # a moving reference
OVERRIDES = ("--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
             "--config.batch_size=16", "--config.eval_every=0", "--config.log_every=1")
ITEMS = ("policy", "policy_opt", "value", "value_opt", "reference", "rng_step")


def _env(tmp_path, demo_cache) -> dict[str, str]:
  return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)),
          "TF_CPP_MIN_LOG_LEVEL": "3", "DRO_JAX_CACHE": demo_cache,
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "pod_jax_cache"),
          "PYTHONPATH": str(ROOT)}


def _launch(workdir, recipe: str, processes: int, devices: int, env, *extra: str,
            wait: bool = True):
  argv = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", str(processes),
          "--devices_per_process", str(devices), "--grace_s", "30", "--",
          "--config", str(ROOT / RECIPES[recipe]), "--workdir", str(workdir), *OVERRIDES, *extra]
  process = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  if not wait:
    return process
  output = process.communicate(timeout=900)[0]
  return process.returncode, output


def _restored(workdir, step: int):
  """(the state at `step` on this process's first device, whatever mesh saved it, its data
  position)."""
  import jax
  from dro_jax import checkpoint_manager, partitioning, policies, step as step_lib, train
  config = policies.read_run_config(str(workdir))
  model_config = step_lib.t5_config(config)
  mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with_reference = os.path.isdir(os.path.join(workdir, "checkpoints", str(step), "reference"))
  abstract, shardings = train.state_layout(config, model_config, mesh,
                                           partitioning.rules_from_config(config),
                                           with_reference=with_reference)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
  checkpointer = checkpoint_manager.Checkpointer(str(workdir))
  try:
    return checkpointer.restore(step, like)
  finally:
    checkpointer.close()


def _assert_same_state(a, b, step: int, *, exact: bool) -> None:
  import jax
  (first, first_position), (second, second_position) = _restored(a, step), _restored(b, step)
  # The same batches consumed of the same global order; the position also records how many
  # processes read them ("memory" for one, "memory_global" for several: one stream).
  for position in (first_position, second_position):
    assert position.pop("order") in ("memory", "memory_global")
    position.pop("process_count")
  assert first_position == second_position and first_position["batches_consumed"] == step
  left = jax.tree_util.tree_flatten_with_path(first)[0]
  right = jax.tree_util.tree_flatten_with_path(second)[0]
  assert [path for path, _ in left] == [path for path, _ in right]
  assert any("value" in jax.tree_util.keystr(path) for path, _ in left) or any(
      "reference" in jax.tree_util.keystr(path) for path, _ in left)
  for (path, x), (_, y) in zip(left, right):
    label = jax.tree_util.keystr(path)
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=label)
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6, err_msg=label)


@pytest.fixture(scope="module")
def pod_runs(tmp_path_factory, demo_cache):
  """Each recipe as 1 process x 8 devices and as 2 processes x 4 devices, STEPS steps."""
  tmp_path = tmp_path_factory.mktemp("pod")
  env = _env(tmp_path, demo_cache)
  runs = {}
  for recipe in RECIPES:
    for processes, devices in ((1, 8), (2, 4)):
      workdir = tmp_path / f"{recipe}_{processes}x{devices}"
      code, output = _launch(workdir, recipe, processes, devices, env,
                             f"--config.total_steps={STEPS}", f"--config.checkpoint_every={STEPS}")
      assert code == 0, output[-4000:]
      runs[recipe, processes] = (workdir, output)
  return runs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_end_with_the_state_of_one(pod_runs, recipe):
  one, _ = pod_runs[recipe, 1]
  two, output = pod_runs[recipe, 2]
  assert "[p0]" in output and "[p1]" in output and "exit statuses: p0 0, p1 0" in output
  # The same global batch, split 8 ways either way: every reduction runs in the same order over
  # the same 8 device shards, so the states agree to the bit.
  _assert_same_state(one, two, STEPS, exact=True)
  # Process 0 alone writes the run's files: one row per logged step, one TensorBoard file.
  rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  steps = [row["step"] for row in rows if "loss" in row]
  assert steps == list(range(1, STEPS + 1))
  assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
  assert json.loads((two / "config.json").read_text())["total_steps"] == STEPS
  leftovers = [p for p in two.rglob("*") if ".tmp" in p.name]
  assert not leftovers


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_after_a_sigkill_the_relaunch_resumes_exactly(
    pod_runs, tmp_path, demo_cache):
  """A preemption notice to one process: both save one step and exit 143. A process killed
  outright: the other stops within 60 s, and nothing complete is lost. The relaunch ends as the
  uninterrupted run does."""
  uninterrupted, _ = pod_runs["dro", 2]
  env = _env(tmp_path, demo_cache)
  workdir = tmp_path / "preempted"
  launcher = _launch(workdir, "dro", 2, 4, env, f"--config.total_steps={STEPS}",
                     f"--config.checkpoint_every={STEPS}", wait=False)
  victim = pid_of_process(launcher, 1)
  lines = []
  # The preemption notice reaches process 1 alone, as training is about to start (the last
  # line before the steps: a signal after the first step's output could come after step STEPS):
  # the processes agree on the next check, a training step, and both save it.
  for line in launcher.stdout:
    lines.append(line)
    if "reference cache: train" in line:
      os.kill(victim, signal.SIGTERM)
      break
  output = "".join(lines) + launcher.communicate(timeout=300)[0]
  assert launcher.returncode == 143, output[-4000:]
  assert "exit statuses: p0 143, p1 143" in output
  saved = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
  stopped_at = max(saved)
  assert 1 <= stopped_at
  assert output.count(f"saved a checkpoint at step {stopped_at}") == 2  # both, the same step
  assert stopped_at < STEPS, f"the run reached step {stopped_at} before stopping"
  # The same launch again, and process 1 killed outright (SIGKILL: no notice, no save) as it
  # resumes: process 0, left alone in a collective, stops with an error on its own within 60 s
  # (the distributed service misses process 1's heartbeats), not after the launcher's grace.
  env[distributed.HEARTBEAT_ENV] = "10"
  launcher = _launch(workdir, "dro", 2, 4, env, f"--config.total_steps={STEPS}",
                     f"--config.checkpoint_every={STEPS}", wait=False)
  victim = pid_of_process(launcher, 1)
  lines, killed = [], None
  for line in launcher.stdout:
    lines.append(line)
    if f"resumed from step {stopped_at}" in line:
      os.kill(victim, signal.SIGKILL)
      killed = time.monotonic()
      break
  output = "".join(lines) + launcher.communicate(timeout=300)[0]
  assert killed is not None and time.monotonic() - killed < 60, output[-3000:]
  statuses = re.search(r"exit statuses: p0 (\d+), p1 (\d+)", output)
  assert statuses and statuses.group(2) == "137" and statuses.group(1) != "0", output[-3000:]
  assert "still runs" not in output  # process 0 stopped by itself
  assert max(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()) \
      == stopped_at
  # The same launch, to the uninterrupted run's length, from the last complete checkpoint:
  # equal to the uninterrupted run, bit for bit.
  del env[distributed.HEARTBEAT_ENV]
  code, resumed = _launch(workdir, "dro", 2, 4, env, f"--config.total_steps={STEPS}",
                          f"--config.checkpoint_every={STEPS}")
  assert code == 0, resumed[-4000:]
  assert f"resumed from step {stopped_at}" in resumed
  _assert_same_state(uninterrupted, workdir, STEPS, exact=True)


def test_the_launcher_sets_each_process_and_streams_with_prefixes(tmp_path):
  script = tmp_path / "show.py"
  script.write_text("import os, sys\n"
                    "print(os.environ['DRO_JAX_PROCESS_ID'], os.environ['DRO_JAX_NUM_PROCESSES'],"
                    " os.environ['DRO_JAX_COORDINATOR_ADDRESS'].split(':')[0], "
                    "os.environ['XLA_FLAGS'])\n"
                    "sys.exit(int(os.environ['DRO_JAX_PROCESS_ID']) * 3)\n")
  result = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "3",
                           "--devices_per_process", "4", "--", str(script)],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 6  # the worst exit status
  for index in range(3):
    assert (f"[p{index}] {index} 3 127.0.0.1 --xla_force_host_platform_device_count=4"
            in result.stdout)
  assert "exit statuses: p0 0, p1 3, p2 6" in result.stdout
  assert local.exit_status(-signal.SIGTERM) == 143


def test_the_launcher_forwards_sigterm_to_every_process(tmp_path):
  script = tmp_path / "wait.py"
  script.write_text("import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
                    "print('ready', flush=True)\n"
                    "time.sleep(60)\n")
  launcher = subprocess.Popen([sys.executable, str(ROOT / "launch" / "local.py"), "--processes",
                               "2", "--", str(script)], stdout=subprocess.PIPE, text=True)
  ready = 0
  for line in launcher.stdout:
    ready += "ready" in line
    if ready == 2:
      break
  launcher.send_signal(signal.SIGTERM)
  output = launcher.communicate(timeout=30)[0]
  assert launcher.returncode == 143
  assert "exit statuses: p0 143, p1 143" in output


def test_a_process_that_outlives_a_failed_peer_is_stopped(tmp_path):
  script = tmp_path / "hang.py"
  script.write_text("import os, sys, time\n"
                    "if os.environ['DRO_JAX_PROCESS_ID'] == '0': sys.exit(1)\n"
                    "time.sleep(120)\n")  # a peer stuck in a collective
  start = time.monotonic()
  result = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
                           "--grace_s", "2", "--", str(script)],
                          capture_output=True, text=True, timeout=90)
  assert time.monotonic() - start < 60
  assert result.returncode == 143 and "p1 still runs" in result.stdout


@pytest.mark.slow
def test_evaluate_sample_and_export_as_two_processes_write_once_what_one_process_writes(
    pod_runs, tmp_path, demo_cache):
  """`python -m dro_jax.evaluate / sample / export` as 2 processes x 4 devices (launch/local.py)
  against the same tools in this process (8 devices): one copy of each output, the same bytes."""
  import pod_tools
  from dro_jax import evaluate, export, sample
  workdir, _ = pod_runs["dro", 2]
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Reply to: cat\nReply to: two dogs\nReply to: a red fox and a hen\n")
  env = _env(tmp_path, demo_cache)
  env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
  two = tmp_path / "two"
  result = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
       "--devices_per_process", "4", "--", str(ROOT / "tests" / "pod_tools.py"), str(workdir),
       str(prompts), str(two)], env=env, cwd=str(ROOT), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stdout[-4000:]
  # Process 0 alone reports each tool's outputs.
  for line in ("win_rate ", "wrote 9 responses (3 prompts x 3 samples)", "wrote "
               f"{two / 'hf'}/config.json"):
    assert f"[p0] {line}" in result.stdout and f"[p1] {line}" not in result.stdout, line
  one = tmp_path / "one"
  arguments = pod_tools.tool_arguments(str(workdir), str(prompts), str(one))
  evaluate.main(arguments["evaluate"])
  sample.main(arguments["sample"])
  export.main(arguments["export"])
  written = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
  assert written == sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
  assert "evaluation/evaluation.json" in written and "hf/model.safetensors" in written
  for name in written:  # win rates, samples, exported weights: the same bytes
    assert (two / name).read_bytes() == (one / name).read_bytes(), name

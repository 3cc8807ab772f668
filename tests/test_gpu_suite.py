"""The GPU suite (benchmarks/gpu_suite.py) runs end to end on the tiny T5 on CPU, in an
environment where TensorFlow and seqio cannot be imported (the GPU machine has neither); its CPU
rehearsal keeps the phases of a row killed mid-compile and plans by its estimates; the dro_jax
and PyTorch steps compute the same loss on the same weights; its FLOP count reproduces the
reference number."""

import copy
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import suite_common  # noqa: E402

# A `sitecustomize` that hides TensorFlow, seqio and the TensorFlow-backed dro_jax.data modules
# from the suite's process and every worker it starts (PYTHONPATH is inherited): every import
# finder answers "not found" for them, so `import tensorflow` fails and find_spec returns None,
# exactly as on a machine without them.
BLOCKER = textwrap.dedent('''
    import sys

    BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio")
    ALLOWED_DATA = ("dro_jax.data", "dro_jax.data.records")


    def hidden(name):
      return name.split(".")[0] in BLOCKED or (
          name.startswith("dro_jax.data.") and name not in ALLOWED_DATA)


    class _Hide:
      def __init__(self, finder):
        self._finder = finder

      def find_spec(self, name, path=None, target=None):
        if hidden(name):
          return None
        find_spec = getattr(self._finder, "find_spec", None)
        return None if find_spec is None else find_spec(name, path, target)

      def __getattr__(self, attribute):
        return getattr(self._finder, attribute)


    sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
''')


def _blocked_environment(tmp_path: pathlib.Path) -> dict[str, str]:
  site = tmp_path / "blocker"
  site.mkdir()
  (site / "sitecustomize.py").write_text(BLOCKER)
  environment = dict(os.environ)
  environment["PYTHONPATH"] = os.pathsep.join(
      [str(site), str(ROOT)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep)
                                if p])
  environment["JAX_PLATFORMS"] = "cpu"
  environment["CUDA_VISIBLE_DEVICES"] = ""
  # One CPU device per process, as on the GPU machine (the tests' conftest asks for eight).
  environment["XLA_FLAGS"] = " ".join(
      flag for flag in environment.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in flag)
  environment.pop("JAX_COMPILATION_CACHE_DIR", None)
  return environment


def test_flop_count_reproduces_dpo_large():
  assert suite_common.check_reference_count() == pytest.approx(78.43, abs=0.01)
  one_encoder = suite_common.step_flops(suite_common.T5_1_1_LARGE, "dpo", 16, 512, 256,
                                        encoder_per_response=False) / 1e12
  assert one_encoder == pytest.approx(56.58, abs=0.01)


def test_the_blocker_blocks(tmp_path):
  environment = _blocked_environment(tmp_path)
  for module in ("tensorflow", "seqio", "dro_jax.data.pipeline"):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], env=environment,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "No module named" in result.stderr, (
        module, result.stderr[-500:])
  found = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                          "print(u.find_spec('tensorflow'), u.find_spec('seqio'))"],
                         env=environment, capture_output=True, text=True, cwd=ROOT)
  assert found.stdout.split() == ["None", "None"], found.stdout + found.stderr


def _finite_numbers(value, where=""):
  if isinstance(value, dict):
    for key, item in value.items():
      yield from _finite_numbers(item, f"{where}/{key}")
  elif isinstance(value, list):
    for index, item in enumerate(value):
      yield from _finite_numbers(item, f"{where}[{index}]")
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    yield where, math.isfinite(value)
  elif isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
    yield where, False


@pytest.mark.slow
def test_tiny_suite_runs_every_row_without_tensorflow(tmp_path):
  environment = _blocked_environment(tmp_path)
  out = tmp_path / "suite.json"
  log = tmp_path / "suite.log"
  with open(log, "w") as stdout:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(out),
         "--xla_cache", str(tmp_path / "xla")],
        env=environment, stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT, timeout=900)
  output = log.read_text()
  assert result.returncode == 0, output[-3000:]
  assert "No module named" not in output, output[-3000:]
  data = json.loads(out.read_text())
  import gpu_suite  # noqa: E402  (after the subprocess: imports nothing heavy)
  assert sorted(data["rows"]) == sorted(gpu_suite.ROWS)
  assert [entry["row"] for entry in data["meta"]["plan"]] == [row.name for row in gpu_suite.PLAN]
  started = [line.split()[1].rstrip(":") for line in output.splitlines()
             if line.startswith("[suite] ") and line.endswith(" needed)") and "running" in line]
  assert started == [row.name for row in gpu_suite.PLAN]  # run in the plan's order
  for name, row in data["rows"].items():
    assert row["status"] == "ok", (name, row, output[-3000:])
    assert row["phases"]["start"] > 0, (name, row["phases"])
    assert name == "logps_memory" or row["phases"]["steps"] > 0, (name, row["phases"])
    bad = [where for where, finite in _finite_numbers(row) if not finite]
    assert not bad, (name, bad)
  rows = data["rows"]
  for name, row in rows.items():
    if "step_ms" in row:
      assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["executed_tflop"] > 0, name
      assert row["mfu"] > 0, name
  assert rows["dro_jax:dpo:large"]["scan_layers"] and not rows["dro_jax:dpo:base"]["scan_layers"]
  assert not rows["dro_jax:dpo:large:unrolled"]["scan_layers"]
  memory = rows["logps_memory"]
  assert memory["fast_temp_gb"] <= memory["plain_temp_gb"]
  for name in ("dro_jax:sample:greedy", "dro_jax:sample:t1", "torch:generate:greedy",
               "torch:generate:t1"):
    assert rows[name]["decode_steps"] >= 1 and rows[name]["tokens_per_s"] > 0
  assert "dro_jax:dro_v:xl" in output and "MFU" in output


def test_the_rehearsal_keeps_a_killed_rows_phases(tmp_path):
  """The rehearsal (T5.1.1-small shapes on the CPU, no TensorFlow), three rows of the plan: the
  matmul runs and reports each phase as it ends; dro_jax:dpo:large is killed as its compile
  starts and keeps its finished phases; torch:dpo:large's estimate does not fit what is left,
  so it is skipped without starting."""
  import gpu_suite
  environment = _blocked_environment(tmp_path)
  estimates = tmp_path / "estimates.json"
  estimates.write_text(json.dumps({"meta": {"mode": "rehearsal"}, "rows": {
      "matmul": {"status": "ok", "phases": {"start": 4.0, "compile": 1.0}},
      "dro_jax:dpo:large": {"status": "ok", "phases": {"start": 4.0, "init": 5.0}},
      "torch:dpo:large": {"status": "ok", "phases": {"start": 4.0, "steps": 996.0}}}}))
  out = tmp_path / "rehearsal.json"
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--rehearse",
       "--only", "torch:dpo:large,dro_jax:dpo:large,matmul", "--out", str(out),
       "--estimates", str(estimates), "--budget_s", "600",
       "--kill_in", "dro_jax:dpo:large:compile", "--xla_cache", str(tmp_path / "xla")],
      env=environment, capture_output=True, text=True, cwd=ROOT, timeout=300)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  assert "No module named" not in output, output[-3000:]
  # The projected order is the plan's, whatever the order of --only; estimates x MARGIN.
  plan = [line.split()[2] for line in output.splitlines() if re.match(r"\[suite\] +\d+\. ", line)]
  assert plan == ["matmul", "dro_jax:dpo:large", "torch:dpo:large"], output[-3000:]
  assert f"~{1000 * gpu_suite.MARGIN:.1f} s" in output
  for line in ("[matmul] init ", "[matmul] compile ", "[matmul] warm-up ",
               "[matmul] steps: median ", "[dro_jax:dpo:large] init "):
    assert line in output, (line, output[-3000:])
  data = json.loads(out.read_text())
  assert data["meta"]["mode"] == "rehearsal" and data["meta"]["dtype"] == "float32"
  matmul = data["rows"]["matmul"]
  assert matmul["status"] == "ok" and matmul["n"] == 1024 and matmul["tflops_per_s"] > 0
  assert set(matmul["phases"]) == {"start", "init", "compile", "warm-up", "steps"}
  killed = data["rows"]["dro_jax:dpo:large"]
  assert killed["status"] == "killed" and killed["killed_in"] == "compile", killed
  assert set(killed["phases"]) == {"start", "init"} and killed["phases"]["init"] > 0, killed
  assert "step_ms" not in killed
  skipped = data["rows"]["torch:dpo:large"]
  assert skipped["status"] == "skipped" and "budget" in skipped["reason"], skipped
  assert "phases" not in skipped


def test_estimates_scale_the_rehearsals_phases_for_the_device(tmp_path):
  import gpu_suite
  path = tmp_path / "times.json"
  phases = {"start": 2.0, "init": 3.0, "compile": 10.0, "warm-up": 1.0, "steps": 4.0}
  path.write_text(json.dumps({"meta": {"mode": "rehearsal"}, "rows": {
      "dro_jax:dpo:large": {"status": "ok", "phases": phases},
      "torch:dpo:large": {"status": "killed", "phases": {"start": 1.0}}}}))
  device = gpu_suite.load_estimates(str(path), "full")
  scaled = sum(gpu_suite.DEVICE_SCALE[phase] * seconds for phase, seconds in phases.items())
  assert device == {"dro_jax:dpo:large": pytest.approx(gpu_suite.MARGIN * scaled)}
  assert gpu_suite.load_estimates(str(path), "rehearsal") == {
      "dro_jax:dpo:large": pytest.approx(gpu_suite.MARGIN * 20.0)}
  # A device run's own phases plan the next device run unscaled.
  path.write_text(json.dumps({"meta": {"mode": "full"}, "rows": {
      "dro_jax:dpo:large": {"status": "ok", "phases": phases}}}))
  assert gpu_suite.load_estimates(str(path), "full") == {
      "dro_jax:dpo:large": pytest.approx(gpu_suite.MARGIN * 20.0)}
  assert gpu_suite.estimate_of("torch:dpo:large", device, "full") == (
      gpu_suite.DEFAULT_ESTIMATE_S)
  # The committed rehearsal gives every row of the plan an estimate.
  committed = gpu_suite.load_estimates(gpu_suite.ESTIMATES, "full")
  assert sorted(committed) == sorted(gpu_suite.ROWS)


def test_the_two_steps_compute_the_same_loss_on_the_same_weights(tmp_path):
  """The suite's dro_jax and PyTorch DPO / DRO-V steps (tiny T5, float32) on one set of weights:
  the same first loss and mean policy log-prob (the device rows each draw their own weights)."""
  import torch
  import torch_t5

  from dro_jax import checkpoints
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # as the suite's CPU workers: a shared CPU's threads wait on others
  torch.manual_seed(0)
  sizes = suite_common.shapes("base", "tiny")
  model = torch_t5.build_torch_t5("", preset_name=sizes.preset, layers=sizes.layers)
  model.save_pretrained(tmp_path / "hf")
  _, params = checkpoints.load_hf_t5(str(tmp_path / "hf"), dtype="float32")
  results = suite_common.Results(str(tmp_path / "rows.json"))
  try:
    _compare_steps(results, model, params)
  finally:
    torch.set_num_threads(threads)


def _compare_steps(results, model, params):
  import suite_jax
  import suite_torch
  for loss in ("dpo", "dro_v"):
    theirs = suite_torch.train_step(loss, "base", "tiny",
                                    suite_common.Phases(results, f"torch:{loss}"),
                                    dtype="float32", repeats=1, model=copy.deepcopy(model))
    ours = suite_jax.train_step(loss, "base", "tiny",
                                suite_common.Phases(results, f"dro_jax:{loss}"),
                                dtype="float32", remat="none", repeats=1, policy=params)
    assert ours["first_policy_logps"] == pytest.approx(theirs["first_policy_logps"], rel=1e-4)
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-4, abs=1e-5), loss

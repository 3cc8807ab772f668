"""The GPU suite (benchmarks/gpu_suite.py) runs end to end on the tiny T5 on CPU, in an
environment where TensorFlow and seqio cannot be imported (the GPU machine has neither), and
its FLOP count reproduces the reference number."""

import json
import math
import os
import pathlib
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
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(out)],
        env=environment, stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT, timeout=600)
  output = log.read_text()
  assert result.returncode == 0, output[-3000:]
  assert "No module named" not in output, output[-3000:]
  data = json.loads(out.read_text())
  import gpu_suite  # noqa: E402  (after the subprocess: imports nothing heavy)
  assert sorted(data["rows"]) == sorted(gpu_suite.ROWS)
  for name, row in data["rows"].items():
    assert row["status"] == "ok", (name, row, output[-3000:])
    bad = [where for where, finite in _finite_numbers(row) if not finite]
    assert not bad, (name, bad)
  rows = data["rows"]
  for name, row in rows.items():
    if "step_ms" in row:
      assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["executed_tflop"] > 0, name
      assert row["mfu"] > 0, name
  # One set of weights: the first step's mean policy log-prob agrees across frameworks
  # (bfloat16 compute on both sides).
  for loss in ("dpo", "dro_v"):
    for size in ("base", "large"):
      ours = rows[f"dro_jax:{loss}:{size}"]["first_policy_logps"]
      theirs = rows[f"torch:{loss}:{size}"]["first_policy_logps"]
      assert ours == pytest.approx(theirs, rel=1e-2), (loss, size, ours, theirs)
  memory = rows["logps_memory"]
  assert memory["fast_temp_gb"] <= memory["plain_temp_gb"]
  for name in ("dro_jax:sample:greedy", "dro_jax:sample:t1", "torch:generate:greedy",
               "torch:generate:t1"):
    assert rows[name]["decode_steps"] >= 1 and rows[name]["tokens_per_s"] > 0
  assert "dro_jax:dro_v:xl" in output and "MFU" in output

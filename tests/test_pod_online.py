"""The online loop and its judges as N processes on this machine (launch/local.py)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(tmp_path, demo_cache) -> dict[str, str]:
  return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)),
          "TF_CPP_MIN_LOG_LEVEL": "3", "DRO_JAX_CACHE": demo_cache,
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "pod_jax_cache"),
          "PYTHONPATH": str(ROOT)}


def test_process_zero_alone_asks_the_judge_and_every_process_gets_its_verdicts(tmp_path):
  """A judge that answers at random on every call, through judges.on_process_zero, in 2
  processes: the same verdicts to the bit everywhere, asked once (on process 0); a phase file
  written by the online loop's writer is there for every process when the call returns."""
  result = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
                           "--", str(ROOT / "tests" / "pod_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))
  assert result.returncode == 0, result.stdout[-4000:]
  first, second = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
  assert first["processes"] == second["processes"] == 2
  assert first["values"] == second["values"] and len(first["values"]) == 37
  assert len(set(first["values"])) == 37  # a random judge's own draws, not a default
  assert first["calls"] == 37 and second["calls"] == 0
  assert first["queries"] == second["queries"] == 5  # attributes reach the judge itself
  assert first["phase"] == second["phase"] == {"from": 0}


@pytest.mark.slow
def test_the_online_loop_as_two_processes_asks_the_oracle_on_process_zero_alone(
    tmp_path, demo_cache):
  """configs/online.py:size=tiny, 2 iterations, 2 processes, an oracle answering at random on
  every call: process 0 alone asks it, every phase file is written once, and both processes
  train on the same pairs (the run's collectives would part otherwise) and end alike."""
  env = _env(tmp_path, demo_cache)
  env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
  env["RANDOM_ORACLE_LOG"] = str(tmp_path)
  workdir = tmp_path / "online"
  argv = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--",
          "--config", f"{ROOT}/configs/online.py:size=tiny,iterations=2,steps=4,"
          "oracle=random_oracle:make_oracle", "--workdir", str(workdir),
          "--config.online.sft_steps=10", "--config.online.prompts=32",
          "--config.evaluation.prompts=16", "--config.batch_size=16",
          "--config.evaluation.judge=demo"]
  result = subprocess.run(argv, env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-4000:]
  asked = sum(json.loads((workdir / "iterations" / str(k) / "judged.json").read_text())[
      "judge_calls"][kind] for k in (1, 2) for kind in ("tournament", "labelling"))
  assert asked > 0
  assert int((tmp_path / "p0.calls").read_text()) == asked
  assert not (tmp_path / "p1.calls").exists()  # process 1 never asked the oracle
  for k in (1, 2):
    folder = workdir / "iterations" / str(k)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert {"samples.jsonl", "judged.json", "pairs.jsonl", "start.json", "evaluation.json",
            "end.json"} <= set(names), names
    assert not [name for name in names if ".tmp" in name]
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(row["labels"] == "bernoulli" for row in pairs)
  # Both processes printed the same evaluation: their policies agree.
  lines = [line.split("] ", 1)[1] for line in result.stdout.splitlines()
           if "iteration 2: against SFT" in line]
  assert len(lines) == 2 and lines[0] == lines[1]

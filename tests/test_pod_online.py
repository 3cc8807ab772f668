"""The online loop, the demo and the judges as N processes on this machine (launch/local.py)."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from run_helpers import pid_of_process  # noqa: E402


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


ONLINE = ("--config", f"{ROOT}/configs/online.py:size=tiny,iterations=2,steps=4,"
          "oracle=random_oracle:make_oracle", "--config.online.sft_steps=10",
          "--config.online.prompts=32", "--config.evaluation.prompts=16",
          "--config.batch_size=16", "--config.evaluation.judge=demo")


def _launch_online(workdir, env, *, wait: bool = True):
  argv = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--",
          *ONLINE, "--workdir", str(workdir)]
  process = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  if not wait:
    return process
  output = process.communicate(timeout=900)[0]
  return process.returncode, output


def _online_env(tmp_path, demo_cache, log) -> dict[str, str]:
  env = _env(tmp_path, demo_cache)
  env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
  env["RANDOM_ORACLE_LOG"] = str(log)
  log.mkdir(parents=True, exist_ok=True)
  return env


@pytest.fixture(scope="module")
def online_pod(tmp_path_factory, demo_cache):
  """configs/online.py:size=tiny, 2 iterations, as 2 processes, with an oracle that answers
  differently on every call and in every process (tests/random_oracle.py)."""
  tmp_path = tmp_path_factory.mktemp("online_pod")
  env = _online_env(tmp_path, demo_cache, tmp_path / "oracle")
  process = _launch_online(tmp_path / "online", env, wait=False)
  output = process.communicate(timeout=900)[0]
  assert process.returncode == 0, output[-4000:]
  return tmp_path / "online", output, tmp_path / "oracle"


def _judge_calls(workdir) -> list[dict]:
  return [json.loads((workdir / "iterations" / str(k) / "judged.json").read_text())["judge_calls"]
          for k in (1, 2)]


@pytest.mark.slow
def test_the_online_loop_as_two_processes_asks_the_oracle_on_process_zero_alone(online_pod):
  """Process 0 alone asks the oracle, every phase file is written once, and both processes
  train on the same pairs (the run's collectives would part otherwise) and end alike."""
  workdir, output, log = online_pod
  import random_oracle
  asked = sum(calls[kind] for calls in _judge_calls(workdir)
              for kind in ("tournament", "labelling"))
  assert asked > 0
  assert random_oracle.calls(log, 0) == asked
  assert random_oracle.calls(log, 1) == 0  # process 1 never asked the oracle
  for k in (1, 2):
    folder = workdir / "iterations" / str(k)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert {"samples.jsonl", "judged.json", "pairs.jsonl", "start.json", "evaluation.json",
            "end.json"} <= set(names), names
    assert not [name for name in names if ".tmp" in name]
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(row["labels"] == "bernoulli" for row in pairs)
  # Both processes printed the same evaluation: their policies agree.
  lines = [line.split("] ", 1)[1] for line in output.splitlines()
           if "iteration 2: against SFT" in line]
  assert len(lines) == 2 and lines[0] == lines[1]


@pytest.mark.slow
def test_a_sigterm_to_one_process_in_iteration_two_stops_both_and_the_restart_ends_bitwise(
    online_pod, tmp_path, demo_cache):
  """SIGTERM to process 1 as iteration 2's sampling starts: both processes agree on the stop and
  exit 143; the same launch resumes and ends with the uninterrupted run's policy, to the bit,
  with its judge calls, and no comparison asked twice."""
  import random_oracle
  reference, _, reference_log = online_pod
  env = _online_env(tmp_path, demo_cache, tmp_path / "oracle")
  workdir = tmp_path / "online"
  launcher = _launch_online(workdir, env, wait=False)
  victim = pid_of_process(launcher, 1)
  lines, signalled = [], False
  for line in launcher.stdout:
    lines.append(line)
    if "[p0] [online] iteration 1: against SFT" in line:
      os.kill(victim, signal.SIGTERM)
      signalled = True
      break
  output = "".join(lines) + launcher.communicate(timeout=600)[0]
  assert signalled and launcher.returncode == 143, output[-4000:]
  assert "exit statuses: p0 143, p1 143" in output
  assert (workdir / "iterations" / "1" / "end.json").exists()
  assert not (workdir / "iterations" / "2" / "end.json").exists()
  code, resumed = _launch_online(workdir, env)
  assert code == 0, resumed[-4000:]
  assert "[p0] [online] resumed" in resumed
  for k in (1, 2):
    ends = [json.loads((run / "iterations" / str(k) / "end.json").read_text())
            for run in (reference, workdir)]
    assert ends[0]["policy_digest"] == ends[1]["policy_digest"], k
  assert _judge_calls(workdir) == _judge_calls(reference)
  assert random_oracle.calls(tmp_path / "oracle", 0) == random_oracle.calls(reference_log, 0)
  assert random_oracle.calls(tmp_path / "oracle", 1) == 0


@pytest.mark.slow
def test_the_demo_as_two_processes_writes_once_what_one_process_writes(tmp_path, demo_cache):
  """The demo (its samples judged, DRO-V, the final judging) as 2 processes x 1 device, against
  the same demo in this process over a 2-device mesh: the same samples, the same win rates,
  every file written once. (SFT, a training run like the driver's tests', is the one-process
  run's, reused by the demo as a finished stage.)"""
  import shutil

  from dro_jax import configs, demo
  arg = "scale=0.01,methods=dro,workers=2"  # the workers: a pod trains each stage in turn
  config = configs.load("demo", arg)
  config.data.cache_dir = demo_cache
  config.demo.eval_prompts = 48
  config.demo.workers = 1
  config.mesh_shape = (2, 1, 1)
  one, two = tmp_path / "one", tmp_path / "two"
  expected = demo.run(config, str(one))
  shutil.copytree(one / "sft", two / "sft")
  result = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--",
       "--config", f"{ROOT}/configs/demo.py:{arg}", "--workdir", str(two),
       "--config.demo.eval_prompts=48"], env=_env(tmp_path, demo_cache), cwd=str(ROOT),
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:]
  got = json.loads((two / "results.json").read_text())
  assert set(got) == set(expected) == {"dro"}
  for key, value in expected["dro"].items():
    if isinstance(value, float):
      assert abs(got["dro"][key] - value) <= 1e-6, key
    else:
      assert got["dro"][key] == value, key
  for name in ("samples/triples.jsonl", "samples/pairs.jsonl"):
    assert (two / name).read_bytes() == (one / name).read_bytes(), name
  assert not [p for p in two.rglob("*") if ".tmp" in p.name]
  assert (two / "log.txt").is_file() and (two / "log.p1.txt").is_file()
  assert result.stdout.count("[demo] results in") == 2  # each process says where they are
  assert (two / "results.md").is_file() and (two / "dro" / "evaluation.json").is_file()

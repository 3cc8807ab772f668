"""The embedded demo at reduced size: DRO-V beats SFT from the judge's feedback, a negated
judge makes it lose, a killed demo resumes to the same table, and the notebook runs."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dro_jax import configs, demo

import run_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Reduced: SFT 450 steps, 300 feedback prompts x 4 samples, 120 DRO-V steps, 120 eval prompts.
ARG = "scale=0.3,methods=dro"


def demo_config(demo_cache: str, arg: str = ARG):
  config = configs.load("demo", arg)
  config.data.cache_dir = demo_cache
  return config


def with_sft(tmp_path, demo_sft) -> pathlib.Path:
  workdir = tmp_path / "demo"
  shutil.copytree(demo_sft, workdir / "sft")
  return workdir


def cli_env(tmp_path, demo_cache: str) -> dict[str, str]:
  return run_helpers.cli_env(tmp_path, demo_cache, "demo_jax_cache")


@pytest.fixture(scope="session")
def demo_results(tmp_path_factory, demo_sft, demo_cache):
  """The reduced demo through the CLI, uninterrupted (the killed run is compared with it)."""
  tmp_path = tmp_path_factory.mktemp("demo_run")
  workdir = with_sft(tmp_path, demo_sft)
  result = subprocess.run(_cli(workdir), env=cli_env(tmp_path, demo_cache), capture_output=True,
                          text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[demo] sft: done already" in result.stdout
  return workdir, json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_dro_v_beats_sft_on_held_out_prompts(demo_results):
  workdir, results = demo_results
  dro = results["dro"]
  assert dro["policy_reward"] > dro["baseline_reward"]
  assert dro["win_rate_low"] > 0.5, dro
  text = (workdir / "results.md").read_text()
  assert "| DRO-V |" in text and (workdir / "results.png").stat().st_size > 1000
  curve = demo.curves(str(workdir / "dro"))
  assert len(curve["step"]) >= 2 and curve["win_rate"][-1] > 0.5


@pytest.mark.slow
def test_the_readme_evaluate_example_runs_on_the_demo_workdirs(demo_results, tmp_path, capsys):
  """README: `python -m dro_jax.evaluate --policy /tmp/demo/dro --baseline /tmp/demo/sft`, with
  no prompts and no judge: the demo's held-out prompts and judge, 400 comparisons."""
  from dro_jax import evaluate
  workdir, _ = demo_results
  report = evaluate.main(["--policy", str(workdir / "dro"), "--baseline", str(workdir / "sft"),
                          "--output", str(tmp_path)])
  first = capsys.readouterr().out.splitlines()[0]
  assert first.startswith("win_rate ") and "(n=400, " in first
  assert report["judge"] == "demo" and report["prompts"] == 400
  assert report["win_rate"] > 0.5 and report["policy_reward"] > report["baseline_reward"]


@pytest.mark.slow
def test_negated_rewards_make_dro_v_lose(tmp_path, demo_sft, demo_cache):
  """The control: the same run with the judge's rewards negated must do worse than SFT, so the
  gain comes from the feedback, not from training on the policy's own samples."""
  workdir = with_sft(tmp_path, demo_sft)
  results = demo.run(demo_config(demo_cache, ARG + ",negate=1"), str(workdir))
  assert results["dro"]["win_rate_high"] < 0.5, results["dro"]
  assert results["dro"]["policy_reward"] < results["dro"]["baseline_reward"]


def _cli(workdir) -> list[str]:
  return [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/demo.py:{ARG}",
          f"--workdir={workdir}"]


@pytest.mark.slow
def test_a_killed_demo_resumes_to_the_same_table(tmp_path, demo_results, demo_sft, demo_cache):
  reference_workdir, _ = demo_results
  workdir = with_sft(tmp_path, demo_sft)
  env = cli_env(tmp_path, demo_cache)
  with open(tmp_path / "first.log", "w") as output:  # a file: an unread pipe would block it
    process = subprocess.Popen(_cli(workdir), env=env, stdout=output, stderr=subprocess.STDOUT)
  deadline = time.time() + 900
  while not (workdir / "dro" / "metrics.jsonl").exists() and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  time.sleep(2)  # well inside the DRO-V stage
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
  assert (workdir / "samples" / "done").exists()

  result = subprocess.run(_cli(workdir), env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[demo] sft: done already" in result.stdout
  assert "[demo] samples: done already" in result.stdout
  assert (workdir / "results.md").read_text() == (reference_workdir / "results.md").read_text()


@pytest.mark.slow
def test_the_notebook_executes(tmp_path, demo_results, demo_cache):
  """On a copy of the reduced demo's workdir: the stages are done, so the notebook runs fast."""
  import nbclient
  import nbformat
  reference_workdir, _ = demo_results
  workdir = tmp_path / "demo"
  shutil.copytree(reference_workdir, workdir)
  notebook = nbformat.read(ROOT / "notebooks" / "dro_demo.ipynb", as_version=4)
  settings = {"DRO_JAX_NOTEBOOK_SCALE": "0.3", "DRO_JAX_NOTEBOOK_METHODS": "dro",
              "DRO_JAX_NOTEBOOK_WORKDIR": str(workdir), "DRO_JAX_CACHE": demo_cache}
  os.environ.update(settings)
  try:
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    for key in settings:
      os.environ.pop(key)
  outputs = "".join(str(output) for cell in notebook.cells for output in cell.get("outputs", []))
  assert "DRO-V" in outputs and "image/png" in outputs
  assert "done already" in outputs  # it reused the finished stages


def test_stages_in_worker_processes_give_the_in_process_results(tmp_path, demo_cache):
  """workers=2 trains the alignment stages at once in spawned processes: the same results as one
  after another in this process (a miniature demo: 30 SFT steps, 8 steps per method)."""
  def miniature(workers: int):
    config = demo_config(demo_cache, f"scale=0.02,methods=dro+kto,workers={workers}")
    config.demo.eval_prompts, config.demo.evaluations = 24, 1
    return config

  parallel = tmp_path / "parallel"
  results = demo.run(miniature(2), str(parallel))
  assert (parallel / "dro" / "stage.log").stat().st_size > 0  # trained in a worker
  assert (parallel / "kto" / "stage.log").stat().st_size > 0
  sequential = tmp_path / "sequential"
  for stage in ("sft", "samples"):
    shutil.copytree(parallel / stage, sequential / stage)
  assert demo.run(miniature(1), str(sequential)) == results
  assert not (sequential / "dro" / "stage.log").exists()


def _processes() -> dict[int, tuple[int, str, str]]:
  """Every live process: {pid: (parent pid, start time, command line)} from /proc."""
  table = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
      command = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
      continue
    fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ..., starttime (the 20th)
    if fields[0] != "Z":
      table[int(entry)] = (int(fields[1]), fields[19], command.decode(errors="replace"))
  return table


def _descendants(pid: int) -> set[tuple[int, str]]:
  """The processes below `pid`, as (pid, start time): a pid alone could be reused."""
  table, found, below = _processes(), set(), [pid]
  while below:
    parent = below.pop()
    for child, (ppid, start, _) in table.items():
      if ppid == parent:
        found.add((child, start))
        below.append(child)
  return found


def _left(spawned: set[tuple[int, str]], workdir) -> list[str]:
  table = _processes()
  return [table[pid][2] for pid, start in spawned if pid in table and table[pid][1] == start] + [
      command for _, _, command in table.values() if str(workdir) in command]


@pytest.mark.slow
def test_a_terminated_demo_leaves_no_worker_and_resumes(tmp_path, demo_cache):
  """SIGTERM to the demo while its alignment stages train in worker processes: the workers save
  their steps and exit with it (143, no orphan, no helper process), and the same command then
  resumes both stages (a miniature demo: 30 SFT steps, 64 per method)."""
  workdir = tmp_path / "demo"
  command = [sys.executable, "-m", "dro_jax.main",
             f"--config={ROOT}/configs/demo.py:scale=0.02,methods=dro+kto,workers=2",
             "--config.demo.align_steps=64", "--config.demo.eval_prompts=24",
             "--config.demo.evaluations=1", f"--workdir={workdir}"]
  env = cli_env(tmp_path, demo_cache)
  stages = [workdir / "dro", workdir / "kto"]
  spawned: set[tuple[int, str]] = set()
  with open(tmp_path / "first.log", "w") as output:
    process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 900
    # Both stages' metrics logs: their training loops start (train.run has built everything).
    while not all((stage / "metrics.jsonl").exists() for stage in stages):
      assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
      assert time.time() < deadline
      spawned |= _descendants(process.pid)
      time.sleep(0.1)
    spawned |= _descendants(process.pid)
    assert len(spawned) >= 2  # the workers (and multiprocessing's resource tracker)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    first = (tmp_path / "first.log").read_text()
    assert process.returncode == 143, first[-3000:]
    assert "the same command resumes them" in first.splitlines()[-1], first[-3000:]
    deadline = time.time() + 30
    while _left(spawned, workdir) and time.time() < deadline:
      time.sleep(0.2)
    assert not _left(spawned, workdir)
  finally:
    if process.poll() is None:
      process.kill()
    table = _processes()
    for pid, start in spawned:  # none, unless an assertion above failed
      if pid in table and table[pid][1] == start:
        os.kill(pid, signal.SIGKILL)

  logged = {stage: (stage / "stage.log").stat().st_size for stage in stages}
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "[demo] sft: done already" in result.stdout
  assert "[demo] samples: done already" in result.stdout
  for stage in stages:  # each stage saved at the step it was at and went on from there
    with open(stage / "stage.log", "rb") as f:
      f.seek(logged[stage])
      assert b"resumed from step" in f.read(), stage

"""launch/tpu.py and launch/gpu.py against fake gcloud, gsutil, ssh and scp that record arguments.

Every command is checked twice: run (the fakes record what they receive) and under --dry_run (the
printed lines, parsed back, equal the recorded commands and no fake is called). The fakes also act:
scp copies into a fake remote home, and with FAKE_EXEC=1 ssh runs the remote command there, so the
detached run, its environment and `stop` are exercised for real. `--help` and the errors run the
scripts as programs under `python -S` (standard library only, no dro_jax needed).
"""

import importlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME, ZONE = "dro-pod", "us-west4-a"
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "alpha", "compute", "tpus", "queued-resources"]
STAGE = "<stage>"

FAKE = r'''#!{python} -S
import json, os, shutil, subprocess, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps([name] + args) + "\n")
home = os.environ["FAKE_HOME"]
if name == "gcloud" and args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  script = next(a for a in args if a.startswith("--command="))[len("--command="):]
elif name == "ssh":
  script = [a for i, a in enumerate(args) if a != "-o" and args[i - 1] != "-o"][-1]
else:
  script = None
if script is not None and os.environ.get("FAKE_EXEC") == "1":
  sys.exit(subprocess.run(["bash", "-c", script], env=dict(os.environ, HOME=home)).returncode)
if name == "scp" or (name == "gcloud" and args[:4] == ["compute", "tpus", "tpu-vm", "scp"]):
  words = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] != "-o"]
  source, dest = words[-2:]
  if ":" in source:  # host:path -> local directory
    shutil.copytree(os.path.join(home, source.split(":", 1)[1].lstrip("/")),
                    os.path.join(dest, os.path.basename(source)))
  else:  # local directory -> host:path, relative to the remote home
    shutil.copytree(source, os.path.join(home, dest.split(":", 1)[1]))
'''


def _load_scripts():
  """launch/tpu.py and launch/gpu.py as modules (they import their neighbour `common`)."""
  sys.path.insert(0, str(ROOT / "launch"))
  try:
    return {"tpu.py": importlib.import_module("tpu"), "gpu.py": importlib.import_module("gpu")}
  finally:
    sys.path.remove(str(ROOT / "launch"))


@pytest.fixture
def fake(tmp_path, monkeypatch, capsys):
  """(call, home): call(script, *args) -> the commands the fakes received; home: the remote home.

  The scripts run in this process (their main(argv)); the fakes are separate processes on PATH.
  """
  scripts = _load_scripts()
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  home.mkdir()
  for tool in ("gcloud", "gsutil", "ssh", "scp"):
    (bin_dir / tool).write_text(FAKE.replace("{python}", sys.executable))
    (bin_dir / tool).chmod(0o755)
  log = tmp_path / "calls.jsonl"
  for key in ("TPU_NAME", "TPU_ZONE", "GPU_HOST", "FAKE_EXEC"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setenv("FAKE_HOME", str(home))

  def stage(words):
    return [re.sub(r"\S*/dro_jax_launch_[^/]+/dro_jax", STAGE, word) for word in words]

  def invoke(script, args, fake_exec):
    log.write_text("")
    monkeypatch.setenv("FAKE_EXEC", fake_exec)
    capsys.readouterr()
    scripts[script].main(list(args))
    calls = [stage(json.loads(line)) for line in log.read_text().splitlines()]
    return capsys.readouterr().out, calls

  def call(script, *args, fake_exec="0"):
    printed, none = invoke(script, [args[0], "--dry_run", *args[1:]], fake_exec)
    assert none == [], "--dry_run called a tool"
    dry = [stage(shlex.split(line)) for line in printed.splitlines()
           if line and not line.startswith("#")]
    _, calls = invoke(script, args, fake_exec)
    assert dry == calls, "--dry_run printed other commands than a run executes"
    return calls

  return call, home


def tpu_ssh(command, worker="all"):
  return TPU_VM + ["ssh", NAME, f"--zone={ZONE}", f"--worker={worker}", f"--command={command}"]


def test_help():
  for script, words in (("tpu.py", ("create", "setup", "run", "logs", "fetch", "delete")),
                        ("gpu.py", ("setup", "run", "logs", "stop", "fetch"))):
    out = subprocess.run([sys.executable, "-S", str(ROOT / "launch" / script), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert all(word in out for word in words)


def test_tpu_create(fake):
  call, _ = fake
  common = ["--name", NAME, "--zone", ZONE, "--accelerator_type", "v5litepod-16"]
  assert call("tpu.py", "create", *common, "--spot") == [TPU_VM + [
      "create", NAME, f"--zone={ZONE}", "--accelerator-type=v5litepod-16",
      "--version=v2-alpha-tpuv5-lite", "--spot"]]
  assert call("tpu.py", "create", *common, "--queued", "--spot", "--valid_until_duration", "6h",
              "--project", "my-project") == [QUEUED + [
      "create", NAME, f"--node-id={NAME}", f"--zone={ZONE}", "--project=my-project",
      "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
      "--valid-until-duration=6h"]]
  assert call("tpu.py", "status", "--name", NAME, "--zone", ZONE, "--queued") == [
      QUEUED + ["describe", NAME, f"--zone={ZONE}"]]


def test_tpu_setup_copies_the_repository_to_all_workers(fake):
  call, home = fake
  calls = call("tpu.py", "setup", "--name", NAME, "--zone", ZONE)
  assert calls[:2] == [tpu_ssh("rm -rf $HOME/dro_jax"),
                       TPU_VM + ["scp", "--recurse", STAGE, f"{NAME}:dro_jax", f"--zone={ZONE}",
                                 "--worker=all"]]
  assert calls[2][:-1] == tpu_ssh("")[:-1] and len(calls) == 3
  assert "pip install -e '.[tpu]'" in calls[2][-1] and "$HOME/dro_jax_venv" in calls[2][-1]
  copy = home / "dro_jax"
  for name in ("setup.py", "configs/dro.py", "dro_jax/main.py", "launch/tpu.py"):
    assert (copy / name).is_file(), name
  assert not (copy / ".venv").exists() and not (copy / ".git").exists()


def _start_and_stop(call, home, script, target, distributed):
  (home / "dro_jax").mkdir(exist_ok=True)
  (home / "dro_jax_venv" / "bin").mkdir(parents=True)
  (home / "dro_jax_venv" / "bin" / "activate").write_text("")
  program = ("import os, time; open('env.txt', 'w').write(' '.join(os.environ.get(k, 'unset') "
             "for k in ('DRO_JAX_DISTRIBUTED', 'EXTRA')) + ' ' + os.getcwd()); "
             "print('training', flush=True); time.sleep(60)")
  calls = call(script, "run", *target, "--env", "EXTRA=a b", "--",
               sys.executable, "-c", program, fake_exec="1")
  env_file, log = home / "dro_jax" / "env.txt", home / "dro_jax_logs" / "run.log"
  for _ in range(100):
    if env_file.exists() and env_file.read_text() and "training" in log.read_text():
      break
    time.sleep(0.05)
  expected = ("1" if distributed else "unset") + f" a b {home / 'dro_jax'}"
  assert env_file.read_text() == expected and log.read_text() == "training\n"
  pid = int((home / "dro_jax_logs" / "run.pid").read_text())
  assert _alive(pid)
  stopped = call(script, "stop", *target, fake_exec="1")
  assert "kill -- -$(cat $HOME/dro_jax_logs/run.pid)" in stopped[0][-1]
  for _ in range(100):
    if not _alive(pid):
      break
    time.sleep(0.05)
  assert not _alive(pid) and not (home / "dro_jax_logs" / "run.pid").exists()
  return calls


def _alive(pid):
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return False
  return state not in ("Z", "X")


def test_tpu_run_on_all_workers_logs_stop(fake):
  call, home = fake
  target = ["--name", NAME, "--zone", ZONE]
  calls = _start_and_stop(call, home, "tpu.py", target, distributed=True)
  assert calls[0][:-1] == tpu_ssh("")[:-1]
  assert call("tpu.py", "logs", *target) == [
      tpu_ssh("tail -n 100 -F $HOME/dro_jax_logs/run.log", worker="0")]
  assert call("tpu.py", "logs", *target, "--worker", "3", "--lines", "5") == [
      tpu_ssh("tail -n 5 -F $HOME/dro_jax_logs/run.log", worker="3")]
  # The driver's command line, as a pod runs it.
  train = ["python", "-m", "dro_jax.main", "--config", "configs/dro.py:size=large",
           "--workdir", "gs://bucket/dro_large"]
  run = call("tpu.py", "run", *target, "--", *train)
  assert run[0][:-1] == tpu_ssh("")[:-1] and shlex.join(train) in run[0][-1]
  no_dist = call("tpu.py", "run", *target, "--no_distributed", "--", *train)
  assert "DRO_JAX_DISTRIBUTED" not in no_dist[0][-1]


def test_fetch_and_delete(fake, tmp_path):
  call, _ = fake
  dest = tmp_path / "local"
  assert call("tpu.py", "fetch", "gs://bucket/dro_large", str(dest)) == [
      ["gcloud", "storage", "cp", "-r", "gs://bucket/dro_large", str(dest)]]
  assert dest.is_dir()
  assert call("tpu.py", "fetch", "gs://bucket/dro_large", str(dest), "--gsutil") == [
      ["gsutil", "-m", "cp", "-r", "gs://bucket/dro_large", str(dest)]]
  assert call("tpu.py", "delete", "--name", NAME, "--zone", ZONE) == [
      TPU_VM + ["delete", NAME, f"--zone={ZONE}", "--quiet"]]
  assert call("tpu.py", "delete", "--name", NAME, "--zone", ZONE, "--queued") == [
      QUEUED + ["delete", NAME, f"--zone={ZONE}", "--quiet", "--force"]]


def test_gpu_host(fake, tmp_path):
  call, home = fake
  target = ["--host", "me@gpu-box", "--ssh_option", "Port=2222"]
  ssh = ["ssh", "-o", "Port=2222", "me@gpu-box"]
  calls = call("gpu.py", "setup", *target)
  assert calls[:2] == [ssh + ["rm -rf $HOME/dro_jax"],
                       ["scp", "-o", "Port=2222", "-r", STAGE, "me@gpu-box:dro_jax"]]
  assert calls[2][:-1] == ssh and "pip install -e '.[gpu]'" in calls[2][-1] and len(calls) == 3
  assert (home / "dro_jax" / "configs" / "dro.py").is_file()
  runs = _start_and_stop(call, home, "gpu.py", target, distributed=False)
  assert runs[0][:-1] == ssh
  assert call("gpu.py", "logs", *target) == [ssh + ["tail -n 100 -F $HOME/dro_jax_logs/run.log"]]
  (home / "runs" / "sft").mkdir(parents=True)
  (home / "runs" / "sft" / "config.json").write_text("{}")
  dest = tmp_path / "fetched"
  assert call("gpu.py", "fetch", *target, "runs/sft", str(dest)) == [
      ["scp", "-o", "Port=2222", "-r", "me@gpu-box:runs/sft", str(dest)]]
  assert (dest / "sft" / "config.json").is_file()
  assert call("gpu.py", "fetch", "gs://bucket/sft", str(dest)) == [
      ["gcloud", "storage", "cp", "-r", "gs://bucket/sft", str(dest)]]


def test_missing_target_fails():
  env = {key: value for key, value in os.environ.items() if key not in ("TPU_NAME", "GPU_HOST")}
  for script, args in (("tpu.py", ["delete", "--zone", ZONE, "--dry_run"]),
                       ("gpu.py", ["stop", "--dry_run"])):
    result = subprocess.run([sys.executable, "-S", str(ROOT / "launch" / script), *args],
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0 and ("--name" in result.stderr or "--host" in result.stderr)


def test_dry_run_after_the_separator_is_refused_and_runs_nothing(tmp_path):
  """`run ... -- COMMAND --dry_run` would pass --dry_run to the remote command and run for real."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.jsonl"
  for tool in ("gcloud", "ssh"):
    (bin_dir / tool).write_text(FAKE.replace("{python}", sys.executable))
    (bin_dir / tool).chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
         "FAKE_LOG": str(log), "FAKE_HOME": str(tmp_path)}
  train = ["python", "-m", "dro_jax.main", "--config", "configs/dro.py", "--workdir", "gs://b/w"]
  for script, target in (("tpu.py", ["--name", NAME, "--zone", ZONE]),
                         ("gpu.py", ["--host", "me@gpu-box"])):
    for words in (["--", "--dry_run", *train], ["--", *train, "--dry_run"]):
      result = subprocess.run([sys.executable, "-S", str(ROOT / "launch" / script), "run",
                               *target, *words], env=env, capture_output=True, text=True)
      assert result.returncode != 0, (script, words)
      assert "--dry_run" in result.stderr and "before `--`" in result.stderr
      assert len((result.stdout + result.stderr).strip().splitlines()) == 1
      assert not log.exists() or not log.read_text(), "a tool ran"

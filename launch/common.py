"""Shared pieces of launch/tpu.py and launch/gpu.py: dry run, repository staging, remote scripts.

Standard library only, so the launch scripts run from any Python 3.9+ without installing dro_jax.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]

# Remote layout, relative to the remote home directory.
REMOTE_DIR = "dro_jax"            # the repository copy
REMOTE_VENV = "dro_jax_venv"      # its virtual environment
REMOTE_LOG = "dro_jax_logs/run.log"
REMOTE_PID = "dro_jax_logs/run.pid"


class Runner:
  """Runs commands, or only prints them (one shell-quoted line each) under --dry_run."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, argv: Sequence[str]) -> None:
    print(("" if self.dry_run else "+ ") + shlex.join(argv), flush=True)
    if not self.dry_run:
      code = subprocess.call(list(argv))
      if code:
        sys.exit(f"command failed with exit status {code}: {shlex.join(argv)}")

  def note(self, text: str) -> None:
    print(f"# {text}", flush=True)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dry_run", action="store_true",
                      help="print the exact commands instead of running them")


def repository_files(repo: pathlib.Path = REPO) -> list[str]:
  """Tracked and untracked-but-not-ignored files (so no .venv, caches or local workdirs)."""
  try:
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True).stdout.decode()
    names = sorted({name for name in out.split("\0") if name})
  except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the usual
    skip = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "dro_jax.egg-info"}
    names = sorted(str(path.relative_to(repo)) for path in repo.rglob("*")
                   if path.is_file() and not skip.intersection(path.relative_to(repo).parts))
  return [name for name in names if (repo / name).is_file()]


def stage_repository(runner: Runner, repo: pathlib.Path = REPO) -> pathlib.Path:
  """Copies the repository's files into a fresh `<tmp>/dro_jax`, removed when the script exits.

  The whole repository goes (configs/ is not installed package data). The copy is made under
  --dry_run too, so the printed copy command names a real directory.
  """
  root = pathlib.Path(tempfile.mkdtemp(prefix="dro_jax_launch_"))
  atexit.register(shutil.rmtree, root, True)
  stage = root / REMOTE_DIR
  names = repository_files(repo)
  for name in names:
    target = stage / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / name, target)
  runner.note(f"staged {len(names)} files of {repo} in {stage} (removed on exit)")
  return stage


def install_script(extra: str, python: str = "python3") -> str:
  """Remote shell: a venv with Python >= 3.11 (through uv when the system's is older), then
  `pip install -e ".[EXTRA]"` of the copied repository; `&&` stops at the first failure. An
  existing venv is kept, so `setup` again after editing the code is quick."""
  venv = f"$HOME/{REMOTE_VENV}"
  return " && ".join([
      f"cd $HOME/{REMOTE_DIR}",
      f"if [ -x {venv}/bin/python ]; then :; "
      f"elif {python} -c 'import sys; sys.exit(sys.version_info < (3, 11))'; "
      f"then {python} -m venv {venv}; "
      f"else {python} -m pip install --user --quiet uv && "
      f"$HOME/.local/bin/uv venv --seed --python 3.11 {venv}; fi",
      f"{venv}/bin/python -m pip install --quiet --upgrade pip",
      f"{venv}/bin/python -m pip install -e {shlex.quote(f'.[{extra}]')}",
      f"{venv}/bin/python -c 'import dro_jax, jax; print(\"dro_jax, jax\", jax.__version__)'",
  ])


def parse_env(items: Sequence[str]) -> dict[str, str]:
  """`--env KEY=VALUE` flags -> {KEY: VALUE}."""
  env = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
      sys.exit(f"run: --env {item!r} is not KEY=VALUE")
    env[key] = value
  return env


def remote_command(words: Sequence[str]) -> list[str]:
  """The REMAINDER after `run`, without its leading `--`. A --dry_run among it is refused: it
  was meant for the launcher, and passed on it would let the command run for real."""
  command = list(words[1:] if words[:1] == ["--"] else words)
  if any(word == "--dry_run" or word.startswith("--dry_run=") for word in command):
    sys.exit("run: --dry_run after `--` belongs to the remote command, so nothing would be a dry "
             "run; put it before `--` (run --dry_run ... -- COMMAND)")
  return command


def run_script(command: Sequence[str], env: dict[str, str]) -> str:
  """Remote shell: the command in the repository with the venv active, detached from the ssh
  session (it survives a dropped connection) into REMOTE_LOG; its process group id to REMOTE_PID."""
  if not command:
    sys.exit("run: give the command after `--`, e.g. "
             "-- python -m dro_jax.main --config configs/dro.py:size=large --workdir gs://b/w")
  # One argument is a shell line as written (`"a && b"`); several are quoted word by word.
  line = command[0] if len(command) == 1 else shlex.join(command)
  inner = " && ".join(
      [f"source $HOME/{REMOTE_VENV}/bin/activate", f"cd $HOME/{REMOTE_DIR}"]
      + [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
      + [line])
  log, pid = f"$HOME/{REMOTE_LOG}", f"$HOME/{REMOTE_PID}"
  return (f"mkdir -p $HOME/{pathlib.PurePosixPath(REMOTE_LOG).parent} && "
          f"{{ setsid nohup bash -c {shlex.quote(inner)} > {log} 2>&1 < /dev/null & "
          f"echo $! > {pid}; }} && echo \"started $(cat {pid}) on $(hostname), log {log}\"")


def logs_script(lines: int) -> str:
  return f"tail -n {int(lines)} -F $HOME/{REMOTE_LOG}"


def stop_script() -> str:
  """Remote shell: ends the process group that `run` started (and only that)."""
  pid = f"$HOME/{REMOTE_PID}"
  return (f"if [ -f {pid} ]; then kill -- -$(cat {pid}) 2>/dev/null "
          f"&& echo \"stopped $(cat {pid}) on $(hostname)\" || echo 'not running'; rm -f {pid}; "
          f"else echo 'no run started'; fi")


def fetch_commands(source: str, dest: str, use_gsutil: bool) -> list[list[str]]:
  """Copy a gs:// workdir into the local directory DEST (it lands as DEST/<basename>)."""
  if not source.startswith("gs://"):
    sys.exit(f"fetch: {source!r} is not a gs:// path")
  if use_gsutil:
    return [["gsutil", "-m", "cp", "-r", source, dest]]
  return [["gcloud", "storage", "cp", "-r", source, dest]]


def make_dest(dest: str, runner: Runner) -> None:
  if not runner.dry_run:
    os.makedirs(dest, exist_ok=True)

#!/usr/bin/env python3
"""dro_jax on one GPU host through ssh and scp.

  launch/gpu.py setup --host USER@HOST      # copy the repository to ~/dro_jax, install .[gpu]
  launch/gpu.py run   --host USER@HOST -- python -m dro_jax.main --config ... --workdir DIR
  launch/gpu.py logs  --host USER@HOST [--lines 100]
  launch/gpu.py stop  --host USER@HOST      # ends the run started by `run`
  launch/gpu.py fetch [--host USER@HOST] WORKDIR LOCAL_DIR [--gsutil]
                      # WORKDIR gs://... (gcloud storage) or a path on the host (scp)

Every subcommand takes --dry_run (print the exact commands, run nothing) and --ssh_option
(repeatable, passed to ssh and scp as `-o OPTION`). --host defaults to $GPU_HOST; a Host alias
of ~/.ssh/config (user, port, key) works too.

`setup` copies the repository's files (git's tracked and untracked-not-ignored ones) to
~/dro_jax and installs it with `pip install -e ".[gpu]"` (jax[cuda12]) into ~/dro_jax_venv
(Python 3.11 through uv when the host's python3 is older). `run` starts the command detached,
logging to ~/dro_jax_logs/run.log; one host is one process, so no jax.distributed. Workdirs may be
local to the host or gs:// (the driver writes to GCS itself, given credentials on the host).
"""

from __future__ import annotations

import argparse
import os
import sys

import common


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/gpu.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

  def add(name: str, help_text: str, host_required: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    common.add_common_flags(p)
    p.add_argument("--host", default=os.environ.get("GPU_HOST"),
                   help="ssh destination, USER@HOST or a ~/.ssh/config alias; default $GPU_HOST"
                   + ("" if host_required else " (only for a WORKDIR on the host)"))
    p.add_argument("--ssh_option", action="append", default=[], metavar="OPTION",
                   help="`-o OPTION` for ssh and scp (repeatable)")
    return p

  p = add("setup", "copy the repository to the host and pip install -e '.[gpu]'")
  p.add_argument("--python", default="python3", help="remote interpreter that makes the venv")

  p = add("run", "start a command on the host, detached (command after --)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="extra environment for the command (repeatable)")
  p.add_argument("remote", nargs=argparse.REMAINDER, help="-- COMMAND ...")

  p = add("logs", "stream the run log (Ctrl-C stops following, not the run)")
  p.add_argument("--lines", type=int, default=100, help="lines of history first")

  add("stop", "end the run started by `run`")

  p = add("fetch", "copy a workdir (gs://, or a path on the host) into a local directory",
          host_required=False)
  p.add_argument("source", help="gs://bucket/workdir or a workdir path on the host")
  p.add_argument("dest", help="local directory; the workdir lands in DEST/<basename>")
  p.add_argument("--gsutil", action="store_true", help="gsutil -m cp -r instead of gcloud storage")
  return parser


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  runner = common.Runner(args.dry_run)
  options = [flag for option in args.ssh_option for flag in ("-o", option)]

  if args.command == "fetch" and args.source.startswith("gs://"):
    common.make_dest(args.dest, runner)
    for command in common.fetch_commands(args.source, args.dest, args.gsutil):
      runner(command)
    return
  if not args.host:
    sys.exit(f"{args.command}: give --host (or set $GPU_HOST)")

  def ssh(script: str) -> None:
    runner(["ssh", *options, args.host, script])

  if args.command == "setup":
    stage = common.stage_repository(runner)
    ssh(f"rm -rf $HOME/{common.REMOTE_DIR}")
    runner(["scp", *options, "-r", str(stage), f"{args.host}:{common.REMOTE_DIR}"])
    ssh(common.install_script("gpu", args.python))
  elif args.command == "run":
    env = common.parse_env(args.env)
    ssh(common.run_script(common.remote_command(args.remote), env))
  elif args.command == "logs":
    ssh(common.logs_script(args.lines))
  elif args.command == "stop":
    ssh(common.stop_script())
  elif args.command == "fetch":
    common.make_dest(args.dest, runner)
    runner(["scp", *options, "-r", f"{args.host}:{args.source}", args.dest])


if __name__ == "__main__":
  main()

#!/usr/bin/env python3
"""dro_jax on Cloud TPU VMs (single host or pod) through gcloud.

  launch/tpu.py create  --name N --zone Z --accelerator_type v5litepod-16 [--version V]
                        [--spot | --preemptible] [--queued [--valid_until_duration 6h]]
  launch/tpu.py status  --name N --zone Z [--queued]
  launch/tpu.py setup   --name N --zone Z     # copy the repository to every worker, install .[tpu]
  launch/tpu.py run     --name N --zone Z -- python -m dro_jax.main --config ... --workdir gs://...
  launch/tpu.py logs    --name N --zone Z [--worker 0] [--lines 100]
  launch/tpu.py stop    --name N --zone Z     # ends the run started by `run` on every worker
  launch/tpu.py fetch   gs://bucket/workdir LOCAL_DIR [--gsutil]
  launch/tpu.py delete  --name N --zone Z [--queued]

Every subcommand takes --dry_run (print the exact commands, run nothing) and --project.
--name and --zone default to $TPU_NAME and $TPU_ZONE.

`setup` copies the repository's files (git's tracked and untracked-not-ignored ones; configs/ is
not installed package data, so the whole repository goes) to ~/dro_jax on all workers and
installs it with `pip install -e ".[tpu]"` into ~/dro_jax_venv (Python 3.11 through uv when the
image's python3 is older). `run` starts the same command on all workers (`--worker=all`),
detached, logging to ~/dro_jax_logs/run.log, with DRO_JAX_DISTRIBUTED=1 so that
dro_jax.main calls jax.distributed.initialize() (TPU VMs set none of the coordinator variables it
looks for; JAX then finds the pod's topology itself). Workdirs should be gs:// paths: every worker
writes to the same place, and the VM's service account needs write access to the bucket.
"""

from __future__ import annotations

import argparse
import os
import sys

import common

DEFAULT_VERSION = "v2-alpha-tpuv5-lite"  # the v5e (v5litepod-*) runtime


def _target_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--name", default=os.environ.get("TPU_NAME"),
                      help="TPU VM (and queued resource) name; default $TPU_NAME")
  parser.add_argument("--zone", default=os.environ.get("TPU_ZONE"),
                      help="e.g. us-west4-a; default $TPU_ZONE")
  parser.add_argument("--project", default=None, help="gcloud project (default: gcloud's own)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/tpu.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

  def add(name: str, help_text: str, target: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    common.add_common_flags(p)
    if target:
      _target_flags(p)
    return p

  p = add("create", "create a TPU VM, directly or as a queued resource")
  p.add_argument("--accelerator_type", required=True, help="e.g. v5litepod-16 (v5e 4x4)")
  p.add_argument("--version", default=DEFAULT_VERSION, help=f"runtime (default {DEFAULT_VERSION})")
  kind = p.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="spot capacity")
  kind.add_argument("--preemptible", action="store_true", help="preemptible (tpu-vm create only)")
  p.add_argument("--queued", action="store_true",
                 help="create through `queued-resources` (waits for capacity)")
  p.add_argument("--valid_until_duration", default=None,
                 help="queued only: give up if not provisioned within this long, e.g. 6h")
  p.add_argument("--reserved", action="store_true", help="queued only: use a reservation")

  p = add("status", "describe the TPU VM (or the queued resource)")
  p.add_argument("--queued", action="store_true")

  p = add("setup", "copy the repository to every worker and pip install -e '.[tpu]'")
  p.add_argument("--python", default="python3", help="remote interpreter that makes the venv")

  p = add("run", "start the same command on every worker, detached (command after --)")
  p.add_argument("--no_distributed", action="store_true",
                 help="do not set DRO_JAX_DISTRIBUTED=1 (no jax.distributed.initialize())")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="extra environment for the command (repeatable)")
  p.add_argument("remote", nargs=argparse.REMAINDER, help="-- COMMAND ...")

  p = add("logs", "stream a worker's run log (Ctrl-C stops following, not the run)")
  p.add_argument("--worker", default="0", help="worker index (default 0)")
  p.add_argument("--lines", type=int, default=100, help="lines of history first")

  add("stop", "end the run started by `run`, on every worker")

  p = add("fetch", "copy a gs:// workdir into a local directory", target=False)
  p.add_argument("source", help="gs://bucket/workdir")
  p.add_argument("dest", help="local directory; the workdir lands in DEST/<basename>")
  p.add_argument("--gsutil", action="store_true", help="gsutil -m cp -r instead of gcloud storage")

  p = add("delete", "delete the TPU VM (with --queued: the queued resource and its VM)")
  p.add_argument("--queued", action="store_true")
  return parser


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  runner = common.Runner(args.dry_run)

  if args.command == "fetch":
    common.make_dest(args.dest, runner)
    for command in common.fetch_commands(args.source, args.dest, args.gsutil):
      runner(command)
    return

  if not args.name or not args.zone:
    sys.exit(f"{args.command}: give --name and --zone (or set $TPU_NAME and $TPU_ZONE)")
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  queued = ["gcloud", "alpha", "compute", "tpus", "queued-resources"]

  def ssh(script: str, worker: str = "all") -> None:
    runner(tpu_vm + ["ssh", args.name, *where, f"--worker={worker}", f"--command={script}"])

  if args.command == "create":
    if args.queued:
      if args.preemptible:
        sys.exit("create: queued resources take --spot, not --preemptible")
      command = queued + ["create", args.name, f"--node-id={args.name}", *where,
                          f"--accelerator-type={args.accelerator_type}",
                          f"--runtime-version={args.version}"]
      command += ["--spot"] if args.spot else []
      command += ["--reserved"] if args.reserved else []
      if args.valid_until_duration:
        command.append(f"--valid-until-duration={args.valid_until_duration}")
    else:
      if args.reserved or args.valid_until_duration:
        sys.exit("create: --reserved and --valid_until_duration need --queued")
      command = tpu_vm + ["create", args.name, *where,
                          f"--accelerator-type={args.accelerator_type}",
                          f"--version={args.version}"]
      command += ["--spot"] if args.spot else []
      command += ["--preemptible"] if args.preemptible else []
    runner(command)
  elif args.command == "status":
    runner((queued if args.queued else tpu_vm) + ["describe", args.name, *where])
  elif args.command == "setup":
    stage = common.stage_repository(runner)
    ssh(f"rm -rf $HOME/{common.REMOTE_DIR}")
    runner(tpu_vm + ["scp", "--recurse", str(stage), f"{args.name}:{common.REMOTE_DIR}", *where,
                     "--worker=all"])
    ssh(common.install_script("tpu", args.python))
  elif args.command == "run":
    env = {} if args.no_distributed else {"DRO_JAX_DISTRIBUTED": "1"}
    env.update(common.parse_env(args.env))
    ssh(common.run_script(common.remote_command(args.remote), env))
  elif args.command == "logs":
    ssh(common.logs_script(args.lines), worker=args.worker)
  elif args.command == "stop":
    ssh(common.stop_script())
  elif args.command == "delete":
    if args.queued:
      runner(queued + ["delete", args.name, *where, "--quiet", "--force"])
    else:
      runner(tpu_vm + ["delete", args.name, *where, "--quiet"])


if __name__ == "__main__":
  main()

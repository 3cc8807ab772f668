#!/usr/bin/env python3
"""A pod on one machine: N processes of one dro_jax command, the way a TPU pod runs them.

    python launch/local.py --processes 2 --devices_per_process 4 -- \
        --config configs/dro.py:size=tiny --workdir /tmp/dro_2x4

starts N copies of `python -m dro_jax.main <driver arguments>`, process i with
DRO_JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, DRO_JAX_NUM_PROCESSES=N and
DRO_JAX_PROCESS_ID=i (dro_jax/main.py then calls jax.distributed.initialize with them), on CPU
with K fake devices each (XLA_FLAGS=--xla_force_host_platform_device_count=K) and gloo
collectives between the processes: 2 x 4 is the 8-device mesh of one process with 8. It streams
each process's output with a `[pI]` prefix, forwards SIGTERM and SIGINT to every process, and
exits with the worst exit status (a signal's death counts as 128 + its number). When one process
dies, the others are given `--grace_s` seconds to finish (a peer lost in a collective stops them
with an error), then stopped.

Everything after `--` goes to `python -m dro_jax.main`; a first argument that ends in `.py` or
is `-m` is run as its own command instead (e.g. `-- benchmarks/x.py ...`). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def command(arguments: Sequence[str]) -> list[str]:
  """The command every process runs: `python -m dro_jax.main ARGS`, or ARGS's own script."""
  arguments = list(arguments)
  if arguments and (arguments[0] == "-m" or arguments[0].endswith(".py")):
    return [sys.executable, *arguments]
  return [sys.executable, "-m", "dro_jax.main", *arguments]


def environment(index: int, processes: int, devices: int, port: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
  env = dict(os.environ if base is None else base)
  flags = [flag for flag in env.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  env.update({
      "DRO_JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "DRO_JAX_NUM_PROCESSES": str(processes), "DRO_JAX_PROCESS_ID": str(index),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
      "PYTHONUNBUFFERED": "1",
  })
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  return env


def _stream(index: int, stream, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      sys.stdout.write(f"[p{index}] {line}" if line.endswith("\n") else f"[p{index}] {line}\n")
      sys.stdout.flush()
  stream.close()


def exit_status(code: int) -> int:
  """A process's status as a shell reports it: a death by signal S is 128 + S."""
  return 128 - code if code < 0 else code


def run(arguments: Sequence[str], processes: int, devices: int, grace_s: float = 60.0) -> int:
  port = free_port()
  argv = command(arguments)
  print(f"[local] {processes} processes x {devices} CPU devices, coordinator 127.0.0.1:{port}: "
        f"{shlex.join(argv)}", flush=True)
  lock = threading.Lock()
  children: list[subprocess.Popen] = []

  def forward(signum, frame) -> None:  # noqa: ARG001
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  # Installed before any process starts: a signal from then on reaches every process started.
  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  for i in range(processes):
    children.append(subprocess.Popen(argv, env=environment(i, processes, devices, port),
                                     cwd=os.getcwd(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True))
  readers = [threading.Thread(target=_stream, args=(i, child.stdout, lock), daemon=True)
             for i, child in enumerate(children)]
  for reader in readers:
    reader.start()
  try:
    first_death = None
    while any(child.poll() is None for child in children):
      failed = [child for child in children if child.poll() not in (None, 0)]
      if failed and first_death is None:
        first_death = time.monotonic()
      if first_death is not None and time.monotonic() - first_death > grace_s:
        for i, child in enumerate(children):
          if child.poll() is None:
            with lock:
              print(f"[local] p{i} still runs {grace_s:.0f} s after a peer stopped: stopping "
                    f"it", flush=True)
            child.terminate()
        first_death = time.monotonic() + 1e9  # terminated once; then wait
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(c.poll() is None for c in children):
          time.sleep(0.2)
        for child in children:
          if child.poll() is None:
            child.kill()
      time.sleep(0.2)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for reader in readers:
    reader.join(timeout=5)
  codes = [exit_status(child.returncode) for child in children]
  print(f"[local] exit statuses: {', '.join(f'p{i} {c}' for i, c in enumerate(codes))}",
        flush=True)
  return max(codes)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--processes", type=int, default=2, help="N processes (default 2)")
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="K fake CPU devices per process (default 1)")
  parser.add_argument("--grace_s", type=float, default=60.0,
                      help="seconds the others get to stop after one process fails (default 60)")
  parser.add_argument("driver", nargs=argparse.REMAINDER,
                      help="-- the arguments of python -m dro_jax.main (or a script and its)")
  args = parser.parse_args(argv)
  driver = args.driver[1:] if args.driver[:1] == ["--"] else args.driver
  if not driver:
    parser.error("give the command after --, e.g. -- --config configs/dro.py:size=tiny "
                 "--workdir /tmp/run")
  if args.processes < 1 or args.devices_per_process < 1:
    parser.error("--processes and --devices_per_process must be at least 1")
  return run(driver, args.processes, args.devices_per_process, args.grace_s)


if __name__ == "__main__":
  sys.exit(main())

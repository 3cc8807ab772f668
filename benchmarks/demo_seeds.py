"""The embedded demo over several seeds: wall time per run and the results table of docs/demo.md.

  python benchmarks/demo_seeds.py --workdir /tmp/demo_seeds               # seeds 0, 1, 2, one at a time
  python benchmarks/demo_seeds.py --workdir /tmp/demo_seeds --parallel 3  # all at once

Each seed is the README's first command, `python -m dro_jax.main --config configs/demo.py:seed=N
--workdir WORKDIR/seedN`, run as its own process (a finished seed is skipped by the demo itself, so
the script resumes). It writes WORKDIR/seeds.json (per seed: wall seconds, CPU seconds of the
child, and the demo's results.json) and prints the table: per method the win rate against SFT per
seed with its 95% Wilson interval, the mean and standard deviation over seeds, and the means of
the judge's reward, KL(policy || SFT), answer length and the share of answers cut at the maximum
length. Wall times are only comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
LABELS = {"dro": "DRO-V", "kto": "KTO", "dpo": "DPO", "tr_dpo": "TR-DPO"}


def command(seed: int, workdir: str, arg: str) -> list[str]:
  config = f"{ROOT / 'configs' / 'demo.py'}:seed={seed}" + (f",{arg}" if arg else "")
  return [sys.executable, "-m", "dro_jax.main", f"--config={config}", f"--workdir={workdir}"]


def run_seeds(seeds: list[int], root: str, parallel: int, arg: str) -> dict[int, dict]:
  """Runs the demo for each seed (at most `parallel` at once); {seed: record}."""
  os.makedirs(root, exist_ok=True)
  pending, running, records = list(seeds), {}, {}
  while pending or running:
    while pending and len(running) < parallel:
      seed = pending.pop(0)
      workdir = os.path.join(root, f"seed{seed}")
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, "demo.log"), "w")
      process = subprocess.Popen(command(seed, workdir, arg), stdout=log,
                                 stderr=subprocess.STDOUT, cwd=ROOT)
      running[seed] = (process, log, time.perf_counter(), workdir)
      print(f"seed {seed}: started ({workdir})", flush=True)
    time.sleep(2)
    for seed, (process, log, start, workdir) in list(running.items()):
      if process.poll() is None:
        continue
      log.close()
      del running[seed]
      wall = time.perf_counter() - start
      if process.returncode:
        raise RuntimeError(f"seed {seed} failed (exit {process.returncode}); see "
                           f"{os.path.join(workdir, 'demo.log')}")
      with open(os.path.join(workdir, "results.json")) as f:
        records[seed] = {"wall_seconds": wall, "results": json.load(f)}
      print(f"seed {seed}: {wall / 60:.1f} min wall", flush=True)
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  for record in records.values():  # the children together: user and system CPU time
    record["children_cpu_seconds_total"] = usage.ru_utime + usage.ru_stime
  return records


def table(records: dict[int, dict]) -> str:
  seeds = sorted(records)
  methods = [m for m in LABELS if all(m in records[s]["results"] for s in seeds)]
  header = ("| method | " + " | ".join(f"seed {s}" for s in seeds)
            + " | mean ± sd | judge reward | KL | length | cut at max |")
  lines = [header, "|" + "---|" * (len(seeds) + 6)]

  def mean(method, key):
    return float(np.mean([records[s]["results"][method][key] for s in seeds]))

  lines.append("| SFT | " + " | ".join("50%" for _ in seeds) + " | 50% | "
               f"{mean(methods[0], 'baseline_reward'):.3f} | 0 | "
               f"{mean(methods[0], 'baseline_length'):.2f} | "
               f"{mean(methods[0], 'baseline_truncated'):.1%} |")
  for method in methods:
    rates = [records[s]["results"][method]["win_rate"] for s in seeds]
    cells = [f"{r['win_rate']:.1%} [{100 * r['win_rate_low']:.1f}, {100 * r['win_rate_high']:.1f}]"
             for r in (records[s]["results"][method] for s in seeds)]
    spread = float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells)
                 + f" | {100 * np.mean(rates):.1f} ± {100 * spread:.1f}% | "
                 f"{mean(method, 'policy_reward'):.3f} | {mean(method, 'kl'):.2f} | "
                 f"{mean(method, 'policy_length'):.2f} | {mean(method, 'policy_truncated'):.1%} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--arg", default="", help="more configs/demo.py args, e.g. scale=0.25")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  records = run_seeds(seeds, args.workdir, args.parallel, args.arg)
  with open(os.path.join(args.workdir, "seeds.json"), "w") as f:
    json.dump({str(s): r for s, r in records.items()}, f, indent=2)
  for seed in seeds:
    print(f"seed {seed}: {records[seed]['wall_seconds'] / 60:.1f} min wall")
  print(table(records))


if __name__ == "__main__":
  main()

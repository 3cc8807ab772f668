"""Judged pairs per second of an `api:MODEL@BASE_URL` judge at several concurrencies.

The judge asks the local chat-completions server of the tests (tests/judge_server.py: a
ThreadingHTTPServer on 127.0.0.1 playing the demo's judge, in a process of its own) which sleeps
`--latency` seconds per request. Each pair is judged in both orders (`judges.compare`,
debiased: 2 requests), through a fresh verdict cache (nothing cached), so the rate is what a
run pays for. The bound is
concurrency / (2 × latency) pairs per second; what is left of it is the client's own cost per
request (the openai client, JSON, SQLite, the GIL) on this machine.

  python benchmarks/api_judge_throughput.py                  # latency 0.05 s and 0.2 s
  python benchmarks/api_judge_throughput.py --latency 0.1 --concurrency 1,8,32,64

Writes benchmarks/results/api_judge/throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(latency: float, concurrency: int, pairs: int) -> dict:
  from dro_jax import judges
  from dro_jax.data import synthetic
  rows = synthetic.preference_pairs(pairs, seed=11)  # two different answers per prompt
  prompts = [r["prompt"] for r in rows]
  first, second = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
  # The server in a process of its own, so that it does not share the client's interpreter.
  server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "judge_server.py"),
                             "--latency", str(latency)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    url = server.stdout.readline().strip()
    with tempfile.TemporaryDirectory() as folder:
      judge = judges.judge_from_spec(f"api:judge@{url}", max_concurrency=concurrency,
                                     cache=os.path.join(folder, "cache.sqlite"))
      start = time.perf_counter()
      _, calls, _ = judges.compare(judge, prompts, first, second)
      seconds = time.perf_counter() - start
    with urllib.request.urlopen(url + "/stats") as reply:
      stats = json.load(reply)
    requests, in_flight = stats["requests"], stats["max_in_flight"]
  finally:
    server.stdin.close()
    server.wait(timeout=30)
  bound = concurrency / (2 * latency)
  return {"latency_s": latency, "concurrency": concurrency, "pairs": pairs, "calls": calls,
          "requests": requests, "seconds": seconds, "pairs_per_second": pairs / seconds,
          "bound_pairs_per_second": bound, "share_of_bound": pairs / seconds / bound,
          "max_in_flight": in_flight}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--latency", default="0.05,0.2", help="seconds per request, comma-separated")
  parser.add_argument("--concurrency", default="1,8,32")
  parser.add_argument("--seconds", type=float, default=6.0,
                      help="about how long each cell runs (its pairs sized from the bound)")
  parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "api_judge", "throughput.json"))
  args = parser.parse_args()
  cells = []
  for latency in (float(x) for x in args.latency.split(",")):
    for concurrency in (int(x) for x in args.concurrency.split(",")):
      pairs = max(16, int(args.seconds * concurrency / (2 * latency)))
      cells.append(measure(latency, concurrency, pairs))
      cell = cells[-1]
      print(f"latency {latency:.3f} s, concurrency {concurrency:>3}: "
            f"{cell['pairs_per_second']:7.1f} pairs/s ({cell['share_of_bound']:.0%} of the "
            f"bound {cell['bound_pairs_per_second']:.1f}; {pairs} pairs, "
            f"{cell['requests']} requests, at most {cell['max_in_flight']} in flight)",
            flush=True)
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                       f"{platform.python_version()}",
            "server": ("tests/judge_server.py (127.0.0.1, stdlib ThreadingHTTPServer, its own "
                       "process)"),
            "pair": "judged in both orders (2 requests)", "cells": cells}
  with open(args.output, "w") as f:
    json.dump(report, f, indent=1)
  print("\n| latency per request | concurrency | pairs/s | bound (c / 2·latency) | share |")
  print("|---|---|---|---|---|")
  for cell in cells:
    print(f"| {cell['latency_s'] * 1000:.0f} ms | {cell['concurrency']} | "
          f"{cell['pairs_per_second']:.1f} | {cell['bound_pairs_per_second']:.1f} | "
          f"{cell['share_of_bound']:.0%} |")
  print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()

"""Online iterative RLHF against offline, on the demo task, over seeds and two oracles.

  python benchmarks/online_vs_offline.py --output /tmp/online_bench [--seeds 0,1,2] [--quick]

Per seed, one SFT policy (the online loop's demo SFT, shared by every run of the seed), then
per oracle (`demo`, the programmatic judge, and `noisy:0.2:demo`, the same with 20% of its
verdicts flipped):
  online IPO (enhancer)     configs/online.py defaults: 3 iterations, the main agent's sample
                            against the best of 4 by the oracle's tournament
  online IPO (best-worst)   tournament winner against tournament loser
  online DPO (enhancer)     the same loop with the DPO loss
  offline IPO               one iteration from SFT: 3x the prompts, sampled once, the same
                            pairing and oracle, capped at the number of pairs online IPO
                            (enhancer) labelled, trained for the same total steps
Every run is evaluated by the TRUE judge (`demo`) against SFT on the held-out prompts after each
iteration. Every run is a workdir under --output and resumes (a finished one is read back). The
table goes to <output>/online_vs_offline.md (win rate per iteration, mean ± sd over seeds),
the curves to online_vs_offline.png, everything to results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dro_jax import files  # noqa: E402  (configs and the online loop once the flags are parsed)

ORACLES = ("demo", "noisy:0.2:demo")
VARIANTS = {
    "online IPO (enhancer)": "pairing=enhancer",
    "online IPO (best-worst)": "pairing=best_worst",
    "online DPO (enhancer)": "pairing=enhancer,loss=dpo",
    "offline IPO": "pairing=enhancer,iterations=1",
}


def run_config(seed: int, oracle: str, variant: str, cache_dir: str, sft: str, quick: bool,
               offline_pairs: int | None):
  from dro_jax import configs
  config = configs.load("online", f"size=tiny,seed={seed},oracle={oracle},{VARIANTS[variant]}")
  config.data.cache_dir = cache_dir
  config.init_checkpoint = sft
  config.evaluation.judge = "demo"  # the truth, whatever the oracle
  if quick:
    config.online.prompts, config.online.steps = 128, 30
    config.evaluation.prompts = 64
  if variant == "offline IPO":
    iterations = configs.load("online", "size=tiny").online.iterations
    config.online.prompts *= iterations
    config.online.steps *= iterations
    config.online.max_pairs = int(offline_pairs or 0)
  return config


def sft_for(seed: int, output: str, cache_dir: str, quick: bool) -> str:
  from dro_jax import configs
  config = configs.load("online", f"size=tiny,seed={seed}")
  config.data.cache_dir = cache_dir
  if quick:
    config.online.sft_steps = 300
  from dro_jax import online
  return online.train_sft(config, os.path.join(output, f"seed_{seed}"))


def summarise(results: dict, path_md: str, path_png: str) -> str:
  lines = ["| oracle | method | pairs (all iterations) | win rate vs SFT per iteration (mean ± sd "
           "over seeds) | final KL | judged pairs/s |", "|---|---|---|---|---|---|"]
  curves = {}
  for oracle in ORACLES:
    for variant in VARIANTS:
      runs = [r for r in results.values() if r["oracle"] == oracle and r["variant"] == variant]
      if not runs:
        continue
      rates = np.array([[it["win_rate"] for it in r["iterations"]] for r in runs])
      kls = [r["iterations"][-1]["kl"] for r in runs]
      pairs = [sum(it["pairs"] for it in r["iterations"]) for r in runs]
      speed = [np.mean([it["judged_pairs_per_second"] for it in r["iterations"]]) for r in runs]
      cells = ", ".join(f"{m:.1%} ± {s:.1%}" for m, s in zip(rates.mean(0), rates.std(0, ddof=1)
                                                            if len(runs) > 1 else
                                                            np.zeros(rates.shape[1])))
      lines.append(f"| {oracle} | {variant} | {np.mean(pairs):.0f} | {cells} | "
                   f"{np.mean(kls):.2f} | {np.mean(speed):.0f} |")
      curves[(oracle, variant)] = rates
  table = "\n".join(lines)
  seeds = sorted({r["seed"] for r in results.values()})
  files.write_text(path_md, f"# Online against offline on the demo task (seeds {seeds})\n\n"
                   f"Win rate against SFT judged by the true judge (`demo`) on held-out prompts "
                   f"after each iteration.\n\n{table}\n\n![curves](online_vs_offline.png)\n")
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(11, 4))
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, len(ORACLES), sharey=True)
  for axis, oracle in zip(axes, ORACLES):
    for (name, variant), rates in curves.items():
      if name != oracle:
        continue
      x = np.arange(1, rates.shape[1] + 1)
      mean, spread = rates.mean(0), rates.std(0) if len(rates) > 1 else np.zeros(rates.shape[1])
      if variant == "offline IPO":
        x = np.array([1, 3])
        mean, spread = np.repeat(mean, 2), np.repeat(spread, 2)
      line, = axis.plot(x, mean, marker="o", label=variant)
      axis.fill_between(x, mean - spread, mean + spread, alpha=0.15, color=line.get_color())
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axis.set(title=f"oracle: {oracle}", xlabel="iteration", xticks=[1, 2, 3])
  axes[0].set(ylabel="win rate vs SFT (true judge; mean ± sd over seeds)")
  axes[0].legend(loc="lower right", fontsize=8)
  figure.tight_layout()
  figure.savefig(path_png, dpi=100)
  return table


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
  args = parser.parse_args(argv)
  from dro_jax import online
  cache_dir = os.path.join(args.output, "data_cache")
  results_path = os.path.join(args.output, "results.json")
  results = files.read_json(results_path) or {}
  for seed in (int(s) for s in args.seeds.split(",")):
    sft = sft_for(seed, args.output, cache_dir, args.quick)
    for oracle in ORACLES:
      online_pairs = None
      for variant in VARIANTS:
        name = f"seed_{seed}/{oracle.replace(':', '_')}/{variant.split(' (')[0].replace(' ', '_')}"
        name += "" if "(" not in variant else "_" + variant.split("(")[1].rstrip(")")
        name = name.replace("-", "_")
        config = run_config(seed, oracle, variant, cache_dir, sft, args.quick, online_pairs)
        start = time.perf_counter()
        result = online.run(config, os.path.join(args.output, name))
        iterations = [{"iteration": it["iteration"], "pairs": it["judged"]["pairs"],
                       "win_rate": it["evaluation"]["vs_sft"]["win_rate"],
                       "win_rate_low": it["evaluation"]["vs_sft"]["win_rate_low"],
                       "win_rate_high": it["evaluation"]["vs_sft"]["win_rate_high"],
                       "kl": it["evaluation"]["vs_sft"]["kl"],
                       "judged_pairs_per_second": it["judged"]["judged_pairs_per_second"]}
                      for it in result["iterations"]]
        if variant == "online IPO (enhancer)":
          online_pairs = sum(it["pairs"] for it in iterations)
        results[name] = {"seed": seed, "oracle": oracle, "variant": variant,
                         "iterations": iterations, "judge_calls": result["judge_calls"],
                         "seconds": results.get(name, {}).get("seconds",
                                                              time.perf_counter() - start)}
        files.write_text(results_path, json.dumps(results, indent=1))
  table = summarise(results, os.path.join(args.output, "online_vs_offline.md"),
                    os.path.join(args.output, "online_vs_offline.png"))
  print(table)


if __name__ == "__main__":
  main()

"""The coverage of the headline win-rate interval (`evaluation.clustered_interval`), simulated.

  python benchmarks/interval_coverage.py                   # the grid below, 4000 evaluations a cell
  python benchmarks/interval_coverage.py --evaluations 500 # quicker

The model, per simulated evaluation: K prompts, each with its own win probability q_i ~ Beta with
mean p and within-prompt correlation ρ (Beta(a, b) with a + b = 1/ρ − 1; ρ = 0: q_i = p); each
prompt's s comparisons are ties (½) with probability `ties`, else Bernoulli(q_i) wins or losses.
The true win rate is (1 − ties)·p + ties/2. The interval depends on the verdicts only through
each prompt's mean and whether the prompt holds a loss (a verdict below ½; a win when p < ½), so
the simulation draws those per prompt (binomial counts) and calls `evaluation.clustered_intervals`
on all evaluations of a cell at once.

Prints one row per cell (prompts, samples, p, ρ, ties, coverage, mean width), then the lowest
coverage with at least 50 prompts and the 20 prompts × 50 samples, p = 0.97, ρ = 0.9 corner.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Iterable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dro_jax import evaluation  # noqa: E402

PROMPTS = (20, 50, 100, 400)
SAMPLES = (1, 2, 5, 20, 50)
RATES = (0.5, 0.7, 0.85, 0.9, 0.95, 0.97)
CORRELATIONS = (0.0, 0.1, 0.3, 0.6, 0.9)
TIES = (0.0, 0.1, 0.3)
CORNER = (20, 50, 0.97, 0.9, 0.0)


def simulate(prompts: int, samples: int, rate: float, correlation: float, ties: float,
             evaluations: int, seed: int = 0, level: float = 0.95) -> dict[str, float]:
  """Coverage and mean width of the `level` interval over `evaluations` simulated evaluations of
  one cell (see the module docstring)."""
  rng = np.random.default_rng([seed, prompts, samples, int(rate * 1e4),
                               int(correlation * 1e4), int(ties * 1e4)])
  shape = (evaluations, prompts)
  if correlation > 0:
    total = 1.0 / correlation - 1.0
    q = rng.beta(rate * total, (1.0 - rate) * total, size=shape)
  else:
    q = np.full(shape, rate)
  tied = rng.binomial(samples, ties, size=shape)
  wins = rng.binomial(samples - tied, q)
  losses = samples - tied - wins
  means = (wins + 0.5 * tied) / samples
  overall = means.mean(axis=1, keepdims=True)
  minority = np.where(overall >= 0.5, losses > 0, wins > 0).sum(axis=1)
  low, high, _ = evaluation.clustered_intervals(means, minority, level)
  truth = (1.0 - ties) * rate + ties / 2.0
  return {"coverage": float(np.mean((low <= truth) & (truth <= high))),
          "width": float(np.mean(high - low))}


def grid(cells: Iterable[tuple[int, int, float, float, float]], evaluations: int,
         seed: int = 0) -> list[dict[str, float]]:
  """`simulate` over (prompts, samples, p, ρ, ties) cells: one dict per cell."""
  rows = []
  for prompts, samples, rate, correlation, ties in cells:
    rows.append({"prompts": prompts, "samples": samples, "p": rate, "rho": correlation,
                 "ties": ties, **simulate(prompts, samples, rate, correlation, ties,
                                          evaluations, seed)})
  return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--evaluations", type=int, default=4000,
                      help="simulated evaluations per cell (default 4000)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  rows = grid(itertools.product(PROMPTS, SAMPLES, RATES, CORRELATIONS, TIES), args.evaluations,
              args.seed)
  print("| prompts | samples | p | rho | ties | coverage | mean width |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['prompts']} | {row['samples']} | {row['p']} | {row['rho']} | {row['ties']} | "
          f"{row['coverage']:.3f} | {row['width']:.3f} |")
  lowest = min((row for row in rows if row["prompts"] >= 50), key=lambda row: row["coverage"])
  corner = next(row for row in rows
                if (row["prompts"], row["samples"], row["p"], row["rho"], row["ties"]) == CORNER)
  print(f"lowest coverage with >= 50 prompts: {lowest['coverage']:.3f} ({lowest['prompts']} "
        f"prompts x {lowest['samples']} samples, p {lowest['p']}, rho {lowest['rho']}, ties "
        f"{lowest['ties']})")
  print(f"20 prompts x 50 samples, p 0.97, rho 0.9: {corner['coverage']:.3f}")
  return rows


if __name__ == "__main__":
  main()

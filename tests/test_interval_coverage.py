"""The headline interval's coverage (evaluation.clustered_interval), simulated with a prompt-level
Beta model (benchmarks/interval_coverage.py): at least 0.92 with 50 or more prompts across win
rates, samples per prompt, within-prompt correlation and ties, at least 0.90 at 20 prompts x 50
samples with p = 0.97 and correlation 0.9; and at the edges it never counts every comparison as
independent."""

import itertools
import os
import sys

import numpy as np
import pytest

from dro_jax import evaluation

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import interval_coverage  # noqa: E402

# A representative grid: the edges of every range and points between (the script's full grid is
# larger); 1500 simulated evaluations a cell (a coverage's standard error about 0.006).
CELLS = list(itertools.product((50, 200), (1, 5, 50), (0.5, 0.9, 0.97), (0.0, 0.3, 0.9),
                               (0.0, 0.3)))


def test_coverage_is_at_least_092_from_50_prompts_on():
  rows = interval_coverage.grid(CELLS, evaluations=1500)
  low = [row for row in rows if row["coverage"] < 0.92]
  assert not low, low


def test_coverage_at_20_prompts_x_50_samples_p_097_rho_09():
  row = interval_coverage.simulate(20, 50, 0.97, 0.9, 0.0, evaluations=4000)
  assert row["coverage"] >= 0.90, row
  # The construction before (n_eff = all comparisons when every verdict was a win) covered about
  # half the time: at p̂ = 1 its interval was Wilson's at n = 1000, [0.996, 1].
  wins = np.ones((20, 50))
  low, high, n_eff = evaluation.clustered_interval(wins)
  assert n_eff == 20 and high == 1.0 and low < 0.97
  assert evaluation.wilson_interval(1000, 1000)[0] > 0.99


@pytest.mark.parametrize("values", [np.ones((30, 8)), np.zeros((30, 8)), np.full((30, 8), 0.5),
                                    np.tile([1.0, 0.0, 0.5, 1.0], (30, 1))])
def test_at_the_edges_n_eff_is_the_number_of_prompts(values):
  """p̂ = 0 or 1, or every prompt's mean the same (no spread between prompts): n_eff = prompts."""
  low, high, n_eff = evaluation.clustered_interval(values)
  assert n_eff == 30 and high - low > 0.1


def test_near_the_edge_the_interval_moves_continuously():
  """One loss among 1000 won comparisons: the interval is about the all-won one, not Wilson's at
  1000 comparisons (the edge's rule would otherwise jump away at the first loss)."""
  all_won = evaluation.clustered_interval(np.ones((20, 50)))
  one_loss = np.ones((20, 50))
  one_loss[3, 7] = 0.0
  low, high, n_eff = evaluation.clustered_interval(one_loss)
  assert n_eff < 25 and abs(low - all_won[0]) < 0.05 and low < 0.97


def test_the_simulation_runs_the_interval_itself():
  """The batch form the simulation calls equals clustered_interval on the verdicts."""
  rng = np.random.default_rng(4)
  for shape, rate in (((40, 5), 0.9), ((60, 3), 0.4), ((25, 20), 0.99)):
    q = rng.beta(rate * 2, (1 - rate) * 2, size=(shape[0], 1))
    values = (rng.random(shape) < q).astype(np.float64)
    values[rng.random(shape) < 0.2] = 0.5
    low, high, n_eff = evaluation.clustered_intervals(
        values.mean(axis=1)[None], np.array([evaluation.minority_prompts(values)]))
    assert (float(low[0]), float(high[0]), float(n_eff[0])) == pytest.approx(
        evaluation.clustered_interval(values), abs=1e-12)

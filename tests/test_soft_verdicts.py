"""Soft verdicts are probabilities, not ties: a reward model's σ(r_a − r_b) of exactly 0.5 is no
draw, and the headline interval of soft verdicts follows their own spread (as the bootstrap over
prompts does) while still covering the true win rate."""

import numpy as np
import pytest

from dro_jax import evaluation


def soft_verdicts(rng, prompts: int, shift: float = 0.2) -> np.ndarray:
  """A reward model's verdicts: σ of a reward difference per comparison."""
  return 1.0 / (1.0 + np.exp(-rng.normal(shift, 0.5, prompts)))


def test_an_exact_half_among_soft_verdicts_is_not_a_tie():
  rng = np.random.default_rng(0)
  verdicts = soft_verdicts(rng, 400)
  verdicts[:30] = 0.5  # identical rewards
  rate = evaluation.win_rate(verdicts)
  assert rate.verdicts == "soft" and rate.ties is None
  assert rate.wins + rate.losses == 370
  assert "soft verdicts" in rate.line() and "ties=" not in rate.line()
  metrics = rate.metrics()
  assert metrics["ties"] is None and metrics["verdicts"] == "soft"


def test_discrete_verdicts_keep_their_ties_asked_once_or_in_both_orders():
  once = evaluation.win_rate(np.array([1.0, 0.0, 0.5, 0.5, 1.0]))
  assert (once.verdicts, once.ties, once.wins, once.losses) == ("discrete", 2, 2, 1)
  both_orders = evaluation.win_rate(np.array([0.75, 0.25, 0.5, 1.0, 0.0]))  # (q + 1 − q') / 2
  assert (both_orders.verdicts, both_orders.ties) == ("discrete", 1)
  assert "ties=1" in both_orders.line()


def test_the_soft_headline_interval_is_about_the_bootstrap_not_a_coin_flips_width():
  """Before, n_eff was capped at n: soft verdicts got a win-or-loss width, several times the
  bootstrap's ([0.40, 0.56] against [0.463, 0.498] in the report that found it)."""
  rng = np.random.default_rng(1)
  rate = evaluation.win_rate(soft_verdicts(rng, 400, shift=-0.1))
  headline = rate.high - rate.low
  bootstrap = rate.bootstrap_high - rate.bootstrap_low
  assert rate.effective_n > rate.n
  assert 0.8 < headline / bootstrap < 1.3, (headline, bootstrap)
  assert headline < 0.5 * (rate.wilson_high - rate.wilson_low)


def test_the_soft_headline_interval_covers_the_truth():
  """1000 simulated evaluations of 60 prompts x 2 samples, soft verdicts that agree within a
  prompt: the headline 95% interval covers the true mean verdict at least 92% of the time."""
  rng = np.random.default_rng(2)
  covered, truth = 0, None
  shifts = rng.normal(0.3, 0.6, size=200_000)
  truth = float(np.mean(1.0 / (1.0 + np.exp(-(shifts + rng.normal(0, 0.4, shifts.size))))))
  for _ in range(1000):
    prompt_shift = rng.normal(0.3, 0.6, size=(60, 1))
    verdicts = 1.0 / (1.0 + np.exp(-(prompt_shift + rng.normal(0, 0.4, size=(60, 2)))))
    rate = evaluation.win_rate(verdicts, resamples=10)
    covered += rate.low <= truth <= rate.high
  assert covered / 1000 >= 0.92, covered


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_verdicts_all_alike_keep_the_win_or_loss_width(value):
  """No spread to measure: Wilson's interval at n, never a zero width."""
  rate = evaluation.win_rate(np.full(16, value))
  assert rate.effective_n == 16 and rate.high - rate.low > 0.2

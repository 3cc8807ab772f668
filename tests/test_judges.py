"""Judges: the demo judge is the synthetic task's reward, preferences are 1 / 0 / 0.5."""

import random

import numpy as np
import pytest

from dro_jax import judges
from dro_jax.data import synthetic


def test_demo_judge_scores_with_the_synthetic_reward():
  judge = judges.get_judge("demo")
  assert isinstance(judge, judges.Judge) and isinstance(judge, judges.RewardJudge)
  assert judges.has_reward(judge)
  prompts = synthetic.eval_prompts(20)
  rng = random.Random(0)
  responses = [synthetic.demonstrate(synthetic.parse_prompt(prompt), rng) for prompt in prompts]
  expected = [synthetic.reward(prompt, response) for prompt, response in zip(prompts, responses)]
  np.testing.assert_array_equal(judge.score(prompts, responses), expected)


def test_demo_judge_prefers_the_higher_reward_and_ties_half():
  judge = judges.DemoJudge()
  prompts = ["sort: 3 1 2"] * 4
  better = ["1 2 3", "1 2 3", "3 1 2", "1 2"]
  worse = ["1 3 2", "1 2 3", "1 2 3", "1 2 9"]
  # rewards: 1 vs 1/3; 1 vs 1; 0 vs 1; 2/3 vs 2/3
  np.testing.assert_array_equal(judge.prefer(prompts, better, worse), [1.0, 0.5, 0.0, 0.5])
  np.testing.assert_array_equal(judge.prefer(prompts, worse, better), [0.0, 0.5, 1.0, 0.5])


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="registered judges: .*'demo'"):
    judges.get_judge("gpt-judge")
  with pytest.raises(ValueError, match="demo task's prompts"):
    judges.DemoJudge().score(["translate: hello"], ["bonjour"])
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    judges.DemoJudge().prefer(["sort: 1", "sort: 2"], ["1"], ["1", "2"])


def test_register_judge():
  class Always(judges.ScoringJudge):
    def score(self, prompts, responses):
      return np.zeros(len(prompts))

  judges.register_judge("test_always", Always)
  try:
    assert judges.get_judge("test_always").prefer(["p"], ["a"], ["b"]).tolist() == [0.5]
    with pytest.raises(ValueError, match="already registered"):
      judges.register_judge("test_always", Always)
  finally:
    judges.JUDGES.pop("test_always")


# ------------------------------------------------------------------------- specs and debiasing


def test_judge_specs_resolve_every_form(tmp_path):
  import fake_judges
  assert isinstance(judges.judge_from_spec("demo"), judges.DemoJudge)
  assert judges.get_judge("demo").symmetric
  plugged = judges.judge_from_spec("fake_judges:first_position_biased")
  assert isinstance(plugged, fake_judges.FirstPositionBiased)
  assert not judges.is_symmetric(plugged)
  noisy = judges.judge_from_spec("noisy:0.2:demo")
  assert isinstance(noisy, judges.NoisyJudge) and noisy.flip == 0.2 and noisy.symmetric
  assert judges.has_reward(noisy)  # the wrapped judge's clean reward
  nested = judges.judge_from_spec("noisy:0.1:fake_judges:first_position_biased")
  assert isinstance(nested.judge, fake_judges.FirstPositionBiased) and not nested.symmetric
  for spec, message in [("noisy:1.5:demo", "noisy:P:SPEC"), ("noisy:x:demo", "noisy:P:SPEC"),
                        ("gpt-judge", "registered judges"),
                        ("no_such_module_xyz:make", "cannot import module"),
                        ("fake_judges:missing", "no callable 'missing'"),
                        ("fake_judges:not_a_judge", "has no prefer"),
                        (f"reward_model:{tmp_path}", "not a dro_jax reward_model workdir"),
                        (f"preference_model:{tmp_path / 'nope'}", "preference_model workdir"),
                        ("", "non-empty")]:
    with pytest.raises(ValueError, match=message):
      judges.judge_from_spec(spec)


def test_noisy_judge_flips_the_same_rows_every_time():
  prompts = synthetic.eval_prompts(2000)
  rng = random.Random(3)
  a = [synthetic.demonstrate(synthetic.parse_prompt(p), rng) for p in prompts]
  b = [synthetic.demonstrate(synthetic.parse_prompt(p), rng) for p in prompts]
  clean = judges.DemoJudge().prefer(prompts, a, b)
  noisy = judges.judge_from_spec("noisy:0.2:demo")
  first = noisy.prefer(prompts, a, b)
  flipped = first != clean
  decided = clean != 0.5
  assert 0.17 < flipped[decided].mean() < 0.23  # P = 0.2
  np.testing.assert_array_equal(first, judges.judge_from_spec("noisy:0.2:demo").prefer(
      prompts, a, b))  # a rerun flips the same rows
  # Reversed batch order and swapped sides: the same comparisons flipped, so still symmetric.
  np.testing.assert_array_equal(noisy.prefer(prompts[::-1], a[::-1], b[::-1]), first[::-1])
  np.testing.assert_array_equal(noisy.prefer(prompts, b, a), 1.0 - first)
  other_seed = judges.NoisyJudge(judges.DemoJudge(), 0.2, seed=1).prefer(prompts, a, b)
  assert np.any(other_seed != first)


def test_compare_debiases_a_position_biased_judge():
  import fake_judges
  judge = fake_judges.FirstPositionBiased()
  prompts = ["sort: 3 1 2"] * 3
  better, worse = ["1 2 3", "1 2 3", "3 1 2"], ["1 3 2", "1 2 3", "1 2 3"]
  p, calls, debiased = judges.compare(judge, prompts, better, worse)
  # (q(a, b) + 1 - q(b, a)) / 2: better 0.9 / 0.3 -> 0.8; equal 0.9 / 0.9 -> 0.5; worse -> 0.2
  np.testing.assert_allclose(p, [0.8, 0.5, 0.2])
  assert (calls, debiased) == (6, True)
  one_order, calls, debiased = judges.compare(judge, prompts, better, worse, debias=False)
  np.testing.assert_allclose(one_order, [0.9, 0.9, 0.3])
  assert (calls, debiased) == (3, False)
  # A symmetric judge is asked once.
  _, calls, debiased = judges.compare(judges.DemoJudge(), prompts, better, worse)
  assert (calls, debiased) == (3, False)


# ---------------------------------------------------------------------------------- tournament


def _random_preferences(rng: np.random.Generator, n: int, condorcet: int | None) -> np.ndarray:
  upper = rng.random((n, n))
  matrix = np.triu(upper, 1) + np.tril(1.0 - upper.T, -1) + 0.5 * np.eye(n)
  if condorcet is not None:
    for other in range(n):
      if other != condorcet:
        value = 0.5 + 0.5 * rng.random() + 1e-6
        matrix[condorcet, other], matrix[other, condorcet] = min(value, 1.0), 1.0 - min(value, 1.0)
  return matrix


@pytest.mark.parametrize("debias", [True, False])
def test_tournament_finds_the_condorcet_winner_with_n_minus_1_comparisons(debias):
  import fake_judges
  rng = np.random.default_rng(0)
  for trial in range(200):
    n = int(rng.integers(2, 9))
    winner = int(rng.integers(0, n)) if trial % 4 else None  # some without a planted winner
    matrix = _random_preferences(rng, n, winner)
    judge = fake_judges.Matrix(matrix)
    prompts = ["p"] * 3
    candidates = [[str(i) for i in rng.permutation(n)] for _ in prompts]
    best, calls = judges.tournament(prompts, candidates, judge, debias=debias)
    assert calls == judge.calls == len(prompts) * (n - 1) * (2 if debias else 1)
    for row, index in zip(candidates, best):
      beats_all = [i for i in range(n) if all(matrix[i, j] > 0.5 for j in range(n) if j != i)]
      if beats_all:  # a Condorcet winner exists: it wins the knock-out
        assert int(row[index]) == beats_all[0]
    worst, calls = judges.tournament(prompts, candidates, judge, debias=debias, worst=True)
    assert calls == len(prompts) * (n - 1) * (2 if debias else 1)
    for row, index in zip(candidates, worst):
      loses_all = [i for i in range(n) if all(matrix[i, j] < 0.5 for j in range(n) if j != i)]
      if loses_all:
        assert int(row[index]) == loses_all[0]


def test_tournament_under_the_demo_judge_picks_the_best_reward():
  prompts = synthetic.eval_prompts(30)
  rng = random.Random(1)
  candidates = [[synthetic.demonstrate(synthetic.parse_prompt(p), rng) for _ in range(5)]
                for p in prompts]
  best, calls = judges.tournament(prompts, candidates, judges.DemoJudge())
  assert calls == 30 * 4  # symmetric: one call per comparison
  for prompt, row, index in zip(prompts, candidates, best):
    rewards = [synthetic.reward(prompt, response) for response in row]
    assert rewards[index] == max(rewards)
  with pytest.raises(ValueError, match="no candidates"):
    judges.tournament(["p"], [[]], judges.DemoJudge())

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
  assert not noisy.persistent and noisy.queries == 0
  persistent = judges.judge_from_spec("noisy_persistent:0.2:demo")
  assert isinstance(persistent, judges.PersistentNoisyJudge) and persistent.persistent
  assert persistent.flip == 0.2 and persistent.symmetric and judges.has_reward(persistent)
  assert persistent.spec == "noisy_persistent:0.2:demo"
  nested = judges.judge_from_spec("noisy:0.1:fake_judges:first_position_biased")
  assert isinstance(nested.judge, fake_judges.FirstPositionBiased) and not nested.symmetric
  for spec, message in [("noisy:1.5:demo", "noisy:P:SPEC"), ("noisy:x:demo", "noisy:P:SPEC"),
                        ("noisy_persistent:1.5:demo", "noisy_persistent:P:SPEC"),
                        ("noisy_persistent:-0.1:demo", "noisy_persistent:P:SPEC"),
                        ("noisy_persistent:0.2", "noisy_persistent:P:SPEC"),
                        ("gpt-judge", "registered judges"),
                        ("no_such_module_xyz:make", "cannot import module"),
                        ("fake_judges:missing", "no callable 'missing'"),
                        ("fake_judges:not_a_judge", "has no prefer"),
                        (f"reward_model:{tmp_path}", "not a dro_jax reward_model workdir"),
                        (f"preference_model:{tmp_path / 'nope'}", "preference_model workdir"),
                        ("", "non-empty")]:
    with pytest.raises(ValueError, match=message):
      judges.judge_from_spec(spec)


def _answer_pairs(count: int, seed: int = 3):
  prompts = synthetic.eval_prompts(count)
  rng = random.Random(seed)
  a = [synthetic.demonstrate(synthetic.parse_prompt(p), rng) for p in prompts]
  b = [synthetic.demonstrate(synthetic.parse_prompt(p), rng) for p in prompts]
  return prompts, a, b


def test_persistent_noisy_judge_flips_the_same_rows_every_time():
  prompts, a, b = _answer_pairs(2000)
  clean = judges.DemoJudge().prefer(prompts, a, b)
  noisy = judges.judge_from_spec("noisy_persistent:0.2:demo")
  first = noisy.prefer(prompts, a, b)
  flipped = first != clean
  decided = clean != 0.5
  assert 0.17 < flipped[decided].mean() < 0.23  # P = 0.2
  np.testing.assert_array_equal(noisy.prefer(prompts, a, b), first)  # asked again: the same
  np.testing.assert_array_equal(first, judges.judge_from_spec(
      "noisy_persistent:0.2:demo").prefer(prompts, a, b))  # a rerun flips the same rows
  # Reversed batch order and swapped sides: the same comparisons flipped, so still symmetric.
  np.testing.assert_array_equal(noisy.prefer(prompts[::-1], a[::-1], b[::-1]), first[::-1])
  np.testing.assert_array_equal(noisy.prefer(prompts, b, a), 1.0 - first)
  assert noisy.queries == 4 * 2000  # counted, though it draws nothing from the count
  other_seed = judges.PersistentNoisyJudge(judges.DemoJudge(), 0.2, seed=1).prefer(prompts, a, b)
  assert np.any(other_seed != first)


def test_fresh_noisy_judge_draws_an_independent_flip_per_query():
  prompts, a, b = _answer_pairs(2000)
  clean = judges.DemoJudge().prefer(prompts, a, b)
  decided = clean != 0.5
  noisy = judges.judge_from_spec("noisy:0.2:demo")
  first = noisy.prefer(prompts, a, b)
  assert noisy.queries == 2000
  second = noisy.prefer(prompts, a, b)  # the same pairs asked again: queries 2000..3999
  assert noisy.queries == 4000
  flips_1, flips_2 = (first != clean)[decided], (second != clean)[decided]
  assert 0.17 < flips_1.mean() < 0.23 and 0.17 < flips_2.mean() < 0.23  # P = 0.2
  # Independent: both flipped about P² of the time (persistent noise: P), and the two differ.
  assert 0.025 < (flips_1 & flips_2).mean() < 0.06
  assert np.any(first != second)
  # Over many queries the flip rate is P, and the flip of query i is u(seed, i) < P.
  many = judges.NoisyJudge(judges.DemoJudge(), 0.3)
  flips = many.flipped(prompts, a, b, 0)
  assert flips.shape == (2000,)
  uniform = judges.query_uniforms(many.key, 0, 200_000)
  assert abs((uniform < 0.3).mean() - 0.3) < 0.005 and abs(uniform.mean() - 0.5) < 0.005
  np.testing.assert_array_equal(flips, uniform[:2000] < 0.3)
  # Reproducible from the seed: a new judge asked the same sequence flips the same rows; another
  # seed does not.
  again = judges.judge_from_spec("noisy:0.2:demo")
  np.testing.assert_array_equal(again.prefer(prompts, a, b), first)
  np.testing.assert_array_equal(again.prefer(prompts, a, b), second)
  other_seed = judges.NoisyJudge(judges.DemoJudge(), 0.2, seed=1).prefer(prompts, a, b)
  assert np.any(other_seed != first)
  # Batching does not matter, only the query index: two halves asked in turn equal one call.
  halves = judges.judge_from_spec("noisy:0.2:demo")
  np.testing.assert_array_equal(np.concatenate([halves.prefer(prompts[:700], a[:700], b[:700]),
                                                halves.prefer(prompts[700:], a[700:], b[700:])]),
                                first)
  # The counter restored: a judge set to query 2000 continues as the first one did.
  restored = judges.judge_from_spec("noisy:0.2:demo")
  restored.queries = 2000
  np.testing.assert_array_equal(restored.prefer(prompts, a, b), second)
  # (b, a) asked after (a, b) is another query, drawn apart: not the mirror of the first answer.
  both = judges.judge_from_spec("noisy:0.2:demo").prefer(prompts * 2, a + b, b + a)
  np.testing.assert_array_equal(both[:2000], first)
  mirrored = (both[2000:] == 1.0 - first)[decided]
  assert 0.6 < mirrored.mean() < 0.75  # agree when both or neither flipped: 0.8² + 0.2² = 0.68
  with pytest.raises(ValueError, match=">= 0"):
    restored.queries = -1


def test_nested_noisy_judges_count_together_and_draw_apart():
  prompts, a, b = _answer_pairs(2000)
  clean = judges.DemoJudge().prefer(prompts, a, b)
  decided = clean != 0.5
  nested = judges.judge_from_spec("noisy:0.2:noisy:0.2:demo")
  verdicts = nested.prefer(prompts, a, b)
  assert nested.queries == nested.judge.queries == 2000
  nested.queries = 5
  assert nested.judge.queries == 5
  # Two independent flips at 0.2: the verdict ends flipped with 2 · 0.2 · 0.8 = 0.32.
  assert 0.28 < (verdicts != clean)[decided].mean() < 0.36


def test_one_oracle_ranking_then_labelling_gets_fresh_noise_on_the_labels():
  """The issue's case: the best-worst pair survives a persistent oracle's tournament only when
  its flip did not hide it, so its labels are wrong less often than P; fresh noise labels it
  wrong at P."""
  problems = synthetic.sample_problems(2000, 7)
  prompts = [problem.prompt for problem in problems]
  rng = random.Random(11)
  candidates = [[synthetic.demonstrate(problem, rng) for _ in range(4)] for problem in problems]
  demo = judges.DemoJudge()
  wrong = {}
  for spec in ("noisy:0.3:demo", "noisy_persistent:0.3:demo"):
    oracle = judges.judge_from_spec(spec)
    best, _ = judges.tournament(prompts, candidates, oracle)
    worst, _ = judges.tournament(prompts, candidates, oracle, worst=True)
    rows = [i for i in range(len(prompts)) if best[i] != worst[i]]
    firsts = [candidates[i][best[i]] for i in rows]
    seconds = [candidates[i][worst[i]] for i in rows]
    row_prompts = [prompts[i] for i in rows]
    truth = demo.prefer(row_prompts, firsts, seconds)
    labels = oracle.prefer(row_prompts, firsts, seconds)
    decided = truth != 0.5
    wrong[spec] = float((labels != truth)[decided].mean())
  assert 0.25 < wrong["noisy:0.3:demo"] < 0.35, wrong
  assert wrong["noisy_persistent:0.3:demo"] < wrong["noisy:0.3:demo"] - 0.03, wrong


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

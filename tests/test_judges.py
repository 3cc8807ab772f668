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

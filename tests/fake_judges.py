"""Judges for the tests, importable as `fake_judges:NAME` judge specs (tests/ is on sys.path)."""

import numpy as np

from dro_jax.data import synthetic


class FirstPositionBiased:
  """A judge with a strong first-position bias: P(a better) = 0.9 when a's demo reward is at
  least b's, else 0.3, so a response shown first wins most comparisons whatever it is."""

  def prefer(self, prompts, responses_a, responses_b):
    rewards_a = np.array([synthetic.reward(p, r) for p, r in zip(prompts, responses_a)])
    rewards_b = np.array([synthetic.reward(p, r) for p, r in zip(prompts, responses_b)])
    return np.where(rewards_a >= rewards_b, 0.9, 0.3)


def first_position_biased():
  return FirstPositionBiased()


class Matrix:
  """Candidates are "0", "1", ...: P(i better than j) = matrix[i, j] (any matrix with
  matrix + matrix.T = 1), answered in the order asked; counts the comparisons it is asked."""

  def __init__(self, matrix):
    self.matrix = np.asarray(matrix, np.float64)
    self.calls = 0

  def prefer(self, prompts, responses_a, responses_b):
    self.calls += len(prompts)
    return np.array([self.matrix[int(a), int(b)] for a, b in zip(responses_a, responses_b)])


not_a_judge = object

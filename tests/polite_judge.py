"""A judge of your own, for the online loop's oracle: `polite_judge:make_judge`.

A prompt is "say politely: <request>". The best answer asks for the request, says "please" and
adds nothing else.
"""

import numpy as np


def reward(prompt: str, response: str) -> float:
  request = prompt.split(":", 1)[-1].split()
  words = response.split()
  polite = 1.0 if "please" in words else 0.0
  faithful = 0.5 if " ".join(request) in " ".join(words) else 0.0
  extra = max(len(words) - len(request) - 1, 0)  # words beyond the request and "please"
  return polite + faithful - 0.1 * extra


class PoliteJudge:
  """Prefers the answer with the higher reward; equal rewards tie."""

  symmetric = True  # its verdict does not depend on which answer is shown first

  def score(self, prompts, responses):
    return np.array([reward(p, r) for p, r in zip(prompts, responses)])

  def prefer(self, prompts, responses_a, responses_b):
    a, b = self.score(prompts, responses_a), self.score(prompts, responses_b)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def make_judge():
  return PoliteJudge()

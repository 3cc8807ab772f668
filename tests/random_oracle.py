"""An oracle that answers at random on every call: `random_oracle:make_oracle` (tests of the
online loop as several processes). Each process counts the comparisons it was asked in
$RANDOM_ORACLE_LOG/p<process index>.calls."""

import os

import numpy as np


class RandomOracle:
  """P(A) drawn afresh on every call from this process's own generator."""

  def __init__(self):
    self.rng = np.random.default_rng(os.getpid())
    self.calls = 0

  def prefer(self, prompts, responses_a, responses_b):
    import jax
    self.calls += len(prompts)
    folder = os.environ.get("RANDOM_ORACLE_LOG")
    if folder:
      with open(os.path.join(folder, f"p{jax.process_index()}.calls"), "w") as f:
        f.write(str(self.calls))
    return self.rng.random(len(prompts))


def make_oracle():
  return RandomOracle()

"""An oracle that answers differently on every call and in every process:
`random_oracle:make_oracle` (tests of the online loop as several processes).

The i-th comparison it is ever asked is answered with a draw keyed by (process index, i): two
processes that both asked it would train on different pairs, and no two calls share an answer.
The online loop restores `queries` from the calls on disk when it resumes, as it does for a noisy
oracle, so a resumed run draws what an uninterrupted one draws. Each process appends the number
of comparisons of each call to $RANDOM_ORACLE_LOG/p<process index>.calls."""

import os

import numpy as np


class RandomOracle:

  def __init__(self):
    self.queries = 0

  def prefer(self, prompts, responses_a, responses_b):
    import jax
    first, self.queries = self.queries, self.queries + len(prompts)
    folder = os.environ.get("RANDOM_ORACLE_LOG")
    if folder:
      with open(os.path.join(folder, f"p{jax.process_index()}.calls"), "a") as f:
        f.write(f"{len(prompts)}\n")
    return np.random.default_rng([jax.process_index(), first]).random(len(prompts))


def make_oracle():
  return RandomOracle()


def calls(folder, index: int) -> int:
  """The comparisons process `index` was asked, over every run that logged to `folder`."""
  path = os.path.join(folder, f"p{index}.calls")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(int(line) for line in f if line.strip())

"""One process of tests/test_pod_online.py's judge check, run by launch/local.py:
`python tests/pod_worker.py OUTDIR`.

A judge that answers at random on every call (a different draw in each process), asked through
`judges.on_process_zero`, and a phase file written through the online loop's writer; each process
writes what it got to OUTDIR/p<index>.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dro_jax import main as driver  # noqa: E402


class RandomJudge:
  """P(A) drawn afresh on every call, from this process's own generator."""

  def __init__(self):
    import numpy as np
    self.rng = np.random.default_rng(os.getpid())
    self.calls = 0
    self.queries = 0

  def prefer(self, prompts, responses_a, responses_b):
    self.calls += len(prompts)
    return self.rng.random(len(prompts))


def main() -> None:
  out = sys.argv[1]
  driver.maybe_initialize_distributed()
  import jax
  from dro_jax import judges, online
  judge = RandomJudge()
  shared = judges.on_process_zero(judge)
  prompts = [f"p{i}" for i in range(37)]
  first = shared.prefer(prompts, ["a"] * 37, ["b"] * 37)
  shared.queries = 5  # set through the wrapper: the judge's own counter
  phase = os.path.join(out, "phase.json")
  online.write_text(phase, json.dumps({"from": jax.process_index()}))
  seen = json.loads(open(phase).read())  # written before any process goes on
  with open(os.path.join(out, f"p{jax.process_index()}.json"), "w") as f:
    json.dump({"values": first.tolist(), "calls": judge.calls, "queries": judge.queries,
               "processes": jax.process_count(), "phase": seen}, f)


if __name__ == "__main__":
  main()

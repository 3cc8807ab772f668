"""The online demo: online IPO against the programmatic judge on the embedded task (CPU, minutes).

  python -m dro_jax.main --config configs/demo_online.py --workdir /tmp/demo_online

SFT on the demo's demonstrations (<workdir>/sft), then 3 iterations of: the policy's own answer
and 4 more per prompt, the best of the 4 by a knock-out tournament under the demo's judge (the
enhancer), the policy's answer against that best, labelled by the judge, IPO (τ = 0.1)
on every pair so far from the previous iterate, evaluated against SFT on held-out prompts.
<workdir>/online.md and online.png hold the table and the curves. This is configs/online.py at
size=tiny; its args (seed, pairing, loss, oracle, reference, iterations, ...) apply here too.
"""

from dro_jax import configs


def get_config(arg=None):
  return configs.load("online", "size=tiny" + (f",{arg}" if arg else ""))

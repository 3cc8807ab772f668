"""IPO on pairs (per-token averaged log-ratios); TR-IPO with `tr=soft|hard|hybrid`.

  python -m dro_jax.main --config configs/ipo.py:size=large,tau=0.1 --workdir /tmp/ipo

Args (comma-separated k=v): size, family, tau, tr, alpha, sync_every, task, steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "ipo", tau=0.1)
  config = configs.base_config("ipo", args)
  config.ipo.tau = args.tau
  return configs.finalize(config, args)

"""DPO on (prompt, chosen, rejected) pairs; TR-DPO with `tr=soft|hard|hybrid`.

  python -m dro_jax.main --config configs/dpo.py:size=large,tr=soft,alpha=0.6 --workdir /tmp/tr_dpo

Args (comma-separated k=v): size, family, beta, label_smoothing, tr, alpha, sync_every, task,
steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "dpo", beta=0.1, label_smoothing=0.0)
  config = configs.base_config("dpo", args)
  config.dpo.beta = args.beta
  config.dpo.label_smoothing = args.label_smoothing
  return configs.finalize(config, args)

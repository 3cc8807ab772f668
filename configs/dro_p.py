"""DRO-P (the DRO paper's Appendix B): the batch mean of r − τℓ in place of a value network.

  python -m dro_jax.main --config configs/dro_p.py:size=large --workdir /tmp/dro_p

Args (comma-separated k=v): size, family, tau, tr, task, steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "dro_p", tau=1.0)
  config = configs.base_config("dro_p", args)
  if args.size != "tiny":  # tiny: the size preset's
    config.total_steps = 40_000
  config.dro.tau = args.tau
  config.data.reward_mode = "normalized"
  return configs.finalize(config, args)

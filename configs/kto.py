"""KTO on single-trajectory data (desirable: thumbs label, else reward above the batch mean).

  python -m dro_jax.main --config configs/kto.py:size=large,beta=5 --workdir /tmp/kto

The DRO paper's KTO baseline: β ∈ {0.1, 1, 5} (best 5), λ_D = λ_U = 1, its DRO-V optimizer.
Args (comma-separated k=v): size, family, beta, desirable_weight, undesirable_weight,
tr (TR-KTO: soft | hard | hybrid), task, steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
  config = configs.base_config("kto", args)
  if args.size != "tiny":  # tiny: the size preset's
    config.total_steps = 40_000
  config.kto.beta = args.beta
  config.kto.desirable_weight = args.desirable_weight
  config.kto.undesirable_weight = args.undesirable_weight
  return configs.finalize(config, args)

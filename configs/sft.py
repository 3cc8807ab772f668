"""Supervised fine-tuning (token cross-entropy): the SFT stage before alignment.

  python -m dro_jax.main --config configs/sft.py:size=tiny --workdir /tmp/sft

Args (comma-separated k=v): size, family, task, steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "sft")
  config = configs.base_config("sft", args)
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3 if args.size == "tiny" else 1e-4
  config.optimizer.warmup_steps = 100
  config.reference.alpha = 0.0
  return configs.finalize(config, args)

"""Bradley-Terry reward model: a T5 encoder over prompt ‖ response with a scalar head.

  python -m dro_jax.main --config configs/reward_model.py:size=large --workdir /tmp/rm

Args (comma-separated k=v): size, family, task, steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "reward_model")
  config = configs.base_config("reward_model", args)
  config.optimizer.multiply_by_parameter_scale = False  # its head starts at zero
  config.reference.alpha = 0.0
  config.max_input_length = 1024
  return configs.finalize(config, args)

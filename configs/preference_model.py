"""General pairwise preference model: "x ‖ y1 ‖ y2" -> "A" or "B", both orders.

  python -m dro_jax.main --config configs/preference_model.py:size=large --workdir /tmp/pm

`preference.a_token` / `b_token` default to the vocabulary's ids of "A" and "B".
Args (comma-separated k=v): size, family, task, steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "preference_model")
  config = configs.base_config("preference_model", args)
  config.reference.alpha = 0.0
  config.max_input_length = 1024
  return configs.finalize(config, args)

"""General pairwise preference model: "x ‖ y1 ‖ y2" -> "A" or "B", both orders.

  python -m dro_jax.main --config configs/preference_model.py:size=large --workdir /tmp/pm

The two label ids (`preference.a_token` / `b_token`, or by piece `preference.a_piece` /
`b_piece`) default to ids of the run's vocabulary: its reserved `<preference_a>` / `<preference_b>`
pieces (ids 3 and 4 of a vocabulary `python -m dro_jax.vocabulary` trains), else the pieces of
"A" and "B" (T5's own vocabulary, the demo's), else T5's sentinels `<extra_id_0>` / `<extra_id_1>`.
Equal, unknown (unk) or out-of-vocabulary ids are refused before anything is written;
config.json records the ids and their pieces.
Args (comma-separated k=v): size, family, task, steps, batch, lr, init.
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "preference_model")
  config = configs.base_config("preference_model", args)
  config.reference.alpha = 0.0
  config.max_input_length = 1024
  return configs.finalize(config, args)

"""DRO-V (the DRO paper's recipe): single-trajectory (prompt, response, reward), value network.

  python -m dro_jax.main --config configs/dro.py:size=large --workdir gs://bucket/dro_large

Paper recipe: Adafactor (decay 0.8), lr 1e-4 for both networks, 150 warm-up steps, batch 32,
τ = 1, rewards z-normalised over the dataset, 40k steps for T5-L and 20k for T5-XL.
Args (comma-separated k=v): size, family, value (double_multiple | double_single |
single_multiple | single_single), value_optimizer (value | policy: the chain of a single-net
variant's value, see dro_jax/configs.py), tau, value_lr, tr (none | soft | hard | hybrid), task,
steps, batch, lr, init. The paper's single-net ablation:
`value=single_single,value_optimizer=policy` (or single_multiple).
"""

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "dro", value="double_multiple", tau=1.0, value_lr="",
                           value_optimizer="value")
  config = configs.base_config("dro", args)
  if args.size in ("large", "base", "small"):  # else base_config's 20k (tiny: the size preset's)
    config.total_steps = 40_000
  config.dro.value_function = args.value
  config.dro.tau = args.tau
  if args.value_optimizer not in ("value", "policy"):
    raise ValueError(f"arg value_optimizer={args.value_optimizer!r}: choose 'value' or 'policy'")
  config.dro.value_optimizer = args.value_optimizer
  if args.value_lr:
    config.optimizer.value_learning_rate = float(args.value_lr)
  config.data.reward_mode = "normalized"
  return configs.finalize(config, args)

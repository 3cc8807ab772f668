"""The embedded demo, end to end on a laptop CPU: SFT -> samples judged -> DRO-V, KTO, DPO, TR-DPO.

  python -m dro_jax.main --config configs/demo.py --workdir /tmp/demo

A small T5.1.1 learns the demo task's careless demonstrations from scratch (SFT), answers the
feedback prompts with its own samples, which the programmatic judge scores; DRO-V and KTO learn
from those single-trajectory triples, DPO and TR-DPO from best-vs-worst pairs of the same
samples; each is judged side by side against SFT on held-out prompts. Stages live in
<workdir>/{sft,samples,dro,kto,dpo,tr_dpo} and resume; <workdir>/results.md has the table and
plot. Args (comma-separated k=v): seed, scale (a factor on every step count, e.g. 0.25 for a
quick run), negate (1: the judge's rewards negated, a control that must make DRO-V worse),
methods (joined by "+", e.g. methods=dro+kto), workers (alignment stages trained at once in
worker processes; default 2, 1 trains them one after another in this process).
"""

import ml_collections

from dro_jax import configs


def get_config(arg=None):
  args = configs.parse_arg(arg, "demo", seed=0, scale=1.0, negate=0, methods="dro+kto+dpo+tr_dpo",
                           workers=2)
  methods = tuple(args.methods.split("+"))
  unknown = sorted(set(methods) - {"dro", "kto", "dpo", "tr_dpo"})
  if unknown:
    raise ValueError(f"{configs.recipe_path('demo')}: arg methods: unknown {unknown}; choose "
                     f"from dro, kto, dpo, tr_dpo")
  config = configs.base_config("dro", args)
  config.runner = "demo"
  config.seed = args.seed
  # A 1.1M-parameter T5.1.1 in float32 over the demo's 96-piece vocabulary.
  config.model.vocab_size = 128
  config.model.emb_dim, config.model.num_heads, config.model.head_dim = 128, 4, 32
  config.model.num_encoder_layers = config.model.num_decoder_layers = 2
  config.model.mlp_dim = 384
  config.compute_dtype = "float32"
  config.mesh_shape = (1, 1, 1)  # one device: a model this small only slows down when split
  config.max_input_length, config.max_target_length = 16, 12
  scale = args.scale
  config.demo = ml_collections.ConfigDict({
      "sft_steps": max(int(1500 * scale), 10), "sft_batch": 64, "sft_lr": 2e-3,
      "sft_examples": 40_000,
      "feedback_prompts": max(int(1000 * scale), 32), "samples_per_prompt": 4,
      "align_steps": max(int(400 * scale), 8), "align_batch": 64, "align_lr": 1e-3,
      "warmup_steps": 40, "evaluations": 4,
      # Not scaled: sampling is cheap next to training, and the interval needs the comparisons.
      "eval_prompts": 400, "final_samples": 2,
      "tau": 1.0, "kto_beta": 1.0, "dpo_beta": 0.5, "tr_alpha": 0.6,
      "methods": methods,
      "negate_rewards": bool(args.negate),
      "max_decode_length": 12,
      # Alignment stages trained at once, each in its own process (1: one after another here).
      "workers": max(int(args.workers), 1),
  })
  config.data.demo = True  # the embedded demo task, its vocabulary and judge
  configs.mark(config, "recipe")
  config.lock()
  return config

"""Online iterative RLHF with a general preference oracle (dro_jax/online.py, docs/methods.md).

  python -m dro_jax.main --config configs/online.py:size=tiny --workdir /tmp/online

Per iteration: sample `online.samples` answers per prompt from the current policy, pick the
enhancer's best by a knock-out tournament under the preference model, pair (the main agent's
sample against the best, or best against worst), label each pair with the oracle (a judge spec),
then train IPO (or DPO) on the pairs, warm-started from the previous iterate. On `size=tiny`
with no `init` and no `task` it runs on the demo task (`data.demo=True`) and first trains SFT on
the demo's demonstrations in <workdir>/sft (like configs/demo.py); elsewhere set
`init_checkpoint` (an SFT policy: the model's dimensions are read from it) and the prompts
(`data.task`'s train split, or `online.prompts_file`). size=tiny's settings fill only the keys
nobody else set.

Args (comma-separated k=v): size, family, task, steps (per iteration), batch, lr, init, loss (ipo
| dpo), iterations, samples, pairing (enhancer | best_worst), oracle (a judge spec), reference
(sft | previous | ema), preference_model (oracle | fit), seed.
"""

import ml_collections

from dro_jax import configs

PAIRINGS = ("enhancer", "best_worst")
REFERENCES = ("sft", "previous", "ema")
PREFERENCE_MODELS = ("oracle", "fit")


def get_config(arg=None):
  args = configs.parse_arg(arg, "online", loss="ipo", iterations=3, samples=4,
                           pairing="enhancer", oracle="demo", reference="sft",
                           preference_model="oracle", seed=0)
  for name, value, choices in (("loss", args.loss, ("ipo", "dpo")),
                               ("pairing", args.pairing, PAIRINGS),
                               ("reference", args.reference, REFERENCES),
                               ("preference_model", args.preference_model, PREFERENCE_MODELS)):
    if value not in choices:
      raise ValueError(f"{configs.recipe_path('online')}: arg {name}={value!r}: choose from "
                       f"{choices}")
  config = configs.base_config(args.loss, args)
  config.runner = "online"
  config.seed = args.seed
  tiny = args.size == "tiny"
  config.online = ml_collections.ConfigDict({
      "iterations": int(args.iterations),  # K
      "samples": int(args.samples),  # n answers per prompt
      "temperature": 1.0,
      "prompts": 512 if tiny else 2048,  # prompts per iteration
      "steps": 120 if tiny else 500,  # optimizer steps per iteration
      # enhancer: the main agent's own sample (the first) against the best of n (the paper);
      # best_worst: tournament winner against tournament loser (iterative DPO).
      "pairing": args.pairing,
      # enhancer pairing: independent: the enhancer's best of `samples` is taken over fresh
      # samples, drawn apart from the main agent's (the paper; n + 1 answers per prompt);
      # shared: over the n answers, the main agent's own included.
      "enhancer": "independent",
      "oracle": args.oracle,  # the judge spec that labels the pairs
      # bernoulli: the first answer of a pair is chosen with the oracle's probability P (drawn
      # from seed, iteration, row: the paper's general preference oracle); threshold: chosen
      # when P > 0.5. Alike for a judge of hard verdicts. P = 0.5 exactly is dropped as a tie.
      "labels": "bernoulli",
      # Ask a non-symmetric ranker and oracle in both orders and average (the tournament and
      # the labels: what is trained on, so fixed on resume; evaluation.debias is the
      # evaluation's own, free to change).
      "debias": True,
      # oracle: rank with the oracle itself; fit: with a preference model refit each iteration
      # on every oracle-labelled pair so far (warm-started).
      "preference_model": args.preference_model,
      "fit_steps": 300 if tiny else 1000,  # the refit's steps per iteration
      # The refit's prompt length (at most the policy's; its answers: max_target_length).
      "fit_max_input_length": 64 if tiny else 1024,
      # At most this many labelled pairs per iteration, counted after ties are dropped (0: all).
      "max_pairs": 0,
      # At most this many oracle calls per iteration for labelling (0: no cap); the pairs are
      # asked in order until the next would pass it (an equal oracle budget across runs).
      "max_oracle_calls": 0,
      # At most this many paid requests to an api:MODEL@BASE_URL oracle over the run (its
      # verdict cache's life; 0: no cap): the next batch that would pass it stops the run with
      # its state and every paid verdict saved, exit 3 (docs/llm_judges.md).
      "oracle_max_calls": 0,
      "accumulate": True,  # train on every iteration's pairs so far (False: this one's)
      # sft: the SFT policy, fixed; previous: iterate k-1; ema: moved towards the policy as the
      # trust-region rule `reference.alpha` / `reference.sync_every` says.
      "reference": args.reference,
      "prompts_file": ml_collections.config_dict.placeholder(str),  # JSONL "prompt" or lines
      # Held-out prompts of each iteration's evaluation (the first evaluation.prompts of them);
      # default: the task's (the demo's, or data.task / data.eval_files' eval split).
      "eval_prompts_file": ml_collections.config_dict.placeholder(str),
      # The KL guard: above this KL(π‖SFT) (nats per answer) an iteration is warned about, on
      # the console and in online.md (healthy demo runs: 1-5; dro_jax/online.py DEFAULT_MAX_KL).
      "max_kl": 10.0,
      "max_decode_length": ml_collections.config_dict.placeholder(int),  # max_target_length
      # SFT on the demo's demonstrations when no init_checkpoint is given (demo task only).
      "sft_steps": 1000, "sft_batch": 64, "sft_lr": 2e-3, "sft_examples": 40_000,
  })
  if args.reference == "ema":
    config.reference.alpha, config.reference.sync_every = 0.6, 8
  config.ipo.tau, config.dpo.beta = 0.1, 0.1
  config.reference_cache = "off"  # the reference is in the state (it may move)
  config.keep_best = 0
  if tiny:  # the demo's model and optimizer settings, into the keys still at their default
    demo = not args.init and not args.task
    # IPO's learning rate: the demo's 1e-3 (fresh prompts every iteration); 1e-4 on a task of
    # your own, where 1e-3 over a small prompt pool took KL(π‖SFT) from 10 to 20 nats in two
    # iterations and lost to SFT, and 1e-4 stayed near 1-2 and won (docs/online.md).
    configs.apply_size_preset(config, {
        "model.vocab_size": 128, "model.emb_dim": 128, "model.num_heads": 4,
        "model.head_dim": 32, "model.num_encoder_layers": 2, "model.num_decoder_layers": 2,
        "model.mlp_dim": 384, "compute_dtype": "float32", "mesh_shape": (1, 1, 1),
        "batch_size": 64, "optimizer.learning_rate": 1e-3 if demo else 1e-4,
        "optimizer.warmup_steps": 20,
        "evaluation.prompts": 200, "evaluation.samples": 2})
    # The documented demo case: no SFT policy and no task given (a user's own prompts or data,
    # given on the command line, are then refused by name: --config.data.demo=False).
    if demo:
      config.data.demo = True
  config.evaluation.max_decode_length = ml_collections.config_dict.placeholder(int)
  configs.finalize(config, args)
  if args.steps:  # `steps` is per iteration
    config.online.steps = int(args.steps)
  config.total_steps = config.online.steps * config.online.iterations
  config.checkpoint_every = config.online.steps
  config.eval_every = 0  # evaluated once per iteration by the loop
  config.log_every = max(config.online.steps // 10, 1)
  configs.mark(config, "recipe")
  return config

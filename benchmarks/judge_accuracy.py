"""Held-out accuracy of two judges, a Bradley-Terry reward model and a pairwise preference model.

  python benchmarks/judge_accuracy.py --output /tmp/judge_accuracy                # seeds 0, 1, 2
  python benchmarks/judge_accuracy.py --output /tmp/judge_accuracy --steps 500 --seeds 0

Trains `configs/reward_model.py` and `configs/preference_model.py` (size tiny, one device) on three
pairwise tasks of the embedded demo data (`dro_jax/data/synthetic.py`): the demo's pairs (better vs
worse careless demonstration), the cyclic task (three response types per prompt with A ≻ B ≻ C ≻ A,
which no scalar reward fits beyond 2/3 of the pairs) and its transitive control (A ≻ B ≻ C, A ≻ C).
Each run trains in this process with `train.run` and is evaluated once, at its last step, on the
task's validation split (held-out prompts); the number reported is its `eval/rewards/accuracies`
(share of held-out pairs where the judge prefers the chosen response). A finished run's workdir
(`OUTPUT/<task>_<model>_steps<N>_lr<LR>_batch<B>_seed<S>`) is read back instead of trained again,
so an interrupted benchmark resumes; compiled steps are cached in OUTPUT/jax_cache. The seed is the
training seed (initialisation and data order); the data are the same for every seed. Prints and
writes OUTPUT/judge_accuracy.md (the markdown table) and OUTPUT/judge_accuracy.json (every run's
accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TASKS = {"pairs": "demo pairs", "cyclic": "cyclic (A ≻ B ≻ C ≻ A)",
         "transitive": "transitive control (A ≻ B ≻ C)"}
MODELS = {"reward_model": "reward model (Bradley-Terry)", "preference_model": "preference model"}
METRIC = "eval/rewards/accuracies"
# The smallest budget at which the preference model learns the cycle on seeds 0, 1 and 2 with a
# margin (held-out accuracy 1.0 from about step 200 on, at this learning rate and batch).
STEPS, LEARNING_RATE, BATCH, WARMUP, EVAL_EXAMPLES = 250, 2e-2, 16, 10, 200


def task_name(task: str, cache_dir: str) -> str:
  """Registers `task` ("pairs", "cyclic" or "transitive") in this process; its seqio name."""
  from dro_jax.data import synthetic
  if task == "pairs":
    return synthetic.register_demo_tasks(cache_dir, eval_examples=EVAL_EXAMPLES)["pairs"]
  return synthetic.register_intransitive_tasks(cache_dir, eval_examples=EVAL_EXAMPLES)[task]


def judge_config(model: str, task: str, *, cache_dir: str, seed: int = 0, steps: int = STEPS,
                 learning_rate: float = LEARNING_RATE, batch: int = BATCH, warmup: int = WARMUP):
  """The recipe `model` (reward_model / preference_model) on a registered Task, evaluated once.

  Evaluated at the last step on every validation pair (EVAL_EXAMPLES of them); one device, no
  checkpoint before the end.
  """
  from dro_jax import configs
  config = configs.load(model, f"size=tiny,steps={steps},batch={batch},lr={learning_rate}")
  config.seed = seed
  config.max_input_length = 16  # size=tiny keeps the recipes' own 1024
  config.mesh_shape = (1, 1, 1)  # one device: a model this small only slows down when split
  config.data.task = config.data.eval_task = task
  config.data.cache_dir = cache_dir
  config.optimizer.warmup_steps = warmup
  config.eval_every = config.checkpoint_every = steps
  config.eval_batches = -(-EVAL_EXAMPLES // batch)
  config.log_every = max(steps // 5, 1)
  return config


def final_accuracy(workdir: str, steps: int) -> float | None:
  """The run's held-out accuracy logged at `steps`, or None if it has not got there."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  values = [row[METRIC] for row in rows if METRIC in row and row.get("step") == steps]
  return float(values[-1]) if values else None


def train_judge(model: str, task: str, workdir: str, *, cache_dir: str, **settings) -> float:
  """Trains (or reads back a finished run of) `model` on a registered Task; its final accuracy."""
  from dro_jax import train
  config = judge_config(model, task, cache_dir=cache_dir, **settings)
  accuracy = final_accuracy(workdir, config.total_steps)
  if accuracy is None:
    train.run(config, workdir)
    accuracy = final_accuracy(workdir, config.total_steps)
  if accuracy is None:
    raise RuntimeError(f"{workdir}: no {METRIC} at step {config.total_steps} in metrics.jsonl")
  return accuracy


def cell(values: list[float]) -> str:
  spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return f"{np.mean(values):.3f} ± {spread:.3f}"


def table(results: dict[str, dict[str, dict[int, float]]], seeds: list[int], steps: int,
          learning_rate: float, batch: int) -> str:
  lines = [
      f"Held-out pairwise accuracy (`{METRIC}` on the {EVAL_EXAMPLES} validation pairs, held-out "
      f"prompts) after {steps} steps (T5.1.1 tiny, batch {batch}, Adafactor at {learning_rate:g} "
      f"after {WARMUP} warm-up steps); mean ± sd over training seeds {', '.join(map(str, seeds))}. "
      "A scalar reward can get at most 2/3 of the cyclic task's pairs right.",
      "",
      "| task | judge | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean ± sd |",
      "|---|---|" + "---|" * len(seeds) + "---|",
  ]
  for task, label in TASKS.items():
    for model, model_label in MODELS.items():
      values = results[task][model]
      lines.append(f"| {label} | {model_label} | "
                   + " | ".join(f"{values[seed]:.3f}" for seed in seeds)
                   + f" | {cell([values[seed] for seed in seeds])} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="workdirs, data cache and the table")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--lr", type=float, default=LEARNING_RATE)
  parser.add_argument("--batch", type=int, default=BATCH)
  args = parser.parse_args(argv)
  seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
  os.makedirs(args.output, exist_ok=True)
  cache_dir = os.path.join(args.output, "data_cache")
  import jax
  if not jax.config.jax_compilation_cache_dir:  # every seed compiles the same steps
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.output, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  settings = {"steps": args.steps, "learning_rate": args.lr, "batch": args.batch}
  results: dict[str, dict[str, dict[int, float]]] = {}
  for task in TASKS:
    name = task_name(task, cache_dir)
    for model in MODELS:
      for seed in seeds:
        workdir = os.path.join(args.output, f"{task}_{model}_steps{args.steps}_lr{args.lr:g}"
                                            f"_batch{args.batch}_seed{seed}")
        start = time.perf_counter()
        accuracy = train_judge(model, name, workdir, cache_dir=cache_dir, seed=seed, **settings)
        results.setdefault(task, {}).setdefault(model, {})[seed] = accuracy
        print(f"{task} {model} seed {seed}: {METRIC} {accuracy:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
  markdown = table(results, seeds, args.steps, args.lr, args.batch)
  with open(os.path.join(args.output, "judge_accuracy.md"), "w") as f:
    f.write(markdown)
  with open(os.path.join(args.output, "judge_accuracy.json"), "w") as f:
    json.dump({"settings": {**settings, "warmup": WARMUP, "seeds": seeds}, "results": results},
              f, indent=2)
  print(markdown)
  return markdown


if __name__ == "__main__":
  main()

"""`python -m dro_jax.evaluate --policy DIR --baseline DIR`: win rate of one policy over another.

    python -m dro_jax.evaluate --policy /tmp/demo/dro --baseline /tmp/demo/sft
    python -m dro_jax.evaluate --policy run/checkpoints/2000 --baseline google/flan-t5-base-dir \\
        --prompts prompts.jsonl --judge NAME --num_prompts 400 --temperature 1 --output /tmp/eval

DIR is a training workdir (its latest checkpoint; the model rebuilt from its config.json), one
step directory of it (`<workdir>/checkpoints/<step>`), or a Hugging Face or T5X checkpoint folder.
By default the prompts are the held-out prompts of the policy's task (the demo task's
`synthetic.eval_prompts`) and the judge is that task's (the demo's programmatic judge); each side
draws one sample per prompt at temperature 1, the policy with `--seed` and the baseline with
`--seed + 1`. Prints `win_rate 0.53 [0.47, 0.59] (n=400, ties=12)` (Wilson 95% interval) and
writes `evaluation.json` (every metric of `evaluation.evaluate_policies` and the settings) and
`samples.jsonl` (prompt, both responses, the judge's preference and rewards: what an external
judge needs) to `--output` (default `<policy workdir>/evaluation/step_<step>`, or
`./evaluation` for a checkpoint folder). When the policy is a checkpoint folder (say an exported
one), the task's defaults come from the baseline's workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from etils import epath  # noqa: E402

from dro_jax import checkpoint_manager, checkpoints, decoding, evaluation  # noqa: E402
from dro_jax import judges as judges_lib  # noqa: E402
from dro_jax.models import t5 as t5_lib  # noqa: E402

DEFAULT_NUM_PROMPTS = 400


@dataclasses.dataclass
class LoadedPolicy:
  """A policy read from disk, with what is known about how it was trained."""

  policy: evaluation.Policy
  path: str
  kind: str  # "workdir" (a workdir or one of its steps), "hf" or "t5x"
  step: int | None = None
  workdir: str | None = None
  run_config: ml_collections.ConfigDict | None = None  # the training config (workdirs only)
  vocabulary: str | None = None  # a sentencepiece model known to belong to it


def _step_dir(path: epath.Path) -> tuple[epath.Path, int] | None:
  """(workdir, step) for `<workdir>/checkpoints/<step>`."""
  if path.name.isdigit() and path.parent.name == "checkpoints" and (
      path.parent.parent / "config.json").exists():
    return path.parent.parent, int(path.name)
  return None


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))


def _first_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore_policy(workdir: str, step: int | None, config: t5_lib.T5Config) -> tuple[Any, int]:
  """The policy parameters of `step` (default: the latest) on this process's first device."""
  checkpointer = checkpoint_manager.Checkpointer(workdir)
  try:
    if step is None:
      step = checkpointer.latest_step()
      if step is None:
        raise ValueError(f"{workdir}: the workdir has no complete checkpoint")
    elif step not in checkpointer.all_steps():
      raise ValueError(f"{workdir}: no checkpoint of step {step} (steps: "
                       f"{checkpointer.all_steps()})")
    device = _first_device()
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        t5_lib.abstract_params(config))
    import flax.linen as nn
    return checkpointer.restore_item(step, "policy", nn.unbox(like)), step
  finally:
    checkpointer.close()


def load_policy(path: str, *, dtype: str | None = None) -> LoadedPolicy:
  """A workdir (latest step), a step directory of one, or an HF / T5X checkpoint folder."""
  from dro_jax import step as step_lib
  location = epath.Path(path)
  if not location.exists():
    raise ValueError(f"{path}: no such folder")
  step_dir = _step_dir(location)
  if step_dir or ((location / "checkpoints").is_dir() and (location / "config.json").exists()):
    workdir, step = step_dir if step_dir else (location, None)
    run_config = read_run_config(str(workdir))
    if run_config.loss == "reward_model":
      raise ValueError(f"{path}: a reward model's workdir holds no policy to sample from")
    config = step_lib.t5_config(run_config)
    if dtype:
      config = config.replace(dtype=dtype)
    params, step = _restore_policy(str(workdir), step, config)
    return LoadedPolicy(evaluation.Policy(params, config), path, "workdir", step, str(workdir),
                        run_config, _run_vocabulary(run_config))
  kind = checkpoints.checkpoint_kind(path)
  config, params = checkpoints.load_checkpoint(path, dtype=dtype)
  # Placed as a restored workdir policy is, so both share one compiled sampler.
  params = jax.device_put(params, _first_device())
  spiece = location / "spiece.model"
  return LoadedPolicy(evaluation.Policy(params, config), path, kind,
                      vocabulary=str(spiece) if spiece.exists() else None)


# ------------------------------------------------------------------------- the task's defaults


def is_demo(run_config: ml_collections.ConfigDict) -> bool:
  """Whether the run trained on the embedded demo task (the default when no data is given)."""
  from dro_jax.data import synthetic
  data = run_config.data
  if data.get("train_files"):
    return False
  return not data.get("task") or data.task in synthetic.TASK_NAMES.values()


def _run_vocabulary(run_config: ml_collections.ConfigDict) -> str | None:
  """The sentencepiece model of the run's data when a path is known without registering Tasks."""
  from dro_jax.data import synthetic
  if is_demo(run_config):
    return synthetic.demo_vocabulary(run_config.data.get("cache_dir"))
  return run_config.data.get("vocabulary") or None


def task_vocabulary(run_config: ml_collections.ConfigDict) -> Any:
  """The vocabulary of the run's training Task (registered as training registers it)."""
  from dro_jax import train
  task, _ = train.resolve_data(run_config)
  return train.vocabulary_of(task)


def held_out_prompts(run_config: ml_collections.ConfigDict, count: int) -> list[str]:
  """`count` held-out prompts of the run's task: the demo's evaluation prompts, or the distinct
  prompts of the eval split of its eval Task, in file order."""
  from dro_jax.data import synthetic
  if is_demo(run_config):
    return synthetic.eval_prompts(count)
  from dro_jax import train
  from dro_jax.data import tasks
  task, eval_task = train.resolve_data(run_config)
  split = run_config.data.get("eval_split", "validation")
  prompts: dict[str, None] = {}
  for component, _ in tasks.component_tasks(eval_task or task):
    for example in tasks.feedback_source(component).examples(split):
      prompts.setdefault(example["inputs"])
      if len(prompts) == count:
        return list(prompts)
  if not prompts:
    raise ValueError(f"Task {eval_task or task} has no {split} prompts; pass --prompts FILE")
  return list(prompts)


def default_judge(run_config: ml_collections.ConfigDict | None) -> str:
  if run_config is not None and is_demo(run_config):
    return "demo"
  raise ValueError(f"no default judge for this policy's task; pass --judge (registered: "
                   f"{sorted(judges_lib.JUDGES)})")


def read_prompts(path: str) -> list[str]:
  """Prompts from a file: JSON lines with a "prompt" field (.jsonl), or one prompt per line."""
  text = epath.Path(path).read_text()
  if path.endswith(".jsonl"):
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
          raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" string")
        prompts.append(row["prompt"])
    return prompts
  return [line for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m dro_jax.evaluate",
                                   description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--policy", required=True, help="workdir, step directory, or HF / T5X folder")
  add("--baseline", required=True, help="workdir, step directory, or HF / T5X folder")
  add("--prompts", help="a .jsonl file with a \"prompt\" field per line, or one prompt per line "
      "(default: the held-out prompts of the policy's task)")
  add("--judge", help=f"one of {sorted(judges_lib.JUDGES)} (default: the policy's task's)")
  add("--num_prompts", type=int, help=f"the first N prompts (default: all of --prompts, or "
      f"{DEFAULT_NUM_PROMPTS} held-out prompts)")
  add("--num_samples", type=int, default=1, help="samples per prompt per side")
  add("--temperature", type=float, default=1.0, help="0 is greedy")
  add("--max_decode_length", type=int,
      help="default: the policy's max_target_length (64 for a checkpoint folder)")
  add("--seed", type=int, default=0, help="the policy's sampling seed")
  add("--baseline_seed", type=int, help="default: --seed + 1 (independent samples)")
  add("--vocabulary", help="sentencepiece model (default: the policy's task's, or spiece.model "
      "in a checkpoint folder)")
  add("--batch_size", type=int, default=64, help="prompts per sampling batch")
  add("--dtype", help="activation dtype (default: the run's, or bfloat16 on accelerators)")
  add("--output", help="folder for evaluation.json and samples.jsonl (default: "
      "<policy workdir>/evaluation/step_<step>, or ./evaluation)")
  return parser.parse_args(argv)


def _vocabulary(args: argparse.Namespace, policy: LoadedPolicy, baseline: LoadedPolicy) -> Any:
  from dro_jax.data import tasks
  path = args.vocabulary or policy.vocabulary or baseline.vocabulary
  if path:
    return tasks.load_vocabulary(path)
  for loaded in (policy, baseline):
    if loaded.run_config is not None:
      return task_vocabulary(loaded.run_config)
  raise ValueError("no vocabulary known for these checkpoints; pass --vocabulary "
                   "(a sentencepiece .model file)")


def _finite(value: Any) -> Any:
  """JSON has no NaN: non-finite floats become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _describe(loaded: LoadedPolicy) -> dict[str, Any]:
  return {"path": loaded.path, "kind": loaded.kind, "step": loaded.step}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  policy = load_policy(args.policy, dtype=args.dtype)
  baseline = load_policy(args.baseline, dtype=args.dtype)
  vocabulary = _vocabulary(args, policy, baseline)
  # The task's defaults come from the policy's run, or the baseline's (an exported policy).
  run = policy.run_config or baseline.run_config
  if args.prompts:
    prompts = read_prompts(args.prompts)[:args.num_prompts]
  elif run is not None:
    prompts = held_out_prompts(run, args.num_prompts or DEFAULT_NUM_PROMPTS)
  else:
    raise ValueError("neither checkpoint comes from a training workdir, so there is no task to "
                     "take held-out prompts from; pass --prompts FILE")
  judge_name = args.judge or default_judge(run)
  judge = judges_lib.get_judge(judge_name)
  max_decode_length = args.max_decode_length or (run.max_target_length if run else 64)
  sampling = decoding.SamplingParams(max_decode_length=max_decode_length,
                                     temperature=args.temperature, num_samples=args.num_samples)
  baseline_seed = args.seed + 1 if args.baseline_seed is None else args.baseline_seed
  metrics = evaluation.evaluate_policies(
      policy.policy, baseline.policy, vocabulary, prompts, judge, sampling=sampling,
      policy_seed=args.seed, baseline_seed=baseline_seed,
      max_input_length=run.max_input_length if run else None, batch_size=args.batch_size,
      return_samples=True)
  samples = metrics.pop("samples")
  line = evaluation.win_rate_line(metrics)

  if args.output:
    output = epath.Path(args.output)
  elif policy.workdir:
    output = epath.Path(policy.workdir) / "evaluation" / f"step_{policy.step}"
  else:
    output = epath.Path("evaluation")
  report = {"line": line, **{key: _finite(value) for key, value in metrics.items()},
            "policy": _describe(policy), "baseline": _describe(baseline), "judge": judge_name,
            "sampling": dataclasses.asdict(sampling), "policy_seed": args.seed,
            "baseline_seed": baseline_seed,
            "prompts_source": args.prompts or "held-out prompts of the policy's task"}
  if jax.process_index() == 0:
    output.mkdir(parents=True, exist_ok=True)
    (output / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))

  print(line)
  print(f"  wilson [{metrics['win_rate_low']:.3f}, {metrics['win_rate_high']:.3f}]  "
        f"bootstrap [{metrics['win_rate_bootstrap_low']:.3f}, "
        f"{metrics['win_rate_bootstrap_high']:.3f}]  5-fold {metrics['win_rate_folds_mean']:.3f}"
        f" ± {metrics['win_rate_folds_std']:.3f}")
  sides = []
  for name in ("policy", "baseline"):
    reward = metrics.get(f"{name}_reward")
    sides.append(f"{name}: " + (f"reward {reward:.3f}  " if reward is not None else "")
                 + f"length {metrics[f'{name}_length']:.2f}  truncated "
                 f"{metrics[f'{name}_truncated']:.3f}")
  print("  " + "  |  ".join(sides))
  print(f"  KL(policy || baseline) {metrics['kl']:.4f} ± {metrics['kl_stderr']:.4f}")
  print(f"  wrote {output / 'evaluation.json'} and {output / 'samples.jsonl'}")
  return report


if __name__ == "__main__":
  try:
    main()
  except (ValueError, checkpoints.CheckpointError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

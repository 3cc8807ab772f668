"""`python -m dro_jax.evaluate --policy DIR --baseline DIR`: win rate of one policy over another.

    python -m dro_jax.evaluate --policy /tmp/demo/dro --baseline /tmp/demo/sft
    python -m dro_jax.evaluate --policy run/checkpoints/2000 --baseline google/flan-t5-base-dir \\
        --prompts prompts.jsonl --judge NAME --num_prompts 400 --temperature 1 --output /tmp/eval

DIR is a training workdir (its latest checkpoint; the model rebuilt from its config.json), one
step directory of it (`<workdir>/checkpoints/<step>`), or a Hugging Face or T5X checkpoint folder.
By default the prompts are the held-out prompts of the policy's task (the demo task's
`synthetic.eval_prompts`) and the judge is that task's (the demo's programmatic judge); each side
draws one sample per prompt at temperature 1, the policy with `--seed` and the baseline with
`--seed + 1`. `--judge api:MODEL@BASE_URL` judges with an LLM behind an OpenAI-compatible endpoint
(`--judge_template`, `--judge_max_concurrency`, `--judge_max_calls`, `--judge_cache`;
docs/llm_judges.md). A judge that is not symmetric is asked in both orders and the verdicts averaged
(`--no_debias`: one order). Prints `win_rate 0.53 [0.47, 0.59] (n=400, ties=12, ...)` (the 95%
prompt-clustered interval; see dro_jax.evaluation; a judge with soft verdicts, i.e. probabilities
like a reward model's, shows `soft verdicts` in place of ties) and
writes `evaluation.json` (every metric of `evaluation.evaluate_policies` and the settings) and
`samples.jsonl` (prompt, both responses, the judge's preference and rewards: what an external
judge needs) to `--output` (default `<policy workdir>/evaluation/step_<step>`, or
`./evaluation` for a checkpoint folder). When the policy is a checkpoint folder (say an exported
one), the task's defaults come from the baseline's workdir.

The numbers, every path and the judge (given where the task has none; a spec naming something
that exists, `judge_specs.check`) are checked before any policy is loaded, and `--help` answers
before JAX is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if TYPE_CHECKING:  # the heavy imports wait until the command line is parsed and checked
  import ml_collections

  from dro_jax.policies import LoadedPolicy

DEFAULT_NUM_PROMPTS = 400
# Loading policies and a run's task lives below every runner; still reachable here by these names.
_REEXPORTED = {"held_out_prompts": "dro_jax.datasets", "is_demo": "dro_jax.datasets",
               "read_prompts": "dro_jax.datasets", "task_vocabulary": "dro_jax.datasets",
               "LoadedPolicy": "dro_jax.policies", "load_policy": "dro_jax.policies",
               "read_run_config": "dro_jax.policies"}


def __getattr__(name: str) -> Any:
  if name in _REEXPORTED:
    import importlib
    return getattr(importlib.import_module(_REEXPORTED[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_judge(run_config: ml_collections.ConfigDict | None) -> str:
  """The judge of the run's task: the demo's for the demo task and the Tasks derived from it."""
  from dro_jax import errors, judge_specs
  from dro_jax.datasets import is_demo
  if run_config is not None and is_demo(run_config):
    return "demo"
  raise errors.UserError(f"no default judge for this policy's task; pass --judge SPEC "
                         f"({judge_specs.forms()})")


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m dro_jax.evaluate",
                                   description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--policy", required=True, help="workdir, step directory, or HF / T5X folder")
  add("--baseline", required=True, help="workdir, step directory, or HF / T5X folder")
  add("--prompts", help="a .jsonl file with a \"prompt\" field per line, or one prompt per line "
      "(default: the held-out prompts of the policy's task)")
  add("--judge", help="a judge spec: demo, reward_model:DIR, preference_model:DIR, "
      "noisy:P:SPEC, noisy_persistent:P:SPEC, api:MODEL@BASE_URL (key from "
      "$DRO_JAX_JUDGE_API_KEY), a registered name, or module:factory (default: the policy's "
      "task's)")
  add("--judge_template", help="api judges: the judging prompt, a text file with {prompt}, "
      "{response_a} and {response_b} (default: the package's templates/pairwise_judge.txt)")
  add("--judge_max_concurrency", type=int, default=8,
      help="api judges: requests in flight at most")
  add("--judge_max_calls", type=int, default=0, help="api judges: the most requests paid for "
      "over the cache's life (0: no cap); a batch that would pass it stops with exit status 3")
  add("--judge_cache", help="api judges: the SQLite verdict cache (default: "
      "<policy workdir>/judge_cache.sqlite, or judge_cache.sqlite in --output)")
  add("--no_debias", action="store_true", help="ask a non-symmetric judge in one order only "
      "(policy first); by default it is asked in both orders and the verdicts averaged")
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


def _run_config_on_disk(path: str) -> ml_collections.ConfigDict | None:
  """The training config of a workdir or step folder, read without loading anything else."""
  from dro_jax import judge_specs
  workdir = judge_specs._learned_workdir(path) if "://" not in path else None
  if workdir is None:
    return None
  import ml_collections
  from dro_jax import errors
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as error:
    raise errors.UserError(f"{workdir}/config.json cannot be read "
                           f"({errors.one_line(error)})") from error


def check_args(args: argparse.Namespace) -> str:
  """What the command line gives, checked before any policy is loaded (one-line UserError):
  the numbers, every path, and the judge (given where the task has none, its spec naming
  something that exists). Returns the judge spec."""
  from dro_jax import errors, judge_specs
  for name in ("num_samples", "batch_size", "num_prompts", "max_decode_length"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise errors.UserError(f"--{name} must be at least 1, got {value}")
  if args.temperature < 0:
    raise errors.UserError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
  for name, kind, what in (
      ("policy", "folder", "a workdir, step directory, or HF / T5X folder"),
      ("baseline", "folder", "a workdir, step directory, or HF / T5X folder"),
      ("prompts", "file", "a .jsonl file with a \"prompt\" field per line, or one prompt per line"),
      ("vocabulary", "file", "a sentencepiece .model file")):
    path = getattr(args, name)
    if path and "://" not in path and not os.path.exists(path):
      raise errors.UserError(f"--{name} {path}: no such {kind}; give {what}")
  if args.output and "://" not in args.output and os.path.isfile(args.output):
    raise errors.UserError(f"--output {args.output} is a file; give a folder for "
                           f"evaluation.json and samples.jsonl")
  if args.judge:
    judge_specs.check(args.judge, "--judge")
  if args.judge_max_concurrency < 1:
    raise errors.UserError(f"--judge_max_concurrency must be at least 1, got "
                           f"{args.judge_max_concurrency}")
  if args.judge_max_calls < 0:
    raise errors.UserError(f"--judge_max_calls must be 0 (no cap) or more, got "
                           f"{args.judge_max_calls}")
  if args.judge_template:
    from dro_jax import api_judge
    api_judge.read_template(args.judge_template, "--judge_template")
  if "://" in args.policy or "://" in args.baseline:  # read once loaded (see main)
    return args.judge
  run = _run_config_on_disk(args.policy) or _run_config_on_disk(args.baseline)
  if run is None and not args.prompts:
    raise errors.UserError(NO_TASK)
  return args.judge or default_judge(run)


NO_TASK = ("neither --policy nor --baseline is a training workdir, so there is no task to take "
           "held-out prompts from; pass --prompts FILE")


def judge_options(args: argparse.Namespace) -> dict[str, Any]:
  """What an api:MODEL@BASE_URL judge takes from the command line; its cache defaults to the
  policy's workdir (or the output folder)."""
  from dro_jax import judge_specs
  workdir = judge_specs._learned_workdir(args.policy) if "://" not in args.policy else None
  cache = args.judge_cache or os.path.join(workdir or args.output or "evaluation",
                                           "judge_cache.sqlite")
  return {"template": args.judge_template, "max_concurrency": args.judge_max_concurrency,
          "max_calls": args.judge_max_calls, "cache": cache,
          "budget_key": "--judge_max_calls", "template_flag": "--judge_template"}


def _vocabulary(args: argparse.Namespace, policy: LoadedPolicy, baseline: LoadedPolicy) -> Any:
  from dro_jax import errors
  from dro_jax.data import tasks
  from dro_jax.datasets import task_vocabulary
  path = args.vocabulary or policy.vocabulary or baseline.vocabulary
  if path:
    return tasks.load_vocabulary(path)
  for loaded in (policy, baseline):
    if loaded.run_config is not None:
      return task_vocabulary(loaded.run_config)
  raise errors.UserError("no vocabulary known for these checkpoints; pass --vocabulary "
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
  judge_name = check_args(args)  # before anything is loaded (None: known once they are)
  import jax
  from etils import epath

  from dro_jax import decoding, distributed, errors, evaluation
  from dro_jax import judges as judges_lib
  from dro_jax.datasets import held_out_prompts, read_prompts
  from dro_jax.policies import load_policy
  if args.prompts:
    prompts = read_prompts(args.prompts)[:args.num_prompts]
    if not prompts:
      raise errors.UserError(f"--prompts {args.prompts} holds no prompt")
  options = judge_options(args)
  judge = judges_lib.judge_from_spec(judge_name, **options) if judge_name else None
  policy = load_policy(args.policy, dtype=args.dtype)
  baseline = load_policy(args.baseline, dtype=args.dtype)
  vocabulary = _vocabulary(args, policy, baseline)
  # The task's defaults come from the policy's run, or the baseline's (an exported policy).
  run = policy.run_config or baseline.run_config
  if judge is None:  # a workdir on a bucket: its task known only now
    judge_name = default_judge(run)
    judge = judges_lib.judge_from_spec(judge_name, **options)
  judge = judges_lib.on_process_zero(judge)  # on a pod, process 0 alone asks the judge
  if not args.prompts:
    if run is None:
      raise errors.UserError(NO_TASK)
    prompts = held_out_prompts(run, args.num_prompts or DEFAULT_NUM_PROMPTS)
  max_decode_length = args.max_decode_length or (run.max_target_length if run else 64)
  sampling = decoding.SamplingParams(max_decode_length=max_decode_length,
                                     temperature=args.temperature, num_samples=args.num_samples)
  baseline_seed = args.seed + 1 if args.baseline_seed is None else args.baseline_seed
  metrics = evaluation.evaluate_policies(
      policy.policy, baseline.policy, vocabulary, prompts, judge, sampling=sampling,
      policy_seed=args.seed, baseline_seed=baseline_seed,
      max_input_length=run.max_input_length if run else None, batch_size=args.batch_size,
      return_samples=True, debias=not args.no_debias)
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
            "debias": not args.no_debias,
            "sampling": dataclasses.asdict(sampling), "policy_seed": args.seed,
            "baseline_seed": baseline_seed,
            "prompts_source": args.prompts or "held-out prompts of the policy's task"}
  if jax.process_index() == 0:
    output.mkdir(parents=True, exist_ok=True)
    (output / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
  distributed.barrier("evaluate wrote its files")
  if jax.process_index() != 0:  # a pod's other hosts: process 0 prints the report
    return report

  print(line)
  print(f"  interval: {metrics['interval']} over {metrics['prompts']} prompts x "
        f"{metrics['samples_per_prompt']} samples (n_eff {metrics['effective_n']:.0f} of "
        f"{metrics['n']}); bootstrap over prompts [{metrics['win_rate_bootstrap_low']:.3f}, "
        f"{metrics['win_rate_bootstrap_high']:.3f}]; plain Wilson "
        f"[{metrics['win_rate_wilson_low']:.3f}, {metrics['win_rate_wilson_high']:.3f}]; 5-fold "
        f"{metrics['win_rate_folds_mean']:.3f} ± {metrics['win_rate_folds_std']:.3f}")
  if metrics["effective_n"] > metrics["n"]:
    print("  n_eff above n: the verdicts (ties, soft verdicts) vary less than wins and losses, so "
          "the headline interval follows their own spread, as the bootstrap does; plain Wilson "
          "counts each comparison as a win or a loss")
  if metrics.get("verdicts") == "soft":
    print(f"  verdicts: soft (probabilities, averaged as they are): {metrics['wins']} above 0.5, "
          f"{metrics['losses']} below; an exact 0.5 among them is not counted as a tie")
  order = ("symmetric judge, asked once" if metrics["judge_symmetric"] else
           "asked in both orders, averaged" if metrics["debiased"] else
           "asked in one order only (--no_debias)")
  paid = ""
  if "judge_calls_paid" in metrics:
    paid = (f" ({metrics['judge_calls_paid']} requests paid, {metrics['judge_calls_cached']} "
            f"answered from the cache {options['cache']})")
  print(f"  judge {judge_name}: {order}; {metrics['judge_calls']} judge calls{paid}")
  if metrics.get("unjudged"):
    print(f"  {metrics['unjudged']} comparisons got no verdict (replies unparseable twice): "
          f"{metrics['prompts_dropped_unjudged']} prompts left out of the win rate")
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


def run() -> None:
  """The command line: flags and paths and the judge checked before the heavy imports; a user's
  mistake is one line on stderr and exit status 2."""
  from dro_jax import cli
  cli.run(parse_args, main, check=check_args)


if __name__ == "__main__":
  run()

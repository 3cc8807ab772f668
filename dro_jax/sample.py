"""`python -m dro_jax.sample --policy DIR --prompts FILE --out FILE`: a policy's responses as JSONL.

    python -m dro_jax.sample --policy /tmp/demo/dro --prompts prompts.jsonl --out responses.jsonl \\
        --num_samples 4 --temperature 0.7 --max_decode_length 64 --seed 0

DIR is a training workdir (its latest checkpoint), one step directory of it
(`<workdir>/checkpoints/<step>`), or a Hugging Face or T5X checkpoint folder. FILE is JSON lines
with a "prompt" field (`.jsonl`), or plain text with one prompt per line. Each prompt gets
`--num_samples` responses, drawn by the sampler evaluation uses (`evaluation.sample_policy`:
prompt i's samples depend only on the seed and i). The output holds one JSON object per
response, prompt-major: {"prompt", "response", "prompt_index", "sample", "truncated"}
(`truncated`: cut at --max_decode_length before EOS). A prompt longer than the run's
max_input_length keeps its end, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEFAULT_DECODE_LENGTH = 64  # for a checkpoint folder, which has no max_target_length


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m dro_jax.sample",
                                   description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--policy", required=True, help="workdir, step directory, or HF / T5X folder")
  add("--prompts", required=True, help="a .jsonl file with a \"prompt\" field per line, or a "
      "text file with one prompt per line")
  add("--out", required=True, help="the JSONL file to write (local or gs://)")
  add("--num_samples", type=int, default=1, help="responses per prompt")
  add("--temperature", type=float, default=1.0, help="0 is greedy")
  add("--max_decode_length", type=int, help=f"tokens per response (default: the run's "
      f"max_target_length, or {DEFAULT_DECODE_LENGTH} for a checkpoint folder)")
  add("--seed", type=int, default=0, help="sampling seed")
  add("--num_prompts", type=int, help="only the first N prompts")
  add("--vocabulary", help="sentencepiece model (default: the policy's task's, or spiece.model "
      "in a checkpoint folder)")
  add("--batch_size", type=int, default=64, help="prompts per sampling batch")
  add("--dtype", help="activation dtype (default: the run's, or bfloat16 on accelerators)")
  return parser.parse_args(argv)


def _vocabulary(args: argparse.Namespace, loaded) -> Any:
  from dro_jax import datasets
  from dro_jax.data import tasks
  path = args.vocabulary or loaded.vocabulary
  if path:
    return tasks.load_vocabulary(path)
  if loaded.run_config is not None:
    return datasets.task_vocabulary(loaded.run_config)
  from dro_jax import errors
  raise errors.UserError(f"{args.policy}: no vocabulary known for this checkpoint; pass "
                         f"--vocabulary (a sentencepiece .model file)")


def check_args(args: argparse.Namespace) -> None:
  """The numbers and paths of the command line, checked before anything is loaded (UserError)."""
  from dro_jax import errors
  for name in ("num_samples", "batch_size"):
    if getattr(args, name) < 1:
      raise errors.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
  for name in ("num_prompts", "max_decode_length"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise errors.UserError(f"--{name} must be at least 1, got {value}")
  if args.temperature < 0:
    raise errors.UserError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
  remote = lambda path: "://" in path
  if not remote(args.prompts) and not os.path.exists(args.prompts):
    raise errors.UserError(f"--prompts {args.prompts} does not exist; give a .jsonl file with a "
                           f"\"prompt\" field per line, or a text file with one prompt per line")
  if not remote(args.policy) and not os.path.exists(args.policy):
    raise errors.UserError(f"--policy {args.policy}: no such folder; give a workdir, step "
                           f"directory, or HF / T5X folder")
  if args.vocabulary and not remote(args.vocabulary) and not os.path.exists(args.vocabulary):
    raise errors.UserError(f"--vocabulary {args.vocabulary}: no such file; give a sentencepiece "
                           f".model file")
  if not remote(args.out) and os.path.isdir(args.out):
    raise errors.UserError(f"--out {args.out} is a folder; give the JSONL file to write")


def sample(args: argparse.Namespace) -> list[dict[str, Any]]:
  """The rows `--out` receives (written by process 0)."""
  import jax
  from etils import epath

  from dro_jax import datasets, decoding, distributed, errors, evaluation, policies
  check_args(args)
  if not epath.Path(args.prompts).exists():
    raise errors.UserError(f"--prompts {args.prompts} does not exist; give a .jsonl file with a "
                           f"\"prompt\" field per line, or a text file with one prompt per line")
  prompts = datasets.read_prompts(args.prompts)[:args.num_prompts]
  if not prompts:
    raise errors.UserError(f"--prompts {args.prompts} holds no prompt")
  loaded = policies.load_policy(args.policy, dtype=args.dtype)
  vocabulary = _vocabulary(args, loaded)
  run = loaded.run_config
  max_decode_length = args.max_decode_length or (
      run.max_target_length if run is not None else DEFAULT_DECODE_LENGTH)
  sampling = decoding.SamplingParams(max_decode_length=max_decode_length,
                                     temperature=args.temperature, num_samples=args.num_samples)
  encoder_tokens = decoding.encode_prompts(
      vocabulary, prompts, eos_id=sampling.eos_id,
      max_input_length=run.max_input_length if run is not None else None)
  samples = evaluation.sample_policy(loaded.policy, encoder_tokens, vocabulary, sampling,
                                     args.seed, batch_size=args.batch_size)
  rows = []
  for row, response in enumerate(samples.responses):
    index, number = divmod(row, args.num_samples)
    rows.append({"prompt": prompts[index], "response": response, "prompt_index": index,
                 "sample": number, "truncated": bool(samples.truncated[row])})
  if jax.process_index() == 0:
    out = epath.Path(args.out)
    if str(out.parent) not in ("", "."):
      out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  distributed.barrier("sample wrote its file")
  return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  rows = sample(args)
  prompts = len({row["prompt_index"] for row in rows})
  import jax
  if jax.process_index() == 0:  # a pod's other hosts: process 0 says what it wrote
    print(f"wrote {len(rows)} responses ({prompts} prompts x {args.num_samples} samples) to "
          f"{args.out}", flush=True)
  return rows


def run() -> None:
  """The command line: flags and paths checked before the heavy imports; a user's mistake is one
  line on stderr and exit status 2."""
  from dro_jax import cli
  cli.run(parse_args, main, check=check_args)


if __name__ == "__main__":
  run()

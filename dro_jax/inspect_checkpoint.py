"""Load a T5X or Hugging Face T5 checkpoint, print its architecture, and score a batch.

  python -m dro_jax.inspect_checkpoint PATH [--reference_outputs reference_outputs.npz]

PATH is a T5X `checkpoint_N/` folder or a Hugging Face folder of safetensors. With
`--reference_outputs` (an .npz holding `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens` and `sequence_log_likelihood`, as t5x's score_batch writes), the
sequence log-likelihoods are recomputed and compared.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from dro_jax import checkpoints, scoring
from dro_jax.models import t5 as t5_lib


def load_any(path: str, dtype: str = "float32") -> tuple[t5_lib.T5Config, dict]:
  """T5X when the folder holds a msgpack `checkpoint` file, Hugging Face otherwise."""
  if os.path.exists(os.path.join(path, "checkpoint")):
    return checkpoints.load_t5x(path, dtype=dtype)
  return checkpoints.load_hf_t5(path, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path")
  parser.add_argument("--reference_outputs", default=None)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args(argv)

  config, params = load_any(args.path, args.dtype)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"{args.path}\n  {config}\n  {count:,} parameters")
  if args.reference_outputs:
    reference = np.load(args.reference_outputs)
    scores = scoring.score(t5_lib.T5(config), params, reference["encoder_input_tokens"],
                           reference["decoder_input_tokens"], reference["decoder_target_tokens"])
    ours, theirs = np.asarray(scores["logps"]), reference["sequence_log_likelihood"]
    print(f"  sequence log-likelihoods: {np.round(ours, 5).tolist()}")
    print(f"  reference:                {np.round(theirs, 5).tolist()}")
    print(f"  max relative difference:  {np.max(np.abs(ours - theirs) / np.abs(theirs)):.2e}")


if __name__ == "__main__":
  main()

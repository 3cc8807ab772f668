"""Load a T5X or Hugging Face T5 checkpoint, print its architecture, and check it against
reference outputs.

  python -m dro_jax.inspect_checkpoint PATH [--reference_outputs reference_outputs.npz]
      [--tolerance 1e-4] [--dtype float32]

PATH is a T5X `checkpoint_N/` folder (it holds the msgpack file `checkpoint`) or a Hugging Face
folder (`config.json` and safetensors). With `--reference_outputs`, the sequence log-likelihoods
(and the logits, when the file has them) are recomputed and compared: the command prints PASS and
exits 0 when every relative difference is within the tolerance, and prints FAIL and exits 1
otherwise. A checkpoint or reference file that cannot be read exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if TYPE_CHECKING:  # the heavy imports wait until the command line has parsed (--help is quick)
  from dro_jax.models import t5 as t5_lib

REFERENCE_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "sequence_log_likelihood")


def load_any(path: str, dtype: str = "float32") -> tuple[t5_lib.T5Config, dict]:
  """T5X or Hugging Face, told apart by the folder's files (see checkpoints.checkpoint_kind)."""
  from dro_jax import checkpoints
  return checkpoints.load_checkpoint(path, dtype=dtype)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m dro_jax.inspect_checkpoint", description=__doc__.split("\n\n")[0],
      epilog="exit status: 0 when the checkpoint loads and (with --reference_outputs) every "
      "difference is within the tolerance (PASS); 1 when a difference is not (FAIL); 2 when the "
      "checkpoint or the reference file cannot be read",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument(
      "path", help="a T5X checkpoint_N/ folder (holding the msgpack file `checkpoint`) or a "
      "Hugging Face folder (config.json and model.safetensors); T5X folders may be on gs://")
  parser.add_argument(
      "--reference_outputs", default=None, metavar="NPZ",
      help="an .npz with encoder_input_tokens [B, S], decoder_input_tokens [B, T], "
      "decoder_target_tokens [B, T] (0 is padding) and sequence_log_likelihood [B] (t5x's "
      "score_batch), optionally logits [B, T, vocab]; recomputed and compared")
  parser.add_argument(
      "--tolerance", type=float, default=1e-4,
      help="largest relative difference from the reference that passes (exit 0); above it the "
      "command prints FAIL and exits 1")
  parser.add_argument(
      "--dtype", default="float32",
      help="activation dtype of the model (float32 or bfloat16; parameters stay float32)")
  return parser


def compare(config: t5_lib.T5Config, params: dict, reference: dict,
            tolerance: float) -> bool:
  """Prints ours against the reference and PASS or FAIL; True on PASS."""
  import numpy as np

  from dro_jax import scoring
  from dro_jax.models import t5 as t5_lib
  model = t5_lib.T5(config)
  inputs = [reference[key] for key in REFERENCE_KEYS[:3]]
  ours = np.asarray(scoring.score(model, params, *inputs)["logps"], np.float64)
  theirs = np.asarray(reference["sequence_log_likelihood"], np.float64)
  differences = {"sequence log-likelihoods": np.max(np.abs(ours - theirs) / np.abs(theirs))}
  print(f"  sequence log-likelihoods: {np.round(ours, 5).tolist()}")
  print(f"  reference:                {np.round(theirs, 5).tolist()}")
  if "logits" in reference:
    logits = np.asarray(model.apply({"params": params}, *inputs[:2]), np.float64)
    valid = reference["decoder_target_tokens"] > 0
    error = np.abs(logits - reference["logits"])[valid]
    differences["logits"] = error.max() / np.abs(reference["logits"][valid]).max()
  print(f"  max relative difference:  {differences['sequence log-likelihoods']:.2e}")
  if "logits" in differences:
    print(f"  logits, relative to the largest: {differences['logits']:.2e}")
  failed = [name for name, value in differences.items() if not value <= tolerance]
  if failed:
    print(f"FAIL: {' and '.join(failed)} differ by more than the tolerance {tolerance:g}")
    return False
  print(f"PASS: within the tolerance {tolerance:g}")
  return True


def main(argv: list[str] | None = None) -> int:
  """The exit status: 0 loaded (and PASS), 1 FAIL, 2 unreadable checkpoint or reference."""
  args = _parser().parse_args(argv)
  import jax
  import numpy as np

  from dro_jax import checkpoints
  try:
    config, params = load_any(args.path, args.dtype)
  except checkpoints.CheckpointError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"{args.path}\n  {config}\n  {count:,} parameters")
  if not args.reference_outputs:
    return 0
  try:
    with np.load(args.reference_outputs) as archive:
      reference = dict(archive)
  except (OSError, ValueError) as error:
    print(f"error: {args.reference_outputs}: cannot read the reference outputs: {error}",
          file=sys.stderr)
    return 2
  missing = [key for key in REFERENCE_KEYS if key not in reference]
  if missing:
    print(f"error: {args.reference_outputs}: missing {missing}; it holds {sorted(reference)}",
          file=sys.stderr)
    return 2
  return 0 if compare(config, params, reference, args.tolerance) else 1


if __name__ == "__main__":
  _parser().parse_args()  # --help and a mistyped flag answer before the heavy imports
  from dro_jax import console
  console.initialize_backends()
  sys.exit(main())

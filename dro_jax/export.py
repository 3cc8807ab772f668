"""Export to Hugging Face: a policy as a `T5ForConditionalGeneration` folder.

    python -m dro_jax.export --workdir /tmp/demo/dro --output /tmp/demo/dro_hf

`save_hf_t5(params, config, directory)` writes `config.json` and `model.safetensors` (float32)
that transformers loads with the same logits, so a trained policy goes to external judges and
serving stacks. The tensor names are those `checkpoints.load_hf_t5` reads (one mapping serves
both directions, so export and import cannot drift apart):

- T5.1.1 / Flan-T5 (gated activation, untied output): `lm_head.weight` is the output kernel, and
  the config says `tie_word_embeddings: false`, which transformers reads as "do not scale the
  decoder output by d_model^-0.5";
- T5.1.0 (tied, scaled output): no `lm_head.weight`, `tie_word_embeddings: true`.

transformers 5 forces `tie_word_embeddings` to True in every T5Config, so loading an untied folder
(like any Flan-T5) warns that lm_head.weight and shared.weight differ and will not be tied: that
is the intended outcome; `load_transformers(directory)` loads it without that warning.

The vocabulary is not part of the parameters: with `vocabulary=` (a sentencepiece .model), or from
a workdir whose task's vocabulary is known, `spiece.model` is copied beside the weights, which
`T5Tokenizer` and `load_hf_t5`'s callers read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if TYPE_CHECKING:  # the heavy imports wait until the command line has parsed (--help is quick)
  import numpy as np

  from dro_jax.models import t5 as t5_lib

# Our activation -> transformers' `feed_forward_proj` activation (see checkpoints._HF_ACTIVATIONS).
_ACTIVATION_NAMES = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}


def hf_feed_forward_proj(config: t5_lib.T5Config) -> str:
  """The `feed_forward_proj` of `config.mlp_activations`: "ACT" or "gated-ACT".

  transformers computes act(wi_0 x) * wi_1 x, i.e. our (ACT, "linear"); its "gated-gelu" is the
  tanh GELU (T5.1.1), so a gated exact GELU has no name there.
  """
  from dro_jax import checkpoints
  activations = config.mlp_activations
  if len(activations) == 1 and activations[0] in _ACTIVATION_NAMES:
    return _ACTIVATION_NAMES[activations[0]]
  if len(activations) == 2 and activations[1] == "linear" and activations[0] in _ACTIVATION_NAMES:
    if activations[0] == "gelu":
      return "gated-gelu"
    if activations[0] != "gelu_exact":
      return f"gated-{_ACTIVATION_NAMES[activations[0]]}"
  raise checkpoints.CheckpointError(
      f"mlp_activations {activations} have no Hugging Face T5 equivalent (supported: one of "
      f"{sorted(_ACTIVATION_NAMES)}, or (gelu | relu | silu, 'linear'))")


def hf_config(config: t5_lib.T5Config) -> dict[str, Any]:
  """The config.json of a `T5ForConditionalGeneration` with `config`'s architecture."""
  tied = config.logits_via_embedding
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.emb_dim,
      "d_kv": config.head_dim,
      "d_ff": config.mlp_dim,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": hf_feed_forward_proj(config),
      "is_encoder_decoder": True,
      # Both the tie and the d_model^-0.5 scaling of the decoder output (transformers 4 reads the
      # scale from tie_word_embeddings; transformers 5 writes scale_decoder_outputs too).
      "tie_word_embeddings": tied,
      "scale_decoder_outputs": tied,
      "decoder_start_token_id": 0,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "use_cache": True,
      "dtype": "float32",
      "torch_dtype": "float32",
  }


def _host_float32(value: Any) -> np.ndarray:
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value), dtype=np.float32)


def hf_tensors(params: Any, config: t5_lib.T5Config) -> dict[str, np.ndarray]:
  """{HF tensor name: float32 array} of t5x-named `params` (transposed where HF is [out, in]);
  a scanned tree (`model.scan_layers`) is unrolled first."""
  import numpy as np
  from flax import traverse_util

  from dro_jax import checkpoints
  from dro_jax.models import scan as scan_lib
  params = scan_lib.to_config_layout(params, config.replace(scan_layers=False))
  flat = traverse_util.flatten_dict(params, sep="/")
  names = checkpoints._hf_name_map(config)
  if not config.logits_via_embedding:
    names["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
  missing = sorted(set(names) - set(flat))
  extra = sorted(set(flat) - set(names))
  if missing or extra:
    raise checkpoints.CheckpointError(
        f"params do not match the config: missing {missing[:8]}, unexpected {extra[:8]}")
  tensors = {}
  for key, (hf_name, transpose) in names.items():
    array = _host_float32(flat[key])
    tensors[hf_name] = np.ascontiguousarray(array.T if transpose else array)
  return tensors


def save_hf_t5(params: Any, config: t5_lib.T5Config, directory: str, *,
               vocabulary: str | None = None) -> str:
  """Writes `directory`/config.json and model.safetensors (and spiece.model from `vocabulary`).

  Every process gathers the parameters; process 0 writes. Returns `directory`.
  """
  import jax
  from etils import epath
  from safetensors.numpy import save

  from dro_jax import distributed
  tensors = hf_tensors(params, config)
  config_json = json.dumps(hf_config(config), indent=2, sort_keys=True) + "\n"
  if jax.process_index() == 0:
    folder = epath.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    (folder / "config.json").write_text(config_json)
    if vocabulary:
      source = epath.Path(vocabulary)
      if source.is_dir():
        source = source / "spiece.model"
      (folder / "spiece.model").write_bytes(source.read_bytes())
  distributed.barrier(f"export wrote {directory}")
  return directory


def export_workdir(workdir: str, output: str, *, step: int | None = None,
                   vocabulary: str | None = None) -> str:
  """A training workdir's policy (the latest step, or `step`) as an HF folder at `output`."""
  from dro_jax import policies
  path = workdir if step is None else os.path.join(workdir, "checkpoints", str(step))
  loaded = policies.load_policy(path)
  if loaded.kind != "workdir":
    raise ValueError(f"{workdir} is not a training workdir (no checkpoints/ beside config.json)")
  save_hf_t5(loaded.policy.params, loaded.policy.config, output,
             vocabulary=vocabulary or loaded.vocabulary)
  return output


class _UntiedOutputNotice:
  """Drops transformers' warning that it will not tie lm_head.weight to shared.weight (for a
  folder whose config.json says tie_word_embeddings false, that is what is meant)."""

  def filter(self, record) -> bool:
    return "but both are present in the checkpoints with different values" not in (
        record.getMessage())


def load_transformers(directory: str, **kwargs: Any):
  """`T5ForConditionalGeneration.from_pretrained(directory, **kwargs)` for an exported folder.

  transformers 5's T5Config sets `tie_word_embeddings` to True whatever config.json says (it
  reads the saved value only as "scale the decoder output or not"), so loading any T5 whose
  output layer is its own (T5.1.1, Flan-T5, and the folders `save_hf_t5` writes for them) warns
  that lm_head.weight and shared.weight differ and will NOT be tied. That is the intended
  outcome: the model keeps both as saved. This loader drops that one warning when the folder's
  config.json says `tie_word_embeddings: false`, and checks that the two were indeed kept apart.
  """
  import logging

  import transformers
  saved = json.loads(epath_read(os.path.join(directory, "config.json")))
  untied = saved.get("tie_word_embeddings") is False
  logger = logging.getLogger("transformers.modeling_utils")
  notice = _UntiedOutputNotice()
  if untied:
    logger.addFilter(notice)
  try:
    model = transformers.T5ForConditionalGeneration.from_pretrained(directory, **kwargs)
  finally:
    logger.removeFilter(notice)
  if untied and model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
    raise ValueError(f"{directory}: transformers tied lm_head.weight to shared.weight although "
                     f"config.json says tie_word_embeddings false")
  return model


def epath_read(path: str) -> str:
  from etils import epath
  return epath.Path(path).read_text()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m dro_jax.export",
                                   description="A workdir's policy as a Hugging Face T5 folder.")
  parser.add_argument("--workdir", required=True, help="a dro_jax training workdir")
  parser.add_argument("--output", required=True, help="the HF folder to write")
  parser.add_argument("--step", type=int, help="default: the latest checkpoint")
  parser.add_argument("--vocabulary", help="sentencepiece model to copy as spiece.model "
                      "(default: the run's, when known)")
  return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
  """The paths the command line names, checked before anything is loaded (UserError)."""
  from dro_jax import errors, files
  gfile = files.gfile() if "://" in args.workdir else None
  exists = gfile.exists if gfile is not None else os.path.exists
  if not exists(args.workdir):
    raise errors.UserError(f"--workdir {args.workdir}: no such folder; give a dro_jax training "
                           f"workdir (the --workdir of python -m dro_jax.main)")
  if not exists(os.path.join(args.workdir, "config.json")):
    raise errors.UserError(f"--workdir {args.workdir}: not a dro_jax training workdir (no "
                           f"config.json); give the --workdir of python -m dro_jax.main")
  if args.step is not None and not exists(
      os.path.join(args.workdir, "checkpoints", str(args.step))):
    raise errors.UserError(f"--step {args.step}: {args.workdir}/checkpoints has no step "
                           f"{args.step}; leave --step out for the latest")
  if args.vocabulary and "://" not in args.vocabulary and not os.path.exists(args.vocabulary):
    raise errors.UserError(f"--vocabulary {args.vocabulary}: no such file; give a sentencepiece "
                           f".model file, or leave it out for the run's")


def main(argv: Sequence[str] | None = None) -> str:
  args = parse_args(argv)
  check_args(args)
  output = export_workdir(args.workdir, args.output, step=args.step, vocabulary=args.vocabulary)
  import jax
  if jax.process_index() == 0:  # a pod's other hosts: process 0 says what it wrote
    print(f"wrote {output}/config.json and {output}/model.safetensors")
  return output


def run() -> None:
  """The command line: the flags parsed and the paths checked before the heavy imports."""
  from dro_jax import cli
  cli.run(parse_args, main, check=check_args)


if __name__ == "__main__":
  run()

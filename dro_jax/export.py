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

The vocabulary is not part of the parameters: with `vocabulary=` (a sentencepiece .model), or from
a workdir whose task's vocabulary is known, `spiece.model` is copied beside the weights, which
`T5Tokenizer` and `load_hf_t5`'s callers read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from dro_jax import checkpoints
from dro_jax.models import scan as scan_lib
from dro_jax.models import t5 as t5_lib

# Our activation -> transformers' `feed_forward_proj` activation (see checkpoints._HF_ACTIVATIONS).
_ACTIVATION_NAMES = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}


def hf_feed_forward_proj(config: t5_lib.T5Config) -> str:
  """The `feed_forward_proj` of `config.mlp_activations`: "ACT" or "gated-ACT".

  transformers computes act(wi_0 x) * wi_1 x, i.e. our (ACT, "linear"); its "gated-gelu" is the
  tanh GELU (T5.1.1), so a gated exact GELU has no name there.
  """
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
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value), dtype=np.float32)


def hf_tensors(params: Any, config: t5_lib.T5Config) -> dict[str, np.ndarray]:
  """{HF tensor name: float32 array} of t5x-named `params` (transposed where HF is [out, in]);
  a scanned tree (`model.scan_layers`) is unrolled first."""
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
  from safetensors.numpy import save
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


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(prog="python -m dro_jax.export",
                                   description="A workdir's policy as a Hugging Face T5 folder.")
  parser.add_argument("--workdir", required=True, help="a dro_jax training workdir")
  parser.add_argument("--output", required=True, help="the HF folder to write")
  parser.add_argument("--step", type=int, help="default: the latest checkpoint")
  parser.add_argument("--vocabulary", help="sentencepiece model to copy as spiece.model "
                      "(default: the run's, when known)")
  args = parser.parse_args(argv)
  output = export_workdir(args.workdir, args.output, step=args.step, vocabulary=args.vocabulary)
  print(f"wrote {output}/config.json and {output}/model.safetensors")
  return output


if __name__ == "__main__":
  from dro_jax import console
  console.initialize_backends()
  try:
    main()
  except (ValueError, checkpoints.CheckpointError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

"""Importing pretrained T5 weights: Hugging Face safetensors folders and legacy T5X checkpoints.

Both loaders return `(T5Config, params)` with t5x's parameter names, float32; `load_checkpoint`
picks the loader from the folder's files (`checkpoint_kind`). Given a tree of
target shardings, each array is read straight into its shards (`jax.make_array_from_callback`
reads only the slice each local device needs), so a large model is never whole on one host.
Training-state checkpoints (orbax) live beside these in the trainer.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from flax import serialization, traverse_util

from dro_jax.models import t5 as t5_lib


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: names the file and the tensor."""


# A source tensor for one target parameter: its shape (in the target layout) and a reader that
# returns the target-layout slice for a tuple of slices.
Reader = Callable[[tuple[slice, ...]], np.ndarray]


class Source:

  def __init__(self, shape: tuple[int, ...], read: Reader, name: str):
    self.shape, self.read, self.name = tuple(shape), read, name


def _materialise(sources: Mapping[str, Source], expected: Mapping[str, Any], where: str,
                 shardings: Any | None) -> dict:
  """Check names and shapes against the model, then read every tensor (sharded if asked)."""
  missing = sorted(set(expected) - set(sources))
  extra = sorted(set(sources) - set(expected))
  if missing:
    raise CheckpointError(f"{where}: missing tensor(s) for parameter(s) {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''}")
  if extra:
    raise CheckpointError(f"{where}: unexpected tensor(s) {[sources[k].name for k in extra[:8]]}"
                          f" that the model has no parameter for")
  for key, source in sources.items():
    if source.shape != tuple(expected[key].shape):
      raise CheckpointError(f"{where}: tensor {source.name!r} has shape {source.shape}, parameter "
                            f"{key} expects {tuple(expected[key].shape)}")
  flat_shardings = (traverse_util.flatten_dict(shardings, sep="/")
                    if shardings is not None else {})
  params = {}
  for key, source in sources.items():
    def read(index, source=source):
      try:
        return np.asarray(source.read(index), dtype=np.float32)
      except CheckpointError:
        raise
      except Exception as error:  # tensorstore/zarr/IO errors: name the tensor.
        raise CheckpointError(f"{where}: cannot read tensor {source.name!r}: {error}") from error
    if key in flat_shardings:
      params[key] = jax.make_array_from_callback(source.shape, flat_shardings[key], read)
    else:
      params[key] = read(tuple(slice(None) for _ in source.shape))
  return traverse_util.unflatten_dict(params, sep="/")


def _expected_shapes(config: t5_lib.T5Config) -> dict[str, Any]:
  abstract = t5_lib.abstract_params(config)
  return traverse_util.flatten_dict(nn.unbox(abstract), sep="/")


# ----------------------------------------------------------------------------------------------
# Hugging Face safetensors.

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_index(path: str) -> dict[str, np.ndarray]:
  """Memory-mapped arrays of one .safetensors file (reads bytes only when sliced); bfloat16 ok."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      (header_length,) = struct.unpack("<Q", f.read(8))
      if header_length > size - 8:
        raise CheckpointError(f"{path}: header length {header_length} exceeds the file "
                              f"({size} bytes): truncated or not a safetensors file")
      header = json.loads(f.read(header_length))
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error
  header.pop("__metadata__", None)
  data_start = 8 + header_length
  arrays = {}
  for name, info in header.items():
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    if data_start + end > size:
      raise CheckpointError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the "
                            f"file has {size} bytes (truncated)")
    shape = tuple(info["shape"])
    count = int(np.prod(shape))
    if (end - begin) != count * np.dtype(dtype).itemsize:
      raise CheckpointError(f"{path}: tensor {name!r} byte range does not match shape {shape}")
    arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin,
                             shape=shape) if count else np.zeros(shape, dtype)
  return arrays


def _hf_tensors(directory: str) -> dict[str, np.ndarray]:
  index_path = os.path.join(directory, "model.safetensors.index.json")
  single_path = os.path.join(directory, "model.safetensors")
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as error:
      raise CheckpointError(f"{index_path}: not a safetensors index ({error})") from error
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_tensors = _safetensors_index(os.path.join(directory, shard))
      for name, file in weight_map.items():
        if file == shard:
          if name not in shard_tensors:
            raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {shard} "
                                  f"but that file does not hold it")
          tensors[name] = shard_tensors[name]
    return tensors
  if os.path.exists(single_path):
    return _safetensors_index(single_path)
  raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                        f"(only safetensors checkpoints are read; convert .bin files first)")


# Hugging Face activation names -> ours. "gelu" is the exact (erf) GELU in transformers; the
# others named gelu are the tanh approximation that t5x uses.
_HF_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                   "gelu_fast": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}

# Written by the original T5.1.0 conversions but never used (only self-attention has a relative
# position bias); transformers ignores it on load.
_UNUSED_HF_TENSORS = frozenset({"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias"
                                ".weight"})


def hf_config_to_t5(hf_config: Mapping[str, Any], *, tied_output: bool,
                    dtype: str | None = None) -> t5_lib.T5Config:
  """T5Config from a Hugging Face config.json dict.

  The activation follows transformers' reading of `feed_forward_proj`: "[gated-]ACT", except that
  "gated-gelu" (T5.1.1, Flan-T5) means the tanh approximation.
  """
  projection = hf_config.get("feed_forward_proj", "relu")
  gated = projection.startswith("gated-")
  name = "gelu_new" if projection == "gated-gelu" else projection.removeprefix("gated-")
  activation = _HF_ACTIVATIONS.get(name)
  if activation is None:
    raise CheckpointError(f"config.json: feed_forward_proj {projection!r} is not supported "
                          f"(activations: {sorted(_HF_ACTIVATIONS)})")
  d_model = hf_config["d_model"]
  return t5_lib.T5Config(
      vocab_size=hf_config["vocab_size"], emb_dim=d_model, num_heads=hf_config["num_heads"],
      head_dim=hf_config["d_kv"], num_encoder_layers=hf_config["num_layers"],
      num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
      mlp_dim=hf_config["d_ff"],
      mlp_activations=(activation, "linear") if gated else (activation,),
      logits_via_embedding=tied_output,
      relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
      dtype=dtype or t5_lib.default_dtype())


def _hf_name_map(config: t5_lib.T5Config) -> dict[str, tuple[str, bool]]:
  """t5x parameter path -> (HF tensor name, transpose?) for every parameter but the output."""
  names = {"token_embedder/embedding": ("shared.weight", False)}
  attention = {"query": "q", "key": "k", "value": "v", "out": "o"}
  mlp = ["wi"] if len(config.mlp_activations) == 1 else [
      f"wi_{i}" for i in range(len(config.mlp_activations))]
  for stack, layers in (("encoder", config.num_encoder_layers),
                        ("decoder", config.num_decoder_layers)):
    names[f"{stack}/relpos_bias/rel_embedding"] = (
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
    final_norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
    names[f"{stack}/{final_norm}/scale"] = (f"{stack}.final_layer_norm.weight", False)
    for i in range(layers):
      ours, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
      if stack == "encoder":
        blocks = [("attention", "0.SelfAttention", "pre_attention_layer_norm")]
      else:
        blocks = [("self_attention", "0.SelfAttention", "pre_self_attention_layer_norm"),
                  ("encoder_decoder_attention", "1.EncDecAttention",
                   "pre_cross_attention_layer_norm")]
      for module, hf_module, norm in blocks:
        for our_proj, hf_proj in attention.items():
          names[f"{ours}/{module}/{our_proj}/kernel"] = (f"{hf}.{hf_module}.{hf_proj}.weight", True)
        names[f"{ours}/{norm}/scale"] = (f"{hf}.{hf_module.split('.')[0]}.layer_norm.weight",
                                         False)
      mlp_index = len(blocks)
      for dense in mlp + ["wo"]:
        names[f"{ours}/mlp/{dense}/kernel"] = (
            f"{hf}.{mlp_index}.DenseReluDense.{dense}.weight", True)
      names[f"{ours}/pre_mlp_layer_norm/scale"] = (f"{hf}.{mlp_index}.layer_norm.weight", False)
  return names


def _slice_reader(array: np.ndarray, transpose: bool, scale: float = 1.0) -> Reader:
  def read(index: tuple[slice, ...]) -> np.ndarray:
    source_index = tuple(reversed(index)) if transpose else index
    block = np.asarray(array[source_index], dtype=np.float32)
    block = block.T if transpose else block
    return block * scale if scale != 1.0 else block
  return read


def _check_aliases(tensors: Mapping[str, np.ndarray], aliases: set[str], path: str) -> None:
  """Copies of `shared.weight` must really be copies: compare a few rows, not the whole table."""
  rows = tensors["shared.weight"][:8]
  for alias in sorted(aliases):
    if tensors[alias].shape != tensors["shared.weight"].shape or not np.array_equal(
        tensors[alias][:8], rows):
      raise CheckpointError(f"{path}: tensor {alias!r} differs from 'shared.weight', but this "
                            f"T5 ties them (untied input embeddings are not supported)")


def load_hf_t5(path: str, shardings: Any | None = None, *,
               dtype: str | None = None) -> tuple[t5_lib.T5Config, dict]:
  """(T5Config, float32 params) from a Hugging Face T5 folder of safetensors, without torch.

  The output layer follows the config: a scaled tied output (T5.1.0) becomes
  `logits_via_embedding`; an untied `lm_head` becomes `decoder/logits_dense` (scaled by
  d_model^-0.5 when the config says the decoder output is scaled, as transformers 5 may).
  `dtype` is the activation dtype of the returned config (parameters are always float32); by
  default bfloat16 on accelerators and float32 on CPU. The unused cross-attention position bias
  of the original T5.1.0 checkpoints is skipped, as transformers does.
  """
  config_path = os.path.join(path, "config.json")
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise CheckpointError(f"{config_path}: cannot read the model config: {error}") from error
  tensors = _hf_tensors(path)
  tied = bool(hf_config.get("tie_word_embeddings", True)) or "lm_head.weight" not in tensors
  scaled = bool(hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True)))
  config = hf_config_to_t5(hf_config, tied_output=tied and scaled, dtype=dtype)
  if "shared.weight" not in tensors:
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      if alias in tensors:
        tensors["shared.weight"] = tensors[alias]
        break
  name_map = _hf_name_map(config)
  used = {hf for hf, _ in name_map.values()}
  if not config.logits_via_embedding:
    output = "shared.weight" if tied else "lm_head.weight"
    name_map["decoder/logits_dense/kernel"] = (output, True)
    used.add(output)
  # Tied copies of the embedding that transformers may write alongside `shared.weight`.
  aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
  if tied:
    aliases.add("lm_head.weight")
  _check_aliases(tensors, aliases & set(tensors), path)
  extra = sorted(set(tensors) - used - aliases - _UNUSED_HF_TENSORS)
  if extra:
    raise CheckpointError(f"{path}: unexpected tensor(s) {extra[:8]} that the model has no "
                          f"parameter for")
  sources = {}
  for key, (hf_name, transpose) in name_map.items():
    if hf_name not in tensors:
      raise CheckpointError(f"{path}: missing tensor {hf_name!r} (for parameter {key})")
    array = tensors[hf_name]
    shape = tuple(reversed(array.shape)) if transpose else tuple(array.shape)
    scale = config.emb_dim ** -0.5 if (key == "decoder/logits_dense/kernel" and scaled) else 1.0
    sources[key] = Source(shape, _slice_reader(array, transpose, scale), hf_name)
  return config, _materialise(sources, _expected_shapes(config), path, shardings)


# ----------------------------------------------------------------------------------------------
# Legacy T5X checkpoints (msgpack + tensorstore/zarr), the format of the published checkpoints.


def _t5x_config(target: Mapping[str, Any], dtype: str | None) -> t5_lib.T5Config:
  """Infer the architecture from the parameter shapes of a T5X checkpoint."""
  shapes = {k: tuple(v["metadata"]["shape"]) if isinstance(v, Mapping) else np.shape(v)
            for k, v in _leaves(target).items()}

  def layer_count(stack: str) -> int:
    return len({m.group(1) for k in shapes if (m := re.match(rf"{stack}/layers_(\d+)/", k))})

  def shape_of(name: str) -> tuple[int, ...]:
    if name not in shapes:
      raise CheckpointError(f"T5X checkpoint has no parameter {name!r}; is it a T5 model?")
    return shapes[name]

  vocab_size, emb_dim = shape_of("token_embedder/embedding")
  num_heads, num_buckets = shape_of("encoder/relpos_bias/rel_embedding")
  joined_kv = shape_of("encoder/layers_0/attention/query/kernel")[1]
  gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
  mlp_dim = shape_of("encoder/layers_0/mlp/wi_0/kernel" if gated else
                     "encoder/layers_0/mlp/wi/kernel")[1]
  return t5_lib.T5Config(
      vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads,
      head_dim=joined_kv // num_heads, num_encoder_layers=layer_count("encoder"),
      num_decoder_layers=layer_count("decoder"), mlp_dim=mlp_dim,
      mlp_activations=("gelu", "linear") if gated else ("relu",),
      logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
      relative_attention_num_buckets=num_buckets, dtype=dtype or t5_lib.default_dtype())


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flatten a checkpoint tree to {"a/b/kernel": leaf}; a tensorstore spec (a dict with a
  `driver`) is one leaf."""
  leaves: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and "driver" not in value:
      leaves.update(_leaves(value, name + "/"))
    else:
      leaves[name] = value
  return leaves


def _kvstore(directory: str, relative: str) -> dict[str, str]:
  """A tensorstore kvstore for a file beside the checkpoint: local or on Cloud Storage."""
  if directory.startswith("gs://"):
    bucket, _, prefix = directory[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": f"{prefix.rstrip('/')}/{relative}"}
  return {"driver": "file", "path": os.path.join(os.path.abspath(directory), relative)}


def _tensorstore_reader(spec: Mapping[str, Any], directory: str, name: str) -> Source:
  import tensorstore as ts
  spec = json.loads(json.dumps(spec))  # a private copy of plain data
  relative = spec.get("kvstore", {}).get("path", spec.pop("path", ""))
  spec["kvstore"] = _kvstore(directory, relative)
  if spec["kvstore"]["driver"] == "file" and not os.path.isdir(spec["kvstore"]["path"]):
    raise CheckpointError(f"{directory}: tensor {name!r} points to {relative!r}, which does not "
                          f"exist (incomplete checkpoint?)")
  try:
    store = ts.open(spec, open=True, read=True).result()
  except Exception as error:
    raise CheckpointError(f"{directory}: cannot open tensor {name!r} ({relative}): "
                          f"{error}") from error
  return Source(tuple(store.shape), lambda index: store[index].read().result(), name)


def _read_bytes(path: str) -> bytes:
  if "://" in path:  # gs:// and other remote filesystems through TensorFlow's gfile
    import tensorflow as tf
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


def load_t5x(path: str, shardings: Any | None = None, *,
             dtype: str | None = None) -> tuple[t5_lib.T5Config, dict]:
  """(T5Config, float32 params) from a legacy T5X checkpoint directory (`checkpoint_N/`).

  Reads the msgpack `checkpoint` file for the tree of `optimizer/target` (optimizer state is
  ignored); each leaf is an inline array or a tensorstore spec of a zarr array beside it. The
  architecture is inferred from the shapes; relative attention uses t5x's 32 buckets and
  maximum distance 128 unless the shapes say otherwise.
  """
  checkpoint_file = f"{path.rstrip('/')}/checkpoint"
  try:
    raw = _read_bytes(checkpoint_file)
  except Exception as error:
    raise CheckpointError(f"{checkpoint_file}: cannot read the T5X checkpoint: {error}") from error
  try:
    state = serialization.msgpack_restore(raw)
  except Exception as error:
    raise CheckpointError(f"{checkpoint_file}: corrupt or truncated msgpack ({len(raw)} bytes): "
                          f"{error}") from error
  try:
    target = state["optimizer"]["target"]
  except (KeyError, TypeError) as error:
    raise CheckpointError(f"{checkpoint_file}: no optimizer/target tree; not a T5X checkpoint"
                          ) from error
  config = _t5x_config(target, dtype)
  sources = {}
  for key, leaf in _leaves(target).items():
    if isinstance(leaf, Mapping):
      sources[key] = _tensorstore_reader(leaf, path, key)
    else:
      array = np.asarray(leaf)
      sources[key] = Source(array.shape, lambda index, array=array: array[index], key)
  return config, _materialise(sources, _expected_shapes(config), path, shardings)


# ----------------------------------------------------------------------------------------------
# Either format, told apart by the folder's files.

_T5X_STEP = re.compile(r"checkpoint_(\d+)$")


def _exists(path: str) -> bool:
  if "://" in path:
    import tensorflow as tf
    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def _list(path: str) -> list[str]:
  if "://" in path:
    import tensorflow as tf
    return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]
  return os.listdir(path) if os.path.isdir(path) else []


def checkpoint_kind(path: str) -> str:
  """"t5x" for a T5X `checkpoint_N/` folder (it holds the msgpack file `checkpoint`), "hf" for a
  Hugging Face folder (it holds `config.json`); otherwise a CheckpointError that says which files
  were expected, or which `checkpoint_N/` folders to choose from when given their parent."""
  path = path.rstrip("/")
  if not _exists(path):
    raise CheckpointError(f"{path}: no such file or folder")
  if "://" not in path and os.path.isfile(path):
    raise CheckpointError(f"{path} is a file; pass the folder that holds it (a T5X checkpoint_N/ "
                          f"folder or a Hugging Face folder)")
  if _exists(f"{path}/checkpoint"):
    return "t5x"
  if _exists(f"{path}/config.json"):
    return "hf"
  steps = sorted((int(match.group(1)), name) for name in _list(path)
                 if (match := _T5X_STEP.match(name)) and _exists(f"{path}/{name}/checkpoint"))
  if steps:
    names = ", ".join(name for _, name in steps[-4:])
    raise CheckpointError(f"{path} holds T5X checkpoints ({names}); pass one of them, e.g. "
                          f"{path}/{steps[-1][1]} (the latest)")
  raise CheckpointError(f"{path}: not a checkpoint folder: expected {path}/checkpoint (the msgpack "
                        f"file of a T5X checkpoint_N/ folder) or {path}/config.json beside "
                        f"model.safetensors (a Hugging Face T5 folder)")


def load_checkpoint(path: str, shardings: Any | None = None, *,
                    dtype: str | None = None) -> tuple[t5_lib.T5Config, dict]:
  """`load_t5x` or `load_hf_t5`, whichever `checkpoint_kind` finds the folder to be."""
  load = load_t5x if checkpoint_kind(path) == "t5x" else load_hf_t5
  return load(path, shardings, dtype=dtype)

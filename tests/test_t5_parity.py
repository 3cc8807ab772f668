"""The Flax T5 against Hugging Face's PyTorch T5 on the same random weights (via load_hf_t5)."""

import copy
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from dro_jax import checkpoints, scoring
from dro_jax.models import t5 as t5_lib
from hf_reference import hf_logits, hf_sequence_logps, make_hf_t5, random_batch

FAMILIES = ["t5_1_1", "t5_1_0"]


@pytest.fixture(scope="module", params=FAMILIES)
def hf_model_dir(request, tmp_path_factory):
  model = make_hf_t5(request.param)
  directory = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(directory)
  return request.param, model, str(directory)


@pytest.fixture(scope="module")
def batch():
  # Lengths well beyond max_distance=12, with padding in inputs and targets.
  return random_batch(np.random.default_rng(0), vocab_size=96, batch=4, source_length=40,
                      target_length=30)


def _relative_error(ours, reference, valid):
  return np.abs(ours - reference)[valid].max() / np.abs(reference[valid]).max()


@pytest.mark.slow
def test_logits_and_scores_match_transformers(hf_model_dir, batch):
  family, hf_model, directory = hf_model_dir
  config, params = checkpoints.load_hf_t5(directory, dtype="float32")
  assert config.logits_via_embedding == (family == "t5_1_0")
  assert config.mlp_activations == (("gelu", "linear") if family == "t5_1_1" else ("relu",))
  model = t5_lib.T5(config)
  logits = np.asarray(model.apply({"params": params}, batch["encoder_input_tokens"],
                                  batch["decoder_input_tokens"]))
  reference = hf_logits(hf_model, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  valid = batch["decoder_target_tokens"] > 0
  assert _relative_error(logits, reference, valid) < 1e-4

  ours = scoring.score(model, params, batch["encoder_input_tokens"],
                       batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  expected = hf_sequence_logps(hf_model, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  np.testing.assert_allclose(np.asarray(ours["logps"]), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(ours["lengths"]), valid.sum(-1))


def test_exact_gelu_checkpoint_matches_transformers(batch, tmp_path):
  """HF's feed_forward_proj="gelu" is the exact (erf) GELU, not t5x's tanh approximation."""
  relu_model = make_hf_t5("t5_1_0")
  hf_config = copy.deepcopy(relu_model.config)
  hf_config.feed_forward_proj, hf_config.dense_act_fn = "gelu", "gelu"
  hf_model = transformers.T5ForConditionalGeneration(hf_config).eval()
  hf_model.load_state_dict(relu_model.state_dict())
  hf_model.save_pretrained(tmp_path)
  config, params = checkpoints.load_hf_t5(str(tmp_path), dtype="float32")
  assert config.mlp_activations == ("gelu_exact",)
  logits = np.asarray(t5_lib.T5(config).apply({"params": params}, batch["encoder_input_tokens"],
                                              batch["decoder_input_tokens"]))
  reference = hf_logits(hf_model, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  assert _relative_error(logits, reference, batch["decoder_target_tokens"] > 0) < 1e-4


def test_feed_forward_proj_names():
  def activations(projection):
    hf_config = dict(vocab_size=8, d_model=4, num_heads=1, d_kv=4, num_layers=1, d_ff=4,
                     feed_forward_proj=projection)
    return checkpoints.hf_config_to_t5(hf_config, tied_output=False).mlp_activations

  assert activations("gated-gelu") == ("gelu", "linear")  # T5.1.1 / Flan-T5: tanh GELU
  assert activations("gated-gelu_new") == ("gelu", "linear")
  assert activations("gelu") == ("gelu_exact",)
  assert activations("gated-silu") == ("silu", "linear")
  assert activations("relu") == ("relu",)
  with pytest.raises(checkpoints.CheckpointError, match="'gated-tanh' is not supported"):
    activations("gated-tanh")


def test_relative_buckets_match_transformers():
  """Bucket ids, including every log-spaced boundary, for both directions."""
  from transformers.models.t5.modeling_t5 import T5Attention
  positions = torch.arange(-300, 300)
  for bidirectional in (True, False):
    for num_buckets, max_distance in ((32, 128), (16, 12), (32, 20)):
      expected = T5Attention._relative_position_bucket(
          positions, bidirectional=bidirectional, num_buckets=num_buckets,
          max_distance=max_distance).numpy()
      ours = t5_lib.relative_position_bucket(positions.numpy().astype(np.int32),
                                             bidirectional=bidirectional,
                                             num_buckets=num_buckets, max_distance=max_distance)
      np.testing.assert_array_equal(ours, expected)


def _shard_safetensors(directory: str, target: str, num_shards: int = 3) -> None:
  """Rewrite model.safetensors as `num_shards` files with an index, as transformers does."""
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  names = sorted(tensors)
  weight_map = {}
  os.makedirs(target)
  for shard in range(num_shards):
    file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
    part = {name: tensors[name] for name in names[shard::num_shards]}
    save_file(part, os.path.join(target, file))
    weight_map.update({name: file for name in part})
  with open(os.path.join(target, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, "config.json")) as src, \
      open(os.path.join(target, "config.json"), "w") as dst:
    dst.write(src.read())


def test_sharded_safetensors_folder(hf_model_dir, tmp_path):
  _, _, directory = hf_model_dir
  _, params = checkpoints.load_hf_t5(directory, dtype="float32")
  sharded = str(tmp_path / "sharded")
  _shard_safetensors(directory, sharded)
  _, sharded_params = checkpoints.load_hf_t5(sharded, dtype="float32")
  for a, b in zip(_leaves(params), _leaves(sharded_params)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_safetensors(hf_model_dir, batch, tmp_path):
  _, hf_model, directory = hf_model_dir
  bf16_dir = tmp_path / "bf16"
  hf_model.to(torch.bfloat16).save_pretrained(bf16_dir)
  hf_model.to(torch.float32)
  config, params = checkpoints.load_hf_t5(str(bf16_dir), dtype="float32")
  _, full = checkpoints.load_hf_t5(directory, dtype="float32")
  for a, b in zip(_leaves(params), _leaves(full)):
    assert a.dtype == np.float32
    # Exactly the float32 weights rounded to bfloat16.
    np.testing.assert_array_equal(a, np.asarray(b).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_unused_t5_1_0_cross_attention_bias_is_ignored(hf_model_dir, tmp_path):
  """The original T5.1.0 checkpoints carry a relative bias for the first cross-attention, which
  T5 never uses; transformers ignores it on load and so must we."""
  _, _, directory = hf_model_dir
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
  tensors[unused] = np.ones((16, 4), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
  _, params = checkpoints.load_hf_t5(str(tmp_path), dtype="float32")
  _, expected = checkpoints.load_hf_t5(directory, dtype="float32")
  for a, b in zip(_leaves(params), _leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_bad_safetensors_folders_fail_clearly(hf_model_dir, tmp_path):
  _, _, directory = hf_model_dir
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  config_text = open(os.path.join(directory, "config.json")).read()

  def write(name, tensor_dict):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(config_text)
    save_file(tensor_dict, str(folder / "model.safetensors"))
    return str(folder)

  missing_name = "decoder.block.1.layer.2.layer_norm.weight"
  missing = write("missing", {k: v for k, v in tensors.items() if k != missing_name})
  with pytest.raises(checkpoints.CheckpointError, match=missing_name.replace(".", r"\.")):
    checkpoints.load_hf_t5(missing)

  extra = write("extra", {**tensors, "encoder.block.9.layer.0.layer_norm.weight":
                          np.ones(32, np.float32)})
  with pytest.raises(checkpoints.CheckpointError, match=r"encoder\.block\.9"):
    checkpoints.load_hf_t5(extra)

  bad_name = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
  misshaped = write("misshaped", {**tensors, bad_name: tensors[bad_name][:, :-1].copy()})
  with pytest.raises(checkpoints.CheckpointError, match=r"wo\.weight.*shape"):
    checkpoints.load_hf_t5(misshaped)

  truncated = tmp_path / "truncated"
  truncated.mkdir()
  (truncated / "config.json").write_text(config_text)
  data = open(os.path.join(directory, "model.safetensors"), "rb").read()
  (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(checkpoints.CheckpointError, match="truncated"):
    checkpoints.load_hf_t5(str(truncated))

  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text(config_text)
  with pytest.raises(checkpoints.CheckpointError, match="no model.safetensors"):
    checkpoints.load_hf_t5(str(no_weights))


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]

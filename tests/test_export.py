"""Export: transformers loads `save_hf_t5`'s folder with our logits, for T5.1.1 and T5.1.0; the
export CLI writes a workdir's policy, which evaluates exactly like the workdir itself."""

import json
import os

import jax
import numpy as np
import pytest
import transformers

from dro_jax import checkpoints, evaluate, export
from dro_jax.models import t5 as t5_lib
from hf_reference import hf_logits, random_batch
from test_evaluation import tiny_sft_workdir


@pytest.fixture(scope="session")
def sft_workdir(tmp_path_factory, request) -> str:
  return tiny_sft_workdir(tmp_path_factory, request)


def _random_params(config: t5_lib.T5Config, seed: int) -> dict:
  """t5x's random init with the norm scales spread around 1 (not all 1), so every tensor is
  distinct and a swapped name changes the logits."""
  params = jax.jit(t5_lib.init_params, static_argnums=0)(config, jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def leaf(path, value):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return (1.0 + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
    return np.asarray(value)

  return jax.tree_util.tree_map_with_path(leaf, params)


def _logits(config: t5_lib.T5Config, params: dict, batch: dict) -> np.ndarray:
  apply = jax.jit(t5_lib.T5(config).apply)  # compiled: far faster than op by op
  return np.asarray(apply({"params": params}, batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"]))


def _relative_error(ours, reference, valid):
  return np.abs(ours - reference)[valid].max() / np.abs(reference[valid]).max()


@pytest.mark.parametrize("preset", ["t5_1_1_tiny", "t5_1_0_tiny"])
def test_transformers_loads_the_export_with_equal_logits(preset, tmp_path):
  config = t5_lib.get_config(preset, vocab_size=96, relative_attention_num_buckets=16,
                             relative_attention_max_distance=12)
  params = _random_params(config, seed=1)
  export.save_hf_t5(params, config, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  tied = preset == "t5_1_0_tiny"
  assert saved["tie_word_embeddings"] is tied
  assert saved["feed_forward_proj"] == ("relu" if tied else "gated-gelu")

  model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  # Lengths beyond max_distance, padding in inputs and targets.
  batch = random_batch(np.random.default_rng(0), vocab_size=96, batch=4, source_length=30,
                       target_length=20)
  ours = _logits(config, params, batch)
  reference = hf_logits(model, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  assert _relative_error(ours, reference, batch["decoder_target_tokens"] > 0) < 1e-5

  # And back: the importer reads the same architecture and bit-identical parameters.
  loaded_config, loaded = checkpoints.load_hf_t5(str(tmp_path), dtype=config.dtype)
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_unsupported_activation_is_refused():
  config = t5_lib.get_config("tiny", mlp_activations=("gelu_exact", "linear"))
  with pytest.raises(checkpoints.CheckpointError, match="no Hugging Face T5 equivalent"):
    export.hf_config(config)
  assert export.hf_feed_forward_proj(config.replace(mlp_activations=("silu", "linear"))) == (
      "gated-silu")
  assert export.hf_feed_forward_proj(config.replace(mlp_activations=("gelu_exact",))) == "gelu"


def test_export_cli_writes_the_workdirs_policy(sft_workdir, tmp_path, capsys):
  output = str(tmp_path / "hf")
  export.main(["--workdir", sft_workdir, "--output", output])
  assert "model.safetensors" in capsys.readouterr().out
  assert os.path.exists(os.path.join(output, "spiece.model"))
  policy = evaluate.load_policy(sft_workdir)
  exported = evaluate.load_policy(output)
  assert exported.kind == "hf" and exported.policy.config == policy.policy.config
  jax.tree.map(np.testing.assert_array_equal, exported.policy.params, policy.policy.params)
  # The HF folder as the CLI's policy (the task's defaults from the baseline workdir): with the
  # same seed on both sides, the same samples, an exact tie.
  report = evaluate.main(["--policy", output, "--baseline", sft_workdir, "--num_prompts", "16",
                          "--max_decode_length", "8", "--batch_size", "16", "--seed", "3",
                          "--baseline_seed", "3", "--output", str(tmp_path / "eval")])
  assert report["policy"]["kind"] == "hf" and report["judge"] == "demo"
  assert report["win_rate"] == 0.5 and report["ties"] == 16 and report["kl"] == 0.0
  assert ("win_rate 0.50 [0.26, 0.74] (n=16, ties=16, 16 prompts x 1 samples, symmetric judge)"
          in capsys.readouterr().out)

  model = transformers.T5ForConditionalGeneration.from_pretrained(output).eval()
  batch = random_batch(np.random.default_rng(1), vocab_size=96, batch=2, source_length=12,
                       target_length=8)
  ours = _logits(policy.policy.config, policy.policy.params, batch)
  reference = hf_logits(model, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  assert _relative_error(ours, reference, batch["decoder_target_tokens"] > 0) < 1e-5

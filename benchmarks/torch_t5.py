"""The PyTorch reference model the benchmarks compare against."""

from __future__ import annotations

import transformers

from dro_jax.models import t5 as t5_lib


def build_torch_t5(size: str, vocab_size: int | None = None, *, preset_name: str | None = None,
                   layers: int | None = None) -> transformers.T5ForConditionalGeneration:
  """A random untied T5.1.1 (gated GELU) with the preset's shapes (dro_jax's `t5_1_1_{size}`, or
  `preset_name`; `layers` per stack instead of the preset's), float32, eval mode, built on the
  current default torch device (`with torch.device("cuda"): ...` initialises it there)."""
  preset = t5_lib.get_config(preset_name or f"t5_1_1_{size}",
                             **({"num_encoder_layers": layers, "num_decoder_layers": layers}
                                if layers else {}))
  config = transformers.T5Config(
      vocab_size=vocab_size or preset.vocab_size, d_model=preset.emb_dim, d_kv=preset.head_dim,
      num_heads=preset.num_heads, num_layers=preset.num_encoder_layers,
      num_decoder_layers=preset.num_decoder_layers, d_ff=preset.mlp_dim,
      feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  # transformers 5 ignores tie_word_embeddings=False in the constructor; untie only the output.
  config.tie_word_embeddings = False
  config.scale_decoder_outputs = False
  model = transformers.T5ForConditionalGeneration(config)
  model.set_input_embeddings(model.shared)
  return model.eval()


def same_weight_models(size: str, dtype: str, vocab_size: int | None = None):
  """(torch model on its device in `dtype`, device name, T5Config, JAX params): one set of weights.

  The PyTorch model is saved as safetensors and read back with load_hf_t5, so both sides compute
  with identical parameters.
  """
  import tempfile

  import jax
  import torch

  from dro_jax import checkpoints

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  torch.manual_seed(0)
  model = build_torch_t5(size, vocab_size)
  with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)
    config, params = checkpoints.load_hf_t5(directory, dtype=dtype)
  return model.to(device=device, dtype=torch_dtype), device, config, jax.device_put(params)

"""Tiny randomly initialised Hugging Face (PyTorch) T5 models, the independent reference."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def make_hf_t5(family: str, *, vocab_size: int = 96, d_model: int = 32, num_heads: int = 4,
               d_kv: int = 8, num_layers: int = 2, d_ff: int = 48, max_distance: int = 12,
               num_buckets: int = 16, seed: int = 0) -> transformers.T5ForConditionalGeneration:
  """A random T5.1.1 ("t5_1_1": gated GELU, untied unscaled output) or T5.1.0 ("t5_1_0": ReLU,
  tied output scaled by d_model^-0.5) model in float32, eval mode."""
  torch.manual_seed(seed)
  gated = family == "t5_1_1"
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, num_heads=num_heads,
      num_layers=num_layers, num_decoder_layers=num_layers, d_ff=d_ff,
      feed_forward_proj="gated-gelu" if gated else "relu",
      relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  if gated:
    # transformers 5 ignores tie_word_embeddings=False in the constructor; set it afterwards.
    config.tie_word_embeddings = False
    config.scale_decoder_outputs = False
  model = transformers.T5ForConditionalGeneration(config).eval()
  # Untying the output must not untie the encoder/decoder input embeddings from `shared`.
  model.set_input_embeddings(model.shared)
  with torch.no_grad():
    # Default init gives near-uniform logits; larger weights make the parity test sharper.
    for name, parameter in model.named_parameters():
      if "layer_norm" in name:
        parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
      else:
        parameter.copy_(torch.randn_like(parameter) * (0.5 if "relative" in name else 0.3))
  return model


def hf_logits(model, encoder_input_tokens: np.ndarray, decoder_input_tokens: np.ndarray):
  with torch.no_grad():
    output = model(input_ids=torch.tensor(np.asarray(encoder_input_tokens), dtype=torch.long),
                   attention_mask=torch.tensor(np.asarray(encoder_input_tokens) > 0),
                   decoder_input_ids=torch.tensor(np.asarray(decoder_input_tokens),
                                                  dtype=torch.long))
  return output.logits.float().numpy()


def hf_sequence_logps(model, encoder_input_tokens, decoder_input_tokens, targets) -> np.ndarray:
  logits = hf_logits(model, encoder_input_tokens, decoder_input_tokens).astype(np.float64)
  logps = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                          ) - logits.max(-1, keepdims=True)
  token = np.take_along_axis(logps, np.asarray(targets)[..., None], -1)[..., 0]
  return np.where(np.asarray(targets) > 0, token, 0.0).sum(-1)


def random_batch(rng: np.random.Generator, vocab_size: int, batch: int, source_length: int,
                 target_length: int) -> dict[str, np.ndarray]:
  """Tokens in [2, vocab) with right padding of random lengths (at least one token each)."""
  def padded(length: int) -> np.ndarray:
    tokens = rng.integers(2, vocab_size, size=(batch, length))
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length  # one full row, so the longest distances are exercised
    return np.where(np.arange(length)[None] < lengths[:, None], tokens, 0).astype(np.int32)

  targets = padded(target_length)
  decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": padded(source_length), "decoder_input_tokens": decoder_inputs,
          "decoder_target_tokens": targets}

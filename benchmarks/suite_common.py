"""Shapes, batches, FLOP counts and the results file shared by the GPU suite's JAX and PyTorch
halves (benchmarks/gpu_suite.py). Imports neither framework."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shapes:
  """One benchmark size: the T5 preset, rows per step and sequence lengths."""
  preset: str
  batch: int  # pairs (DPO) or single trajectories (DRO-V) per step
  source: int  # encoder input tokens
  target: int  # decoder target tokens
  layers: int | None = None  # encoder and decoder layers each; None: the preset's


FULL = {
    "base": Shapes("t5_1_1_base", 16, 512, 256),
    "large": Shapes("t5_1_1_large", 16, 512, 256),
    "xl": Shapes("t5_1_1_xl", 32, 512, 256),
}
TINY = {name: Shapes("t5_1_1_tiny", 4, 16, 8, layers=1) for name in FULL}
SAMPLING_FULL = {"preset": "t5_1_1_large", "batch": 64, "source": 512, "new_tokens": 256}
SAMPLING_TINY = {"preset": "t5_1_1_tiny", "batch": 4, "source": 16, "new_tokens": 8, "layers": 1}
TORCH_FALLBACK_PAIRS = 4  # the PyTorch step's batch when 16 does not fit
MATMUL_FULL, MATMUL_TINY = 8192, 256


def shapes(size: str, tiny: bool) -> Shapes:
  return (TINY if tiny else FULL)[size]


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the FLOP count needs of a T5 (read from dro_jax's T5Config by the JAX half)."""
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_mlp_inputs: int  # 2 for the gated T5.1.1 MLP (wi_0, wi_1), 1 for T5.1.0
  num_encoder_layers: int
  num_decoder_layers: int
  vocab_size: int


# ------------------------------------------------------------------------------------- batches


def batch_arrays(vocab_size: int, rows: int, source: int, target: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """Every key the DPO and DRO-V steps read: full-length random tokens (no padding, so the FLOP
  count is exact), rewards, unit example weights. Both frameworks train on exactly this."""
  rng = np.random.default_rng(seed)

  def tokens(length: int) -> np.ndarray:
    return rng.integers(2, vocab_size, size=(rows, length)).astype(np.int32)

  arrays = {"encoder_input_tokens": tokens(source)}
  for prefix in ("", "chosen_", "rejected_"):
    targets = tokens(target)
    arrays[f"{prefix}decoder_target_tokens"] = targets
    arrays[f"{prefix}decoder_input_tokens"] = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    arrays[f"{prefix}decoder_loss_weights"] = np.ones_like(targets, np.float32)
  arrays["reward"] = rng.normal(size=rows).astype(np.float32)
  arrays["example_weights"] = np.ones(rows, np.float32)
  return arrays


# ----------------------------------------------------------------------------------------- FLOPs


def encoder_flops(m: ModelShape, source: int) -> float:
  """Forward FLOPs (2 per multiply-add) of the encoder on one sequence of `source` tokens.

  Per layer: q, k, v, o projections 4·2·S·d·hd; attention scores and the weighted sum
  2·2·S²·hd (full, no causal halving); MLP (n_in + 1)·2·S·d·f. Norms, softmax, biases and
  the embedding gather are not counted.
  """
  d, hd, f = m.emb_dim, m.num_heads * m.head_dim, m.mlp_dim
  layer = 4 * 2 * source * d * hd + 2 * 2 * source * source * hd + (
      m.num_mlp_inputs + 1) * 2 * source * d * f
  return m.num_encoder_layers * layer


def decoder_flops(m: ModelShape, source: int, target: int) -> float:
  """Forward FLOPs of the decoder on one sequence of `target` tokens over `source` encoded ones.

  Per layer: self-attention 4·2·T·d·hd + 2·2·T²·hd; cross-attention q, o 2·2·T·d·hd, k, v over
  the encoder output 2·2·S·d·hd, scores and sum 2·2·T·S·hd; MLP (n_in + 1)·2·T·d·f. Plus the
  output projection 2·T·d·V.
  """
  d, hd, f = m.emb_dim, m.num_heads * m.head_dim, m.mlp_dim
  layer = (4 * 2 * target * d * hd + 2 * 2 * target * target * hd
           + 2 * 2 * target * d * hd + 2 * 2 * source * d * hd + 2 * 2 * target * source * hd
           + (m.num_mlp_inputs + 1) * 2 * target * d * f)
  return m.num_decoder_layers * layer + 2 * target * d * m.vocab_size


def step_flops(m: ModelShape, loss: str, batch: int, source: int, target: int, *,
               encoder_per_response: bool) -> float:
  """Model FLOPs of one train step: 3x the forward of each trained network (forward, and a
  backward of twice the forward), 1x the forward of the frozen reference.

  DPO: policy and reference each score `batch` chosen and `batch` rejected responses. With
  `encoder_per_response` each response comes with its own encoder pass over the prompt (2·batch
  encoder sequences, the usual accounting and what a step that concatenates the prompt twice
  does); without it the prompt is encoded once per pair (batch encoder sequences), as dro_jax's
  scoring does. DRO-V: policy and reference score `batch` responses; the value network (an
  encoder copy and a head) is trained on the `batch` prompts.
  """
  enc, dec = encoder_flops(m, source), decoder_flops(m, source, target)
  if loss == "dpo":
    encoders = 2 * batch if encoder_per_response else batch
    forward = encoders * enc + 2 * batch * dec
    return 3 * forward + forward
  if loss == "dro_v":
    forward = batch * (enc + dec)
    return 3 * forward + forward + 3 * batch * enc
  raise ValueError(f"no FLOP count for loss {loss!r}")


def step_tokens(loss: str, batch: int, source: int, target: int) -> int:
  """Tokens a train step reads: prompts once per example plus every response token."""
  responses = 2 if loss == "dpo" else 1
  return batch * (source + responses * target)


T5_1_1_LARGE = ModelShape(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816,
                          num_mlp_inputs=2, num_encoder_layers=24, num_decoder_layers=24,
                          vocab_size=32128)


def check_reference_count() -> float:
  """DPO at T5.1.1-Large, 16 pairs, 512 -> 256, reference forward included: about 78.3 TFLOP."""
  tflop = step_flops(T5_1_1_LARGE, "dpo", 16, 512, 256, encoder_per_response=True) / 1e12
  assert abs(tflop - 78.3) / 78.3 < 0.01, tflop
  return tflop


# -------------------------------------------------------------------------------- the results


class Results:
  """The suite's JSON file: {"meta": {...}, "rows": {name: {...}}}, rewritten after every row
  (a killed run keeps every row that finished)."""

  def __init__(self, path: str):
    self.path = path
    self.data: dict[str, Any] = {"meta": {}, "rows": {}}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)

  def row(self, name: str, values: dict[str, Any]) -> None:
    self.data["rows"][name] = _jsonable(values)
    self.write()

  def meta(self, **values: Any) -> None:
    self.data["meta"].update(_jsonable(values))
    self.write()

  def write(self) -> None:
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{self.path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
      json.dump(self.data, f, indent=1, sort_keys=True)
    os.replace(temporary, self.path)


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else str(value)
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def median_time(fn, *, repeats: int, min_repeats: int = 2, max_seconds: float = 10.0) -> tuple[
    float, int]:
  """(median seconds of `fn()`, calls timed): `repeats` calls or fewer past `max_seconds`
  (at least `min_repeats`). `fn` must block until its work is done."""
  times = []
  start = time.perf_counter()
  while len(times) < repeats:
    begin = time.perf_counter()
    fn()
    times.append(time.perf_counter() - begin)
    if len(times) >= min_repeats and time.perf_counter() - start > max_seconds:
      break
  return float(np.median(times)), len(times)

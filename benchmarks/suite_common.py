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
# The CPU rehearsal (`gpu_suite.py --rehearse`): every size at T5.1.1-small's widths and depth
# (8 + 8 layers, d 512, vocab 32128), 2 pairs, inputs 64, targets 32.
REHEARSAL = {name: Shapes("t5_1_1_small", 2, 64, 32) for name in FULL}
SAMPLING_FULL = {"preset": "t5_1_1_large", "batch": 64, "source": 512, "new_tokens": 256}
SAMPLING_TINY = {"preset": "t5_1_1_tiny", "batch": 4, "source": 16, "new_tokens": 8, "layers": 1}
SAMPLING_REHEARSAL = {"preset": "t5_1_1_small", "batch": 4, "source": 64, "new_tokens": 16}
TORCH_FALLBACK_PAIRS = 4  # the PyTorch step's batch when 16 does not fit
MATMUL_FULL, MATMUL_TINY, MATMUL_REHEARSAL = 8192, 256, 1024
SCANNED_SIZES = ("large", "xl")  # T5-L and larger compile with scanned layer stacks


def mode(tiny: bool = False, rehearse: bool = False) -> str:
  return "tiny" if tiny else "rehearsal" if rehearse else "full"


def shapes(size: str, tiny: bool | str) -> Shapes:
  """The row's shapes: `tiny` is a mode ("full", "rehearsal", "tiny") or a bool (tiny or full)."""
  which = mode(tiny) if isinstance(tiny, bool) else tiny
  return {"full": FULL, "rehearsal": REHEARSAL, "tiny": TINY}[which][size]


def sampling_spec(which: str) -> dict[str, Any]:
  return {"full": SAMPLING_FULL, "rehearsal": SAMPLING_REHEARSAL, "tiny": SAMPLING_TINY}[which]


def matmul_size(which: str) -> int:
  return {"full": MATMUL_FULL, "rehearsal": MATMUL_REHEARSAL, "tiny": MATMUL_TINY}[which]


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
               encoder_per_response: bool, reference_forward: bool = True) -> float:
  """Model FLOPs of one train step: 3x the forward of each trained network (forward, and a
  backward of twice the forward), 1x the forward of the frozen reference (none with
  `reference_forward=False`: its log-probs come with the batch, dro_jax's reference cache).

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
    return 3 * forward + (forward if reference_forward else 0)
  if loss == "dro_v":
    forward = batch * (enc + dec)
    return 3 * forward + (forward if reference_forward else 0) + 3 * batch * enc
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
  """The suite's JSON file: {"meta": {...}, "rows": {name: {...}}}, rewritten after every row and
  every phase of a row (a killed run keeps every row and phase that finished)."""

  def __init__(self, path: str):
    self.path = path
    self.data: dict[str, Any] = {"meta": {}, "rows": {}}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)

  def row(self, name: str, values: dict[str, Any]) -> None:
    self.data["rows"][name] = _jsonable(values)
    self.write()

  def update(self, name: str, values: dict[str, Any]) -> None:
    self.data["rows"].setdefault(name, {}).update(_jsonable(values))
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


class Phases:
  """A row's phases in its worker: each printed as it ends (`[row] compile 22.4 s`) and written
  into the row's entry of the results file at once (`phases`: seconds per finished phase;
  `phase`: the one running), so a killed row still says where its time went.

  `kill_in`: a phase whose start kills this process (SIGKILL, as a timeout would), for the test
  that a killed row keeps its finished phases."""

  def __init__(self, results: Results, name: str, kill_in: str | None = None):
    self.results, self.name, self.kill_in = results, name, kill_in
    self.done: dict[str, float] = {}

  def begin(self, phase: str) -> float:
    self.results.update(self.name, {"status": "running", "phase": phase, "phases": self.done})
    if phase == self.kill_in:
      import signal
      print(f"[{self.name}] killed in {phase} (--kill_in)", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return time.perf_counter()

  def end(self, phase: str, start: float, line: str | None = None) -> float:
    seconds = time.perf_counter() - start
    self.done[phase] = seconds
    self.results.update(self.name, {"phases": self.done, "phase": None})
    print(f"[{self.name}] {line or f'{phase} {seconds:.1f} s'}", flush=True)
    return seconds

  def timed(self, phase: str):
    """with phases.timed("compile"): ..."""
    import contextlib

    @contextlib.contextmanager
    def block():
      start = self.begin(phase)
      yield
      self.end(phase, start)
    return block()

  def steps(self, fn, *, repeats: int, max_seconds: float) -> tuple[float, int]:
    """The "steps" phase: median_time of `fn`, printed as `steps: median 0.29 s over 10`."""
    start = self.begin("steps")
    seconds, count = median_time(fn, repeats=repeats, max_seconds=max_seconds)
    self.end("steps", start, f"steps: median {seconds:.3g} s over {count}")
    return seconds, count


def process_start_s() -> float:
  """Seconds since this process started (its interpreter and imports: the row's "start")."""
  try:
    with open("/proc/self/stat") as f:
      ticks = float(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
  except (OSError, ValueError, IndexError):
    return 0.0

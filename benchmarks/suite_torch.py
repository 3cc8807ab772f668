"""The GPU suite's PyTorch reference rows: Hugging Face's T5ForConditionalGeneration built with the
same config as the dro_jax row (the dro_jax preset's shapes, benchmarks/torch_t5.py) and its own
random weights, initialised on the device; the same batch, the same loss, eager bfloat16
autocast, fused AdamW; and `generate` for the sampling rows. Nothing is saved or loaded: the
check that both steps compute the same loss on the same weights is a CPU test
(tests/test_gpu_suite.py). Each row reports its phases as they end (suite_common.Phases).

The reference step is the usual PyTorch one: chosen and rejected in one forward pass with the
prompt repeated (each response gets its own encoder pass), log-softmax of float32 logits and a
gather; DRO-V's value network is a copy of the encoder with a zero-initialised linear head on
the masked mean of its output, as dro_jax's `double_multiple`.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers

import suite_common as common


def device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def device_info() -> dict[str, Any]:
  name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "torch_device": name}


def _sync() -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _peak_gb() -> float:
  return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _reset_peak() -> None:
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def build_model(preset: str, layers: int | None = None) -> transformers.T5ForConditionalGeneration:
  """The dro_jax preset's T5 in PyTorch, float32, random weights (seed 0) made on the device."""
  import torch_t5
  torch.manual_seed(0)
  with torch.device(device()):
    return torch_t5.build_torch_t5("", preset_name=preset, layers=layers)


def matmul(which: str, phases: common.Phases) -> dict[str, Any]:
  n = common.matmul_size(which)
  with phases.timed("init"):
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    _sync()
  with phases.timed("warm-up"):
    for _ in range(3):
      a @ b
    _sync()

  def one():
    a @ b
    _sync()

  seconds, repeats = phases.steps(one, repeats=20, max_seconds=5.0)
  return {"n": n, "ms": seconds * 1e3, "tflops_per_s": 2 * n**3 / seconds / 1e12,
          "repeats": repeats}


# --------------------------------------------------------------------------------- train steps


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  return {key: torch.from_numpy(np.asarray(value)).to(device()) for key, value in arrays.items()}


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
  token = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None].long())[..., 0]
  return (token * weights).sum(-1)


class ValueNetwork(torch.nn.Module):
  """A copy of the policy's encoder and a zero-initialised head on its masked mean output."""

  def __init__(self, policy: transformers.T5ForConditionalGeneration):
    super().__init__()
    self.encoder = copy.deepcopy(policy.get_encoder())
    self.head = torch.nn.Linear(policy.config.d_model, 1)
    torch.nn.init.zeros_(self.head.weight)
    torch.nn.init.zeros_(self.head.bias)

  def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.float()[..., None]
    pooled = (encoded.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    with torch.autocast(device(), enabled=False):
      return self.head(pooled)[:, 0]


def _optimizer(params) -> torch.optim.Optimizer:
  return torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                           fused=True)


def _build_step(loss: str, policy, reference, value, batch: dict[str, torch.Tensor],
                dtype: torch.dtype):
  """A closure running one train step; returns (loss, mean policy log-prob) as floats."""
  optimizers = [_optimizer(policy.parameters())]
  if value is not None:
    optimizers.append(_optimizer(value.parameters()))
  prompts = batch["encoder_input_tokens"].long()
  prompt_mask = (prompts > 0).long()
  autocast = dict(device_type=device(), dtype=dtype, enabled=dtype != torch.float32)

  def scored(input_ids, mask, decoder_inputs, targets, weights):
    """(policy log-probs, reference log-probs, values or None) under autocast."""
    with torch.autocast(**autocast):
      with torch.no_grad():
        ref_logits = reference(input_ids=input_ids, attention_mask=mask,
                               decoder_input_ids=decoder_inputs).logits
      logits = policy(input_ids=input_ids, attention_mask=mask,
                      decoder_input_ids=decoder_inputs).logits
      values = value(input_ids, mask) if value is not None else None
    return (sequence_logps(logits, targets, weights),
            sequence_logps(ref_logits, targets, weights), values)

  def step(objective):
    """One optimizer step on `objective() -> (loss, policy log-probs)`."""
    def run():
      for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
      value_, logps = objective()
      value_.backward()
      for optimizer in optimizers:
        optimizer.step()
      return value_.detach(), logps.detach().mean()
    return run

  if loss == "dpo":
    both = lambda key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])

    def dpo():
      logps, ref_logps, _ = scored(
          torch.cat([prompts, prompts]), torch.cat([prompt_mask, prompt_mask]),
          both("decoder_input_tokens").long(), both("decoder_target_tokens"),
          both("decoder_loss_weights"))
      chosen, rejected = logps.chunk(2)
      ref_chosen, ref_rejected = ref_logps.chunk(2)
      margin = 0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))
      return -F.logsigmoid(margin).mean(), logps
    return step(dpo)

  def dro_v():
    logps, ref_logps, values = scored(
        prompts, prompt_mask, batch["decoder_input_tokens"].long(),
        batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    residual = batch["reward"] - values - 1.0 * (logps - ref_logps)  # τ = 1: no update scale
    return (0.5 * residual.square()).mean(), logps
  return step(dro_v)


def train_step(loss: str, size: str, which: str, phases: common.Phases, *, dtype: str,
               repeats: int = 10, model: transformers.T5ForConditionalGeneration | None = None
               ) -> dict[str, Any]:
  """The reference step at the suite's batch, or at 4 pairs when that runs out of memory.
  `model`: this policy (its weights) instead of a random one (the CPU test of equal losses)."""
  sh = common.shapes(size, which)
  torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  with phases.timed("init"):
    policy = (model or build_model(sh.preset, sh.layers)).to(device()).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value = ValueNetwork(policy).to(device()).train() if loss == "dro_v" else None
    _sync()
  config = policy.config
  shape = common.ModelShape(
      emb_dim=config.d_model, num_heads=config.num_heads, head_dim=config.d_kv,
      mlp_dim=config.d_ff, num_mlp_inputs=2 if config.is_gated_act else 1,
      num_encoder_layers=config.num_layers, num_decoder_layers=config.num_decoder_layers,
      vocab_size=config.vocab_size)
  arrays = common.batch_arrays(config.vocab_size, sh.batch, sh.source, sh.target)
  notes = []
  for rows in (sh.batch, common.TORCH_FALLBACK_PAIRS):
    _reset_peak()
    batch = _tensors({key: value_[:rows] for key, value_ in arrays.items()})
    try:
      step = _build_step(loss, policy, reference, value, batch, torch_dtype)
      start = phases.begin("warm-up")
      first_loss, first_logps = (float(x) for x in step())
      step()
      _sync()
      phases.end("warm-up", start, f"warm-up {time.perf_counter() - start:.1f} s ({rows} rows)")

      def one():
        step()
        _sync()

      seconds, timed = phases.steps(one, repeats=repeats,
                                    max_seconds={"full": 10.0}.get(which, 3.0))
      break
    except torch.cuda.OutOfMemoryError as error:
      notes.append(f"{rows} rows: out of memory ({str(error).splitlines()[0][:120]})")
      step = batch = None
      for module in (policy, value):
        if module is not None:
          module.zero_grad(set_to_none=True)
      if rows == common.TORCH_FALLBACK_PAIRS or sh.batch <= common.TORCH_FALLBACK_PAIRS:
        raise
  flops = common.step_flops(shape, loss, rows, sh.source, sh.target, encoder_per_response=True)
  tokens = common.step_tokens(loss, rows, sh.source, sh.target)
  return {"framework": "torch", "loss": loss, "preset": sh.preset, "batch": rows,
          "source": sh.source, "target": sh.target, "dtype": f"autocast {dtype}",
          "optimizer": "fused adamw", "step_ms": seconds * 1e3, "steps_timed": timed,
          "init_s": phases.done.get("init"), "tokens_per_step": tokens,
          "tokens_per_s": tokens / seconds, "executed_tflop": flops / 1e12,
          "nominal_tflop": flops / 1e12, "tflops_per_s": flops / seconds / 1e12,
          "first_loss": first_loss, "first_policy_logps": first_logps, "peak_gb": _peak_gb(),
          "notes": "; ".join(notes)}


# ------------------------------------------------------------------------------------ sampling


def generate(which: str, phases: common.Phases, *, temperature: float) -> dict[str, Any]:
  """Hugging Face `generate` tokens/s with bfloat16 weights, batch 64, 256 new tokens."""
  spec = common.sampling_spec(which)
  with phases.timed("init"):
    model = build_model(spec["preset"], spec.get("layers")).to(torch.bfloat16).eval()
    _sync()
  prompts = torch.from_numpy(common.batch_arrays(
      model.config.vocab_size, spec["batch"], spec["source"], 1)["encoder_input_tokens"]).long()
  prompts = prompts.to(device())
  options = dict(max_new_tokens=spec["new_tokens"], num_beams=1,
                 attention_mask=(prompts > 0).long(), pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)
  if temperature > 0:
    options.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
  else:
    options.update(do_sample=False)
  output = None

  def one():
    nonlocal output
    torch.manual_seed(0)
    with torch.inference_mode():
      output = model.generate(prompts, **options)
    _sync()

  with phases.timed("warm-up"):
    one()
  seconds, timed = phases.steps(one, repeats=3, max_seconds=10.0)
  steps = int(output.shape[1]) - 1  # the decoder start token is not generated
  return {"framework": "torch", "preset": spec["preset"], "batch": spec["batch"],
          "source": spec["source"], "new_tokens": spec["new_tokens"],
          "temperature": temperature, "decode_steps": steps, "ms": seconds * 1e3,
          "steps_timed": timed, "tokens_per_s": spec["batch"] * steps / seconds,
          "init_s": phases.done.get("init"), "peak_gb": _peak_gb()}

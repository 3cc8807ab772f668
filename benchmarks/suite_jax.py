"""The GPU suite's dro_jax rows: the engine's train step, the sampler, a matmul and the
log-softmax memory check (benchmarks/gpu_suite.py runs them; each returns one results row).

The train step is the engine's: the recipe `configs/dpo.py` or `configs/dro.py`, the state from
`train.state_layout` / `train.build_state` (initialised on the device under jit with the state's
out_shardings: nothing is built on the host and copied), the step from `step.make_train_step`
jitted by `train.compile_step` (shardings, state donated); T5-L and larger with scanned layer
stacks. Each row reports its phases as they end (suite_common.Phases). Nothing here imports
dro_jax.data's pipeline, TensorFlow or seqio.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import suite_common as common


def _jax():
  import jax
  return jax


def device_info() -> dict[str, Any]:
  jax = _jax()
  device = jax.devices()[0]
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)), "device_count": jax.device_count()}


def _memory_stats() -> dict[str, Any]:
  stats = _jax().devices()[0].memory_stats() or {}
  return {"process_peak_gb": stats.get("peak_bytes_in_use", 0) / 2**30,
          "device_limit_gb": stats.get("bytes_limit", 0) / 2**30}


def compiled_memory(compiled) -> dict[str, float]:
  """XLA's buffer assignment of a compiled program: arguments + outputs − donated aliases +
  temporaries, the device memory the program needs while it runs."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {"compiled_peak_gb": peak / 2**30, "compiled_temp_gb": analysis.temp_size_in_bytes / 2**30,
          "arguments_gb": analysis.argument_size_in_bytes / 2**30}


def compiled_flops(compiled) -> dict[str, float]:
  """XLA's own FLOP count of a compiled program (what it executes, fusions included)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # not every backend offers it
    return {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return {"xla_tflop": float(flops) / 1e12} if flops else {}


# -------------------------------------------------------------------------------------- matmul


def matmul(which: str, phases: common.Phases) -> dict[str, Any]:
  """bf16 N×N×N matrix product (N = 8192): the achievable peak the MFU columns divide by."""
  jax = _jax()
  import jax.numpy as jnp
  n = common.matmul_size(which)
  with phases.timed("init"):
    keys = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
    b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
    jax.block_until_ready((a, b))
  product = jax.jit(jnp.dot)
  with phases.timed("compile"):
    compiled = product.lower(a, b).compile()
  with phases.timed("warm-up"):
    for _ in range(3):
      compiled(a, b).block_until_ready()
  seconds, repeats = phases.steps(lambda: compiled(a, b).block_until_ready(), repeats=20,
                                  max_seconds=5.0)
  return {"n": n, "ms": seconds * 1e3, "tflops_per_s": 2 * n**3 / seconds / 1e12,
          "repeats": repeats}


# -------------------------------------------------------------------------- log-softmax memory


def plain_target_logps(logits, targets):
  """The straightforward per-token log-prob: a float32 copy of the logits, logsumexp, gather,
  differentiated by JAX (what dro_jax.scoring computed before its custom gradient)."""
  import jax
  import jax.numpy as jnp
  logits32 = logits.astype(jnp.float32)
  target = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
  return jnp.where(targets > 0, target - jax.nn.logsumexp(logits32, axis=-1), 0.0)


def logps_memory(which: str, phases: common.Phases) -> dict[str, Any]:
  """Compiled temp memory of jax.grad through the bf16 output projection and the per-token
  log-probs, at DPO-Large's logits shape [32, 256, 32128]: plain vs dro_jax.scoring."""
  jax = _jax()
  import jax.numpy as jnp
  from dro_jax import scoring
  rows, length, embed, vocab = {"tiny": (8, 8, 32, 256), "rehearsal": (4, 32, 512, 32128)}.get(
      which, (32, 256, 1024, 32128))

  def temp_bytes(fn):
    def loss(kernel, hidden, targets):
      logits = jnp.dot(hidden, kernel.astype(jnp.bfloat16))
      return jnp.sum(fn(logits, targets))
    args = (jax.ShapeDtypeStruct((embed, vocab), jnp.float32),
            jax.ShapeDtypeStruct((rows, length, embed), jnp.bfloat16),
            jax.ShapeDtypeStruct((rows, length), jnp.int32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  with phases.timed("compile"):
    plain, fast = temp_bytes(plain_target_logps), temp_bytes(scoring.target_logps_from_logits)
  float32_logits = rows * length * vocab * 4
  return {"shape": [rows, length, vocab], "plain_temp_gb": plain / 2**30,
          "fast_temp_gb": fast / 2**30, "float32_logits_gb": float32_logits / 2**30,
          "saved_gb": (plain - fast) / 2**30}


# --------------------------------------------------------------------------------- train steps


def model_shape(model_config) -> common.ModelShape:
  return common.ModelShape(
      emb_dim=model_config.emb_dim, num_heads=model_config.num_heads,
      head_dim=model_config.head_dim, mlp_dim=model_config.mlp_dim,
      num_mlp_inputs=len(model_config.mlp_activations),
      num_encoder_layers=model_config.num_encoder_layers,
      num_decoder_layers=model_config.num_decoder_layers, vocab_size=model_config.vocab_size)


def engine_config(loss: str, size: str, which: str, *, dtype: str, attention: str = "xla",
                  remat: str = "none", scan: bool | None = None):
  """The recipe's config at the suite's shapes: AdamW, no warm-up, one device mesh, scanned
  layer stacks for T5-L and larger (`scan` None) or as given."""
  from dro_jax import configs
  sh = common.shapes(size, which)
  preset_size = {"tiny": "tiny", "rehearsal": "small"}.get(which, size)
  config = configs.load("dpo" if loss == "dpo" else "dro", f"size={preset_size}")
  config.batch_size = sh.batch
  config.max_input_length, config.max_target_length = sh.source, sh.target
  config.compute_dtype = dtype
  config.mesh_shape = (1, 1, 1)
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-6
  config.optimizer.warmup_steps = 0
  config.reference_cache = "off"
  if sh.layers:
    config.model.num_encoder_layers = config.model.num_decoder_layers = sh.layers
  config.model.attention = attention
  config.model.remat = remat
  config.model.scan_layers = size in common.SCANNED_SIZES if scan is None else bool(scan)
  return config


def train_step(loss: str, size: str, which: str, phases: common.Phases, *, dtype: str,
               attention: str = "xla", remat: str = "auto", scan: bool | None = None,
               repeats: int = 10, deadline: float | None = None, policy=None) -> dict[str, Any]:
  """One engine train step row: init (on the device), compile, warm-up (the first two steps; the
  first's loss and policy log-prob), then the timed steps.

  remat "auto": "none" when XLA's buffer assignment fits the device, else "minimal", else "full".
  `policy`: initial policy parameters (host or device arrays) instead of random ones (the CPU
  test that compares the step's loss with the PyTorch step's on the same weights)."""
  jax = _jax()
  from dro_jax import partitioning, step as step_lib, train
  from dro_jax.models import t5 as t5_lib
  sh = common.shapes(size, which)
  choices = ["none", "minimal", "full"] if remat == "auto" else [remat]
  limit = _memory_stats()["device_limit_gb"]
  state = None
  compile_s = 0.0
  for choice in choices:
    config = engine_config(loss, size, which, dtype=dtype, attention=attention, remat=choice,
                           scan=scan)
    model_config = step_lib.t5_config(config)
    mesh = partitioning.mesh_from_config(config)
    rules = partitioning.rules_from_config(config)
    abstract, shardings = train.state_layout(config, model_config, mesh, rules)
    if state is None:
      with phases.timed("init"):
        if policy is not None:
          policy = jax.device_put(policy, shardings.policy)
        state = train.build_state(config, model_config, mesh, rules, abstract, shardings,
                                  policy=policy)
        jax.block_until_ready(state)
    host_batch = {k: v for k, v in common.batch_arrays(
        model_config.vocab_size, sh.batch, sh.source, sh.target).items()
        if loss == "dpo" or not k.startswith(("chosen_", "rejected_"))}
    jitted, layout = train.compile_step(config, mesh, rules, shardings, host_batch)
    batch = train.device_batch(host_batch, layout)
    with partitioning.activate(mesh, rules):
      start = phases.begin("compile")
      compiled = jitted.jitted.lower(state, batch).compile()
      compile_s += phases.end("compile", start, f"compile {time.perf_counter() - start:.1f} s"
                              f" (remat {choice})")
    memory = {**compiled_memory(compiled), **compiled_flops(compiled)}
    fits = not limit or memory.get("compiled_peak_gb", 0) <= 0.97 * limit
    if fits or choice == choices[-1]:
      break
    if deadline is not None and time.time() + 30 > deadline:
      raise RuntimeError(f"budget: remat {choice!r} needs {memory['compiled_peak_gb']:.1f} GB of "
                         f"{limit:.1f}; no time left to compile with more rematerialisation")
  implementation = "einsum"
  if hasattr(t5_lib, "attention_implementation"):
    implementation = t5_lib.attention_implementation(model_config, sh.source, sh.source)

  with partitioning.activate(mesh, rules):
    start = phases.begin("warm-up")
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    first = {key: float(metrics[key]) for key in ("loss", "logps/policy")}

    def one():
      nonlocal state
      state, step_metrics = compiled(state, batch)
      jax.block_until_ready((state, step_metrics))

    one()
    phases.end("warm-up", start)
    seconds, timed = phases.steps(one, repeats=repeats,
                                  max_seconds={"full": 10.0}.get(which, 3.0))
  shape = model_shape(model_config)
  executed = common.step_flops(shape, loss, sh.batch, sh.source, sh.target,
                               encoder_per_response=False)
  nominal = common.step_flops(shape, loss, sh.batch, sh.source, sh.target,
                              encoder_per_response=True)
  tokens = common.step_tokens(loss, sh.batch, sh.source, sh.target)
  return {"framework": "dro_jax", "loss": loss, "preset": sh.preset,
          "layers": model_config.num_encoder_layers, "batch": sh.batch, "source": sh.source,
          "target": sh.target, "dtype": dtype, "attention": attention,
          "attention_path": implementation, "remat": choice,
          "scan_layers": bool(config.model.scan_layers), "optimizer": "adamw",
          "step_ms": seconds * 1e3, "steps_timed": timed, "compile_s": compile_s,
          "init_s": phases.done.get("init"), "tokens_per_step": tokens,
          "tokens_per_s": tokens / seconds, "executed_tflop": executed / 1e12,
          "nominal_tflop": nominal / 1e12, "tflops_per_s": executed / seconds / 1e12,
          "first_loss": first["loss"], "first_policy_logps": first["logps/policy"],
          "last_loss": float(metrics["loss"]), **memory, **_memory_stats()}


# ------------------------------------------------------------------------------------ sampling


def sampling(which: str, phases: common.Phases, *, temperature: float,
             dtype: str) -> dict[str, Any]:
  """Tokens/s of dro_jax.decoding's sampler at batch 64, 512 prompt tokens, 256 new tokens;
  random weights initialised on the device (scanned layers for T5-L, as the train rows)."""
  jax = _jax()
  from dro_jax import decoding
  from dro_jax.models import t5 as t5_lib
  spec = common.sampling_spec(which)
  options = {"num_encoder_layers": spec["layers"], "num_decoder_layers": spec["layers"]} if (
      spec.get("layers")) else {}
  if which != "tiny":
    options["scan_layers"] = True
  config = t5_lib.get_config(spec["preset"], dtype=dtype, **options)
  with phases.timed("init"):
    params = jax.jit(lambda rng: t5_lib.init_params(config, rng))(jax.random.PRNGKey(0))
    jax.block_until_ready(params)
  prompts = common.batch_arrays(config.vocab_size, spec["batch"], spec["source"], 1)[
      "encoder_input_tokens"]
  sampling_params = decoding.SamplingParams(max_decode_length=spec["new_tokens"],
                                            temperature=temperature)
  sampler = decoding.make_sampler(config, sampling_params)
  rng = jax.random.PRNGKey(1)
  with phases.timed("compile"):  # the first call: the sampler compiles, then runs once
    output = sampler(params, prompts, rng)
    jax.block_until_ready(output)

  def one():
    jax.block_until_ready(sampler(params, prompts, rng))

  seconds, timed = phases.steps(one, repeats=3, max_seconds=10.0)
  lengths = np.asarray(output.lengths)
  steps = int(lengths.max()) if not np.asarray(output.truncated).any() else spec["new_tokens"]
  return {"framework": "dro_jax", "preset": spec["preset"], "batch": spec["batch"],
          "source": spec["source"], "new_tokens": spec["new_tokens"],
          "temperature": temperature, "decode_steps": steps, "ms": seconds * 1e3,
          "steps_timed": timed, "tokens_per_s": spec["batch"] * steps / seconds,
          "compile_s": phases.done.get("compile"), "mean_length": float(lengths.mean()),
          **_memory_stats()}

"""Forward+backward time of the Flax T5 against Hugging Face's PyTorch T5 on the same batch.

Both models hold the same random weights (the PyTorch model is saved and loaded with
load_hf_t5); both compute the summed target log-likelihood and its gradient with respect to
every parameter. Prints the per-step times and the ratio (PyTorch / JAX; > 1 means JAX is
faster).

  python benchmarks/model_step.py                       # T5.1.1-small, float32, CPU
  python benchmarks/model_step.py --size large --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def time_steps(step, repeats: int) -> float:
  step()  # compile / warm up
  step()
  start = time.perf_counter()
  for _ in range(repeats):
    step()
  return (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--source_length", type=int, default=128)
  parser.add_argument("--target_length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  import jax  # after the flags: --help answers before the heavy imports
  import torch
  from torch_t5 import same_weight_models

  from dro_jax import scoring
  from dro_jax.models import t5 as t5_lib

  torch_model, device, config, params = same_weight_models(args.size, args.dtype)
  torch_model.train()

  rng = np.random.default_rng(0)
  inputs = rng.integers(2, config.vocab_size, (args.batch, args.source_length)).astype(np.int32)
  targets = rng.integers(2, config.vocab_size, (args.batch, args.target_length)).astype(np.int32)
  decoder_inputs = np.concatenate([np.zeros((args.batch, 1), np.int32), targets[:, :-1]], 1)

  model = t5_lib.T5(config)

  @jax.jit
  def jax_step(params, inputs, decoder_inputs, targets):
    def loss(p):
      return -scoring.score(model, p, inputs, decoder_inputs, targets)["logps"].sum()
    return jax.value_and_grad(loss)(params)

  def run_jax():
    jax.block_until_ready(jax_step(params, inputs, decoder_inputs, targets))

  t_inputs, t_targets, t_decoder = (torch.tensor(x, dtype=torch.long, device=device)
                                    for x in (inputs, targets, decoder_inputs))

  def run_torch():
    torch_model.zero_grad(set_to_none=True)
    logits = torch_model(input_ids=t_inputs, decoder_input_ids=t_decoder).logits
    logps = torch.log_softmax(logits.float(), -1).gather(-1, t_targets[..., None])
    (-logps.sum()).backward()
    if device == "cuda":
      torch.cuda.synchronize()

  jax_time = time_steps(run_jax, args.repeats)
  torch_time = time_steps(run_torch, args.repeats)
  print(f"T5.1.1-{args.size} {args.dtype} batch {args.batch} x ({args.source_length} -> "
        f"{args.target_length}) on {jax.devices()[0].platform} / torch {device}")
  print(f"  jax   forward+backward: {jax_time * 1e3:9.1f} ms/step")
  print(f"  torch forward+backward: {torch_time * 1e3:9.1f} ms/step")
  print(f"  ratio torch/jax: {torch_time / jax_time:.2f}")


if __name__ == "__main__":
  main()

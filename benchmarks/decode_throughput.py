"""Sampling throughput of dro_jax.decoding against Hugging Face `generate` on the same model.

Both hold the same random T5.1.1 weights (the PyTorch model is saved and loaded with load_hf_t5)
and decode the same batch of prompts to the same length; tokens per second counts generated
tokens up to and including EOS. Prints both rates and the ratio (JAX / PyTorch; > 1 means JAX is
faster) and, for greedy decoding, how many tokens agree. Runs on whatever device JAX and torch see.

  python benchmarks/decode_throughput.py                            # T5.1.1-small, CPU, batch 64
  python benchmarks/decode_throughput.py --mode sample --top_p 0.9
  python benchmarks/decode_throughput.py --size large --dtype bfloat16 --batch 256   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np

EOS = 1


def generated_tokens(tokens_NxL: np.ndarray) -> int:
  """Tokens up to and including the first EOS of each row (all of a row without one)."""
  tokens_NxL = np.asarray(tokens_NxL)
  has_eos = (tokens_NxL == EOS).any(axis=1)
  first_eos = np.argmax(tokens_NxL == EOS, axis=1)
  return int(np.where(has_eos, first_eos + 1, tokens_NxL.shape[1]).sum())


def timed(run) -> tuple[float, object]:
  start = time.perf_counter()
  result = run()
  return time.perf_counter() - start, result


def best_times(runs, repeats: int) -> list[tuple[float, object]]:
  """Fastest time of each run over `repeats` rounds, with its last result. The runs alternate
  within a round, so a busy machine slows both rather than whichever ran second."""
  best = [(float("inf"), None)] * len(runs)
  for _ in range(repeats):
    for index, run in enumerate(runs):
      seconds, result = timed(run)
      best[index] = (min(best[index][0], seconds), result)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="small")
  parser.add_argument("--vocab_size", type=int, default=None, help="default: the preset's")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--source_length", type=int, default=64)
  parser.add_argument("--decode_length", type=int, default=64)
  parser.add_argument("--mode", default="greedy", choices=["greedy", "sample"])
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  import jax  # after the flags: --help answers before the heavy imports
  import torch
  from torch_t5 import same_weight_models

  from dro_jax import decoding

  torch_model, torch_device, config, params = same_weight_models(args.size, args.dtype,
                                                                 args.vocab_size)

  rng = np.random.default_rng(0)
  prompts = rng.integers(2, config.vocab_size, (args.batch, args.source_length)).astype(np.int32)
  greedy = args.mode == "greedy"
  # No pad suppression: generate does not suppress it either, so greedy tokens can agree.
  sampling = decoding.SamplingParams(
      max_decode_length=args.decode_length, temperature=0.0 if greedy else args.temperature,
      top_k=args.top_k, top_p=args.top_p, eos_id=EOS, suppress_pad=False)
  sampler = decoding.make_sampler(config, sampling)
  key = jax.random.key(0)

  def run_jax():
    return jax.block_until_ready(sampler(params, prompts, key))

  compile_s, _ = timed(run_jax)

  input_ids = torch.tensor(prompts, dtype=torch.long, device=torch_device)
  attention_mask = input_ids > 0
  sample_kwargs = (dict(do_sample=False) if greedy else
                   dict(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p))

  def run_torch():
    with torch.inference_mode():
      output = torch_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    max_new_tokens=args.decode_length, num_beams=1,
                                    **sample_kwargs)
    if torch_device == "cuda":
      torch.cuda.synchronize()
    return output

  run_torch()  # warm up
  (jax_s, jax_output), (torch_s, torch_output) = best_times([run_jax, run_torch], args.repeats)
  jax_tokens = np.asarray(jax_output.tokens)
  # generate's output starts with the decoder start token and may stop before decode_length.
  torch_tokens = np.zeros_like(jax_tokens)
  generated = torch_output[:, 1:].cpu().numpy()
  torch_tokens[:, :generated.shape[1]] = generated

  jax_rate = generated_tokens(jax_tokens) / jax_s
  torch_rate = generated_tokens(torch_tokens) / torch_s
  print(f"T5.1.1-{args.size} vocab {config.vocab_size} {args.dtype}, batch {args.batch}, source "
        f"{args.source_length}, decode {args.decode_length}, {args.mode}; JAX on "
        f"{jax.devices()[0].platform}, torch on {torch_device}")
  print(f"jax decoding:  {jax_s:8.3f} s  {jax_rate:10.1f} tokens/s  (first call with compile "
        f"{compile_s:.1f} s)")
  print(f"hf generate:   {torch_s:8.3f} s  {torch_rate:10.1f} tokens/s")
  print(f"ratio (jax / hf tokens per second): {jax_rate / torch_rate:.2f}")
  if greedy:
    print(f"greedy tokens equal: {np.mean(jax_tokens == torch_tokens):.4f}")


if __name__ == "__main__":
  main()

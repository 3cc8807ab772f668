"""The GPU suite's train-step rows at any shape in one process: dro_jax's engine step against
the PyTorch reference step, for CPU measurements (no memory isolation needed there).

  python benchmarks/step_compare.py --preset t5_1_1_small --batch 4 --source 128 --target 64
  python benchmarks/step_compare.py --source_tree /tmp/old_checkout ...   # another dro_jax

`--source_tree` puts another checkout's dro_jax first on the import path (before/after
comparisons of the same rows); the suite's own modules stay this checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--preset", default="t5_1_1_small", help="t5_1_1_{tiny,small,base,large,xl}")
  add("--layers", type=int, default=0, help="encoder and decoder layers each; 0: the preset's")
  add("--batch", type=int, default=4)
  add("--source", type=int, default=128)
  add("--target", type=int, default=64)
  add("--losses", default="dpo,dro_v")
  add("--dtype", default="float32", choices=["float32", "bfloat16"])
  add("--repeats", type=int, default=5)
  add("--torch", action=argparse.BooleanOptionalAction, default=True)
  add("--source_tree", default="", help="a dro_jax checkout to import dro_jax from")
  add("--out", default="")
  args = parser.parse_args(argv)
  sys.path.insert(0, HERE)
  sys.path.insert(1, os.path.abspath(args.source_tree) if args.source_tree else os.path.dirname(
      HERE))
  import suite_common as common
  import suite_jax
  size = args.preset.replace("t5_1_1_", "")
  common.FULL[size] = common.Shapes(args.preset, args.batch, args.source, args.target,
                                    layers=args.layers or None)
  import dro_jax
  print(f"dro_jax from {os.path.dirname(dro_jax.__file__)}; {args.preset}, batch {args.batch}, "
        f"{args.source} -> {args.target}, {args.dtype}", flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as weights:
    # One set of weights: PyTorch's random T5, read into JAX through a Hugging Face folder.
    import torch
    import torch_t5

    from dro_jax import checkpoints
    torch.manual_seed(0)
    model = torch_t5.build_torch_t5("", preset_name=args.preset, layers=args.layers or None)
    model.save_pretrained(os.path.join(weights, size))
    _, params = checkpoints.load_hf_t5(os.path.join(weights, size), dtype="float32")
    log = common.Results(os.path.join(weights, "phases.json"))
    for loss in args.losses.split(","):
      ours = suite_jax.train_step(loss, size, "full", common.Phases(log, f"dro_jax:{loss}"),
                                  dtype=args.dtype, remat="none", scan=False,
                                  repeats=args.repeats, policy=params)
      results[f"dro_jax:{loss}"] = ours
      print(f"dro_jax {loss:<6} step {ours['step_ms']:9.1f} ms  compile {ours['compile_s']:6.1f} s"
            f"  temp {ours.get('compiled_temp_gb', 0) * 1024:8.1f} MB"
            f"  XLA {ours.get('xla_tflop', 0) * 1e3:8.1f} GFLOP"
            f"  logps/policy {ours['first_policy_logps']:.4f}", flush=True)
      if args.torch:
        import suite_torch
        import copy
        theirs = suite_torch.train_step(loss, size, "full", common.Phases(log, f"torch:{loss}"),
                                        dtype=args.dtype, repeats=args.repeats,
                                        model=copy.deepcopy(model))
        results[f"torch:{loss}"] = theirs
        print(f"torch   {loss:<6} step {theirs['step_ms']:9.1f} ms"
              f"  logps/policy {theirs['first_policy_logps']:.4f}"
              f"  ratio torch/jax {theirs['step_ms'] / ours['step_ms']:.2f}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()

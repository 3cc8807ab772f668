"""The roofline of the DRO paper's setups on v5e slices: a lower bound on the train step's time
and the MFU ceiling it implies, from the compiled program's own costs (`sizing.roofline`:
XLA's cost analysis and the collectives of the step compiled for the TPU topology on this CPU,
libtpu needed; the chips' published peaks). An estimate from the compiled program, not a
measurement.

  python benchmarks/roofline_table.py --out roofline.json            # compile what is missing
  python benchmarks/roofline_table.py --out roofline.json --print    # the table only

Results are added to `--out` as they come (a rerun skips what is there); the markdown table is
printed at the end. 512 / 256 tokens, batch 32. Each row compiles the step unrolled at 1 and 2
layers (the bytes) and lowers it at 1 and 2 layers with and without remat (the FLOPs); a 2-layer
compile took 13 minutes for T5-L, 16 for T5-XL, on 2 CPU cores shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (recipe, recipe args, topology, overrides)
FITTING = {"mesh_shape": (1, -1, 1), "model.scan_layers": True, "model.remat": "full"}
# The settings that fit a 16 GiB v5e chip (docs/pods.md's sizing table, "after").
ROWS: dict[str, tuple[str, str, str, dict]] = {
    "T5-L DRO-V, fsdp, scan, remat=full": ("dro", "size=large,batch=32", "v5e:4x4", FITTING),
    "T5-XL DRO-V, fsdp, scan, remat=full": ("dro", "size=xl,batch=32", "v5e:4x8", FITTING),
}


def config_of(name: str):
  from dro_jax import configs, sizing
  recipe, args, topology, overrides = ROWS[name]
  config = configs.load(recipe, args)
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return sizing.prepare_config(config, input_length=512, target_length=256)


def measure(name: str) -> dict:
  from dro_jax import sizing
  recipe, args, topology, overrides = ROWS[name]
  config = config_of(name)
  start = time.perf_counter()
  roof = sizing.roofline(config, topology)
  mesh = tuple(config.mesh_shape)
  return {"recipe": f"configs/{recipe}.py:{args}", "topology": topology,
          "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
          "mesh_shape": list(mesh), "seconds": round(time.perf_counter() - start, 1), **roof}


def table(results: dict) -> str:
  lines = ["| setup | slice | TFLOP/step (model) | HBM GB/chip | collectives GB/chip | "
           "compute / HBM / ICI ms | lower bound | MFU ceiling |",
           "|---|---|---|---|---|---|---|---|"]
  for name in ROWS:
    r = results.get(name)
    if not r:
      continue
    lines.append(
        f"| {name} | {r['topology']} | {r['flops'] / 1e12:.1f} ({r['model_flops'] / 1e12:.1f}) | "
        f"{r['hbm_bytes_per_chip'] / 1e9:.1f} | {r['collective_bytes_per_chip'] / 1e9:.2f} | "
        f"{r['compute_s'] * 1e3:.0f} / {r['memory_s'] * 1e3:.0f} / {r['network_s'] * 1e3:.0f} | "
        f"{r['lower_bound_s'] * 1e3:.0f} ms ({r['bound_by']}) | {100 * r['mfu_ceiling']:.0f}% |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--rows", default="", help=f"names of {list(ROWS)}, separated by ;")
  parser.add_argument("--print", action="store_true", help="print the table of --out only")
  args = parser.parse_args()
  results = json.loads(pathlib.Path(args.out).read_text()) if os.path.exists(args.out) else {}
  if not args.print:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    from dro_jax import console
    console.initialize_backends()
    for name in [n for n in args.rows.split(";") if n] or list(ROWS):
      if name in results:
        continue
      print(f"[roofline] {name}", file=sys.stderr, flush=True)
      results[name] = measure(name)
      pathlib.Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
  print(table(results))


if __name__ == "__main__":
  main()

"""Per-chip memory of the DRO paper's setups on v5e slices: the defaults, and settings that fit.

  python benchmarks/sizing_table.py --out sizing_table.json                 # the fitting settings
  python benchmarks/sizing_table.py --out sizing_table.json --before        # and the defaults
  python benchmarks/sizing_table.py --out sizing_table.json --rows dro_xl_b32,xxl_dro
  python benchmarks/sizing_table.py --out sizing_table.json --print         # the table only

Every number is measured with `python -m dro_jax.sizing` (the real train step compiled for the TPU
topology on this CPU; libtpu needed), each compile in its own process, at 512 / 256 tokens.
"after": fsdp over the whole slice (`mesh_shape=(1,-1,1)`), scanned layer stacks with full remat,
the microbatches doubled until the step needs at most 90% of a 16 GiB v5e chip. "before"
(`--before`): the recipe as it is (data parallelism over every chip, unrolled layers, no remat,
one microbatch); an unrolled T5-L / XL step takes 10-30 minutes to compile on 2 CPU cores. Rows
without it show a lower bound of the defaults instead ("≥"): the state plus gradients per chip,
from the shardings alone (`sizing.state_bytes`, no compile). T5-XXL DRO-V tries the standard slices from the smallest up. Results are added to `--out` as they come
(a rerun skips what is there), and the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADROOM = 0.9
HBM_GIB = 16
# name -> (recipe arg, topology, extra flags tried first)
ROWS: dict[str, tuple[str, str, tuple[str, ...]]] = {}
for _size, _topology in (("large", "v5e:4x4"), ("xl", "v5e:4x8")):
  for _loss in ("dro", "dpo", "kto"):
    for _batch in (32, 128):
      ROWS[f"{_loss}_{_size}_b{_batch}"] = (f"{_loss}.py:size={_size},batch={_batch}",
                                            _topology, ())
XXL_SLICES = ("v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8")
GIB = 2 ** 30


def sizing(recipe: str, topology: str, flags: list[str], workdir: pathlib.Path) -> dict:
  """One compile through the CLI; its JSON report (with the wall time)."""
  tag = abs(hash((recipe, topology, tuple(flags))))
  path, log = workdir / f"{tag}.json", workdir / f"{tag}.log"
  command = [sys.executable, "-m", "dro_jax.sizing", f"--config={ROOT}/configs/{recipe}",
             f"--topology={topology}", f"--json={path}", *flags]
  start = time.perf_counter()
  with open(log, "w") as out:
    result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if result.returncode:
    tail = log.read_text()[-1500:]
    return {"error": tail, "flags": flags, "topology": topology}
  report = json.loads(path.read_text())
  report["flags"], report["seconds"] = flags, round(time.perf_counter() - start, 1)
  return report


def _flag(key: str, value) -> str:
  if isinstance(value, (list, tuple)):
    value = "(" + ",".join(str(v) for v in value) + ")"
  return f"--config.{key}={value}"


def good(report: dict) -> bool:
  return "error" not in report and report["total"] <= HEADROOM * report["hbm_bytes"]


AFTER = ("--config.mesh_shape=(1,-1,1)", "--config.model.scan_layers=True",
         "--config.model.remat=full")


def fit(recipe: str, topology: str, workdir: pathlib.Path, log) -> dict:
  """The AFTER settings with the microbatches doubled until the step fits with headroom."""
  micro, report = 1, {}
  while True:
    flags = [*AFTER, *([f"--config.num_microbatches={micro}"] if micro > 1 else [])]
    report = sizing(recipe, topology, flags, workdir)
    log(recipe, topology, report)
    if good(report) or "error" in report:
      return report
    if report["state"] + report["parameters"] + report["code"] > HEADROOM * report["hbm_bytes"]:
      return report  # state and gradients alone: more microbatches cannot help
    micro *= 2
    if report["batch_size"] % (report["devices"] * micro):
      return report


def lower_bound(recipe: str, topology: str) -> dict:
  """The defaults' per-chip state + gradients (at least the parameters' size), from the
  shardings alone: a lower bound of the step's memory, in seconds instead of a compile."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from dro_jax import configs, sizing
  name, arg = recipe.split(".py:")
  config = configs.load(name, arg)
  state = sizing.state_bytes(config, topology)
  total = sum(state.values()) + state["parameters"]
  return {"bound": total, "hbm_bytes": sizing.hbm_bytes_of(topology), **state,
          "mesh": dict(zip(("data", "fsdp", "model"), (len(sizing.topology_devices(topology)),
                                                        1, 1)))}


def _settings(report: dict) -> str:
  mesh = report["mesh"]
  parts = [f"mesh {mesh['data']}x{mesh['fsdp']}x{mesh['model']}"]
  if report["num_microbatches"] > 1:
    parts.append(f"{report['num_microbatches']} microbatches")
  if report.get("reference_dtype"):
    parts.append(f"{report['reference_dtype']} ref")
  for key, value in (report.get("model_options") or {}).items():
    if value not in (None, False, "none"):
      parts.append("scan" if key == "scan_layers" else f"{key}={value}")
  return ", ".join(parts)


def table(results: dict) -> str:
  lines = ["| setup | slice | batch | before: settings | GiB/chip | after: settings | GiB/chip "
           "| after: state / temporaries / code, GiB |",
           "|---|---|---|---|---|---|---|---|"]
  gib = lambda r: f"{r['total'] / GIB:.1f}" + ("" if r["total"] <= r["hbm_bytes"] else " ✗")
  for name, row in results.items():
    after, before = row.get("after"), row.get("before")
    if after is None:
      continue
    if "error" in after:
      lines.append(f"| {name} | {after['topology']} | | | | error | | |")
      continue
    loss = {"dro": "DRO-V", "dpo": "DPO", "kto": "KTO"}.get(after["loss"], after["loss"])
    size = after["preset"].split("_")[-1]
    size = {"large": "L"}.get(size, size.upper())
    if before is None and row.get("bound"):
      bound = row["bound"]
      mark = " ✗" if bound["bound"] > bound["hbm_bytes"] else ""
      mesh = bound["mesh"]
      earlier = (f"mesh {mesh['data']}x{mesh['fsdp']}x{mesh['model']}",
                 f"≥ {bound['bound'] / GIB:.1f}{mark}")
    elif before is None:
      earlier = "not compiled", "—"
    elif "error" in before:
      earlier = "error", "—"
    else:
      earlier = _settings(before), gib(before)
    smaller = "".join(
        f" (not {r['topology']}: " + ("refused by the TPU compiler" if "error" in r else gib(r))
        + ")" for r in row.get("smaller", []))
    lines.append(
        f"| T5-{size} {loss} | {after['topology']}{smaller} | {after['batch_size']} | "
        f"{earlier[0]} | {earlier[1]} | {_settings(after)} | {gib(after)} | "
        f"{after['state'] / GIB:.2f} / {after['temporaries'] / GIB:.2f} / "
        f"{after['code'] / GIB:.2f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="sizing_table.json")
  parser.add_argument("--rows", default="", help="comma-separated row names (default: all, "
                      f"{', '.join([*ROWS, 'xxl_dro'])})")
  parser.add_argument("--print", action="store_true", help="only print the table of --out")
  parser.add_argument("--before", action="store_true", help="also compile the defaults (slow)")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  results = json.loads(out.read_text()) if out.exists() else {}
  if not args.print:
    workdir = out.parent / (out.stem + "_runs")
    workdir.mkdir(parents=True, exist_ok=True)
    names = args.rows.split(",") if args.rows else [*ROWS, "xxl_dro"]

    def log(recipe, topology, report):
      total = "error" if "error" in report else f"{report['total'] / GIB:.2f} GiB"
      print(f"{recipe} {topology} {' '.join(report['flags'])}: {total} "
            f"({report.get('seconds', '?')} s)", flush=True)

    for name in names:
      row = results.setdefault(name, {})
      if "after" not in row:
        if name == "xxl_dro":
          for topology in XXL_SLICES:
            row["after"] = fit("dro.py:size=xxl", topology, workdir, log)
            row.setdefault("smaller", [])
            if good(row["after"]):
              break
            row["smaller"].append(row["after"])
        else:
          recipe, topology, _ = ROWS[name]
          row["after"] = fit(recipe, topology, workdir, log)
        out.write_text(json.dumps(results, indent=1))
      if "bound" not in row:
        recipe, topology = (("dro.py:size=xxl", row["after"]["topology"]) if name == "xxl_dro"
                            else ROWS[name][:2])
        row["bound"] = lower_bound(recipe, topology)
        out.write_text(json.dumps(results, indent=1))
      if args.before and "before" not in row:
        recipe, topology = ((("dro.py:size=xxl", row["after"]["topology"])) if name == "xxl_dro"
                            else ROWS[name][:2])
        row["before"] = sizing(recipe, topology, [], workdir)
        log(recipe, topology, row["before"])
        out.write_text(json.dumps(results, indent=1))
  print(table(results))


if __name__ == "__main__":
  main()

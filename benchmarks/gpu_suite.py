"""dro_jax's GPU suite: the engine's train steps against a PyTorch reference, in one device call.

The plan, in this order, each row in its own worker process (JAX and PyTorch never share one):

  1. `matmul`: a plain bf16 8192×8192×8192 product, the achievable peak that the MFU column
     divides by.
  2. `dro_jax:dpo:large`, 3. `torch:dpo:large`, 4. `dro_jax:dro_v:large`, 5. `torch:dro_v:large`:
     the engine's step (`configs/dpo.py` / `configs/dro.py`, `train.build_state` on the device
     under jit with the state's out_shardings, `step.make_train_step` jitted by
     `train.compile_step`, state donated, scanned layer stacks; rematerialisation only when
     XLA's buffer assignment does not fit the device) at T5.1.1-Large, 16 pairs (DPO:
     16 chosen + 16 rejected + the reference forward) or 16 trajectories (DRO-V: policy,
     reference, value network), inputs 512, targets 256, bf16 compute, float32 parameters,
     AdamW; and transformers' T5ForConditionalGeneration built from the same config with its
     own random weights (nothing saved or loaded), the same batch and loss, eager bf16
     autocast, fused AdamW; 16 pairs, or 4 when 16 run out of memory.
  6. `dro_jax:sample:greedy` vs `torch:generate:greedy`: T5.1.1-Large, batch 64, 512 prompt
     tokens, up to 256 new tokens.
  7. the rest: `dro_jax:dpo:large:unrolled` (the same step without scanned layers: does
     scanning change the step time?), `logps_memory` (compiled temp memory of jax.grad through
     the output projection and the per-token log-probs, plain log-softmax vs dro_jax.scoring's),
     `torch:matmul`, `dro_jax:dpo:large:attention=auto` (config.model.attention, cuDNN where
     it applies), the temperature-1 sampling rows, the T5.1.1-Base rows and
     `dro_jax:dro_v:xl` (T5.1.1-XL DRO-V at batch 32: peak memory, rematerialisation only if
     needed).

Every row prints each phase as it ends (`[row] init 3.1 s`, `[row] compile 22.4 s`,
`[row] warm-up 1.2 s`, `[row] steps: median 0.29 s over 10`) and rewrites the JSON after each
phase (`phases`: seconds per finished phase, `phase`: the one running), so a row killed at the
deadline still says where its time went (status "killed", `killed_in`). A row starts only if
its estimate fits the time left; else it is recorded as skipped.

Estimates: the phase times of the CPU rehearsal (`--rehearse`, committed as ESTIMATES), scaled
for the device phase by phase by DEVICE_SCALE, times MARGIN; the rehearsal itself uses its own
times unscaled. Pass a device run's JSON as `--estimates` to plan with its measured phases
instead (unscaled). A row the file lacks is given DEFAULT_ESTIMATE_S.

Each row reports step time, tokens/s, model FLOPs per step (suite_common.step_flops: 3x the
forward of trained networks + 1x the reference forward; DPO-Large is 78.4 TFLOP when each response
gets its own encoder pass, as the PyTorch step does, and 56.6 TFLOP with one encoder pass per
prompt, as dro_jax does), TFLOP/s, MFU against the measured matmul, and peak memory. The workers
share a persistent XLA compilation cache on local disk (`--xla_cache`).

On a GPU host with jax (CUDA), torch and transformers installed, from a copy of the repository
that includes .gpu_wheels/ (made by `bash benchmarks/fetch_gpu_wheels.sh` where a package index
is reachable), one command (480 s in all, setup included):

  OUT=/tmp/gpu_suite bash benchmarks/run_gpu_suite.sh

which writes $OUT/gpu_suite.json and $OUT/gpu_suite.log. Rows left out by the budget:

  OUT=/tmp/gpu_suite bash benchmarks/run_gpu_suite.sh --only dro_jax:dro_v:xl

The CPU rehearsal: the same plan, row names, phases, JSON and budget logic at T5.1.1-small
shapes (2 pairs, 64 -> 32 tokens; sampling batch 4, 16 new tokens), 300 s:

  python benchmarks/gpu_suite.py --rehearse --out /tmp/rehearsal.json

`--tiny` runs every row on the tiny T5 with no budget (CI checks that every row runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import suite_common as common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ESTIMATES = os.path.join(HERE, "results", "rehearsal", "gpu_suite_rehearsal.json")
# From the rehearsal's CPU phases at T5.1.1-small to the device's at full shapes: guesses until a
# device run's JSON replaces them (--estimates). The committed rehearsal ran on 2 CPU cores
# shared with other jobs (load average 15-22), which inflated its times 3-4x against a quiet
# machine (dro_jax:dpo:large's compile: 75 s there, 19-22 s quiet); on the device the compile of
# the full-size step takes about what the quiet CPU's small one does, init and steps much less,
# and a worker's start (CUDA, the imports) somewhat more. With these factors the headline rows
# project at 12-150 s each, about 410 s for the seven.
DEVICE_SCALE = {"start": 1.5, "init": 0.25, "compile": 0.5, "warm-up": 0.25, "steps": 0.25}
MARGIN = 1.2
DEFAULT_ESTIMATE_S = 60.0
DEFAULT_BUDGET_S = {"full": 480.0, "rehearsal": 300.0, "tiny": 0.0}


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  framework: str  # "jax" | "torch": which worker runs it
  run: Callable[[argparse.Namespace, common.Phases], dict[str, Any]]


def _jax_step(loss: str, size: str, attention: str = "xla", remat: str = "none",
              scan: bool | None = None):
  def run(args, phases):
    import suite_jax
    return suite_jax.train_step(loss, size, args.mode, phases, dtype=args.dtype,
                                attention=attention, remat=remat, scan=scan,
                                deadline=args.deadline)
  return run


def _torch_step(loss: str, size: str):
  def run(args, phases):
    import suite_torch
    return suite_torch.train_step(loss, size, args.mode, phases, dtype=args.dtype)
  return run


def _sample(temperature: float):
  def run(args, phases):
    import suite_jax
    return suite_jax.sampling(args.mode, phases, temperature=temperature, dtype=args.dtype)
  return run


def _generate(temperature: float):
  def run(args, phases):
    import suite_torch
    return suite_torch.generate(args.mode, phases, temperature=temperature)
  return run


def _matmul(framework: str):
  def run(args, phases):
    if framework == "torch":
      import suite_torch
      return suite_torch.matmul(args.mode, phases)
    import suite_jax
    return suite_jax.matmul(args.mode, phases)
  return run


def _logps_memory(args, phases):
  import suite_jax
  return suite_jax.logps_memory(args.mode, phases)


# The plan: the headline rows first, then the rest, each in its own worker, in this order.
PLAN: list[Row] = [
    Row("matmul", "jax", _matmul("jax")),
    Row("dro_jax:dpo:large", "jax", _jax_step("dpo", "large", remat="auto")),
    Row("torch:dpo:large", "torch", _torch_step("dpo", "large")),
    Row("dro_jax:dro_v:large", "jax", _jax_step("dro_v", "large", remat="auto")),
    Row("torch:dro_v:large", "torch", _torch_step("dro_v", "large")),
    Row("dro_jax:sample:greedy", "jax", _sample(0.0)),
    Row("torch:generate:greedy", "torch", _generate(0.0)),
    Row("dro_jax:dpo:large:unrolled", "jax", _jax_step("dpo", "large", remat="auto",
                                                         scan=False)),
    Row("logps_memory", "jax", _logps_memory),
    Row("torch:matmul", "torch", _matmul("torch")),
    Row("dro_jax:dpo:large:attention=auto", "jax", _jax_step("dpo", "large", "auto",
                                                               remat="auto")),
    Row("dro_jax:sample:t1", "jax", _sample(1.0)),
    Row("torch:generate:t1", "torch", _generate(1.0)),
    Row("dro_jax:dpo:base", "jax", _jax_step("dpo", "base")),
    Row("torch:dpo:base", "torch", _torch_step("dpo", "base")),
    Row("dro_jax:dro_v:base", "jax", _jax_step("dro_v", "base")),
    Row("torch:dro_v:base", "torch", _torch_step("dro_v", "base")),
    Row("dro_jax:dro_v:xl", "jax", _jax_step("dro_v", "xl", remat="auto")),
]
ROWS = {row.name: row for row in PLAN}
HEADLINE = ("matmul", "dro_jax:dpo:large", "torch:dpo:large", "dro_jax:dro_v:large",
            "torch:dro_v:large", "dro_jax:sample:greedy", "torch:generate:greedy")
assert [row.name for row in PLAN[:len(HEADLINE)]] == list(HEADLINE)


# ---------------------------------------------------------------------------------- estimates


def load_estimates(path: str, mode: str) -> dict[str, float]:
  """Seconds per row: a results file's phase times (its rows that finished, or were killed,
  with the phases they finished), scaled by DEVICE_SCALE when a rehearsal's plan a full run."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    data = json.load(f)
  source = data.get("meta", {}).get("mode", "full")
  scale = DEVICE_SCALE if (mode == "full" and source != "full") else {}
  estimates = {}
  for name, row in data.get("rows", {}).items():
    phases = row.get("phases") or {}
    if row.get("status") != "ok" or not phases:
      continue
    estimates[name] = MARGIN * sum(scale.get(phase, 1.0) * float(seconds)
                                   for phase, seconds in phases.items())
  return estimates


def estimate_of(name: str, estimates: dict[str, float], mode: str) -> float:
  if mode == "tiny":
    return 5.0
  return estimates.get(name, DEFAULT_ESTIMATE_S)


# ---------------------------------------------------------------------------------- the worker


def worker(args: argparse.Namespace) -> None:
  """Runs one row in this process, its phases and then its values written to the JSON."""
  name = args.worker
  results = common.Results(args.out)
  phases = common.Phases(results, name, kill_in=args.kill_in or None)
  phases.done["start"] = common.process_start_s()  # the interpreter and the imports
  row = ROWS[name]
  if row.framework == "jax":
    import jax
    if args.xla_cache:  # local disk, shared by the call's workers
      jax.config.update("jax_compilation_cache_dir", args.xla_cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    import suite_jax
    info = suite_jax.device_info()
  else:
    import torch
    if args.mode != "full":
      # On a shared CPU, PyTorch's threads wait on each other behind the other processes' (a
      # T5-small step: 35 s with 2 threads under load, 5 s with one).
      torch.set_num_threads(1)
    import suite_torch
    info = suite_torch.device_info()
  phases.done["start"] = common.process_start_s()
  results.meta(**info)
  print(f"[{name}] start {phases.done['start']:.1f} s", flush=True)
  start = time.time()
  try:
    values = row.run(args, phases)
    values["status"] = "ok"
  except Exception as error:  # the row's failure is its result; the plan goes on
    traceback.print_exc()
    values = {"status": "error", "error": f"{type(error).__name__}: {str(error)[:500]}"}
    if "RESOURCE_EXHAUSTED" in str(error) or "OutOfMemory" in type(error).__name__:
      values["status"] = "oom"
  values["wall_s"] = time.time() - start + phases.done["start"]
  if args.mode != "full":  # the CPU's load while it ran: how far to trust its phase times
    values["cpu_load"] = os.getloadavg()[0]
  values["phases"] = phases.done
  values["phase"] = None
  results = common.Results(args.out)  # the phases were written through another instance
  results.update(name, values)
  print(f"[{name}] {values['status']} in {values['wall_s']:.1f} s", flush=True)


# ----------------------------------------------------------------------------- the orchestrator


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
  start = time.time()
  budget = args.budget_s if args.budget_s > 0 else 1e9
  deadline = start + budget
  if os.path.exists(args.out) and not args.keep:
    os.remove(args.out)
  estimates = load_estimates(args.estimates, args.mode)
  selected = [row for row in PLAN if row.name in args.selected]
  plan = [(row.name, estimate_of(row.name, estimates, args.mode)) for row in selected]
  results = common.Results(args.out)
  results.meta(mode=args.mode, tiny=args.mode == "tiny", dtype=args.dtype,
               budget_s=args.budget_s, started=start, python=sys.version.split()[0],
               estimates=os.path.relpath(args.estimates) if args.estimates else None,
               plan=[{"row": name, "estimate_s": seconds} for name, seconds in plan],
               xla_cache=args.xla_cache, cpu_count=os.cpu_count(),
               cpu_load=os.getloadavg()[0],
               formula_check_dpo_large_tflop=common.check_reference_count())
  print_plan(plan, budget if args.budget_s > 0 else None)
  environment = dict(os.environ)
  for row_name, estimate in plan:
    row = ROWS[row_name]
    remaining = deadline - time.time()
    if remaining < estimate:
      results = common.Results(args.out)
      results.row(row_name, {"status": "skipped", "estimate_s": estimate,
                             "reason": f"budget: {remaining:.0f} s left, about {estimate:.0f} "
                                       f"needed"})
      print(f"[suite] {row_name}: skipped ({remaining:.0f} s left, about {estimate:.0f} needed)",
            flush=True)
      continue
    print(f"[suite] {row_name}: running ({remaining:.0f} s left, about {estimate:.0f} needed)",
          flush=True)
    command = [sys.executable, os.path.abspath(__file__), "--worker", row_name, "--out",
               args.out, "--deadline", repr(deadline), "--dtype", args.dtype,
               "--xla_cache", args.xla_cache] + {"tiny": ["--tiny"], "rehearsal": [
                   "--rehearse"]}.get(args.mode, [])
    if args.kill_in and args.kill_in.rsplit(":", 1)[0] == row_name:
      command += ["--kill_in", args.kill_in.rsplit(":", 1)[1]]
    child = dict(environment)
    if row.framework == "torch":
      # The PyTorch rows read dro_jax's presets (JAX on the CPU): the GPU stays PyTorch's.
      child["JAX_PLATFORMS"] = "cpu"
    else:
      # One JAX process at a time owns the GPU; let it take nearly all of it.
      child.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    begun = time.time()
    try:
      returncode = subprocess.run(command, env=child,
                                  timeout=max(deadline - time.time(), 1.0)).returncode
    except subprocess.TimeoutExpired:
      returncode = "timeout"
    results = common.Results(args.out)
    entry = results.data["rows"].get(row_name, {})
    if entry.get("status") in (None, "running"):
      killed = returncode == "timeout" or (isinstance(returncode, int) and returncode < 0)
      results.update(row_name, {
          "status": "killed" if killed else "error", "killed_in": entry.get("phase"),
          "phase": None, "wall_s": time.time() - begun, "estimate_s": estimate,
          "error": f"worker ended ({returncode}) in phase {entry.get('phase')!r}; finished "
                   f"phases: {sorted((entry.get('phases') or {}))}"})
      print(f"[suite] {row_name}: {'killed' if killed else 'ended'} ({returncode}) in "
            f"{entry.get('phase')!r}", flush=True)
    else:
      results.update(row_name, {"estimate_s": estimate})
  results = common.Results(args.out)
  results.meta(wall_s=time.time() - start)
  add_mfu(results)
  print_table(results.data)
  return results.data


def print_plan(plan: list[tuple[str, float]], budget: float | None) -> None:
  """The projected order: each row's estimate and when it would start if all ran to plan."""
  print(f"[suite] plan ({'no budget' if budget is None else f'budget {budget:.0f} s'}):",
        flush=True)
  at = 0.0
  for index, (name, estimate) in enumerate(plan, 1):
    fits = budget is None or at + estimate <= budget
    print(f"[suite]   {index:>2}. {name:<34} ~{estimate:6.1f} s, from {at:6.1f} s"
          f"{'' if fits else '  (past the budget)'}", flush=True)
    at += estimate


def add_mfu(results: common.Results) -> None:
  """MFU = the row's TFLOP/s over the JAX matmul's measured TFLOP/s (same run)."""
  rows = results.data["rows"]
  peak = rows.get("matmul", {}).get("tflops_per_s")
  for name, row in rows.items():
    if isinstance(peak, float) and isinstance(row.get("tflops_per_s"), float):
      row["mfu"] = row["tflops_per_s"] / peak
  results.write()


def _fmt(value: Any, digits: int = 1) -> str:
  if isinstance(value, float):
    return f"{value:,.{digits}f}" if math.isfinite(value) else str(value)
  return "-" if value is None else str(value)


def print_table(data: dict[str, Any]) -> None:
  rows = data["rows"]
  meta = data["meta"]
  print(f"\ndro_jax GPU suite on {meta.get('device', '?')} (jax {meta.get('jax', '?')}, torch "
        f"{meta.get('torch', '?')}), {meta.get('mode', 'full')} shapes, "
        f"{meta.get('wall_s', 0):.0f} s")
  peak = rows.get("matmul", {}).get("tflops_per_s")
  if peak:
    print(f"bf16 matmul {rows['matmul']['n']}^3: {peak:,.1f} TFLOP/s (jax), "
          f"{_fmt(rows.get('torch:matmul', {}).get('tflops_per_s'))} (torch)")
  header = (f"{'row':<36}{'status':>8}{'rows':>6}{'step ms':>10}{'tokens/s':>11}"
            f"{'TFLOP/step':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}{'compile s':>10}")
  print(header)
  for name, row in rows.items():
    if "step_ms" not in row and row.get("status") == "ok":
      continue
    peak_gb = row.get("peak_gb", row.get("compiled_peak_gb"))
    print(f"{name:<36}{row.get('status', '?'):>8}{_fmt(row.get('batch')):>6}"
          f"{_fmt(row.get('step_ms')):>10}{_fmt(row.get('tokens_per_s'), 0):>11}"
          f"{_fmt(row.get('executed_tflop'), 2):>11}{_fmt(row.get('tflops_per_s')):>9}"
          f"{_fmt(row.get('mfu'), 3):>7}{_fmt(peak_gb, 2):>9}{_fmt(row.get('compile_s')):>10}")
  for name, row in rows.items():
    if "decode_steps" in row:
      print(f"{name:<36}{row['status']:>8} batch {row['batch']}, {row['decode_steps']} steps: "
            f"{row['tokens_per_s']:,.0f} tokens/s ({row['ms']:.0f} ms)")
  memory = rows.get("logps_memory", {})
  if memory.get("status") == "ok":
    print(f"logps_memory {memory['shape']}: temp {memory['plain_temp_gb']:.2f} GB plain -> "
          f"{memory['fast_temp_gb']:.2f} GB (float32 logits: {memory['float32_logits_gb']:.2f})")
  print("phases (s):")
  for name, row in rows.items():
    if row.get("phases"):
      order = ("start", "init", "compile", "warm-up", "steps")
      spent = ", ".join(f"{phase} {row['phases'][phase]:.1f}" for phase in order
                        if phase in row["phases"])
      print(f"  {name:<36} {row.get('status', '?'):>8}: {spent}"
            + (f"; killed in {row['killed_in']}" if row.get("killed_in") else ""))
  for name, row in rows.items():
    if row.get("status") in ("skipped", "error", "oom", "killed"):
      print(f"{name}: {row['status']}: {row.get('reason') or row.get('error')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--rehearse", action="store_true",
      help="the CPU rehearsal: the same plan at T5.1.1-small shapes (300 s budget)")
  add("--tiny", action="store_true", help="every row on the tiny T5 (CPU, CI), no budget")
  add("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_suite.json"))
  add("--budget_s", type=float, default=None,
      help="seconds for the whole plan; default 480 (--rehearse 300, --tiny 0: no limit)")
  add("--estimates", default=ESTIMATES,
      help="a results JSON whose phase times give the rows' estimates (default: the "
           "committed rehearsal, scaled for the device)")
  add("--dtype", default=None, choices=["bfloat16", "float32"],
      help="compute dtype (parameters stay float32); default bfloat16, float32 in --rehearse "
           "(the CPU emulates bfloat16 slowly, PyTorch's autocast at 10x float32's time)")
  add("--only", default="", help=f"comma-separated rows of {list(ROWS)}")
  add("--keep", action="store_true", help="add to an existing --out instead of starting anew")
  add("--xla_cache", default=os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                            "/tmp/dro_jax_xla_cache"),
      help="persistent XLA compilation cache on local disk, shared by the workers")
  add("--kill_in", default="", help=argparse.SUPPRESS)  # ROW:PHASE (the killed-row test)
  add("--worker", default="", help=argparse.SUPPRESS)
  add("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.tiny and args.rehearse:
    parser.error("--tiny and --rehearse: choose one")
  args.mode = common.mode(args.tiny, args.rehearse)
  if args.budget_s is None:
    args.budget_s = DEFAULT_BUDGET_S[args.mode]
  if args.dtype is None:
    args.dtype = "float32" if args.mode == "rehearsal" else "bfloat16"
  names = [name for name in args.only.split(",") if name] or list(ROWS)
  unknown = sorted(set(names) - set(ROWS))
  if unknown:
    parser.error(f"--only: unknown rows {unknown}; choose from {list(ROWS)}")
  if args.worker and args.worker not in ROWS:
    parser.error(f"--worker: unknown row {args.worker!r}")
  args.selected = set(names)
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker(args)
  else:
    orchestrate(args)


if __name__ == "__main__":
  main()

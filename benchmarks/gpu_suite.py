"""dro_jax's GPU suite: the engine's train steps against a PyTorch reference, in one invocation.

Rows (full size; `--tiny` runs every row on the tiny T5 on CPU, which CI does):

* `matmul`, `torch:matmul`: a plain bf16 8192×8192×8192 product, the achievable peak that the
  MFU column divides by (the JAX one; the PyTorch one for reference).
* `logps_memory`: compiled temp memory of jax.grad through the output projection and the
  per-token log-probs at DPO-Large's logits shape, plain log-softmax vs dro_jax.scoring's.
* `dro_jax:{dpo,dro_v}:{base,large}`: the engine's step (`configs/dpo.py` / `configs/dro.py`,
  `train.build_state`, `step.make_train_step` jitted by `train.compile_step`, state donated) at
  T5.1.1-Base / Large, 16 pairs (DPO: 16 chosen + 16 rejected + the reference forward) or 16
  trajectories (DRO-V: policy, reference, value network), inputs 512, targets 256, bf16
  compute, float32 parameters, AdamW.
* `torch:{dpo,dro_v}:{base,large}`: transformers' T5ForConditionalGeneration with the same
  weights (the dro_jax row saves its initial policy as a Hugging Face folder), the same batch
  and loss, eager bf16 autocast, fused AdamW; 16 pairs, or 4 when 16 run out of memory.
* `dro_jax:dpo:large:attention=auto`: the fused-attention variant (config.model.attention;
  cuDNN where it applies), next to the default einsum attention of the row above.
* `dro_jax:sample:{greedy,t1}` vs `torch:generate:{greedy,t1}`: T5.1.1-Large, batch 64, 512
  prompt tokens, up to 256 new tokens, greedy and temperature 1.
* `dro_jax:dro_v:xl`: T5.1.1-XL DRO-V (policy + value network + reference) at batch 32: peak
  memory (XLA's buffer assignment and the allocator's peak), rematerialisation only if needed.

Each row reports step time, tokens/s, model FLOPs per step (suite_common.step_flops: 3x the
forward of trained networks + 1x the reference forward; DPO-Large is 78.4 TFLOP when each response
gets its own encoder pass, as the PyTorch step does, and 56.6 TFLOP with one encoder pass per
prompt, as dro_jax does), TFLOP/s, MFU against the measured matmul, and peak memory. Rows run in
worker processes grouped by framework and size (JAX and PyTorch never share the GPU), each group
under a deadline; a row starts only if its estimated time fits, else it is recorded as skipped.
The JSON is rewritten after every row, so a timeout keeps what finished.

On a GPU host with jax (CUDA), torch and transformers installed, from a copy of the repository
that includes .gpu_wheels/ (made by `bash benchmarks/fetch_gpu_wheels.sh` where a package index
is reachable), one command:

  OUT=/tmp/gpu_suite bash benchmarks/run_gpu_suite.sh

which writes $OUT/gpu_suite.json and $OUT/gpu_suite.log. Rows left out by the budget:

  OUT=/tmp/gpu_suite bash benchmarks/run_gpu_suite.sh --only dro_jax:dro_v:xl

Locally: `python benchmarks/gpu_suite.py --tiny --out /tmp/suite.json` (about a minute on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import suite_common as common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  # Guessed seconds on the H200, compile included (not yet measured: the first GPU run's
  # wall_s per row replaces them); a row starts only when this much of its group's time is left.
  estimate_s: float
  run: Callable[[argparse.Namespace, str], dict[str, Any]]  # (args, weights root) -> values


def _weights(root: str, size: str) -> str:
  return os.path.join(root, f"t5_1_1_{size}")


def _jax_rows() -> dict[str, Row]:
  def jax_step(loss, size, attention="xla", remat="none", save=True):
    def run(args, root):
      import suite_jax
      return suite_jax.train_step(loss, size, args.tiny, dtype=args.dtype, attention=attention,
                                  remat=remat, weights_dir=_weights(root, size) if save else None,
                                  deadline=args.deadline)
    return run

  def sample(temperature):
    def run(args, root):
      import suite_jax
      return suite_jax.sampling(args.tiny, temperature=temperature, dtype=args.dtype,
                                weights_dir=_weights(root, "large"))
    return run

  def matmul(args, root):
    import suite_jax
    return suite_jax.matmul(args.tiny)

  def logps_memory(args, root):
    import suite_jax
    return suite_jax.logps_memory(args.tiny)

  rows = [
      Row("matmul", 10, matmul),
      Row("logps_memory", 15, logps_memory),
      Row("dro_jax:dpo:large", 60, jax_step("dpo", "large")),
      Row("dro_jax:dro_v:large", 60, jax_step("dro_v", "large")),
      Row("dro_jax:dpo:large:attention=auto", 50, jax_step("dpo", "large", "auto", save=False)),
      Row("dro_jax:sample:greedy", 40, sample(0.0)),
      Row("dro_jax:sample:t1", 25, sample(1.0)),
      Row("dro_jax:dpo:base", 35, jax_step("dpo", "base")),
      Row("dro_jax:dro_v:base", 35, jax_step("dro_v", "base")),
      Row("dro_jax:dro_v:xl", 120, jax_step("dro_v", "xl", remat="auto", save=False)),
  ]
  return {row.name: row for row in rows}


def _torch_rows() -> dict[str, Row]:
  def torch_step(loss, size):
    def run(args, root):
      import suite_torch
      return suite_torch.train_step(loss, size, args.tiny, dtype=args.dtype,
                                    weights_dir=_weights(root, size))
    return run

  def generate(temperature):
    def run(args, root):
      import suite_torch
      return suite_torch.generate(args.tiny, temperature=temperature,
                                  weights_dir=_weights(root, "large"))
    return run

  def matmul(args, root):
    import suite_torch
    return suite_torch.matmul(args.tiny)

  rows = [
      Row("torch:matmul", 10, matmul),
      Row("torch:dpo:large", 25, torch_step("dpo", "large")),
      Row("torch:dro_v:large", 25, torch_step("dro_v", "large")),
      Row("torch:generate:greedy", 20, generate(0.0)),
      Row("torch:generate:t1", 20, generate(1.0)),
      Row("torch:dpo:base", 15, torch_step("dpo", "base")),
      Row("torch:dro_v:base", 15, torch_step("dro_v", "base")),
  ]
  return {row.name: row for row in rows}


ROWS = {**_jax_rows(), **_torch_rows()}

# Worker processes in order: (group, rows, seconds kept back for the groups after it). JAX and
# PyTorch never share a process (each framework's allocator keeps what it took).
GROUPS: list[tuple[str, tuple[str, ...], float]] = [
    ("jax_large", ("matmul", "logps_memory", "dro_jax:dpo:large", "dro_jax:dro_v:large"), 70),
    ("torch_large", ("torch:matmul", "torch:dpo:large", "torch:dro_v:large"), 0),
    ("jax_more", ("dro_jax:dpo:large:attention=auto", "dro_jax:sample:greedy",
                  "dro_jax:sample:t1", "dro_jax:dpo:base", "dro_jax:dro_v:base"), 50),
    ("torch_more", ("torch:generate:greedy", "torch:generate:t1", "torch:dpo:base",
                    "torch:dro_v:base"), 0),
    ("jax_xl", ("dro_jax:dro_v:xl",), 0),
]
assert sorted(name for _, names, _ in GROUPS for name in names) == sorted(ROWS)


# ---------------------------------------------------------------------------------- the worker


def worker(args: argparse.Namespace) -> None:
  """Runs one group's selected rows in this process, each written to the JSON when done."""
  results = common.Results(args.out)
  group = dict((name, names) for name, names, _ in GROUPS)[args.worker]
  framework = "torch" if args.worker.startswith("torch") else "jax"
  if framework == "jax":
    import suite_jax
    info = suite_jax.device_info()
  else:
    import suite_torch
    info = suite_torch.device_info()
  results.meta(**info)
  for name in group:
    if name not in args.selected:
      continue
    row = ROWS[name]
    estimate = 5.0 if args.tiny else row.estimate_s
    remaining = args.deadline - time.time()
    if remaining < estimate:
      results.row(name, {"status": "skipped",
                         "reason": f"budget: {remaining:.0f} s left, about {estimate:.0f} needed"})
      print(f"[suite] {name}: skipped ({remaining:.0f} s left)", flush=True)
      continue
    print(f"[suite] {name}: running ({remaining:.0f} s left)", flush=True)
    start = time.time()
    try:
      values = row.run(args, args.weights)
      values["status"] = "ok"
    except Exception as error:  # a row's failure must not lose the others
      traceback.print_exc()
      values = {"status": "error", "error": f"{type(error).__name__}: {str(error)[:500]}"}
      if "RESOURCE_EXHAUSTED" in str(error) or "OutOfMemory" in type(error).__name__:
        values["status"] = "oom"
    values["wall_s"] = time.time() - start
    results.row(name, values)
    print(f"[suite] {name}: {values['status']} in {values['wall_s']:.1f} s", flush=True)


# ----------------------------------------------------------------------------- the orchestrator


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
  start = time.time()
  budget = args.budget_s if args.budget_s > 0 else 1e9
  deadline = start + budget
  if os.path.exists(args.out) and not args.keep:
    os.remove(args.out)
  results = common.Results(args.out)
  results.meta(tiny=args.tiny, dtype=args.dtype, budget_s=args.budget_s, started=start,
               python=sys.version.split()[0], formula_check_dpo_large_tflop=(
                   common.check_reference_count()))
  weights_root = args.weights or tempfile.mkdtemp(prefix="dro_jax_suite_")
  try:
    for group, names, keep_back in GROUPS:
      selected = [name for name in names if name in args.selected]
      if not selected:
        continue
      group_deadline = deadline - keep_back
      if group_deadline - time.time() < (5 if args.tiny else 10):
        for name in selected:
          results = common.Results(args.out)
          results.row(name, {"status": "skipped", "reason": "budget: the suite's time is spent"})
        continue
      command = [sys.executable, os.path.abspath(__file__), "--worker", group, "--out", args.out,
                 "--deadline", repr(group_deadline), "--weights", weights_root, "--dtype",
                 args.dtype, "--only", ",".join(selected)] + (["--tiny"] if args.tiny else [])
      environment = dict(os.environ)
      if args.tiny:
        # The tiny rows of different sizes compile the same programs: share them across workers.
        environment.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(weights_root, "xla"))
        environment.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
      if not group.startswith("torch"):
        # One JAX process at a time owns the GPU; let it take nearly all of it.
        environment.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
      # The worker gets until the suite's deadline (a row that started in time may finish).
      timeout = max(deadline - time.time() + (60 if not args.tiny else 120), 30)
      try:
        returncode = subprocess.run(command, env=environment, timeout=timeout).returncode
      except subprocess.TimeoutExpired:
        returncode = "timeout"
      results = common.Results(args.out)
      for name in selected:
        if name not in results.data["rows"]:
          results.row(name, {"status": "error", "error": f"worker {group} ended ({returncode}) "
                                                         f"before this row finished"})
  finally:
    if not args.weights:
      shutil.rmtree(weights_root, ignore_errors=True)
  results = common.Results(args.out)
  results.meta(wall_s=time.time() - start)
  add_mfu(results)
  print_table(results.data)
  return results.data


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
        f"{meta.get('torch', '?')}), {'tiny shapes' if meta.get('tiny') else 'full shapes'}, "
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
  for name, row in rows.items():
    if row.get("status") in ("skipped", "error", "oom"):
      print(f"{name}: {row['status']}: {row.get('reason') or row.get('error')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--tiny", action="store_true", help="every row on the tiny T5 (CPU, CI)")
  add("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_suite.json"))
  add("--budget_s", type=float, default=None,
      help="seconds for the whole suite; default 280 (0 in --tiny: no limit)")
  add("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
      help="compute dtype (parameters stay float32)")
  add("--only", default="", help=f"comma-separated rows of {list(ROWS)}")
  add("--keep", action="store_true", help="add to an existing --out instead of starting anew")
  add("--weights", default="", help="folder for the shared weights (default: a temporary one)")
  add("--worker", default="", help=argparse.SUPPRESS)
  add("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = 0.0 if args.tiny else 280.0
  names = [name for name in args.only.split(",") if name] or list(ROWS)
  unknown = sorted(set(names) - set(ROWS))
  if unknown:
    parser.error(f"--only: unknown rows {unknown}; choose from {list(ROWS)}")
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

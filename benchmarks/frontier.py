"""The reward-KL frontier on the demo task: each method swept over its regularisation, over seeds.

  python benchmarks/frontier.py --output /tmp/frontier            # the full sweep (hours on a CPU)
  python benchmarks/frontier.py --output /tmp/frontier --quick    # 2 values per method, 1 seed
  python benchmarks/frontier.py --output /tmp/frontier --workers 2  # points trained 2 at a time

The demo's SFT policy and its judged samples are made once in <output>/shared (the demo's own
`sft` and `samples` stages) and shared by every point. Each point is one training run from SFT
(the demo's alignment settings, `train.run`) in <output>/points/<method>/<value>/seed_<s>: a
finished point is not trained again, so the script resumes. Swept, each over values spanning an
order of magnitude either side of its default:

  DRO-V, DRO-P      τ (DRO's update is scaled by 1/τ: `policy_update_scale = inverse_tau`)
  DRO-V (no 1/τ)    τ with `policy_update_scale = none`, at the best of three learning rates
  KTO, DPO          β            IPO     τ            TR-DPO   β (α = 0.6 every step)

Per point: the win rate against SFT on the held-out prompts (prompt-clustered 95% interval), the
judge's mean reward, KL(policy ‖ SFT) from the policy's own samples and the mean answer length. A
run that diverges (a non-finite loss) is recorded as diverged, not dropped. Written to <output>:
frontier.json (every point), frontier.md (every point; each method's win rate at three KL levels
every method reaches, interpolated; whether KL grows as the regularisation weakens, with the
violations listed; the DRO-V value-function ablation at its best τ) and frontier.png (win rate
against KL, one curve per method, the seed spread as error bars).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dro_jax import configs, console, demo, files, train  # noqa: E402

# method: (demo stage it starts from, loss, the swept key, its default, extra settings)
METHODS = {
    "DRO-V": ("dro", "dro", "dro.tau", 1.0, {}),
    "DRO-V (no 1/τ)": ("dro", "dro", "dro.tau", 1.0, {"optimizer.policy_update_scale": "none"}),
    "DRO-P": ("dro", "dro_p", "dro.tau", 1.0, {}),
    "KTO": ("kto", "kto", "kto.beta", 1.0, {}),
    "DPO": ("dpo", "dpo", "dpo.beta", 0.5, {}),
    "IPO": ("dpo", "ipo", "ipo.tau", 0.1, {}),
    "TR-DPO": ("tr_dpo", "dpo", "dpo.beta", 0.5, {}),
}
FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
QUICK_FACTORS = (0.3, 3.0)
NO_SCALE_LEARNING_RATES = (3e-4, 1e-3, 3e-3)
ABLATION = (("double_multiple", "value"), ("double_single", "value"),
            ("single_multiple", "value"), ("single_multiple", "policy"),
            ("single_single", "value"), ("single_single", "policy"))
POLL_S = 10.0  # how often a worker waiting on another's points looks at frontier.json
KL_TOLERANCE = 0.05  # nats: a KL drop smaller than this (or than 2 seed sd) is not a violation


def _set(config, key: str, value: Any) -> None:
  node = config
  *parents, leaf = key.split(".")
  for parent in parents:
    node = node[parent]
  node[leaf] = value


class Frontier:
  def __init__(self, output: str, quick: bool, seeds: list[int], *, data_cache: str | None = None,
               sft: str | None = None):
    import seqio
    from dro_jax.data import synthetic
    self.output, self.quick, self.seeds = output, quick, seeds
    arg = "scale=0.15" if quick else "scale=1.0"
    self.demo = configs.load("demo", arg)
    self.demo.data.cache_dir = data_cache or os.path.join(output, "data_cache")
    if quick:
      self.demo.demo.eval_prompts, self.demo.demo.final_samples = 64, 1
    names = demo.synthetic_tasks(self.demo)
    shared = os.path.join(output, "shared")
    self.sft_dir = sft or os.path.join(shared, "sft")
    if not sft:
      demo.run_stage("sft", demo.stage_config(self.demo, "sft", names["sft"], init=None,
                                              baseline=None), self.sft_dir)
    vocabulary_path = synthetic.demo_vocabulary(self.demo.data.cache_dir)
    vocabulary = seqio.SentencePieceVocabulary(vocabulary_path)
    sft = demo.load_policy(self.sft_dir, self.demo)
    paths = demo.sample_feedback(self.demo, sft, vocabulary, os.path.join(shared, "samples"))
    self.feedback = demo.register_feedback(paths, vocabulary_path, self.demo)
    self.evaluate = demo.FinalEvaluation(self.demo, sft, vocabulary)
    self.path = os.path.join(output, "frontier.json")
    self.points: dict[str, dict[str, Any]] = files.read_json(self.path) or {}

  def config(self, method: str, value: float, seed: int, extra: dict[str, Any]):
    stage, loss, key, _, settings = METHODS[method]
    config = demo.stage_config(self.demo, stage, self.feedback["pairs" if stage in (
        "dpo", "tr_dpo") else "triples"], init=self.sft_dir, baseline=self.sft_dir)
    config.loss = loss
    config.seed = seed
    config.eval_every = 0  # judged once, at the end, by the shared evaluation
    for name, setting in {**settings, **extra}.items():
      _set(config, name, setting)
    _set(config, key, float(value))
    return config

  def point(self, method: str, value: float, seed: int, extra: dict[str, Any] | None = None,
            label: str | None = None) -> dict[str, Any]:
    extra = dict(extra or {})
    tag = label or f"{value:g}"
    name = point_name(method, tag, seed)
    if name in self.points:
      return self.points[name]
    self.reload()
    if name in self.points:
      return self.points[name]
    workdir = self.workdir(name)
    if not self.claim(workdir):
      return None  # another worker is training it
    config = self.config(method, value, seed, extra)
    start = time.perf_counter()
    record: dict[str, Any] = {"method": method, "value": float(value), "label": tag,
                              "seed": seed, "settings": extra, "workdir": workdir}
    try:
      if not demo.finished(workdir, config.total_steps):
        train.run(config, workdir)
      metrics = self.evaluate(demo.load_policy(workdir, self.demo), workdir)
      record.update(diverged=False, **{key: metrics[key] for key in (
          "win_rate", "win_rate_low", "win_rate_high", "policy_reward", "kl", "policy_length")})
    except train.NonFiniteError as error:
      record.update(diverged=True, error=str(error))
    record["seconds"] = time.perf_counter() - start
    print(f"[frontier] {method} {METHODS[method][2]}={tag} seed {seed}: "
          + ("diverged" if record["diverged"] else
             f"win rate {record['win_rate']:.1%} KL {record['kl']:.3f}"), flush=True)
    with self.locked():
      self.points = {**(files.read_json(self.path) or {}), **self.points, name: record}
      files.write_text(self.path, json.dumps(self.points, indent=1))
    os.remove(workdir + ".claim")
    return record

  def workdir(self, name: str) -> str:
    method, tag, seed = name.split("|")
    folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
    return os.path.join(self.output, "points", folder, tag, f"seed_{seed}")

  @contextlib.contextmanager
  def locked(self):
    """frontier.json's lock: every worker merges its points into the file under it."""
    with open(self.path + ".lock", "a") as handle:
      fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  def reload(self) -> None:
    with self.locked():
      self.points = {**self.points, **(files.read_json(self.path) or {})}

  def claimed(self, workdir: str) -> bool:
    """Whether a live process other than this one is training the point in `workdir`."""
    try:
      with open(workdir + ".claim") as handle:
        owner = int(handle.read().strip() or 0)
    except (OSError, ValueError):
      return False
    return owner != os.getpid() and _alive(owner)

  def claim(self, workdir: str) -> bool:
    """Whether this process may train the point: its claim file holds the trainer's pid, and a
    claim whose process is gone (a stopped run) is taken over."""
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    path = workdir + ".claim"
    for _ in range(2):
      try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        if self.claimed(workdir):
          return False
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
      return True
    return False

  def wait(self, names: list[str]) -> list[dict[str, Any]]:
    """The points `names`, waiting for the workers training any of them. Called after this
    process has tried every one of them, so a point neither done nor claimed by a live worker was
    left by one that failed."""
    while True:
      self.reload()
      missing = [name for name in names if name not in self.points]
      if not missing:
        return [self.points[name] for name in names]
      lost = [name for name in missing if not self.claimed(self.workdir(name))]
      if lost:
        self.reload()
        lost = [name for name in lost if name not in self.points]
        if lost:
          raise RuntimeError(f"frontier: {len(lost)} points (e.g. {lost[0]}) were left by a "
                             f"worker that stopped; run the same command again to train them")
      time.sleep(POLL_S)

  def values(self, method: str) -> list[float]:
    default = METHODS[method][3]
    return [default * factor for factor in (QUICK_FACTORS if self.quick else FACTORS)]

  def run(self) -> None:
    """Every point, in an order that leaves the choices made from earlier points (the no-1/τ
    learning rate, the ablation's τ) as late as possible, so that parallel workers keep busy."""
    rate_points = [] if self.quick else [
        ("DRO-V (no 1/τ)", 1.0, seed, {"optimizer.learning_rate": rate}, f"lr_{rate:g}")
        for rate in NO_SCALE_LEARNING_RATES for seed in self.seeds]
    for method, value, seed, extra, label in rate_points:
      self.point(method, value, seed, extra, label=label)
    swept = [m for m in METHODS if m != "DRO-V (no 1/τ)"]
    names = [self.sweep_points(method) for method in swept]
    for points in names:
      for method, value, seed in points:
        self.point(method, value, seed)
    extra = {"optimizer.learning_rate": self.best_no_scale_rate(rate_points)}
    no_scale = self.sweep_points("DRO-V (no 1/τ)")
    for method, value, seed in no_scale:
      self.point(method, value, seed, extra)
    ablation = []
    if not self.quick:
      self.wait([point_name(m, f"{v:g}", s) for m, v, s in self.sweep_points("DRO-V")])
      tau = self.best_value("DRO-V")
      ablation = [({"dro.value_function": variant, "dro.value_optimizer": chain},
                   f"ablation_{variant}_{chain}_{tau:g}", seed)
                  for variant, chain in ABLATION for seed in self.seeds]
      for extra_, label, seed in ablation:
        self.point("DRO-V", tau, seed, extra_, label=label)
    self.wait([point_name(m, f"{v:g}", s) for points in names + [no_scale] for m, v, s in points]
              + [point_name("DRO-V", label, seed) for _, label, seed in ablation])

  def sweep_points(self, method: str) -> list[tuple[str, float, int]]:
    return [(method, value, seed) for value in self.values(method) for seed in self.seeds]

  def best_no_scale_rate(self, rate_points) -> float:
    """The learning rate (of three) at which DRO-V without the 1/τ scale does best at τ = 1."""
    if self.quick:
      return self.demo.demo.align_lr
    runs = self.wait([point_name(m, label, seed) for m, _, seed, _, label in rate_points])
    rates = {}
    for (_, _, _, extra, _), run in zip(rate_points, runs):
      rates.setdefault(extra["optimizer.learning_rate"], []).append(
          run["win_rate"] if not run["diverged"] else 0.0)
    return max(rates, key=lambda rate: np.mean(rates[rate]))

  def best_value(self, method: str) -> float:
    curve = self.curve(method)
    return max(curve, key=lambda row: row["win_rate"])["value"] if curve else METHODS[method][3]

  def curve(self, method: str) -> list[dict[str, Any]]:
    """Per swept value (strongest regularisation first): means and sds over seeds."""
    rows = []
    for value in sorted({p["value"] for p in self.sweep(method)}, reverse=True):
      runs = [p for p in self.sweep(method) if p["value"] == value]
      good = [p for p in runs if not p["diverged"]]
      row = {"value": value, "seeds": len(runs), "diverged": len(runs) - len(good)}
      for key in ("win_rate", "kl", "policy_reward", "policy_length"):
        values = np.array([p[key] for p in good])
        row[key] = float(values.mean()) if good else float("nan")
        row[key + "_sd"] = float(values.std(ddof=1)) if len(good) > 1 else 0.0
      rows.append(row)
    return rows

  def sweep(self, method: str) -> list[dict[str, Any]]:
    return [p for p in self.points.values() if p["method"] == method
            and not p["label"].startswith(("ablation_", "lr_"))]


def matched(curves: dict[str, list[dict[str, Any]]]) -> tuple[list[float], dict[str, list]]:
  """Three KL levels inside the KL range of as many methods as possible (all of them when their
  ranges overlap), and each method's win rate there, interpolated between its measured points;
  None at a level outside the method's own range (no extrapolation)."""
  ranges = {}
  for method, rows in curves.items():
    kls = [r["kl"] for r in rows if np.isfinite(r["kl"])]
    if kls:
      ranges[method] = (min(kls), max(kls))
  if not ranges:
    return [], {}

  def span(x):
    """The methods whose range holds KL x: how many, and the range they all share."""
    methods = [m for m, (low, high) in ranges.items() if low <= x <= high]
    if not methods:
      return 0, 0.0, 0.0
    return (len(methods), max(ranges[m][0] for m in methods),
            min(ranges[m][1] for m in methods))

  ends = sorted({kl for pair in ranges.values() for kl in pair})
  candidates = ends + [(a + b) / 2 for a, b in zip(ends, ends[1:])]
  _, low, high = max((span(x) for x in candidates), key=lambda s: (s[0], s[2] - s[1]))
  if not high > low:
    return [], {}
  levels = [float(level) for level in np.linspace(low, high, 5)[1:4]]
  return levels, {method: interpolate(rows, levels) for method, rows in curves.items()
                  if method in ranges}


def interpolate(rows: list[dict[str, Any]], levels: list[float]) -> list[float | None]:
  """Win rate at each KL level, linear between the measured points; None outside their range."""
  finite = sorted((r["kl"], r["win_rate"]) for r in rows if np.isfinite(r["kl"]))
  if not finite:
    return [None] * len(levels)
  kls, wins = zip(*finite)
  return [float(np.interp(level, kls, wins)) if kls[0] <= level <= kls[-1] else None
          for level in levels]


def monotonicity(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
  """Where KL falls as the regularisation weakens (beyond the tolerance)."""
  violations = []
  for method, rows in curves.items():
    for stronger, weaker in zip(rows, rows[1:]):  # rows go from strongest to weakest
      tolerance = max(KL_TOLERANCE, 2 * max(stronger["kl_sd"], weaker["kl_sd"]))
      if weaker["kl"] < stronger["kl"] - tolerance:
        violations.append(f"{method}: {METHODS[method][2]} {stronger['value']:g} -> "
                          f"{weaker['value']:g}, KL {stronger['kl']:.3f} -> {weaker['kl']:.3f} "
                          f"(tolerance {tolerance:.3f})")
  return violations


def write(frontier: Frontier, command: str) -> str:
  curves = {m: frontier.curve(m) for m in METHODS if frontier.sweep(m)}
  lines = [f"# The reward-KL frontier on the demo task ({'quick' if frontier.quick else 'full'} "
           f"run, seeds {frontier.seeds})", "", f"Made by `{command}`.", "",
           "| method | parameter | value | seeds | diverged | win rate vs SFT (mean ± sd) | "
           "KL(π‖SFT) | judge reward | length |", "|---|---|---|---|---|---|---|---|---|"]
  for method, rows in curves.items():
    for r in rows:
      lines.append(f"| {method} | {METHODS[method][2]} | {r['value']:g} | {r['seeds']} | "
                   f"{r['diverged']} | {r['win_rate']:.1%} ± {r['win_rate_sd']:.1%} | "
                   f"{r['kl']:.3f} ± {r['kl_sd']:.3f} | {r['policy_reward']:.3f} | "
                   f"{r['policy_length']:.2f} |")
  levels, rates = matched(curves)
  lines += ["", "## Win rate at matched KL", ""]
  if levels:
    lines += ["| method | " + " | ".join(f"KL {level:.2f}" for level in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for method, values in rates.items():
      # Each seed's own curve interpolated too: the spread over seeds at the same KL.
      by_seed = [interpolate([p for p in frontier.sweep(method) if p["seed"] == seed
                              and not p["diverged"]], levels) for seed in frontier.seeds]
      cells = []
      for i, value in enumerate(values):
        spread = [seed[i] for seed in by_seed if seed[i] is not None]
        cells.append("—" if value is None else f"{value:.1%}" + (
            f" ± {np.std(spread, ddof=1):.1%}" if len(spread) > 1 else ""))
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
    apart = {m: (min(r["kl"] for r in curves[m]), max(r["kl"] for r in curves[m]))
             for m, values in rates.items() if None in values}
    if apart:
      lines += ["", "Interpolated between each method's measured points (means over seeds; ± the sd "
                "over seeds of each seed's own curve interpolated); — is a "
                "level outside the method's measured KL range: " + "; ".join(
                    f"{m} spans KL {low:.2f} to {high:.2f}" for m, (low, high) in apart.items())
                + "."]
  else:
    lines.append("The methods' KL ranges do not overlap: no matched comparison.")
  violations = monotonicity(curves)
  lines += ["", "## KL against the regularisation", "",
            f"Expected: KL grows as τ or β falls (tolerance {KL_TOLERANCE} nats or twice the seed "
            f"sd). " + ("No violations." if not violations else
                        f"{len(violations)} violations:")]
  lines += [f"- {v}" for v in violations]
  ablation = [p for p in frontier.points.values() if p["label"].startswith("ablation_")]
  lines += ["", "## DRO-V value functions at its best τ", ""]
  if ablation:
    lines += ["| value function | value optimizer | win rate (mean ± sd) | KL |", "|---|---|---|---|"]
    for variant, chain in ABLATION:
      runs = [p for p in ablation if p["settings"].get("dro.value_function") == variant
              and p["settings"].get("dro.value_optimizer") == chain and not p["diverged"]]
      if runs:
        wins = np.array([p["win_rate"] for p in runs])
        lines.append(f"| {variant} | {chain} | {wins.mean():.1%} ± "
                     f"{(wins.std(ddof=1) if len(runs) > 1 else 0):.1%} | "
                     f"{np.mean([p['kl'] for p in runs]):.3f} |")
    lines.append("\nDouble-net variants keep their own value chain under either value optimizer, "
                 "so `policy` is not run for them.")
  else:
    lines.append("Run without --quick for the ablation.")
  lines += ["", "![win rate against KL](frontier.png)", ""]
  text = "\n".join(lines)
  files.write_text(os.path.join(frontier.output, "frontier.md"), text)
  plot(curves, os.path.join(frontier.output, "frontier.png"))
  return text


def plot(curves: dict[str, list[dict[str, Any]]], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import FuncFormatter
  figure = Figure(figsize=(7, 5))
  FigureCanvasAgg(figure)
  axis = figure.subplots()
  for method, rows in curves.items():
    rows = sorted((r for r in rows if np.isfinite(r["kl"])), key=lambda r: r["kl"])
    if rows:
      axis.errorbar([r["kl"] for r in rows], [r["win_rate"] for r in rows],
                    xerr=[r["kl_sd"] for r in rows], yerr=[r["win_rate_sd"] for r in rows],
                    marker="o", capsize=3, label=method)
  axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
  # Logarithmic above 0.01 nats (KLs span four decades), linear below it (an estimate near 0 can
  # come out negative).
  axis.set_xscale("symlog", linthresh=0.01)
  top = max([r["kl"] for rows in curves.values() for r in rows if np.isfinite(r["kl"])] + [1.0])
  axis.set_xticks([t for t in (0, 0.01, 0.1, 1, 10, 100) if t <= 10 * top])
  axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
  axis.set(xlabel="KL(π‖SFT), nats per answer (policy's own samples)",
           ylabel="win rate against SFT (mean ± sd over seeds)",
           title="Reward-KL frontier on the demo task")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def point_name(method: str, tag: str, seed: int) -> str:
  """A point's name in frontier.json (and its workdir, `Frontier.workdir`)."""
  return f"{method}|{tag}|{seed}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="the folder of the points, frontier.json, "
                      "frontier.md and frontier.png")
  parser.add_argument("--quick", action="store_true",
                      help="2 values per method, 1 seed, a smaller demo and evaluation")
  parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0)")
  parser.add_argument("--data_cache", default=None, help="the demo data's folder (default: "
                      "<output>/data_cache)")
  parser.add_argument("--sft", default=None, help="an SFT workdir of the demo's model to start "
                      "from (default: trained in <output>/shared/sft)")
  parser.add_argument("--workers", type=int, default=1, help="points trained at once, each "
                      "worker a process of its own (default 1)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
  console.initialize_backends()  # without the start-up notices of devices this machine lacks
  frontier = Frontier(args.output, args.quick, seeds, data_cache=args.data_cache, sft=args.sft)
  # The shared SFT policy and samples exist now: the extra workers only train points.
  argv = list(sys.argv[1:] if argv is None else argv)
  workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker",
                               "--workers", "1"]) for _ in range(max(args.workers, 1) - 1)]
  try:
    frontier.run()
  except BaseException:
    for worker in workers:
      worker.terminate()
    raise
  finally:
    for worker in workers:
      if worker.wait() != 0 and not args.worker:
        print(f"[frontier] a worker exited with {worker.returncode}", file=sys.stderr)
  if args.worker:
    return
  command = "python benchmarks/frontier.py --output DIR" + (" --quick" if args.quick else "")
  print(write(frontier, command), flush=True)


if __name__ == "__main__":
  main()

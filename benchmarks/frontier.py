"""The reward-KL frontier on the demo task: each method swept over its regularisation, over seeds,
under the benchmarks' one protocol (benchmarks/protocol.py).

  python benchmarks/frontier.py --output /tmp/frontier --workers 2   # the full sweep (about 3 h)
  python benchmarks/frontier.py --output /tmp/frontier --quick       # 3 methods, 2 values, 1 seed

The protocol. The demo's SFT policy (one, <output>/shared/sft) is shared by every point; a seed
replicates everything after it: its own judged training samples (SFT's answers to its own
training prompts, <output>/shared/samples_seed<s>), its own training order and its own evaluation
sampling seeds. Each point is one training run from SFT (the demo's alignment settings,
`train.run`) in <output>/points/<method>/<tag>/seed_<s>, evaluated against SFT by the true judge
on VALIDATION prompts (every choice reads these) and on TEST prompts (reported, never read by a
choice); the sets are disjoint from each other and from every training prompt. A finished point
is not trained again, so the script resumes, also from a frontier.json copied from an earlier
session (the points' results and per-prompt scores are in it).

The choices, in order, each on validation and each recorded with its grid and scores:
  learning_rate/<method>   every method's learning rate, from the same grid, at its default
                           regularisation (first seed)
  best/<method>            each method's best swept value
  ablation_tau             DRO-V's best τ; the value-function variants run at it and at its two
                           neighbours in the grid
Swept (7 values each, denser where the methods' KLs meet):
  DRO-V, DRO-P, DRO-V (no 1/τ)   τ (no 1/τ: `optimizer.policy_update_scale = none`)
  KTO, DPO β      IPO τ      TR-DPO the mixing weight α of its soft update (every step, β 1):
                             β barely moves TR-DPO's KL, α does

Written to <output>: frontier.json ("protocol", "points", "choices", "matched"), frontier.md
(every point with its interval over seeds and test prompts; the choices; the paired differences
against DRO-V at matched KL under linear and log-KL interpolation; the value-function ablation at
matched KL) and frontier.png (win rate against KL with the intervals).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import protocol  # noqa: E402
from dro_jax import configs, console, demo, files, train  # noqa: E402

# TR-DPO's β while its α is swept: with α → 0 it is DPO at this β (KL about 0.9 on the demo), and
# α moves its KL from there up to about 3, through the range where the methods meet.
TR_DPO_BETA = 1.0
# method: (demo stage it starts from, loss, the swept key, its default, the swept values,
# extra settings). Values go from the strongest regularisation to the weakest.
METHODS = {
    "DRO-V": ("dro", "dro", "dro.tau", 1.0, (3.0, 1.0, 0.6, 0.4, 0.3, 0.2, 0.1), {}),
    "DRO-V (no 1/τ)": ("dro", "dro", "dro.tau", 1.0, (3.0, 1.0, 0.6, 0.4, 0.3, 0.2, 0.1),
                       {"optimizer.policy_update_scale": "none"}),
    "DRO-P": ("dro", "dro_p", "dro.tau", 1.0, (3.0, 1.0, 0.6, 0.4, 0.3, 0.2, 0.1), {}),
    "KTO": ("kto", "kto", "kto.beta", 1.0, (10.0, 3.0, 1.5, 1.0, 0.6, 0.3, 0.1), {}),
    "DPO": ("dpo", "dpo", "dpo.beta", 0.5, (5.0, 2.0, 1.2, 0.8, 0.5, 0.3, 0.15), {}),
    "IPO": ("dpo", "ipo", "ipo.tau", 0.1, (1.0, 0.6, 0.4, 0.3, 0.2, 0.1, 0.03), {}),
    "TR-DPO": ("tr_dpo", "dpo", "reference.alpha", 0.6,
               (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6),
               {"reference.sync_every": 1, "dpo.beta": TR_DPO_BETA}),
}
# Quick: each method's default and one weaker value (the default is the learning-rate point).
QUICK_VALUES = {"DRO-V": (1.0, 0.3), "DRO-V (no 1/τ)": (1.0, 0.3), "DRO-P": (1.0, 0.3),
                "KTO": (1.0, 0.3), "DPO": (0.5, 0.15), "IPO": (0.1, 0.03), "TR-DPO": (0.01, 0.6)}
QUICK_METHODS = ("DRO-V", "KTO", "DPO")
QUICK_ALIGN_STEPS = 30
REFERENCE = "DRO-V"  # paired differences are taken against it
LEARNING_RATES = (3e-4, 1e-3, 3e-3)  # every method's grid
# The value-function variants against DRO-V's default (double_multiple, value).
ABLATION = (("double_single", "value"), ("single_multiple", "value"),
            ("single_multiple", "policy"), ("single_single", "value"),
            ("single_single", "policy"))
# Test: a point's 95% half-width at most 1.3 points even at a win rate of 50% (1.2 measured).
PROMPTS = {"validation": 500, "test": 2500}
QUICK_PROMPTS = {"validation": 32, "test": 64}
SAMPLES = 2  # answers per prompt and side
LEVELS = 3  # matched-KL levels
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
    self.demo = configs.load("demo", "scale=0.15" if quick else "scale=1.0")
    self.methods = QUICK_METHODS if quick else tuple(METHODS)
    if quick:
      self.demo.demo.align_steps = QUICK_ALIGN_STEPS
    self.demo.data.cache_dir = data_cache or os.path.join(output, "data_cache")
    names = demo.synthetic_tasks(self.demo)
    shared = os.path.join(output, "shared")
    self.sft_dir = sft or os.path.join(shared, "sft")
    if not sft:
      demo.run_stage("sft", demo.stage_config(self.demo, "sft", names["sft"], init=None,
                                              baseline=None), self.sft_dir)
    vocabulary_path = synthetic.demo_vocabulary(self.demo.data.cache_dir)
    vocabulary = seqio.SentencePieceVocabulary(vocabulary_path)
    sft_policy = demo.load_policy(self.sft_dir, self.demo)
    self.sets = protocol.prompt_sets(**(QUICK_PROMPTS if quick else PROMPTS))
    self.feedback, self.evaluators, train_prompts = {}, {}, set()
    for seed in seeds:  # each seed: SFT's own answers to its own training prompts, judged
      seeded = copy.deepcopy(self.demo)
      seeded.seed = seed
      paths = demo.sample_feedback(seeded, sft_policy, vocabulary,
                                   os.path.join(shared, f"samples_seed{seed}"))
      train_prompts |= {json.loads(line)["prompt"] for line in
                        files.read_text(paths["triples"]).splitlines() if line.strip()}
      self.feedback[seed] = demo.register_feedback(paths, vocabulary_path, self.demo)
      self.evaluators[seed] = protocol.Evaluator(self.demo, sft_policy, vocabulary, self.sets,
                                                 seed, SAMPLES)
    protocol.check_disjoint({"train": sorted(train_prompts), **self.sets})
    self.protocol = {
        "train_prompts": len(train_prompts),
        "train_prompts_per_seed": int(self.demo.demo.feedback_prompts),
        "validation_prompts": len(self.sets["validation"]),
        "test_prompts": len(self.sets["test"]), "samples_per_prompt": SAMPLES,
        "selection": "validation", "seeds": list(seeds), "judge": "demo",
        "learning_rates": list(self.learning_rates()),
        "methods": list(self.methods),
        "grids": {method: list(self.values(method)) for method in self.methods},
        "sft_steps": int(self.demo.demo.sft_steps), "align_steps": int(self.demo.demo.align_steps),
        "prompts_digest": protocol.digest(self.sets), "sft_digest": _digest(sft_policy.params)}
    self.path = os.path.join(output, "frontier.json")
    self.points: dict[str, dict[str, Any]] = {}
    self.choices: dict[str, dict[str, Any]] = {}
    self.reload()

  # ------------------------------------------------------------------ the state, shared by workers

  def read(self) -> dict[str, Any]:
    state = files.read_json(self.path) or {}
    if state and "protocol" not in state:
      raise SystemExit(f"{self.path}: written by an earlier version of this script (no "
                       f"protocol); use a new --output")
    if state:
      theirs = {k: v for k, v in state["protocol"].items() if k not in ("seeds", "train_prompts")}
      ours = {k: v for k, v in self.protocol.items() if k not in ("seeds", "train_prompts")}
      if theirs != ours:
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise SystemExit(f"{self.path}: made under another protocol ({', '.join(changed)} "
                         f"differ); use a new --output")
    return state

  def save(self) -> None:
    """Merges this process's points and choices into frontier.json (under the lock)."""
    with self.locked():
      state = self.read()
      self.points = {**state.get("points", {}), **self.points}
      self.choices = {**state.get("choices", {}), **self.choices}
      seeds = sorted(set(self.seeds) | set(state.get("protocol", {}).get("seeds", [])))
      files.write_text(self.path, json.dumps(
          {"protocol": {**self.protocol, "seeds": seeds}, "choices": self.choices,
           "points": self.points, **({"matched": state["matched"]} if "matched" in state
                                     else {})}, indent=1))

  def reload(self) -> None:
    with self.locked():
      state = self.read()
    self.points = {**self.points, **state.get("points", {})}
    self.choices = {**self.choices, **state.get("choices", {})}

  @contextlib.contextmanager
  def locked(self):
    """frontier.json's lock: every worker merges its points into the file under it."""
    os.makedirs(self.output, exist_ok=True)
    with open(self.path + ".lock", "a") as handle:
      fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  # ------------------------------------------------------------------ one point

  def config(self, method: str, value: float, seed: int, learning_rate: float,
             extra: dict[str, Any]):
    stage, loss, key, _, _, settings = METHODS[method]
    seeded = copy.deepcopy(self.demo)
    seeded.seed = seed
    config = demo.stage_config(seeded, stage, self.feedback[seed]["pairs" if stage in (
        "dpo", "tr_dpo") else "triples"], init=self.sft_dir, baseline=self.sft_dir)
    config.loss = loss
    config.seed = seed
    config.eval_every = 0  # judged once, at the end, under the protocol
    config.optimizer.learning_rate = float(learning_rate)
    for name, setting in {**settings, **extra}.items():
      _set(config, name, setting)
    _set(config, key, float(value))
    return config

  def point(self, method: str, value: float, seed: int, learning_rate: float,
            extra: dict[str, Any] | None = None, label: str | None = None
            ) -> dict[str, Any] | None:
    """A point's record, trained and evaluated here unless it is done or another worker has it
    (then None)."""
    extra = dict(extra or {})
    tag = (label or f"{value:g}") + f"@lr{learning_rate:g}"
    name = point_name(method, tag, seed)
    if name in self.points:
      return self.points[name]
    self.reload()
    if name in self.points:
      return self.points[name]
    workdir = self.workdir(name)
    if not self.claim(workdir):
      return None  # another worker is training it
    config = self.config(method, value, seed, learning_rate, extra)
    start = time.perf_counter()
    record: dict[str, Any] = {"method": method, "value": float(value), "label": label or "",
                              "learning_rate": float(learning_rate), "seed": seed,
                              "settings": extra, "workdir": os.path.relpath(workdir, self.output)}
    try:
      if not demo.finished(workdir, config.total_steps):
        train.run(config, workdir)
      record["diverged"] = False
      record.update(self.evaluators[seed](demo.load_policy(workdir, self.demo), workdir))
    except train.NonFiniteError as error:
      record.update(diverged=True, error=str(error))
    record["seconds"] = time.perf_counter() - start
    print(f"[frontier] {method} {METHODS[method][2]}={tag} seed {seed}: "
          + ("diverged" if record["diverged"] else
             f"validation {record['validation']['win_rate']:.1%}, test "
             f"{record['test']['win_rate']:.1%} KL {record['test']['kl']:.3f}"), flush=True)
    self.points[name] = record
    self.save()
    os.remove(workdir + ".claim")
    return record

  def workdir(self, name: str) -> str:
    method, tag, seed = name.split("|")
    folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
    return os.path.join(self.output, "points", folder, tag.replace("@", "_"), f"seed_{seed}")

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

  # ------------------------------------------------------------------ the sweep and its choices

  def values(self, method: str) -> tuple[float, ...]:
    return QUICK_VALUES[method] if self.quick else METHODS[method][4]

  def learning_rates(self) -> tuple[float, ...]:
    return (float(self.demo.demo.align_lr),) if self.quick else LEARNING_RATES

  def decide(self, name: str, candidates: dict[str, list[str]]) -> str:
    """A choice on validation (protocol.choose) over the points named per candidate, recorded."""
    runs = {label: self.wait(names) for label, names in candidates.items()}
    pick, record = protocol.choose(name, runs)
    self.choices[name] = record
    self.save()
    return pick

  def learning_rate(self, method: str) -> float:
    default, seed = METHODS[method][3], self.seeds[0]
    candidates = {f"{rate:g}": [point_name(method, f"{default:g}@lr{rate:g}", seed)]
                  for rate in self.learning_rates()}
    return float(self.decide(f"learning_rate/{method}", candidates))

  def best_value(self, method: str, rate: float) -> float:
    candidates = {f"{value:g}": [point_name(method, f"{value:g}@lr{rate:g}", seed)
                                 for seed in self.seeds] for value in self.values(method)}
    return float(self.decide(f"best/{method}", candidates))

  def ablation_taus(self, best: float) -> list[float]:
    """DRO-V's best τ and its two neighbours in the grid (the three nearest at an end)."""
    grid = list(self.values(REFERENCE))
    index = grid.index(best)
    start = min(max(index - 1, 0), max(len(grid) - 3, 0))
    return grid[start:start + 3]

  def run(self) -> None:
    """Every point, in an order that leaves each choice as late as possible, so that parallel
    workers keep busy: the learning-rate grid, then each method's sweep at its chosen rate, then
    the ablation around DRO-V's best τ."""
    seed = self.seeds[0]
    for method in self.methods:
      for rate in self.learning_rates():
        self.point(method, METHODS[method][3], seed, rate)
    rates = {method: self.learning_rate(method) for method in self.methods}
    for method in self.methods:
      for value in self.values(method):
        for s in self.seeds:
          self.point(method, value, s, rates[method])
    best = {method: self.best_value(method, rates[method]) for method in self.methods}
    taus = self.ablation_taus(best[REFERENCE])
    self.choices["ablation_tau"] = {**self.choices[f"best/{REFERENCE}"], "name": "ablation_tau",
                                    "taus": taus}
    self.save()
    names = []
    if not self.quick:
      for variant, chain in ABLATION:
        for tau in taus:
          for s in self.seeds:
            label = f"ablation_{variant}_{chain}_{tau:g}"
            self.point(REFERENCE, tau, s, rates[REFERENCE],
                       {"dro.value_function": variant, "dro.value_optimizer": chain}, label=label)
            names.append(point_name(REFERENCE, f"{label}@lr{rates[REFERENCE]:g}", s))
    self.wait(names)

  def planned(self) -> int:
    """How many points the whole sweep trains (each method's default value is in its grid, so
    the learning-rate grid adds all rates but the chosen one)."""
    sweep = sum(len(self.values(method)) for method in self.methods) * len(self.seeds)
    rates = len(self.methods) * (len(self.learning_rates()) - 1)
    return sweep + rates + (0 if self.quick else len(ABLATION) * 3 * len(self.seeds))

  # ------------------------------------------------------------------ reading the points

  def rate(self, method: str) -> float | None:
    """The method's learning rate chosen on validation (None before the choice)."""
    choice = self.choices.get(f"learning_rate/{method}")
    return float(choice["pick"]) if choice else None

  def sweep(self, method: str) -> list[dict[str, Any]]:
    """The points of a method's sweep (at its chosen learning rate), not the grid or ablation;
    none before its learning rate is chosen."""
    rate = self.rate(method)
    if rate is None:
      return []
    return [p for p in self.points.values() if p["method"] == method and not p["label"]
            and p["learning_rate"] == rate and p["seed"] in self.seeds]

  def curve(self, method: str, label_prefix: str = "", settings: dict | None = None
            ) -> list[dict[str, Any]]:
    """Per swept value (strongest regularisation first) with every seed done and none diverged:
    its tables (seeds x test prompts) of verdicts and log-ratios, and its summary."""
    if label_prefix:
      runs = [p for p in self.points.values() if p["method"] == method
              and p["label"].startswith(label_prefix) and p["seed"] in self.seeds
              and all(p["settings"].get(k) == v for k, v in (settings or {}).items())]
    else:
      runs = self.sweep(method)
    rows = []
    for value in sorted({p["value"] for p in runs}, reverse=METHODS[method][2] != "reference.alpha"):
      by_seed = {p["seed"]: p for p in runs if p["value"] == value}
      row = {"value": value, "seeds": len(by_seed),
             "diverged": sum(p["diverged"] for p in by_seed.values())}
      if set(by_seed) == set(self.seeds) and not row["diverged"]:
        ordered = [by_seed[s] for s in self.seeds]
        row["scores"] = np.stack([protocol.unpack(p["test"]["prompt_scores"]) for p in ordered])
        row["kls"] = np.stack([protocol.unpack(p["test"]["prompt_kl"]) for p in ordered])
        row["validation"] = float(np.mean([p["validation"]["win_rate"] for p in ordered]))
        row["halfwidth"] = max((p["test"]["win_rate_high"] - p["test"]["win_rate_low"]) / 2
                               for p in ordered)
        row["length"] = float(np.mean([p["test"]["policy_length"] for p in ordered]))
        row["kl_seed_sd"] = float(np.std([p["test"]["kl"] for p in ordered], ddof=1)) \
            if len(ordered) > 1 else 0.0
      rows.append(row)
    return rows


def complete(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [row for row in rows if "scores" in row]


def as_points(rows: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
  return [(row["scores"], row["kls"]) for row in complete(rows)]


def matched_levels(curves: dict[str, list[dict[str, Any]]], count: int = LEVELS) -> list[float]:
  """`count` KL levels, evenly spaced in log KL inside the range the most methods share (its
  middle: the ends of a range are where the bootstrap's replicates fall outside it)."""
  ranges = {}
  for method, rows in curves.items():
    kls = [float(row["kls"].mean()) for row in complete(rows)]
    if len(kls) > 1:
      ranges[method] = (min(kls), max(kls))
  if not ranges:
    return []

  def span(x):
    methods = [m for m, (low, high) in ranges.items() if low <= x <= high]
    if not methods:
      return 0, 0.0, 0.0
    return len(methods), max(ranges[m][0] for m in methods), min(ranges[m][1] for m in methods)

  ends = sorted({kl for pair in ranges.values() for kl in pair})
  candidates = ends + [(a + b) / 2 for a, b in zip(ends, ends[1:])]
  _, low, high = max((span(x) for x in candidates),
                     key=lambda s: (s[0], math.log(max(s[2], 1e-6) / max(s[1], 1e-6))))
  if not high > 0:
    return []
  low = low if low > 0 else high / 100  # an estimate at or below 0: log KL needs a floor
  if not high > low:
    return []
  return [float(level) for level in np.exp(np.linspace(math.log(low), math.log(high),
                                                       count + 2)[1:-1])]


def matched_table(curves: dict[str, list[dict[str, Any]]], reference: str, levels: list[float],
                  replicates: protocol.Replicates) -> dict[str, Any]:
  """Per method and level: its win rate read linearly in KL and in log KL (each with its
  interval), and its paired difference from `reference` under both readings; `unstable` where
  the two readings differ by more than the cell's half-width (no claim is made from it); a
  `verdict` ("better", "worse", "indistinguishable") only where both readings agree."""
  table: dict[str, Any] = {}
  base = as_points(curves[reference]) if reference in curves else []
  for method, rows in curves.items():
    points = as_points(rows)
    if len(points) < 2:
      continue
    cells = []
    for level in levels:
      cell: dict[str, Any] = {"kl": level}
      for reading, log_kl in (("linear", False), ("log", True)):
        cell[reading] = protocol.matched_value(points, level, log_kl, replicates)
        if method != reference and len(base) > 1:
          cell[f"{reading}_difference"] = protocol.matched_difference(points, base, level,
                                                                      log_kl, replicates)
      lin, log = cell["linear"], cell["log"]
      halfwidth = max((lin["high"] - lin["low"]) / 2, (log["high"] - log["low"]) / 2) \
          if math.isfinite(lin["win_rate"]) and math.isfinite(log["win_rate"]) else math.nan
      cell["unstable"] = bool(not math.isfinite(halfwidth)
                              or abs(lin["win_rate"] - log["win_rate"]) > halfwidth)
      if "linear_difference" in cell:
        differences = [cell["linear_difference"], cell["log_difference"]]
        if cell["unstable"] or not all(math.isfinite(d["difference"]) for d in differences):
          cell["verdict"] = "no claim"
        elif all(d["low"] > 0 for d in differences):
          cell["verdict"] = "better"
        elif all(d["high"] < 0 for d in differences):
          cell["verdict"] = "worse"
        else:
          cell["verdict"] = "indistinguishable"
      cells.append(cell)
    table[method] = cells
  return table


def monotonicity(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
  """Where KL falls as the regularisation weakens (beyond the tolerance)."""
  violations = []
  for method, rows in curves.items():
    rows = complete(rows)
    for stronger, weaker in zip(rows, rows[1:]):  # rows go from strongest to weakest
      tolerance = max(KL_TOLERANCE, 2 * max(stronger["kl_seed_sd"], weaker["kl_seed_sd"]))
      low, high = float(stronger["kls"].mean()), float(weaker["kls"].mean())
      if high < low - tolerance:
        violations.append(f"{method}: {METHODS[method][2]} {stronger['value']:g} -> "
                          f"{weaker['value']:g}, KL {low:.3f} -> {high:.3f} "
                          f"(tolerance {tolerance:.3f})")
  return violations


def _pct(value: float) -> str:
  return "—" if not math.isfinite(value) else f"{value:.1%}"


def _interval_text(cell: dict[str, float], key: str = "win_rate") -> str:
  if not math.isfinite(cell[key]):
    return "—"
  return f"{cell[key]:.1%} [{cell['low']:.1%}, {cell['high']:.1%}]"


def _difference_text(cell: dict[str, float]) -> str:
  if not math.isfinite(cell["difference"]):
    return "—"
  return (f"{100 * cell['difference']:+.1f} [{100 * cell['low']:+.1f}, "
          f"{100 * cell['high']:+.1f}]")


def write(frontier: Frontier, command: str) -> str:
  frontier.reload()
  curves = {m: frontier.curve(m) for m in frontier.methods if frontier.sweep(m)}
  replicates = protocol.Replicates(len(frontier.seeds), frontier.protocol["test_prompts"])
  p = frontier.protocol
  done = sum(p["seed"] in frontier.seeds for p in frontier.points.values())
  status = "" if done >= frontier.planned() else (
      f" Partial: {done} of the sweep's {frontier.planned()} points are done; the same command "
      f"resumes it.")
  lines = [f"# The reward-KL frontier on the demo task ({'quick' if frontier.quick else 'full'} "
           f"run, seeds {frontier.seeds})", "", f"Made by `{command}`.{status}", "",
           "## Protocol", "",
           f"- Prompts: {p['train_prompts_per_seed']} training prompts per seed ({p['train_prompts']}"
           f" in all), {p['validation_prompts']} validation and {p['test_prompts']} test prompts, "
           f"disjoint (checked); {p['samples_per_prompt']} answers per prompt and side, judged by "
           f"the true judge (`{p['judge']}`) against SFT's answers.",
           "- Every choice below is made on validation; test results are reported only.",
           "- A seed replicates everything after SFT: its judged training samples, its training "
           "order, its evaluation sampling.",
           "- Intervals (95%): a bootstrap over seeds and test prompts together (crossed; "
           "benchmarks/protocol.py), so they hold training-seed variation and evaluation noise. "
           "Differences are paired: the same replicates, prompts and SFT answers on both sides."]
  halfwidths = [row["halfwidth"] for rows in curves.values() for row in complete(rows)]
  if halfwidths:
    lines.append(f"- Evaluation noise: each point's own 95% half-width on test (one seed) is at "
                 f"most {100 * max(halfwidths):.1f} points (median "
                 f"{100 * float(np.median(halfwidths)):.1f}).")
  lines += ["", "## Choices (on validation)", "", "| choice | grid | validation win rate | pick |",
            "|---|---|---|---|"]
  for name, choice in sorted(frontier.choices.items()):
    scores = ", ".join(f"{label}: {_pct(score)}" for label, score in choice["validation"].items())
    pick = choice["pick"] + (f" (τ run: {', '.join(f'{t:g}' for t in choice['taus'])})"
                             if "taus" in choice else "")
    lines.append(f"| {name} | {', '.join(choice['grid'])} | {scores} | {pick} |")
  pending = [p for p in frontier.points.values() if not p["label"] and p["seed"] in frontier.seeds
             and f"learning_rate/{p['method']}" not in frontier.choices and not p["diverged"]]
  if pending:  # the learning-rate grid of a partial sweep, before its choices
    lines += ["", "Learning-rate grid points done, before their choice (validation only):", ""]
    lines += [f"- {p['method']} at {METHODS[p['method']][2]} {p['value']:g}, learning rate "
              f"{p['learning_rate']:g}, seed {p['seed']}: {_pct(p['validation']['win_rate'])}"
              for p in sorted(pending, key=lambda p: (p["method"], p["learning_rate"]))]
  lines += ["", "## Every point (test prompts)", "",
            "| method | parameter | value | learning rate | seeds | diverged | validation win rate "
            "| test win rate [95%] | KL(π‖SFT) [95%] | length |", "|---|---|---|---|---|---|---|---|---|---|"]
  for method, rows in curves.items():
    for row in rows:
      if "scores" in row:
        win = protocol.point_interval(row["scores"], replicates)
        kl = protocol.point_interval(row["kls"], replicates)
        cells = (f"{_pct(row['validation'])} | {win[0]:.1%} [{win[1]:.1%}, {win[2]:.1%}] | "
                 f"{kl[0]:.3f} [{kl[1]:.3f}, {kl[2]:.3f}] | {row['length']:.2f}")
      else:
        cells = "— | — | — | —"
      lines.append(f"| {method} | {METHODS[method][2]} | {row['value']:g} | "
                   f"{frontier.rate(method):g} | {row['seeds']} | {row['diverged']} | {cells} |")
  levels = matched_levels(curves)
  table = matched_table(curves, REFERENCE, levels, replicates) if levels else {}
  lines += ["", "## Paired differences at matched KL", ""]
  if table:
    lines += [f"Each method's win rate at KL levels inside the range the methods share, read off "
              f"its curve linearly in KL and linearly in log KL, and its paired difference from "
              f"{REFERENCE} (points of win rate; 95% interval). A cell whose two readings differ by "
              f"more than its half-width is marked *unstable* and makes no claim; a method is called "
              f"better or worse than {REFERENCE} only where both readings' intervals exclude 0.", "",
              "| method | KL | win rate (linear) | win rate (log KL) | − " + REFERENCE +
              " (linear) | − " + REFERENCE + " (log KL) | verdict |",
              "|---|---|---|---|---|---|---|"]
    for method, cells in table.items():
      for cell in cells:
        lines.append(
            f"| {method} | {cell['kl']:.2f} | {_interval_text(cell['linear'])} | "
            f"{_interval_text(cell['log'])}{' (unstable)' if cell['unstable'] else ''} | "
            + (f"{_difference_text(cell['linear_difference'])} | "
               f"{_difference_text(cell['log_difference'])} | {cell['verdict']} |"
               if "linear_difference" in cell else "— | — | reference |"))
    missing = [m for m in curves if m not in table or all(
        not math.isfinite(c["linear"]["win_rate"]) for c in table[m])]
    if missing:
      lines += ["", "Outside the shared KL range (no matched cells): " + ", ".join(
          f"{m} (KL {min(float(r['kls'].mean()) for r in complete(curves[m])):.2f} to "
          f"{max(float(r['kls'].mean()) for r in complete(curves[m])):.2f})"
          if complete(curves[m]) else m for m in missing) + "."]
  else:
    lines.append("Too few complete points for matched KL.")
  violations = monotonicity(curves)
  lines += ["", "## KL against the regularisation", "",
            f"Expected: KL grows as the regularisation weakens (τ or β falls, TR-DPO's α grows; "
            f"tolerance {KL_TOLERANCE} nats or twice the seed sd). "
            + ("No violations." if not violations else f"{len(violations)} violations:")]
  lines += [f"- {v}" for v in violations]
  ablation = ablation_table(frontier, replicates)
  lines += ["", "## DRO-V value functions at matched KL", ""]
  if ablation["cells"]:
    lines += [f"Each variant run at τ {', '.join(f'{t:g}' for t in ablation['taus'])} (DRO-V's "
              f"best on validation and its neighbours); its win rate at common KL levels against "
              f"DRO-V's own curve (double_multiple, value), paired, linear | log KL.", "",
              "| value function | value optimizer | KL | win rate (log KL) | − DRO-V (linear) | "
              "− DRO-V (log KL) | verdict |", "|---|---|---|---|---|---|---|"]
    for (variant, chain), cells in ablation["cells"].items():
      for cell in cells:
        lines.append(f"| {variant} | {chain} | {cell['kl']:.2f} | {_interval_text(cell['log'])} | "
                     f"{_difference_text(cell['linear_difference'])} | "
                     f"{_difference_text(cell['log_difference'])} | {cell['verdict']} |")
  else:
    lines.append("Run without --quick for the ablation.")
  lines += ["", "![win rate against KL](frontier.png)", ""]
  text = "\n".join(lines)
  with frontier.locked():
    state = frontier.read() or {"protocol": frontier.protocol, "choices": frontier.choices,
                                "points": frontier.points}
    state["matched"] = {"levels": levels, "reference": REFERENCE,
                        "cells": _plain(table), "ablation": _plain(ablation)}
    files.write_text(frontier.path, json.dumps(state, indent=1))
  files.write_text(os.path.join(frontier.output, "frontier.md"), text)
  plot(curves, replicates, os.path.join(frontier.output, "frontier.png"), levels)
  return text


def ablation_table(frontier: Frontier, replicates: protocol.Replicates) -> dict[str, Any]:
  """The value-function variants against DRO-V's curve at KL levels their curves share."""
  taus = frontier.choices.get("ablation_tau", {}).get("taus", [])
  curves = {}
  for variant, chain in ABLATION:
    rows = frontier.curve(REFERENCE, "ablation_", {"dro.value_function": variant,
                                                   "dro.value_optimizer": chain})
    if len(complete(rows)) > 1:
      curves[(variant, chain)] = rows
  reference = frontier.curve(REFERENCE)
  if not curves or len(complete(reference)) < 2:
    return {"taus": taus, "levels": [], "cells": {}}
  named = {f"{v}|{c}": rows for (v, c), rows in curves.items()}
  levels = matched_levels({**named, REFERENCE: reference})
  table = matched_table({**named, REFERENCE: reference}, REFERENCE, levels, replicates)
  return {"taus": taus, "levels": levels,
          "cells": {tuple(name.split("|")): cells for name, cells in table.items()
                    if name != REFERENCE}}


def _plain(value):
  """JSON-ready: tuple keys joined, numpy numbers as floats, NaN as None."""
  if isinstance(value, dict):
    return {("|".join(k) if isinstance(k, tuple) else k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def plot(curves: dict[str, list[dict[str, Any]]], replicates: protocol.Replicates,
         path: str, levels: list[float] | tuple[float, ...] = ()) -> None:
  """Win rate against KL with both intervals: the whole sweep (left, KL on a log axis) and, when
  there are matched-KL levels, the range where the methods meet (right, linear KL, the levels
  dotted), where the paired differences are read."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import FuncFormatter
  near = bool(levels)
  figure = Figure(figsize=(12.5 if near else 7, 5))
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, 2 if near else 1, squeeze=False)[0]
  whole = axes[0]
  top = 1.0
  series = []
  for method, rows in curves.items():
    rows = sorted(complete(rows), key=lambda row: float(row["kls"].mean()))
    if not rows:
      continue
    wins = np.array([protocol.point_interval(row["scores"], replicates) for row in rows])
    kls = np.array([protocol.point_interval(row["kls"], replicates) for row in rows])
    top = max(top, float(kls[:, 0].max()))
    series.append((method, wins, kls))
  spread = lambda t: np.maximum([t[:, 0] - t[:, 1], t[:, 2] - t[:, 0]], 0.0)  # noqa: E731
  for axis in axes:
    for index, (method, wins, kls) in enumerate(series):
      axis.errorbar(kls[:, 0], wins[:, 0], xerr=spread(kls), yerr=spread(wins), marker="o",
                    markersize=3, capsize=2, label=method, color=f"C{index}")
    axis.set_ylabel("win rate against SFT on test prompts (95%: seeds x prompts)")
  whole.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
  # Logarithmic above 0.01 nats (KLs span decades), linear below (an estimate near 0 can be < 0).
  whole.set_xscale("symlog", linthresh=0.01)
  whole.set_xticks([t for t in (0, 0.01, 0.1, 1, 10, 100) if t <= 10 * top])
  whole.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
  whole.set(xlabel="KL(π‖SFT), nats per answer (policy's own samples, test prompts)",
            title="Reward-KL frontier on the demo task")
  if near:
    zoom = axes[1]
    low, high = min(levels) / 1.6, max(levels) * 1.6
    inside = [(w[i, 1], w[i, 2]) for _, w, k in series for i in range(len(k))
              if low <= k[i, 0] <= high]
    if inside:
      bottom, ceiling = min(b for b, _ in inside), max(c for _, c in inside)
      margin = 0.1 * max(ceiling - bottom, 0.01)
      zoom.set_ylim(bottom - margin, ceiling + margin)
    zoom.set_xlim(low, high)
    for level in levels:
      zoom.axvline(level, color="grey", linewidth=0.8, linestyle=":")
    zoom.set(xlabel="KL(π‖SFT), nats per answer (linear)",
             title="Where the methods meet (matched-KL levels dotted)")
  if whole.get_legend_handles_labels()[0]:
    whole.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def _digest(params) -> str:
  """The SFT parameters' sha256 (a resumed sweep must start from the same SFT)."""
  import hashlib
  import jax
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


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
  parser.add_argument("--quick", action="store_true", help="DRO-V, KTO and DPO at 2 values each, 1 "
                      "seed, one learning rate, no ablation, a smaller demo and fewer prompts")
  parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0)")
  parser.add_argument("--data_cache", default=None, help="the demo data's folder (default: "
                      "<output>/data_cache)")
  parser.add_argument("--sft", default=None, help="an SFT workdir of the demo's model to start "
                      "from (default: trained in <output>/shared/sft)")
  parser.add_argument("--workers", type=int, default=1, help="points trained at once, each "
                      "worker a process of its own (default 1)")
  parser.add_argument("--report", action="store_true", help="only write frontier.md and "
                      "frontier.png from the points in frontier.json (nothing trained)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
  console.initialize_backends()  # without the start-up notices of devices this machine lacks
  frontier = Frontier(args.output, args.quick, seeds, data_cache=args.data_cache, sft=args.sft)
  command = "python benchmarks/frontier.py --output DIR" + (" --quick" if args.quick else "")
  if args.report:
    print(write(frontier, command), flush=True)
    return
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
  print(write(frontier, command), flush=True)


if __name__ == "__main__":
  main()

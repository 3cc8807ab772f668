"""Online iterative RLHF against offline at equal oracle budgets, on the demo task.

  python benchmarks/online_vs_offline.py --output /tmp/online_bench --workers 2  # the full run
  python benchmarks/online_vs_offline.py --output /tmp/online_bench --quick      # a smoke test

Under the benchmarks' protocol (benchmarks/protocol.py): one SFT policy (the online loop's demo
SFT, <output>/sft) is shared by every run; a seed replicates the whole pipeline after it (its own
samples, pairs, labels, preference-model fits, training order and evaluation sampling seeds).
Per seed and per oracle (`demo`, the programmatic judge, and `noisy:0.2:demo`, the same with each
verdict flipped with probability 0.2, a fresh draw per query):

  online (enhancer)    IPO (τ 0.1), K iterations; the main agent's sample against the best of
                       4 by the learned ranker (`online.preference_model=fit`: a preference
                       model refit on every label so far; the first iteration ranks at random)
  online (best-worst)  the same loop, the ranker's best against its worst
  offline              IPO, one iteration from SFT: two SFT samples per prompt (no ranker), more
                       prompts, trained for up to the online runs' total steps; its step count
                       is chosen on the VALIDATION prompts from a grid of checkpoints of the one
                       run (constant learning rate after the warm-up: the checkpoint at s steps
                       is the run trained for s steps)

The oracle budget. The oracle only labels (the ranker is learned, so the tournament asks no
oracle), and every run asks it exactly B labelling calls per online iteration, K·B in all
(`online.max_oracle_calls`: the candidate pairs are asked in order until the budget is spent);
offline asks its K·B in one go. So every run of one seed and oracle makes the same number of
oracle calls, best-worst and enhancer included (`oracle_calls` per run in results.json, checked
equal). The labelled pairs kept after ties are dropped differ between runs only by their ties
(reported beside).

Evaluation. Each online iterate and each offline checkpoint of the grid is judged by the TRUE
judge (`demo`) against SFT on the protocol's test prompts (offline's also on the validation
prompts, for the choice); each prompt keeps its mean verdict and its mean log-ratio (KL), so a
point's 95% interval is the protocol's two-level bootstrap over seeds and test prompts, and
methods are compared as paired differences on the same prompts and SFT answers (a winner only
where the interval excludes 0), at equal oracle calls, and at matched KL (interpolated in KL and
in log KL along each method's points).

`--oracles demo,noisy:0.2:demo,learned` adds the realistic setting: a preference model trained
by configs/preference_model.py on the demo's labelled pairs (<output>/preference_model) is the
oracle of online (enhancer), reported against the same runs under `demo` (the paired difference,
and the share of the true oracle's gain over SFT that survives).

Resumable: every run is a workdir under --output (the online loop resumes it), each point's
evaluation is cached beside it, and a finished run's record is <output>/records/<name>.json. The
report: <output>/results.json, online_vs_offline.md and online_vs_offline.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # protocol

from dro_jax import files  # noqa: E402  (the heavy modules once the flags are parsed)

ORACLES = ("demo", "noisy:0.2:demo")
METHODS = ("online (enhancer)", "online (best-worst)", "offline")
TAGS = {"online (enhancer)": "online_enhancer", "online (best-worst)": "online_best_worst",
        "offline": "offline"}
OFFLINE_TAUS = (0.1, 0.3)  # offline's IPO τ grid at full size (online: configs/online.py's 0.1)
# `--oracles learned`: the realistic setting. A pairwise preference model trained by
# configs/preference_model.py on the demo's labelled pairs (<output>/preference_model) is the
# oracle (`preference_model:DIR`); its runs are online (enhancer) only, compared with the same
# runs under the true oracle `demo` on the same seeds and test prompts.
LEARNED = "learned"
LEARNED_RUNS = (("online (enhancer)", None),)


# Sizes. Full: 3 iterations of 120 steps (configs/online.py's tiny defaults; the preference
# model's refit 100 steps, a third of the default, for time: it dominates the cost), each online run
# evaluated every half iteration, and B = 192 oracle calls per iteration (576 per run), the
# candidate pairs drawn from 1536 prompts per iteration so the budget is filled even when most of
# the main agent's samples are the best; offline labels 576 pairs of 1536 prompts, at each τ of
# OFFLINE_TAUS, evaluated at 7 checkpoints up to the online runs' 360 steps. Test: 2400 prompts x
# 2 samples per side (a point's 95% half-width about 1.2-1.5 points); validation 600 x 2.
SIZES = {
    "full": {"iterations": 3, "steps": 120, "budget": 192, "prompts": 1536, "samples": 4,
             "fit_steps": 100, "offline_prompts": 1536,
             "offline_grid": (30, 60, 120, 180, 240, 300, 360), "validation": 600, "test": 2400,
             "eval_samples": 2, "seeds": "0,1,2", "sft_steps": 1000,
             "offline_taus": OFFLINE_TAUS, "oracle_steps": 1500},
    "quick": {"iterations": 2, "steps": 6, "budget": 12, "prompts": 48, "samples": 4,
              "fit_steps": 6, "offline_prompts": 64, "offline_grid": (4, 8, 12),
              "validation": 24, "test": 32, "eval_samples": 1, "seeds": "0,1",
              "sft_steps": 300, "offline_taus": (0.1,), "oracle_steps": 20},
}


def runs_for(taus: Sequence[float]) -> tuple[tuple[str, float | None], ...]:
  """Each seed's and oracle's runs: (method, offline τ or None)."""
  return tuple([(method, None) for method in METHODS[:2]] + [("offline", tau) for tau in taus])


RUNS = runs_for(OFFLINE_TAUS)


def run_name(seed: int, oracle: str, method: str, tau: float | None = None) -> str:
  return (f"seed_{seed}/{oracle.replace(':', '_')}/{TAGS[method]}"
          + ("" if tau is None else f"_tau_{tau:g}"))


def oracle_calls(judge_calls: Mapping[str, int], preference_model: str) -> int:
  """The oracle's calls in a run's `judge_calls`: labelling, plus the tournament's when the
  oracle itself ranks (`preference_model='oracle'`; a learned ranker's calls cost no oracle)."""
  calls = int(judge_calls["labelling"])
  if preference_model == "oracle":
    calls += int(judge_calls["tournament"])
  return calls


# ------------------------------------------------------------------------------------ the runs


class Bench:
  def __init__(self, output: str, size: Mapping[str, Any], seeds: Sequence[int],
               oracles: Sequence[str], sft: str | None = None, data_cache: str | None = None):
    self.output, self.size, self.seeds, self.oracles = output, dict(size), list(seeds), oracles
    self.cache_dir = data_cache or os.path.join(output, "data_cache")
    self.sft_arg = sft
    self.sft_dir = sft or os.path.join(output, "sft")
    self.records_dir = os.path.join(output, "records")
    self.runs = runs_for(self.size["offline_taus"])

  # ------------------------------------------------------------------------- shared inputs

  def prepare(self) -> None:
    """The prompt sets' files and the SFT policy (trained once, before any worker starts)."""
    import protocol
    for name, prompts in self.drawn_sets().items():
      protocol.write_prompts(self.prompts_path(name), prompts)
    if not self.sft_arg:
      from dro_jax import online
      online.train_sft(self.base_config(0, "demo"), self.output)
    if LEARNED in self.oracles:
      self.train_learned_oracle()

  def learned_oracle_dir(self) -> str:
    return os.path.join(self.output, "preference_model")

  def train_learned_oracle(self) -> None:
    """configs/preference_model.py at size=tiny on the demo's labelled pairs (its train split;
    its held-out accuracy logged on the validation split), resumed or read back when done."""
    from dro_jax import configs, train
    steps = int(self.size["oracle_steps"])
    config = configs.load("preference_model", "size=tiny")
    config.data.cache_dir = self.cache_dir
    config.max_input_length, config.max_target_length = 16, 12  # the demo's lengths
    config.total_steps, config.batch_size = steps, 32
    config.eval_every = config.checkpoint_every = max(steps // 3, 1)
    config.eval_batches = 200 // 32  # the pairs task's 200 validation pairs
    config.optimizer.learning_rate = 1e-3
    train.run(config, self.learned_oracle_dir())

  def oracle_spec(self, oracle: str) -> str:
    return f"preference_model:{self.learned_oracle_dir()}" if oracle == LEARNED else oracle

  def prompts_path(self, name: str) -> str:
    return os.path.join(self.output, "prompts", f"{name}.jsonl")

  def drawn_sets(self) -> dict[str, list[str]]:
    """The validation and test prompts (deterministic in the size: written once by `prepare`)."""
    import protocol
    return dict(protocol.prompt_sets(self.size["validation"], self.size["test"]))

  def sets(self) -> dict[str, list[str]]:
    from dro_jax import datasets
    if not all(os.path.exists(self.prompts_path(name)) for name in ("validation", "test")):
      return self.drawn_sets()  # a report rebuilt from results.json alone
    return {name: datasets.read_prompts(self.prompts_path(name)) for name in ("validation", "test")}

  def base_config(self, seed: int, oracle: str, arg: str = ""):
    from dro_jax import configs
    config = configs.load("online", f"size=tiny,seed={seed},oracle={self.oracle_spec(oracle)}"
                          + arg)
    config.data.cache_dir = self.cache_dir
    config.online.sft_steps = int(self.size["sft_steps"])
    return config

  def config(self, seed: int, oracle: str, method: str, tau: float | None = None):
    size = self.size
    pairing = "enhancer" if method == "online (enhancer)" else "best_worst"
    config = self.base_config(seed, oracle, f",pairing={pairing},preference_model=fit")
    config.init_checkpoint = self.sft_dir
    settings = config.online
    settings.fit_steps = int(size["fit_steps"])
    # The settings the published run (benchmarks/results/online_vs_offline) was made with: the
    # enhancer ranks the n answers, the main agent's among them, and labels are thresholded
    # (the demo oracle's verdicts are hard, so the labels are the same as Bernoulli draws).
    settings.enhancer, settings.labels = "shared", "threshold"
    if oracle == LEARNED:  # the paper's general oracle: labels drawn from its probabilities
      settings.labels = "bernoulli"
    # The loop's own per-iteration check, kept small: the protocol's evaluation is the report.
    config.evaluation.judge = "demo"
    config.evaluation.prompts, config.evaluation.samples = 16, 1
    settings.eval_prompts_file = self.prompts_path("validation")
    if method == "offline":
      grid = tuple(size["offline_grid"])
      settings.iterations, settings.samples = 1, 2
      settings.prompts, settings.steps = int(size["offline_prompts"]), max(grid)
      settings.max_oracle_calls = int(size["budget"]) * int(size["iterations"])
      config.ipo.tau = float(tau)
      config.checkpoint_every = math.gcd(*grid)
    else:
      settings.iterations, settings.samples = int(size["iterations"]), int(size["samples"])
      settings.prompts, settings.steps = int(size["prompts"]), int(size["steps"])
      settings.max_oracle_calls = int(size["budget"])
      config.checkpoint_every = max(settings.steps // 2, 1)
    config.total_steps = settings.steps * settings.iterations
    config.keep_last = config.total_steps // config.checkpoint_every + 1  # every point kept
    config.log_every = max(settings.steps // 10, 1)
    return config

  def jobs(self) -> list[tuple[int, str, str, float | None]]:
    return [(seed, oracle, method, tau) for seed in self.seeds for oracle in self.oracles
            for method, tau in (LEARNED_RUNS if oracle == LEARNED else self.runs)]

  def record_path(self, name: str) -> str:
    return os.path.join(self.records_dir, name.replace("/", "__") + ".json")

  def run_job(self, seed: int, oracle: str, method: str, tau: float | None, evaluator
              ) -> dict[str, Any]:
    """One run (trained, or resumed, or read back) and its points' evaluations."""
    from dro_jax import online
    import protocol
    name = run_name(seed, oracle, method, tau)
    record = files.read_json(self.record_path(name))
    if record is not None:
      return record
    config = self.config(seed, oracle, method, tau)
    workdir = os.path.join(self.output, name)
    start = time.perf_counter()
    result = online.run(config, workdir)
    trained = time.perf_counter() - start
    train_prompts = sorted({row["prompt"] for k in range(1, config.online.iterations + 1)
                            for row in online.read_jsonl(os.path.join(
                                workdir, "iterations", str(k), "samples.jsonl"))})
    protocol.check_disjoint({"train": train_prompts, **evaluator.sets})
    judged = [files.read_json(os.path.join(workdir, "iterations", str(it["iteration"]),
                                           "judged.json")) for it in result["iterations"]]
    points = []
    if method == "offline":
      steps = [(None, s) for s in self.size["offline_grid"]]
    else:  # every half iteration; the iterates are the whole ones
      every = config.checkpoint_every
      steps = [(s / config.online.steps, s) for s in range(every, config.total_steps + 1, every)]
    for iteration, step in steps:
      splits = ("validation", "test") if method == "offline" else ("test",)
      policy = iterate_policy(workdir, step)
      evaluated = evaluator(policy, os.path.join(workdir, "protocol", str(step)), splits)
      points.append({"iteration": iteration, "step": step, **evaluated})
    record = {
        "seed": seed, "oracle": oracle, "method": method, "tau": float(config.ipo.tau),
        "workdir": workdir,
        "oracle_calls": oracle_calls(result["judge_calls"], config.online.preference_model),
        "judge_calls": result["judge_calls"], "preference_model": config.online.preference_model,
        "labelled_pairs": sum(j["pairs"] for j in judged),
        "ties": sum(j["dropped_tie"] for j in judged),
        "per_iteration": [{"iteration": j_it, "labelling_calls": None, "pairs": j["pairs"],
                           "ties": j["dropped_tie"], "identical": j["dropped_identical"],
                           "not_asked": j.get("dropped_over_cap", 0), "ranker": j["ranker"]}
                          for j_it, j in enumerate(judged, 1)],
        "train_prompts": len(train_prompts), "points": points,
        "ranker_agreement": None if method == "offline" else ranker_agreement(workdir),
        "seconds": {"train": trained, "total": time.perf_counter() - start}}
    for row, j in zip(record["per_iteration"], judged):
      row["labelling_calls"] = j["judge_calls"]["labelling"]
    files.write_text(self.record_path(name), json.dumps(record, indent=1))
    print(f"[online_vs_offline] {name}: {record['oracle_calls']} oracle calls, "
          f"{record['labelled_pairs']} pairs kept; test win rate "
          + ", ".join(f"{p['test']['win_rate']:.1%} (KL {p['test']['kl']:.2f})" for p in points),
          flush=True)
    return record

  def work(self, part: int = 0, parts: int = 1) -> None:
    """This worker's share of the runs (every `parts`-th, from `part`)."""
    evaluators: dict[int, Any] = {}
    for index, (seed, oracle, method, tau) in enumerate(self.jobs()):
      if index % parts != part:
        continue
      if seed not in evaluators:
        evaluators[seed] = self.evaluator(seed)
      self.run_job(seed, oracle, method, tau, evaluators[seed])

  def evaluator(self, seed: int):
    import types
    import seqio
    import protocol
    from dro_jax import policies
    from dro_jax.data import synthetic
    config = self.base_config(seed, "demo")
    lengths = types.SimpleNamespace(
        max_input_length=config.max_input_length,
        demo=types.SimpleNamespace(max_decode_length=config.evaluation.max_decode_length
                                   or config.max_target_length))
    synthetic.register_demo_tasks(self.cache_dir, sft_examples=config.online.sft_examples)
    vocabulary = seqio.SentencePieceVocabulary(synthetic.demo_vocabulary(self.cache_dir))
    sft = policies.load_policy(self.sft_dir).policy
    return protocol.Evaluator(lengths, sft, vocabulary, self.sets(), seed,
                              int(self.size["eval_samples"]), judge="demo")

  def previous(self) -> dict[str, Any]:
    """The last report's results.json in <output> ({} if none): it holds every finished run's
    record, so `--report` rebuilds the report from it alone once the runs' folders are gone."""
    return files.read_json(os.path.join(self.output, "results.json")) or {}

  def records(self) -> dict[str, dict[str, Any]]:
    found = {}
    kept = self.previous().get("runs", {})
    for seed, oracle, method, tau in self.jobs():
      name = run_name(seed, oracle, method, tau)
      record = files.read_json(self.record_path(name)) or kept.get(name)
      if record is not None:
        found[name] = record
    return found


def ranker_agreement(workdir: str) -> list[float | None]:
  """Per iteration of a run: the fraction of its kept pairs whose oracle label agrees with the
  ranker (the chosen answer is the one the tournament ranked best): about ½ for a random ranking
  (the first iteration), above it for a ranker that learned the oracle. None where the files are
  gone."""
  from dro_jax import online
  shares = []
  for k in range(1, 100):
    judged = files.read_json(os.path.join(workdir, "iterations", str(k), "judged.json"))
    if judged is None:
      break
    pairs = online.read_jsonl(os.path.join(workdir, "iterations", str(k), "pairs.jsonl"))
    agree = [pair["chosen_index"] == judged["best"][pair["row"]] for pair in pairs]
    shares.append(float(np.mean(agree)) if agree else None)
  return shares


def iterate_policy(workdir: str, step: int):
  """The policy a run's checkpoint holds at `step`."""
  from dro_jax import policies
  return policies.load_policy(os.path.join(workdir, "checkpoints", str(step))).policy


# --------------------------------------------------------------------------------- the report


def tables(runs: Sequence[Mapping[str, Any]], split: str, index: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
  """(scores, kls) [seeds, prompts] of point `index` of these runs (one per seed, in order)."""
  import protocol
  scores = np.stack([protocol.unpack(run["points"][index][split]["prompt_scores"])
                     for run in runs])
  kls = np.stack([protocol.unpack(run["points"][index][split]["prompt_kl"]) for run in runs])
  return scores, kls


def choose_offline(runs: Sequence[Mapping[str, Any]], oracle: str
                   ) -> tuple[tuple[float, int], dict[str, Any]]:
  """Offline's (τ, steps) for `oracle`: the grid's point with the best mean VALIDATION win rate
  over the seeds (protocol.choose; nothing of the test results is read)."""
  import protocol
  candidates: dict[str, list[Mapping[str, Any]]] = {}
  keys = {}
  for run in runs:
    if run["method"] != "offline" or run["oracle"] != oracle:
      continue
    for point in run["points"]:
      label = f"τ {run['tau']:g}, {point['step']} steps"
      keys[label] = (float(run["tau"]), int(point["step"]))
      candidates.setdefault(label, []).append({"validation": point["validation"]})
  pick, record = protocol.choose(f"offline τ and steps ({oracle})", candidates)
  return keys[pick], record


def complete_seeds(records: Mapping[str, Mapping[str, Any]], oracle: str,
                   runs: Sequence[tuple[str, float | None]] = RUNS) -> list[int]:
  seeds = sorted({r["seed"] for r in records.values()})
  return [s for s in seeds if all(run_name(s, oracle, m, tau) in records for m, tau in runs)]


def anchored(curve: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
  """A curve with SFT itself in front: win rate ½ and KL 0 on every prompt, exactly (the policy
  is SFT), so a level just below a curve's first measured KL still reads inside it."""
  scores, _ = curve[0]
  return [(np.full_like(scores, 0.5), np.zeros_like(scores))] + list(curve)


def oracle_report(records: Mapping[str, Mapping[str, Any]], oracle: str,
                  run_keys: Sequence[tuple[str, float | None]] = RUNS) -> dict[str, Any] | None:
  """Points, the choice, the paired differences and the matched-KL cells of one oracle, over
  the seeds whose every run is finished (all read under one set of bootstrap replicates)."""
  import protocol
  seeds = complete_seeds(records, oracle, run_keys)
  if not seeds:
    return None
  runs = {(m, tau): [records[run_name(s, oracle, m, tau)] for s in seeds]
          for m, tau in run_keys}
  budgets = {run_name(0, oracle, m, tau).split("/")[-1]: sorted({r["oracle_calls"] for r in
                                                                  group})
             for (m, tau), group in runs.items()}
  equal = len({calls for values in budgets.values() for calls in values}) == 1
  (tau, steps), choice = choose_offline([r for group in runs.values() for r in group], oracle)
  prompts = tables(runs[run_keys[0]], "test", 0)[0].shape[1]
  replicates = protocol.Replicates(len(seeds), prompts)
  curves: dict[tuple[str, float | None], list[tuple[np.ndarray, np.ndarray]]] = {}
  points = []
  for (method, run_tau), group in runs.items():
    curves[(method, run_tau)] = []
    for index, point in enumerate(group[0]["points"]):
      scores, kls = tables(group, "test", index)
      curves[(method, run_tau)].append((scores, kls))
      mean, low, high = protocol.point_interval(scores, replicates)
      record = {"method": method, "tau": group[0]["tau"], "iteration": point["iteration"],
                "step": point["step"],
                "chosen": method == "offline" and run_tau == tau and point["step"] == steps,
                "test": {"win_rate": mean, "win_rate_low": low, "win_rate_high": high,
                         "kl": float(kls.mean())}}
      if method == "offline":
        record["validation"] = {key: float(np.mean([r["points"][index]["validation"][key]
                                                    for r in group]))
                                for key in ("win_rate", "kl")}
      points.append(record)
  offline_steps = [p["step"] for p in runs[("offline", tau)][0]["points"]]
  method_curves = {"online (enhancer)": curves[("online (enhancer)", None)],
                   "online (best-worst)": curves[("online (best-worst)", None)],
                   "offline": curves[("offline", tau)]}
  final = {"online (enhancer)": method_curves["online (enhancer)"][-1],
           "online (best-worst)": method_curves["online (best-worst)"][-1],
           "offline": method_curves["offline"][offline_steps.index(steps)]}
  pairs = (("online (enhancer)", "offline"), ("online (best-worst)", "offline"),
           ("online (best-worst)", "online (enhancer)"))
  differences = []
  for a, b in pairs:
    mean, low, high = protocol.paired_difference(final[a][0], final[b][0], replicates)
    cell = {"a": a, "b": b, "difference": mean, "low": low, "high": high,
            "kl_a": float(final[a][1].mean()), "kl_b": float(final[b][1].mean())}
    cell["verdict"] = verdict(cell)
    differences.append(cell)
  # At matched KL, offline is the chosen τ's checkpoints, and also each other τ's (a curve is
  # no choice; it reaches KLs the chosen one may not).
  others = [t for (m, t) in runs if m == "offline" and t != tau]
  for other in others:
    method_curves[f"offline (τ {other:g})"] = curves[("offline", other)]
  matched = []
  for a, b in pairs + tuple((online_method, f"offline (τ {other:g})") for other in others
                            for online_method in METHODS[:2]):
    for level in matched_levels(method_curves[a], method_curves[b]):
      cell = {"a": a, "b": b, "kl": level,
              "between_a": bracket(method_curves[a], level),
              "between_b": bracket(method_curves[b], level)}
      for reading, log_kl in (("linear", False), ("log", True)):
        cell[reading] = protocol.matched_difference(anchored(method_curves[a]),
                                                    anchored(method_curves[b]), level, log_kl,
                                                    replicates)
      cell["verdict"] = matched_verdict(cell)
      matched.append(cell)
  labelled = {run_name(0, oracle, m, t).split("/")[-1]: float(np.mean(
      [r["labelled_pairs"] for r in group])) for (m, t), group in runs.items()}
  ties = {run_name(0, oracle, m, t).split("/")[-1]: float(np.mean([r["ties"] for r in group]))
          for (m, t), group in runs.items()}
  agreement = {}
  for (m, t), group in runs.items():
    if m == "offline":
      continue
    # Kept in the record since it was run; read from the run's folder for older records.
    per_run = [r.get("ranker_agreement") or (ranker_agreement(r["workdir"]) if os.path.isdir(
        r.get("workdir") or "") else None) for r in group]
    per_run = [shares for shares in per_run if shares and None not in shares]
    if len(per_run) == len(group) and len({len(shares) for shares in per_run}) == 1:
      agreement[m] = [float(v) for v in np.mean(per_run, axis=0)]
  half_width = max((p["test"]["win_rate_high"] - p["test"]["win_rate_low"]) / 2 for p in points)
  return {"oracle": oracle, "seeds": seeds, "test_prompts": prompts,
          "largest_half_width": half_width,
          "evaluation_half_width": evaluation_half_width(
              [r for group in runs.values() for r in group]),
          "ranker_agreement": agreement,
          "oracle_calls": budgets, "equal_oracle_calls": equal, "labelled_pairs": labelled,
          "ties": ties, "offline_tau": tau, "offline_steps": steps, "choice": choice,
          "points": points, "paired_differences": differences, "matched_kl": matched}


def evaluation_half_width(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Evaluation noise alone: each point's own 95% half-width on test for one seed (its interval
  over test prompts, clustered by prompt), the largest and the median over every run and point.
  The protocol asks the largest to be at most 1.5 points; the two-level intervals add the
  training seeds' spread to it."""
  widths = [(point["test"]["win_rate_high"] - point["test"]["win_rate_low"]) / 2
            for run in runs for point in run["points"]]
  return {"largest": float(max(widths)), "median": float(np.median(widths))}


def learned_report(records: Mapping[str, Mapping[str, Any]], seeds: Sequence[int],
                   oracle_dir: str) -> dict[str, Any] | None:
  """How much of the true oracle's gain survives a learned one: online (enhancer)'s final
  iterate under `learned` and under `demo`, on the seeds where both finished, as points, their
  paired difference and the share of the gain over SFT kept (all under one set of replicates)."""
  import protocol
  name = lambda seed, oracle: run_name(seed, oracle, "online (enhancer)")
  seeds = [s for s in seeds if name(s, LEARNED) in records and name(s, "demo") in records]
  if not seeds:
    return None
  learned, true = (tables([records[name(s, o)] for s in seeds], "test", -1)
                   for o in (LEARNED, "demo"))
  replicates = protocol.Replicates(len(seeds), learned[0].shape[1])
  report = {"seeds": seeds, "method": "online (enhancer)", "iterate": "final"}
  for label, (scores, kls) in (("learned", learned), ("true", true)):
    mean, low, high = protocol.point_interval(scores, replicates)
    report[label] = {"win_rate": mean, "win_rate_low": low, "win_rate_high": high,
                     "kl": float(kls.mean())}
  mean, low, high = protocol.paired_difference(learned[0], true[0], replicates)
  report["difference"] = {"difference": mean, "low": low, "high": high}
  report["difference"]["verdict"] = verdict({"a": "learned", "b": "true", **report["difference"]})
  # The share of the gain kept, where the true oracle's gain is above 0 in every replicate
  # (else the ratio is not defined, and is reported as n/a).
  true_gains = replicates.means(true[0]) - 0.5
  if np.all(true_gains > 0):
    gains = (replicates.means(learned[0]) - 0.5) / true_gains
    kept = (float(learned[0].mean()) - 0.5) / (float(true[0].mean()) - 0.5)
    report["gain_kept"] = {"share": kept, "low": float(np.quantile(gains, 0.025)),
                           "high": float(np.quantile(gains, 0.975))}
  else:
    report["gain_kept"] = {"share": math.nan, "low": math.nan, "high": math.nan}
  rows = files.metrics_rows(os.path.join(oracle_dir, "metrics.jsonl"))
  accuracies = [row["eval/rewards/accuracies"] for row in rows
                if "eval/rewards/accuracies" in row]
  report["oracle_accuracy"] = accuracies[-1] if accuracies else None
  report["oracle_calls"] = sorted({records[name(s, LEARNED)]["oracle_calls"] for s in seeds})
  report["labelled_pairs"] = {o: float(np.mean([records[name(s, o)]["labelled_pairs"]
                                                for s in seeds])) for o in (LEARNED, "demo")}
  report["curve"] = {o: [[float(p["test"]["win_rate"]) for p in records[name(s, o)]["points"]]
                         for s in seeds] for o in (LEARNED, "demo")}
  return report


def matched_levels(curve_a, curve_b, count: int = 3) -> list[float]:
  """`count` KL levels spread inside the overlap of two curves' KL ranges (on the full data),
  10% in from its ends; none when the ranges do not overlap."""
  a = [float(np.mean(kl)) for _, kl in curve_a]
  b = [float(np.mean(kl)) for _, kl in curve_b]
  low, high = max(min(a), min(b)), min(max(a), max(b))
  if not high > low:
    return []
  span = high - low
  return [float(v) for v in np.linspace(low + 0.1 * span, high - 0.1 * span, count)]


def bracket(curve, level: float) -> list[float]:
  """The measured KLs (full data) of the two points of a curve on either side of `level`: a
  wide bracket means the matched value there is a chord across a gap under either reading."""
  kls = sorted(float(np.mean(kl)) for _, kl in curve)
  below = [kl for kl in kls if kl <= level]
  above = [kl for kl in kls if kl >= level]
  return [below[-1] if below else 0.0, above[0] if above else math.nan]


def verdict(cell: Mapping[str, Any]) -> str:
  if cell["low"] > 0:
    return f"{cell['a']} better"
  if cell["high"] < 0:
    return f"{cell['b']} better"
  return "indistinguishable at this size"


def matched_verdict(cell: Mapping[str, Any]) -> str:
  """A matched cell's reading: no claim when either interpolation has no value there, or the
  two differ by more than the linear reading's half-width; else as `verdict`."""
  linear, log = cell["linear"], cell["log"]
  if not (math.isfinite(linear["difference"]) and math.isfinite(log["difference"])):
    return "no claim (outside a curve)"
  half = (linear["high"] - linear["low"]) / 2
  if abs(linear["difference"] - log["difference"]) > half:
    return "no claim (the interpolations disagree)"
  both = [verdict({"a": cell["a"], "b": cell["b"], **reading}) for reading in (linear, log)]
  return both[0] if both[0] == both[1] else "indistinguishable at this size"


def point_label(point: Mapping[str, Any]) -> str:
  if point["method"] == "offline":
    return f"{point['step']} steps" + (" (chosen)" if point["chosen"] else "")
  iteration = float(point["iteration"])
  if iteration == int(iteration):
    return f"iteration {int(iteration)} (step {point['step']})"
  return f"half-way through iteration {math.ceil(iteration)} (step {point['step']})"


def percent(value: float) -> str:
  return f"{100 * value:.1f}%" if math.isfinite(value) else "n/a"


def points_label(value: float) -> str:
  return f"{100 * value:+.1f}" if math.isfinite(value) else "n/a"


def markdown(summary: Mapping[str, Any], command: str) -> str:
  protocol_record = summary["protocol"]
  size = summary["size"]
  lines = [
      "# Online against offline at equal oracle budgets (demo task)", "",
      f"Produced by `{command}`. Protocol (benchmarks/protocol.py): "
      f"{protocol_record['validation_prompts']} validation and {protocol_record['test_prompts']} "
      f"test prompts (disjoint from each other and from every training prompt), "
      f"{size['eval_samples']} answers per prompt and side, judged by the true judge `demo` "
      f"against SFT; seeds {protocol_record['seeds']} (each replicates everything after SFT); "
      f"95% intervals from the two-level bootstrap over seeds and test prompts; the offline step "
      f"count chosen on validation.", "",
      f"Budget: every run asks the oracle {size['budget']} labelling calls per online iteration, "
      f"{size['budget'] * size['iterations']} in all; the ranker is learned "
      f"(`online.preference_model=fit`), so the tournament asks no oracle. "
      f"`noisy:0.2:demo` flips each verdict with probability 0.2, a fresh draw per query.", ""]
  for oracle, report in summary["oracles"].items():
    if report is None:
      lines += [f"## Oracle `{oracle}`", "", "No seed finished yet.", ""]
      continue
    lines += [f"## Oracle `{oracle}` (seeds {report['seeds']})", "",
              "| run | oracle calls | labelled pairs kept (mean) | ties dropped (mean) |",
              "|---|---|---|---|"]
    for run, calls in report["oracle_calls"].items():
      lines.append(f"| {run} | {', '.join(map(str, calls))} | "
                   f"{report['labelled_pairs'][run]:.0f} | {report['ties'][run]:.0f} |")
    lines += ["", "Equal oracle calls: " + ("yes." if report["equal_oracle_calls"] else
                                            "**no** (a run could not fill its budget)."),
              ""]
    noise = report.get("evaluation_half_width")
    if noise:
      lines.append(f"Evaluation noise: each point's own 95% half-width on test (one seed, over "
                   f"test prompts) is at most {100 * noise['largest']:.1f} points (median "
                   f"{100 * noise['median']:.1f}; the protocol asks at most 1.5).")
    lines += [f"The intervals below, over seeds and test prompts together, are up to "
              f"{100 * report['largest_half_width']:.1f} points wide on either side: they add "
              f"the training seeds' spread.", ""]
    if report.get("ranker_agreement"):
      lines += ["The ranker against the oracle: the share of kept pairs whose label agrees with "
                "the tournament's pick, per iteration (mean over seeds; the first ranks at "
                "random): " + "; ".join(
                    f"{method} " + ", ".join(percent(v) for v in shares)
                    for method, shares in report["ranker_agreement"].items()) + ".", ""]
    choice = report["choice"]
    lines += [f"Offline's τ and steps, chosen on validation (mean win rate over the seeds): "
              + ", ".join(f"{label} {percent(score)}" for label, score in
                          choice["validation"].items())
              + f" -> **{choice['pick']}**.", "",
              "| run | point | test win rate vs SFT [95%] | KL(π‖SFT) |", "|---|---|---|---|"]
    for point in report["points"]:
      where = point_label(point)
      test = point["test"]
      run = point["method"] + (f" τ {point['tau']:g}" if point["method"] == "offline" else "")
      lines.append(f"| {run} | {where} | {percent(test['win_rate'])} "
                   f"[{percent(test['win_rate_low'])}, {percent(test['win_rate_high'])}] | "
                   f"{test['kl']:.2f} |")
    lines += ["", "### Paired differences at equal oracle calls", "",
              "Final iterates against offline at its chosen steps, and the two pairings; in "
              "points of win rate against SFT, on the same test prompts and SFT answers.", "",
              "| a − b | difference [95%] | KL a, b | reading |", "|---|---|---|---|"]
    for cell in report["paired_differences"]:
      lines.append(f"| {cell['a']} − {cell['b']} | {points_label(cell['difference'])} "
                   f"[{points_label(cell['low'])}, {points_label(cell['high'])}] | "
                   f"{cell['kl_a']:.2f}, {cell['kl_b']:.2f} | {cell['verdict']} |")
    lines += ["", "### Paired differences at matched KL", "",
              "Each curve read at the KL level by interpolation along its points (online: its "
              "iterates and half-iterations; `offline`: the chosen τ's checkpoints, `offline (τ "
              "...)`: another τ's; SFT at KL 0 in front), sorted by KL, linear in KL and linear "
              "in log KL. Where a curve's bracketing points are far apart, both readings are "
              "chords across the gap; an online run's KL does not grow with every step (see the "
              "plot), so its points sorted by KL are not its order in training.", "",
              "| a − b | KL | read between the points at KL (a; b) | linear in KL [95%] | "
              "linear in log KL [95%] | reading |",
              "|---|---|---|---|---|---|"]
    for cell in report["matched_kl"]:
      linear, log = cell["linear"], cell["log"]
      gaps = "; ".join("{:.2f}-{:.2f}".format(*cell[key]) for key in ("between_a", "between_b")
                       if key in cell)
      lines.append(f"| {cell['a']} − {cell['b']} | {cell['kl']:.2f} | {gaps} | "
                   f"{points_label(linear['difference'])} [{points_label(linear['low'])}, "
                   f"{points_label(linear['high'])}] | {points_label(log['difference'])} "
                   f"[{points_label(log['low'])}, {points_label(log['high'])}] | "
                   f"{cell['verdict']} |")
    if not report["matched_kl"]:
      lines.append("| (the curves' KL ranges do not overlap) | | | | | |")
    lines.append("")
  if "learned_oracle" in summary:
    lines += learned_markdown(summary["learned_oracle"])
  lines += ["![win rate against KL](online_vs_offline.png)", ""]
  return "\n".join(lines)


def share(kept: Mapping[str, float]) -> str:
  if not math.isfinite(kept["share"]):
    return "n/a (the true oracle's gain is not above 0 throughout its interval)"
  return f"{kept['share']:.0%} [{kept['low']:.0%}, {kept['high']:.0%}]"


def learned_markdown(report: Mapping[str, Any] | None) -> list[str]:
  lines = ["## A learned oracle (`--oracles learned`)", ""]
  if report is None:
    return lines + ["No seed finished under both oracles yet.", ""]
  accuracy = report["oracle_accuracy"]
  lines += [
      "The oracle is a preference model trained by `configs/preference_model.py` (size=tiny) on "
      "the demo's labelled pairs"
      + (f" (held-out pairwise accuracy {percent(accuracy)})" if accuracy is not None else "")
      + f"; online (enhancer), {', '.join(map(str, report['oracle_calls']))} oracle calls per "
      f"run; seeds {report['seeds']}; final iterates judged by the TRUE judge against SFT on the "
      f"test prompts. The learned oracle is not symmetric, so each label costs 2 calls (both "
      f"orders, averaged): {report['labelled_pairs'][LEARNED]:.0f} pairs kept per run against "
      f"the true oracle's {report['labelled_pairs']['demo']:.0f}; its labels are drawn from its "
      f"probabilities.", "",
      "| oracle | test win rate vs SFT [95%] | KL(π‖SFT) |", "|---|---|---|"]
  for label, name in (("true", "`demo` (the true judge)"), ("learned", "learned")):
    point = report[label]
    lines.append(f"| {name} | {percent(point['win_rate'])} [{percent(point['win_rate_low'])}, "
                 f"{percent(point['win_rate_high'])}] | {point['kl']:.2f} |")
  cell, kept = report["difference"], report["gain_kept"]
  lines += ["", f"Learned − true, paired: {points_label(cell['difference'])} points "
            f"[{points_label(cell['low'])}, {points_label(cell['high'])}] ({cell['verdict']}). "
            f"Share of the true oracle's gain over SFT kept: {share(kept)}.", "",
            "Every half iteration (test win rate vs SFT, per seed): "
            + "; ".join(f"{label} " + " / ".join(
                ", ".join(percent(v) for v in curve) for curve in report["curve"][key])
                for label, key in (("learned", LEARNED), ("true", "demo"))) + ".", ""]
  return lines


def plot(summary: Mapping[str, Any], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  reports = [r for r in summary["oracles"].values() if r is not None]
  if not reports:
    return
  figure = Figure(figsize=(5.5 * len(reports), 4.2))
  FigureCanvasAgg(figure)
  axes = np.atleast_1d(figure.subplots(1, len(reports), sharey=True))
  for axis, report in zip(axes, reports):
    for method in METHODS:
      points = [p for p in report["points"] if p["method"] == method and (
          method != "offline" or p["tau"] == report["offline_tau"])]
      x = [p["test"]["kl"] for p in points]
      y = np.array([p["test"]["win_rate"] for p in points])
      error = np.array([[p["test"]["win_rate"] - p["test"]["win_rate_low"] for p in points],
                        [p["test"]["win_rate_high"] - p["test"]["win_rate"] for p in points]])
      label = method + (f" (τ {report['offline_tau']:g})" if method == "offline" else "")
      line = axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label=label)
      for p, xi, yi in zip(points, x, y):
        if method == "offline":
          text = f"{p['step']}" + ("*" if p["chosen"] else "")
        elif float(p["iteration"]) == int(p["iteration"]):
          text = f"{int(p['iteration'])}"
        else:
          continue
        axis.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7,
                      color=line.lines[0].get_color())
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axis.set(title=f"oracle {report['oracle']}", xlabel="KL(π‖SFT), nats per answer (test)")
  axes[0].set(ylabel="test win rate vs SFT (true judge, 95%)")
  axes[0].legend(loc="lower right", fontsize=8, title_fontsize=7,
                 title="online: iteration (and half-way points); offline: steps (* chosen)")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def summarise(bench: Bench, command: str) -> dict[str, Any]:
  import protocol
  records = bench.records()
  sets = bench.sets()
  previous = bench.previous()
  summary = {
      "protocol": {"validation_prompts": len(sets["validation"]),
                   "test_prompts": len(sets["test"]), "selection": "validation",
                   "seeds": bench.seeds, "eval_samples": bench.size["eval_samples"],
                   "judge": "demo", "bootstrap": "seeds x test prompts",
                   "resamples": protocol.RESAMPLES},
      "size": {key: (list(value) if isinstance(value, tuple) else value)
               for key, value in bench.size.items()},
      "oracles": {oracle: oracle_report(records, oracle, bench.runs)
                  for oracle in bench.oracles if oracle != LEARNED},
      "runs": records}
  if LEARNED in bench.oracles:
    summary["learned_oracle"] = learned_report(records, bench.seeds, bench.learned_oracle_dir())
  # What only the runs' folders hold (the ranker's agreement, the learned oracle's accuracy) is
  # kept from the last report where those folders are gone, for the same seeds.
  for oracle, report in summary["oracles"].items():
    before = (previous.get("oracles") or {}).get(oracle) or {}
    if report is not None and before.get("seeds") == report["seeds"]:
      for method, shares in (before.get("ranker_agreement") or {}).items():
        report["ranker_agreement"].setdefault(method, shares)
  learned, before = summary.get("learned_oracle"), previous.get("learned_oracle") or {}
  if learned and learned.get("oracle_accuracy") is None and before.get("seeds") == learned["seeds"]:
    learned["oracle_accuracy"] = before.get("oracle_accuracy")
  summary["choices"] = {oracle: report["choice"] for oracle, report in
                        summary["oracles"].items() if report is not None}
  files.write_text(os.path.join(bench.output, "results.json"), json.dumps(summary, indent=1))
  text = markdown(summary, command)
  files.write_text(os.path.join(bench.output, "online_vs_offline.md"), text)
  plot(summary, os.path.join(bench.output, "online_vs_offline.png"))
  return summary


def estimate(size: Mapping[str, Any], seeds: int, oracles: int, workers: int) -> str:
  """The run's work, and a wall-time estimate from per-unit costs measured on the 2-core
  machine with one worker per core (the constants below)."""
  offline_runs = len(size["offline_taus"])
  runs = seeds * oracles * (2 + offline_runs)
  groups = seeds * oracles
  policy_steps = groups * (2 * size["iterations"] * size["steps"]
                           + offline_runs * max(size["offline_grid"]))
  fit_steps = groups * 2 * (size["iterations"] - 1) * size["fit_steps"]
  tests = groups * (2 * 2 * size["iterations"] + offline_runs * len(size["offline_grid"]))
  validations = groups * offline_runs * len(size["offline_grid"])
  answers = (tests * size["test"] + validations * size["validation"]) * size["eval_samples"]
  seconds = (policy_steps * STEP_SECONDS + fit_steps * FIT_STEP_SECONDS
             + answers * ANSWER_SECONDS + runs * RUN_SECONDS)
  return (f"{runs} runs: {policy_steps} policy and {fit_steps} preference-model steps, "
          f"{tests} test and {validations} validation evaluations ({answers} answers judged "
          f"against SFT's); about {seconds / 3600 / workers:.1f} h with {workers} worker(s)")


# Per-unit costs with one worker per core of the 2-core machine, nothing else running (about 4x
# more when other jobs share it): a policy step (batch 64), a
# preference-model step (inputs of 64 tokens), an answer sampled, scored and judged, and a run's
# fixed cost (compilations, sampling and ranking the training prompts).
STEP_SECONDS = 0.3
FIT_STEP_SECONDS = 1.0
ANSWER_SECONDS = 0.002
RUN_SECONDS = 120


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick 0,1)")
  parser.add_argument("--oracles", default=",".join(ORACLES),
                      help=f"comma-separated judge specs (default {','.join(ORACLES)})")
  parser.add_argument("--quick", action="store_true", help="tiny runs and prompt sets (a smoke "
                      "test; its numbers mean nothing)")
  parser.add_argument("--sft", default=None, help="an SFT workdir of the online loop's demo "
                      "model (default: trained in <output>/sft)")
  parser.add_argument("--data_cache", default=None, help="the demo data's folder (default: "
                      "<output>/data_cache; with --sft, the one it was trained with)")
  parser.add_argument("--workers", type=int, default=1, help="runs trained at once, each worker "
                      "a process of its own (default 1)")
  parser.add_argument("--report", action="store_true", help="only write the report from the "
                      "finished runs")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  size = SIZES["quick" if args.quick else "full"]
  seeds = [int(s) for s in (args.seeds or size["seeds"]).split(",")]
  oracles = [o for o in args.oracles.split(",") if o]
  from dro_jax import judge_specs
  for oracle in oracles:
    if oracle != LEARNED:
      judge_specs.check(oracle, "--oracles")
  if LEARNED in oracles and "demo" not in oracles:
    parser.error("--oracles learned is compared with the true oracle: give demo as well")
  bench = Bench(args.output, size, seeds, oracles, sft=args.sft, data_cache=args.data_cache)
  workers = max(int(args.workers), 1)
  from dro_jax import console
  console.initialize_backends()  # without the start-up notices of devices this machine lacks
  if args.worker is not None:
    bench.work(args.worker, workers)
    return
  command = "python benchmarks/online_vs_offline.py --output DIR" + (
      " --quick" if args.quick else f" --workers {workers}") + (
      "" if oracles == list(ORACLES) else f" --oracles {','.join(oracles)}")
  if not args.report:
    print(f"[online_vs_offline] {estimate(size, len(seeds), len(oracles), workers)}",
          flush=True)
    bench.prepare()
    argv = list(sys.argv[1:] if argv is None else argv)
    children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv,
                                  "--worker", str(part)]) for part in range(1, workers)]
    try:
      bench.work(0, workers)
    except BaseException:
      for child in children:
        child.terminate()
      raise
    failed = [child.args for child in children if child.wait() != 0]
    if failed:
      raise SystemExit(f"online_vs_offline: {len(failed)} worker(s) failed; run the same "
                       f"command again to resume")
  summary = summarise(bench, command)
  for oracle, report in summary["oracles"].items():
    if report is None:
      continue
    for cell in report["paired_differences"]:
      print(f"[online_vs_offline] {oracle}: {cell['a']} − {cell['b']}: "
            f"{points_label(cell['difference'])} points [{points_label(cell['low'])}, "
            f"{points_label(cell['high'])}] ({cell['verdict']})", flush=True)
  learned = summary.get("learned_oracle")
  if learned:
    kept = learned["gain_kept"]
    print(f"[online_vs_offline] learned oracle: {percent(learned['learned']['win_rate'])} against "
          f"the true oracle's {percent(learned['true']['win_rate'])}; difference "
          f"{points_label(learned['difference']['difference'])} points "
          f"[{points_label(learned['difference']['low'])}, "
          f"{points_label(learned['difference']['high'])}]; gain kept {share(kept)}", flush=True)
  print(f"[online_vs_offline] report in {os.path.join(args.output, 'online_vs_offline.md')}",
        flush=True)


if __name__ == "__main__":
  main()

"""The protocol every benchmark in this folder follows: prompt sets, evaluation, selection and
uncertainty, so that a number in a results table means the same thing everywhere.

Prompt sets. The demo task's prompt space is split by hashing each prompt, so the three sets are
disjoint by construction (`split`) and `check_disjoint` verifies it on the lists themselves:
  train        every prompt outside the demo's held-out tenth (`synthetic.is_eval_prompt`): SFT
               demonstrations, judged training samples, the online loop's prompts
  validation   a quarter of the held-out tenth: every choice a sweep makes (learning rates, τ,
               which point is best, offline's steps) reads only results on these prompts
  test         the other three quarters: judged once per point, reported, never read by a choice

Evaluation (`Evaluator`). Per seed, the policy's answers and SFT's answers to the validation and
test prompts (each seed its own sampling seeds; within a seed every method faces the same SFT
answers, so methods are paired on the same prompts and baseline answers), judged by the true
judge; the result keeps each prompt's mean verdict and mean log-ratio (`prompt_scores`,
`prompt_kl`) for the bootstrap.

Uncertainty. A point is a (method, setting) run over seeds; its scores form a seeds x prompts
table. Seeds and prompts are crossed factors (every seed is judged on every test prompt), so the
interval resamples both: each bootstrap replicate draws seeds with replacement and, independently,
prompts with replacement, and takes the mean over the drawn cells (the pigeonhole bootstrap for
crossed random effects). Its variance estimate holds the between-seed term (training order,
training samples, evaluation sampling), the between-prompt term and their interaction, so it is
at least as wide as either a seeds-only or a prompts-only interval; with one seed it is the
prompt bootstrap. Every point, curve and difference of one report uses the same replicates (the
same drawn seeds and prompts), so differences between methods are paired: the spread of a
difference leaves out what the two methods share (the prompts' difficulty, SFT's answers).

Matched KL. A method's win rate at a KL level is read off its curve (its points, ordered by KL)
by linear interpolation, in KL or in log KL; per replicate, so the interval of a matched value
or difference holds the uncertainty of both axes. A level outside a replicate's KL range gives
no value there (no extrapolation); a cell with more than `MAX_OUTSIDE` of its replicates
outside is not reported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dro_jax.data import synthetic

SPLITS = ("train", "validation", "test")
RESAMPLES = 2000
LEVEL = 0.95
MAX_OUTSIDE = 0.1  # a matched cell needs its level inside the curve in 90% of the replicates
LOG_FLOOR = 1e-3  # nats: KL estimates below it (or negative) are read as this under log KL


# ------------------------------------------------------------------------------- prompt sets


def split(prompt: str) -> str:
  """Which set a demo prompt belongs to: "train", "validation" or "test"."""
  if not synthetic.is_eval_prompt(prompt):
    return "train"
  return "validation" if hashlib.sha256(f"split:{prompt}".encode()).digest()[0] % 4 == 0 \
      else "test"


def prompt_sets(validation: int, test: int, seed: int = 0) -> dict[str, list[str]]:
  """`validation` and `test` distinct held-out demo prompts (deterministic in `seed`)."""
  count = 4 * validation + 2 * test + 64
  while True:
    sets: dict[str, list[str]] = {"validation": [], "test": []}
    for problem in synthetic.sample_problems(count, seed, evaluation=True):
      sets[split(problem.prompt)].append(problem.prompt)
    if len(sets["validation"]) >= validation and len(sets["test"]) >= test:
      sets = {"validation": sets["validation"][:validation], "test": sets["test"][:test]}
      check_disjoint(sets)
      return sets
    count *= 2


def check_disjoint(sets: Mapping[str, Sequence[str]]) -> None:
  """Raises ValueError naming the first prompt two sets share (or an evaluation set holding a
  prompt twice, or a prompt of the wrong split). Training prompts may repeat."""
  names = list(sets)
  for i, first in enumerate(names):
    for second in names[i + 1:]:
      shared = set(sets[first]) & set(sets[second])
      if shared:
        raise ValueError(f"protocol: the {first} and {second} prompts share "
                         f"{len(shared)} prompts, e.g. {sorted(shared)[0]!r}")
  for name in names:
    if name != "train" and len(set(sets[name])) != len(sets[name]):
      raise ValueError(f"protocol: the {name} prompts repeat a prompt")
    wrong = [p for p in sets[name] if name in SPLITS and split(p) != name]
    if wrong:
      raise ValueError(f"protocol: {wrong[0]!r} is in the {name} prompts but belongs to "
                       f"{split(wrong[0])}")


def digest(sets: Mapping[str, Sequence[str]]) -> str:
  """A short sha256 of the prompt sets (a resumed run must use the same ones)."""
  return hashlib.sha256(json.dumps({k: list(v) for k, v in sets.items()},
                                   sort_keys=True).encode()).hexdigest()[:16]


def write_prompts(path: str, prompts: Sequence[str]) -> str:
  """A prompts file (`path` ends in .jsonl: one {"prompt": ...} per line), as `online.eval_prompts_file`
  reads it."""
  from dro_jax import files
  files.write_text(path, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  return path


# ------------------------------------------------------------------------------- evaluation


def pack(values: Sequence[float]) -> str:
  """Per-prompt values as base64 float16 (verdict means of a few samples are exact; log-ratios
  keep 3 significant digits): a point's test prompts stay a few kB in a results file."""
  return base64.b64encode(np.asarray(values, "<f2").tobytes()).decode()


def unpack(text: str) -> np.ndarray:
  return np.frombuffer(base64.b64decode(text), "<f2").astype(np.float64)


class Evaluator:
  """One seed's evaluation of policies against SFT on the validation and test prompts.

  `demo`: the demo config (lengths, decode length); `samples`: answers per prompt and side.
  A policy's result is cached in <workdir>/protocol_evaluation.json under the protocol's
  signature (prompt sets, samples, seed, judge), so a resumed sweep judges nothing twice.
  """

  def __init__(self, demo, sft, vocabulary, sets: Mapping[str, Sequence[str]], seed: int,
               samples: int, judge: str = "demo"):
    from dro_jax import decoding, judges
    self.demo, self.sft, self.vocabulary, self.seed = demo, sft, vocabulary, int(seed)
    self.sets = {name: list(prompts) for name, prompts in sets.items()}
    check_disjoint(self.sets)
    self.sampling = decoding.SamplingParams(max_decode_length=demo.demo.max_decode_length,
                                            temperature=1.0, num_samples=int(samples))
    self.judge_spec = judge
    self.judge = judges.judge_from_spec(judge)
    self.baselines: dict[str, Any] = {}
    digest = hashlib.sha256(json.dumps([self.sets, samples, self.seed, judge]).encode())
    self.signature = digest.hexdigest()[:16]

  def seeds(self, name: str) -> dict[str, int]:
    offset = 1000 * (self.seed + 1) + 10 * SPLITS.index(name)
    return {"policy_seed": offset + 1, "baseline_seed": offset + 2}

  def __call__(self, policy, workdir: str, splits: Sequence[str] = ("validation", "test")
               ) -> dict[str, dict[str, Any]]:
    from dro_jax import evaluation, files
    path = os.path.join(workdir, "protocol_evaluation.json")
    cached = files.read_json(path) or {}
    if cached.get("signature") != self.signature:
      cached = {"signature": self.signature}
    for name in splits:
      if name in cached:
        continue
      seeds = self.seeds(name)
      if name not in self.baselines:
        self.baselines[name] = evaluation.sample_baseline(
            self.sft, self.vocabulary, self.sets[name], sampling=self.sampling,
            baseline_seed=seeds["baseline_seed"], max_input_length=self.demo.max_input_length)
      metrics = evaluation.evaluate_policies(
          policy, self.sft, self.vocabulary, self.sets[name], self.judge, sampling=self.sampling,
          max_input_length=self.demo.max_input_length, baseline_samples=self.baselines[name],
          per_prompt=True, resamples=200, **seeds)
      cached[name] = result(metrics)
      files.write_text(path, json.dumps(cached))
    return {name: cached[name] for name in splits}


def result(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """A split's record: the summary numbers and the packed per-prompt values."""
  keys = ("win_rate", "win_rate_low", "win_rate_high", "kl", "kl_stderr", "policy_reward",
          "policy_length", "prompts", "n")
  record = {key: metrics[key] for key in keys if key in metrics}
  record["prompt_scores"] = pack(metrics["prompt_scores"])
  record["prompt_kl"] = pack(metrics["prompt_kl"])
  return record


# ------------------------------------------------------------------------------- selection


def choose(name: str, candidates: Mapping[str, Sequence[Mapping[str, Any]]],
           key: str = "win_rate") -> tuple[str, dict[str, Any]]:
  """The candidate whose runs score best on VALIDATION (mean of `key` over its runs; a diverged
  run scores 0), and the record of the choice: its grid, every candidate's validation score and
  the pick. Reads nothing but each run's "validation" result (and whether it diverged)."""
  scores = {}
  for label, runs in candidates.items():
    values = [0.0 if run.get("diverged") else float(run["validation"][key]) for run in runs]
    scores[label] = float(np.mean(values)) if values else -math.inf
  pick = max(scores, key=lambda label: scores[label])
  return pick, {"name": name, "selection": "validation", "key": key, "grid": list(candidates),
                "validation": scores, "pick": pick}


# ------------------------------------------------------------------------------- bootstrap


class Replicates:
  """The bootstrap's draws, shared by every statistic of one report: per replicate, a count for
  each seed and each prompt (multinomial: drawn with replacement)."""

  def __init__(self, seeds: int, prompts: int, resamples: int = RESAMPLES, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.seeds, self.prompts = seeds, prompts
    self.seed_weights = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=resamples) \
        .astype(np.float64)
    self.prompt_weights = rng.multinomial(prompts, np.full(prompts, 1.0 / prompts),
                                          size=resamples).astype(np.float64)

  def means(self, table: np.ndarray) -> np.ndarray:
    """[resamples]: the mean of a seeds x prompts table under each replicate."""
    table = np.asarray(table, np.float64)
    if table.shape != (self.seeds, self.prompts):
      raise ValueError(f"protocol: a table of shape {table.shape}; the replicates draw "
                       f"{self.seeds} seeds x {self.prompts} prompts")
    per_seed = table @ self.prompt_weights.T  # [seeds, resamples]
    return (self.seed_weights.T * per_seed).sum(axis=0) / (self.seeds * self.prompts)


def _replicates_for(table: np.ndarray, replicates: Replicates | None) -> Replicates:
  table = np.asarray(table)
  if replicates is None:
    return Replicates(*table.shape)
  return replicates


def _interval(values: np.ndarray, mean: float, level: float = LEVEL) -> tuple[float, float, float]:
  tail = (1.0 - level) / 2.0
  values = values[np.isfinite(values)]
  if not values.size:
    return (mean, math.nan, math.nan)
  return (float(mean), float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail)))


def point_interval(scores: np.ndarray, replicates: Replicates | None = None
                   ) -> tuple[float, float, float]:
  """(mean, low, high): a point's 95% interval over seeds and test prompts (module docstring)."""
  scores = np.asarray(scores, np.float64)
  replicates = _replicates_for(scores, replicates)
  return _interval(replicates.means(scores), float(scores.mean()))


def paired_difference(a: np.ndarray, b: np.ndarray, replicates: Replicates | None = None
                      ) -> tuple[float, float, float]:
  """(mean, low, high) of mean(a) − mean(b), two tables on the same seeds, prompts and SFT
  answers, resampled together."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"protocol: paired tables differ in shape: {a.shape} and {b.shape}")
  replicates = _replicates_for(a, replicates)
  return _interval(replicates.means(a - b), float(a.mean() - b.mean()))


def _read(points: Sequence[tuple[np.ndarray, np.ndarray]], replicates: Replicates):
  """Per replicate (rows) and per point (columns): the KL and win-rate means; and the means on
  the full data."""
  kls = np.stack([replicates.means(kl) for _, kl in points], axis=1)
  wins = np.stack([replicates.means(score) for score, _ in points], axis=1)
  full = (np.array([np.mean(kl) for _, kl in points]),
          np.array([np.mean(score) for score, _ in points]))
  return kls, wins, full


def _interp(level: float, kls: np.ndarray, wins: np.ndarray, log_kl: bool) -> float:
  order = np.argsort(kls)
  kls, wins = kls[order], wins[order]
  x = np.log(np.maximum(kls, LOG_FLOOR)) if log_kl else kls
  at = math.log(max(level, LOG_FLOOR)) if log_kl else level
  if not x[0] <= at <= x[-1]:
    return math.nan
  return float(np.interp(at, x, wins))


def matched_replicates(points: Sequence[tuple[np.ndarray, np.ndarray]], level: float,
                       log_kl: bool, replicates: Replicates) -> tuple[float, np.ndarray]:
  """A curve's win rate at KL `level`: (on the full data, [per replicate]); NaN where the
  level is outside the curve's KL range. `points`: (scores, kl) tables, one per setting."""
  kls, wins, (full_kl, full_win) = _read(points, replicates)
  per = np.array([_interp(level, kls[r], wins[r], log_kl) for r in range(len(kls))])
  return _interp(level, full_kl, full_win, log_kl), per


def matched_value(points, level: float, log_kl: bool, replicates: Replicates
                  ) -> dict[str, float]:
  """{"win_rate", "low", "high", "outside"}: a curve at a KL level with its interval."""
  value, per = matched_replicates(points, level, log_kl, replicates)
  outside = float(np.mean(~np.isfinite(per)))
  mean, low, high = _interval(per, value)
  if outside > MAX_OUTSIDE or not math.isfinite(value):
    mean = low = high = math.nan
  return {"win_rate": mean, "low": low, "high": high, "outside": outside}


def matched_difference(curve_a, curve_b, level: float, log_kl: bool,
                       replicates: Replicates | None = None) -> dict[str, float]:
  """{"difference", "low", "high", "outside"}: win(a) − win(b) at KL `level`, both curves read
  under the same replicates (paired); NaN when either curve misses the level in more than
  `MAX_OUTSIDE` of them."""
  if replicates is None:
    replicates = Replicates(*np.asarray(curve_a[0][0]).shape)
  value_a, per_a = matched_replicates(curve_a, level, log_kl, replicates)
  value_b, per_b = matched_replicates(curve_b, level, log_kl, replicates)
  per = per_a - per_b
  outside = float(np.mean(~np.isfinite(per)))
  mean, low, high = _interval(per, value_a - value_b)
  if outside > MAX_OUTSIDE or not math.isfinite(mean):
    mean = low = high = math.nan
  return {"difference": mean, "low": low, "high": high, "outside": outside}


def excludes_zero(cell: Mapping[str, float]) -> bool:
  return bool(cell["low"] > 0 or cell["high"] < 0)

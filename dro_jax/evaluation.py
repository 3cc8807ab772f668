"""Honest evaluation of a policy against a baseline: win rate with intervals, reward, KL, length.

Both policies answer the same held-out prompts, each side with its own seed (so a checkpoint
evaluated against itself is a fair coin, not a guaranteed tie); a judge compares the two answers
to each prompt side by side. Reported (`evaluate_policies`):

- win rate: the mean of P(policy's answer better), ties counting half. A judge that is not
  `symmetric` is asked in both orders and the verdicts averaged (position debiasing, see
  judges.compare). The headline 95% interval is prompt-clustered: the samples of one prompt are
  not independent, so the interval is a Wilson interval at the effective number of comparisons
  n_eff = p̂(1 − p̂) / v, where v is the cluster-robust variance of p̂ (the variance of the
  per-prompt means over the number of prompts), and Student's t quantile with prompts − 1
  degrees of freedom (fewer when few prompts hold a loss) in place of z. n_eff is not capped at
  n: ties and soft verdicts (a reward model's σ(r_a − r_b), a preference model's probability)
  vary less than a win-or-loss coin, whose variance p̂(1 − p̂) is the most a verdict in [0, 1]
  can have, so n_eff > n says the verdicts are that much less noisy, and the interval then
  agrees with the bootstrap. At the edges (p̂ = 0 or 1, or v = 0) the data hold no spread to
  measure and n_eff is the number of prompts; near them (few prompts holding a loss) n_eff is
  shrunk towards it (`clustered_interval`). Also reported: the plain Wilson interval over all
  comparisons (win-or-loss variance, samples as if independent), a percentile bootstrap over
  prompts, and the DRO paper's spread (mean ± std over 5 folds of the prompts);
- the counts: wins (P > 0.5) and losses (P < 0.5); ties only for discrete verdicts (every verdict
  0, ½ or 1, or such verdicts averaged over both orders), where a ½ is a draw. Soft verdicts are
  probabilities: an exact ½ among them is not a tie, and `ties` is None (`verdicts` says which);
- the judge's mean reward of each side (judges with a reward);
- KL(policy || baseline) from the policy's own samples: the mean of log π(y|x) − log π_base(y|x)
  with y ~ π, raw model log-probs. Under trust-region training the saved reference moves, so KL
  against it says little; a fixed baseline (the SFT start) is what makes runs comparable. With
  temperature ≠ 1 (or top-k / top-p) the samples come from the warped distribution, and the
  estimate is the mean log-ratio under it rather than KL of the raw policy;
- the mean response length in tokens (EOS excluded) and the share of samples cut at the maximum
  decode length without EOS: a judge sees those as unfinished answers, and a policy that learns
  to ramble shows up here first.

The statistics are pure functions of arrays (`wilson_interval`, `clustered_interval`,
`bootstrap_interval`, `fold_spread`, `win_rate`), so periodic evaluation in training reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dro_jax import decoding, partitioning, scoring, stops
from dro_jax import judges as judges_lib
from dro_jax.models import t5 as t5_lib
from dro_jax.policies import Policy  # noqa: F401  (evaluation.Policy, as before)

PyTree = Any


# ------------------------------------------------------------------------------------ statistics


def normal_quantile(level: float) -> float:
  """z with P(|N(0, 1)| <= z) = level (1.95996... for 95%)."""
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  return statistics.NormalDist().inv_cdf(0.5 + level / 2.0)


def student_t_quantile(level: float, dof: float) -> float:
  """t with P(|T_dof| <= t) = level: the normal quantile with its Cornish-Fisher expansion in
  1/dof (Abramowitz & Stegun 26.7.5; within 1e-3 of the exact value for dof >= 3 at 95%). For
  dof < 3 the expansion is not used: the exact closed forms for 1 and 2 degrees of freedom."""
  z = normal_quantile(level)
  if not math.isfinite(dof) or dof > 1e6:
    return z
  tail = (1.0 - level) / 2.0
  if dof <= 1:
    return math.tan(math.pi * (0.5 - tail))
  if dof < 3:  # dof = 2: t = (2p - 1) / sqrt(2p(1 - p)) at p = 1 - tail
    p = 1.0 - tail
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
  g1 = (z ** 3 + z) / 4
  g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
  g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
  g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
  return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3 + g4 / dof ** 4


def wilson_interval(successes: float, n: int, level: float = 0.95, *,
                    z: float | None = None) -> tuple[float, float]:
  """Wilson score interval of a proportion: the p whose score test does not reject successes / n.

  `successes` may be fractional (ties counted half). Unlike the normal interval p̂ ± z·se it stays
  inside [0, 1] and keeps a width at p̂ = 0 or 1.
  """
  if n <= 0:
    return (math.nan, math.nan)
  if not 0.0 <= successes <= n:
    raise ValueError(f"successes must be in [0, n={n}], got {successes}")
  z = normal_quantile(level) if z is None else z
  p = successes / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # At p̂ = 0 or 1 the bound is exactly 0 or 1 (center - half cancels only up to rounding).
  low = 0.0 if successes == 0 else max(0.0, center - half)
  high = 1.0 if successes == n else min(1.0, center + half)
  return (low, high)


# How many prompts must hold a verdict on the minority side of ½ before the spread between
# prompts is trusted in full (`clustered_interval`).
MINORITY_PROMPTS = 15


def minority_prompts(values: np.ndarray) -> int:
  """The prompts (rows of `values` [prompts, samples]) holding at least one verdict on the
  minority side of ½: below ½ when the mean is at least ½ (a loss, or a soft verdict leaning to
  b), above ½ otherwise. Ties (exactly ½) are on neither side."""
  values = np.asarray(values, np.float64)
  if values.ndim == 1:
    values = values[:, None]
  if values.size == 0:
    return 0
  minority = values < 0.5 if values.mean() >= 0.5 else values > 0.5
  return int(minority.any(axis=1).sum())


def clustered_intervals(per_prompt: np.ndarray, minority: np.ndarray | int,
                        level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`clustered_interval` from its sufficient statistics, over a batch: `per_prompt`
  [..., prompts] (each prompt's mean verdict; every prompt with the same number of samples) and
  `minority` [...] (`minority_prompts` of each). Returns (low, high, n_eff), each [...]. The
  coverage simulation (benchmarks/interval_coverage.py) runs this very function over many
  evaluations at once."""
  per_prompt = np.asarray(per_prompt, np.float64)
  prompts = per_prompt.shape[-1]
  minority = np.broadcast_to(np.asarray(minority, np.float64), per_prompt.shape[:-1])
  rate = per_prompt.mean(axis=-1)
  if prompts > 1:
    variance = per_prompt.var(axis=-1, ddof=1) / prompts
  else:
    variance = np.full(rate.shape, np.nan)
  spread = rate * (1.0 - rate)
  measured = (variance > 0) & (spread > 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    n_hat = np.where(measured, spread / np.where(measured, variance, 1.0), float(prompts))
    trust = np.minimum(1.0, minority / MINORITY_PROMPTS)
    shrunk = 1.0 / (trust / n_hat + (1.0 - trust) / prompts)
  n_eff = np.where(measured & (n_hat > prompts), shrunk, n_hat)
  dof = np.minimum(prompts - 1, np.maximum(minority, MINORITY_PROMPTS) - 1).astype(np.int64)
  dof = np.maximum(dof, 1)
  quantiles = {int(d): student_t_quantile(level, int(d)) for d in np.unique(dof)}
  z = np.vectorize(quantiles.__getitem__, otypes=[np.float64])(dof) if dof.ndim else \
      np.float64(quantiles[int(dof)])
  center = (rate + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
  half = z / (1 + z * z / n_eff) * np.sqrt(np.maximum(spread, 0.0) / n_eff
                                           + z * z / (4 * n_eff * n_eff))
  # At p̂ = 0 or 1 the bound is exactly 0 or 1 (center - half cancels only up to rounding).
  low = np.where(rate <= 0.0, 0.0, np.maximum(0.0, center - half))
  high = np.where(rate >= 1.0, 1.0, np.minimum(1.0, center + half))
  return low, high, n_eff


def clustered_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
  """(low, high, n_eff): the prompt-clustered interval of the mean of `values` [prompts, samples].

  Every prompt has the same number of samples, so p̂ is the mean of the per-prompt means m_i and
  its cluster-robust variance is v = var(m_i) / prompts (ddof 1). The interval is Wilson's at
  n_eff comparisons with Student's t quantile in place of z: it stays in [0, 1], keeps a width at
  p̂ = 0 or 1, widens as the samples of one prompt agree, and narrows to the verdicts' own spread
  when they vary less than wins and losses (ties, soft verdicts: n_eff above n; see the module
  docstring). Away from 0 and 1 it is close to p̂ ± t·√v, which the bootstrap over prompts
  approximates.

  n_eff starts from n̂ = p̂(1 − p̂) / v. The spread between prompts can only be measured where
  verdicts on the minority side of ½ occur (losses when p̂ ≥ ½): when few prompts hold one, a
  small fraction of prompts that lose outright could be missing from the sample (with K prompts,
  any share up to about 3/K goes unseen 5% of the time), and v is then far too small. So:
  - p̂ = 0 or 1, or v = 0 (every prompt's mean the same): n_eff = K, the number of prompts, as if
    each prompt were one all-or-nothing verdict (the most its samples can agree). Never all the
    comparisons: 20 prompts × 50 samples all won at a true rate of 0.97 gave [0.996, 1] before;
  - n̂ above K: the variance is shrunk towards that all-or-nothing bound by how many prompts hold
    a minority verdict, k: 1 / n_eff = w / n̂ + (1 − w) / K with w = min(1, k / 15)
    (`MINORITY_PROMPTS`), so the interval moves continuously from the edge, and is the plain one
    from 15 such prompts on;
  - the t quantile's degrees of freedom are min(K, max(k, 15)) − 1: the variance rests on the
    prompts that carry the minority verdicts, and a skewed spread (most prompts won outright, a
    few lost) needs the wider quantile (with 10 in place of 15, 50 prompts × 50 samples at
    p = 0.95, ρ = 0.3 and 10% ties covered 0.923).
  Simulated coverage of the 95% interval (benchmarks/interval_coverage.py; each prompt's win
  probability Beta with mean p and within-prompt correlation ρ, its samples Bernoulli, a share of
  the comparisons replaced by ties; 4000 evaluations a cell, 1800 cells: 20, 50, 100 and 400
  prompts, 1 to 50 samples per prompt, p from 0.5 to 0.97, ρ from 0 to 0.9, ties from 0 to 30%):
  at least 0.932 in every cell (the lowest: 100 prompts × 50 samples, p = 0.95, ρ = 0.3, 10%
  ties), 20 prompts included; 0.973 at 20 prompts × 50 samples, p = 0.97, ρ = 0.9, where the
  construction before covered 0.50. The price is width near the edges: there, n_eff stays close
  to K until many prompts show a loss.
  """
  values = np.asarray(values, np.float64)
  if values.ndim == 1:
    values = values[:, None]
  if values.size == 0:
    return (math.nan, math.nan, math.nan)
  low, high, n_eff = clustered_intervals(values.mean(axis=1), minority_prompts(values), level)
  return (float(low), float(high), float(n_eff))


def bootstrap_interval(values: np.ndarray, *, level: float = 0.95, resamples: int = 4000,
                       seed: int = 0, chunk: int = 500) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (one per prompt).

  Resampled in chunks so the index matrix stays small for thousands of prompts.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size == 0:
    return (math.nan, math.nan)
  rng = np.random.default_rng(seed)
  means = []
  for start in range(0, resamples, chunk):
    count = min(chunk, resamples - start)
    means.append(values[rng.integers(0, values.size, (count, values.size))].mean(axis=1))
  means = np.concatenate(means)
  tail = (1.0 - level) / 2.0
  return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def fold_spread(values: np.ndarray, folds: int = 5) -> tuple[float, float]:
  """(mean, std) of the per-fold means over `folds` contiguous folds of the prompts.

  The DRO paper's spread; std with ddof=1 (the folds are a sample). NaN std for one fold.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  folds = min(folds, values.size)
  if folds == 0:
    return (math.nan, math.nan)
  means = np.array([part.mean() for part in np.array_split(values, folds)])
  return float(means.mean()), float(means.std(ddof=1)) if folds > 1 else math.nan


INTERVAL_METHOD = "prompt-clustered Wilson (t, n_eff)"


@dataclasses.dataclass(frozen=True)
class WinRate:
  """Win rate with ties half, and its intervals (the headline: prompt-clustered)."""

  rate: float
  low: float  # the headline: prompt-clustered Wilson (`clustered_interval`)
  high: float
  n: int  # comparisons (prompts x samples)
  prompts: int
  samples_per_prompt: int
  effective_n: float  # comparisons worth of independent information (n_eff)
  wins: int
  ties: int | None  # draws among discrete verdicts; None for soft verdicts (probabilities)
  losses: int
  wilson_low: float  # plain Wilson over all comparisons (treats samples as independent)
  wilson_high: float
  bootstrap_low: float  # percentile bootstrap over prompts
  bootstrap_high: float
  folds_mean: float  # the DRO paper's 5-fold spread
  folds_std: float
  level: float = 0.95
  verdicts: str = "discrete"  # or "soft" (see `verdict_kind`)

  def line(self) -> str:
    return win_rate_line(self.metrics())

  def metrics(self, prefix: str = "win_rate") -> dict[str, Any]:
    return {prefix: self.rate, f"{prefix}_low": self.low, f"{prefix}_high": self.high,
            f"{prefix}_wilson_low": self.wilson_low, f"{prefix}_wilson_high": self.wilson_high,
            f"{prefix}_bootstrap_low": self.bootstrap_low,
            f"{prefix}_bootstrap_high": self.bootstrap_high,
            f"{prefix}_folds_mean": self.folds_mean, f"{prefix}_folds_std": self.folds_std,
            "n": self.n, "prompts": self.prompts, "samples_per_prompt": self.samples_per_prompt,
            "effective_n": self.effective_n, "wins": self.wins, "ties": self.ties,
            "losses": self.losses, "verdicts": self.verdicts,
            "interval": f"{self.level:.0%} {INTERVAL_METHOD}"}


def win_rate_line(metrics: dict[str, Any]) -> str:
  """`win_rate 0.53 [0.47, 0.59] (n=400, ties=12, ...)`: the headline (prompt-clustered)
  interval, then the comparisons, ties, prompts x samples, and whether the judge was asked both
  orders (`debiased`, when known)."""
  ties = metrics.get("ties")
  details = [f"n={metrics['n']}", "soft verdicts" if ties is None else f"ties={ties}"]
  if "prompts" in metrics and "samples_per_prompt" in metrics:
    details.append(f"{metrics['prompts']} prompts x {metrics['samples_per_prompt']} samples")
  if metrics.get("judge_symmetric"):
    details.append("symmetric judge")
  elif "debiased" in metrics:
    details.append("both orders" if metrics["debiased"] else "one order")
  return (f"win_rate {metrics['win_rate']:.2f} [{metrics['win_rate_low']:.2f}, "
          f"{metrics['win_rate_high']:.2f}] ({', '.join(details)})")


def verdict_kind(preferences: np.ndarray) -> str:
  """"discrete" when every verdict is 0, ½ or 1 (a judge that picks a side or calls a draw),
  or the mean of two such verdicts (asked in both orders): multiples of ¼. "soft" otherwise:
  probabilities, like a reward model's σ(r_a − r_b)."""
  quarters = np.asarray(preferences, np.float64) * 4.0
  return "discrete" if np.all(quarters == np.round(quarters)) else "soft"


def win_rate(preferences: np.ndarray, *, level: float = 0.95, resamples: int = 4000,
             seed: int = 0, folds: int = 5) -> WinRate:
  """The win rate of side a from P(a better than b): [prompts] or [prompts, samples].

  Above 0.5 a verdict is a win, below a loss (for the counts); exactly 0.5 is a tie among
  discrete verdicts, and soft verdicts have no ties (`ties` None, see `verdict_kind`). The rate
  and the counts are over all comparisons; the headline interval (`clustered_interval`), the
  bootstrap and the folds treat a prompt's samples as one cluster, since they are not
  independent; the plain Wilson interval (over all comparisons as if independent) is kept for
  reference.
  """
  preferences = np.asarray(preferences, np.float64)
  if preferences.ndim == 1:
    preferences = preferences[:, None]
  if preferences.ndim != 2:
    raise ValueError(f"preferences: expected [prompts] or [prompts, samples], got shape "
                     f"{preferences.shape}")
  if np.any((preferences < 0) | (preferences > 1)) or not np.all(np.isfinite(preferences)):
    raise ValueError("preferences must be probabilities in [0, 1]")
  n = preferences.size
  per_prompt = preferences.mean(axis=1)
  wilson_low, wilson_high = wilson_interval(float(preferences.sum()), n, level)
  low, high, n_eff = clustered_interval(preferences, level)
  boot_low, boot_high = bootstrap_interval(per_prompt, level=level, resamples=resamples, seed=seed)
  folds_mean, folds_std = fold_spread(per_prompt, folds)
  kind = verdict_kind(preferences)
  return WinRate(rate=float(preferences.mean()) if n else math.nan, low=low, high=high, n=n,
                 prompts=preferences.shape[0], samples_per_prompt=preferences.shape[1],
                 effective_n=n_eff, wins=int(np.sum(preferences > 0.5)),
                 ties=int(np.sum(preferences == 0.5)) if kind == "discrete" else None,
                 losses=int(np.sum(preferences < 0.5)), verdicts=kind,
                 wilson_low=wilson_low, wilson_high=wilson_high, bootstrap_low=boot_low,
                 bootstrap_high=boot_high, folds_mean=folds_mean, folds_std=folds_std,
                 level=level)


# -------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class Samples:
  """One side's answers, prompt-major ([prompts * num_samples] rows)."""

  responses: list[str]
  tokens: np.ndarray  # int32 [N, max_decode_length], 0 after EOS
  lengths: np.ndarray  # int [N]: tokens before EOS
  truncated: np.ndarray  # bool [N]: max_decode_length reached without EOS


def _prompt_keys(seed: int, start: int, count: int) -> jax.Array:
  """Typed keys of prompts start .. start+count-1: prompt i's samples depend on (seed, i) only,
  not on the batch it falls in."""
  indices = jnp.arange(start, start + count)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), indices)


def _batches(total: int, batch_size: int) -> list[tuple[int, int]]:
  return [(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
  """Rows padded to `size` with copies of the first, so every batch has one compiled shape."""
  if rows.shape[0] == size:
    return rows
  return np.concatenate([rows, np.repeat(rows[:1], size - rows.shape[0], axis=0)])


def _batch_size(batch_size: int, prompts: int, mesh: Mesh | None) -> int:
  multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  size = min(batch_size, prompts)
  return -(-size // multiple) * multiple


def sample_policy(policy: Policy, encoder_tokens: np.ndarray, vocabulary: decoding.Vocabulary,
                  sampling: decoding.SamplingParams, seed: int, *, batch_size: int = 64,
                  mesh: Mesh | None = None) -> Samples:
  """Samples `sampling.num_samples` answers per row of `encoder_tokens` [prompts, S]."""
  prompts = encoder_tokens.shape[0]
  size = _batch_size(batch_size, prompts, mesh)
  sampler = decoding.make_sampler(policy.config, sampling, mesh)
  tokens, lengths, truncated = [], [], []
  for start, end in _batches(prompts, size):
    stops.check("sampling")  # a stop asked for mid-phase (a run's own; else a no-op)
    keys = _prompt_keys(seed, start, size)
    output = sampler(policy.params, _padded(encoder_tokens[start:end], size), keys)
    rows = (end - start) * sampling.num_samples
    tokens.append(decoding._host_array(output.tokens, rows))
    lengths.append(decoding._host_array(output.lengths, rows))
    truncated.append(decoding._host_array(output.truncated, rows))
  tokens_NxL = np.concatenate(tokens)
  truncated_N = np.concatenate(truncated).astype(bool)
  # `lengths` count EOS when it was produced.
  lengths_N = np.concatenate(lengths) - (~truncated_N).astype(np.int64)
  return Samples(decoding.decode_responses(vocabulary, tokens_NxL, sampling.eos_id), tokens_NxL,
                 lengths_N, truncated_N)


@functools.lru_cache(maxsize=16)
def _scorer(config: t5_lib.T5Config):
  model = t5_lib.T5(config)

  @jax.jit
  def logps(params: PyTree, encoder_tokens_NxS: jax.Array, tokens_NxL: jax.Array) -> jax.Array:
    decoder_inputs_NxL = jnp.pad(tokens_NxL, ((0, 0), (1, 0)))[:, :-1]
    return scoring.score(model, params, encoder_tokens_NxS, decoder_inputs_NxL,
                         tokens_NxL)["logps"]

  return logps


def sequence_logps(policy: Policy, encoder_tokens: np.ndarray, tokens: np.ndarray, *,
                   batch_size: int = 64, mesh: Mesh | None = None,
                   rules: tuple[tuple[str, Any], ...] = partitioning.DEFAULT_RULES) -> np.ndarray:
  """float64 [N]: log π(tokens[i] | encoder_tokens[i]), raw model log-probs (padding masked)."""
  rows = tokens.shape[0]
  size = _batch_size(batch_size, rows, mesh)
  logps = _scorer(policy.config)
  params = policy.params
  if mesh is not None:
    shardings = partitioning.params_shardings(t5_lib.abstract_params(policy.config), mesh, rules)
    params = partitioning.put(params, shardings)
  results = []
  for start, end in _batches(rows, size):
    stops.check("scoring")
    encoder_batch = _padded(encoder_tokens[start:end], size)
    token_batch = _padded(tokens[start:end], size)
    if mesh is None:
      values = logps(params, encoder_batch, token_batch)
    else:
      batch = partitioning.batch_sharding(mesh)
      with partitioning.activate(mesh, rules):
        values = logps(params, jax.device_put(encoder_batch, batch),
                       jax.device_put(token_batch, batch))
    results.append(decoding._host_array(values, end - start))
  return np.concatenate(results).astype(np.float64)


# ------------------------------------------------------------------------------------ evaluation


def sample_baseline(baseline: Policy, vocabulary: decoding.Vocabulary, prompts: Sequence[str], *,
                    sampling: decoding.SamplingParams = decoding.SamplingParams(),
                    baseline_seed: int = 1, max_input_length: int | None = None,
                    batch_size: int = 64, mesh: Mesh | None = None) -> Samples:
  """The baseline side of `evaluate_policies` on its own, to pass as its `baseline_samples`."""
  encoder_tokens = decoding.encode_prompts(vocabulary, list(prompts), eos_id=sampling.eos_id,
                                           max_input_length=max_input_length)
  return sample_policy(baseline, encoder_tokens, vocabulary, sampling, baseline_seed,
                       batch_size=batch_size, mesh=mesh)


def evaluate_policies(policy: Policy, baseline: Policy, vocabulary: decoding.Vocabulary,
                      prompts: Sequence[str], judge: judges_lib.Judge, *,
                      sampling: decoding.SamplingParams = decoding.SamplingParams(),
                      policy_seed: int = 0, baseline_seed: int = 1,
                      max_input_length: int | None = None, batch_size: int = 64,
                      mesh: Mesh | None = None, level: float = 0.95, folds: int = 5,
                      resamples: int = 4000, return_samples: bool = False,
                      baseline_samples: Samples | None = None,
                      debias: bool = True, per_prompt: bool = False) -> dict[str, Any]:
  """Policy against baseline on `prompts`; a flat dict of metrics (see the module docstring).

  Both sides share `vocabulary` (KL scores the policy's tokens under the baseline). Keys:
  win_rate, win_rate_low/high (Wilson), win_rate_bootstrap_low/high, win_rate_folds_mean/std,
  n, prompts, wins, ties, losses, kl, kl_stderr, {policy,baseline}_reward (judges with a reward),
  {policy,baseline}_length, {policy,baseline}_truncated; and `samples` (one dict per comparison:
  prompt, policy and baseline response, preference, rewards, truncation) with return_samples.
  `baseline_samples`: the baseline's answers to these prompts with these sampling settings and
  `baseline_seed`, from an earlier call (`sample_baseline`), so repeated evaluations against the
  same baseline sample it once. `debias`: a judge that is not `symmetric` is asked in both orders
  (policy first, then baseline first) and the verdicts averaged; `debiased` and `judge_calls`
  say what was done. `per_prompt`: also `prompt_scores` and `prompt_kl`, each prompt's mean
  verdict and mean log-ratio over its samples (lists in prompt order), for paired comparisons
  and bootstraps over prompts.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts to evaluate on")
  encoder_tokens = decoding.encode_prompts(vocabulary, prompts, eos_id=sampling.eos_id,
                                           max_input_length=max_input_length)
  sides = {"policy": sample_policy(policy, encoder_tokens, vocabulary, sampling, policy_seed,
                                   batch_size=batch_size, mesh=mesh)}
  if baseline_samples is None:
    baseline_samples = sample_policy(baseline, encoder_tokens, vocabulary, sampling,
                                     baseline_seed, batch_size=batch_size, mesh=mesh)
  elif len(baseline_samples.responses) != len(prompts) * sampling.num_samples:
    raise ValueError(f"baseline_samples has {len(baseline_samples.responses)} answers; "
                     f"{len(prompts)} prompts x {sampling.num_samples} samples need "
                     f"{len(prompts) * sampling.num_samples}")
  sides["baseline"] = baseline_samples
  repeats = sampling.num_samples
  shape = (len(prompts), repeats)
  prompt_rows = [prompt for prompt in prompts for _ in range(repeats)]
  encoder_rows = np.repeat(encoder_tokens, repeats, axis=0)
  rewards = {}
  if judges_lib.has_reward(judge):
    for name, samples in sides.items():
      rewards[name] = np.asarray(judge.score(prompt_rows, samples.responses), np.float64)
  counted: dict[str, int] = {}
  if rewards and type(judge).prefer is judges_lib.ScoringJudge.prefer:
    # Its preference is the comparison of the rewards: judge each response once, not twice.
    preferences = judges_lib.preference_from_rewards(rewards["policy"], rewards["baseline"])
    calls, debiased = len(prompt_rows), False
  else:
    before = judges_lib.call_counts(judge)
    preferences, calls, debiased = judges_lib.compare(
        judge, prompt_rows, sides["policy"].responses, sides["baseline"].responses,
        debias=debias)
    counted = {key: value - before.get(key, 0)
               for key, value in judges_lib.call_counts(judge).items()}
  # A comparison the judge gave no verdict for (NaN: an API judge's reply unparseable twice, in
  # every order asked) is not taken as one: its prompt leaves the win rate (the clusters keep
  # equal sizes) and is counted.
  missing = np.isnan(preferences).reshape(shape)
  kept = ~missing.any(axis=1)
  if not kept.any():
    raise ValueError(f"judge {judges_lib.describe(judge)} gave no verdict on any prompt: every "
                     f"prompt has a comparison it could not judge")
  rate = win_rate(preferences.reshape(shape)[kept], level=level, resamples=resamples,
                  seed=policy_seed, folds=folds)
  metrics: dict[str, Any] = rate.metrics()
  metrics["debiased"] = debiased
  metrics["judge_symmetric"] = judges_lib.is_symmetric(judge)
  metrics["judge_calls"] = calls
  if counted:  # an API judge: requests paid and comparisons answered from its cache
    metrics["judge_calls_paid"] = counted["judge_calls/paid"]
    metrics["judge_calls_cached"] = counted["judge_calls/cached"]
  if missing.any():
    metrics["unjudged"] = int(missing.sum())
    metrics["prompts_dropped_unjudged"] = int((~kept).sum())

  rows = batch_size * repeats
  logratios = (sequence_logps(policy, encoder_rows, sides["policy"].tokens, batch_size=rows,
                              mesh=mesh)
               - sequence_logps(baseline, encoder_rows, sides["policy"].tokens, batch_size=rows,
                                mesh=mesh))
  metrics["kl"] = float(logratios.mean())
  metrics["kl_stderr"] = (float(logratios.reshape(shape).mean(axis=1).std(ddof=1)
                                / math.sqrt(len(prompts))) if len(prompts) > 1 else math.nan)
  if per_prompt:  # a prompt with an unjudged comparison: its judged ones' mean (NaN: none)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      metrics["prompt_scores"] = np.nanmean(preferences.reshape(shape), axis=1).tolist()
    metrics["prompt_kl"] = logratios.reshape(shape).mean(axis=1).tolist()
  for name, values in rewards.items():
    metrics[f"{name}_reward"] = float(values.mean())
  for name, samples in sides.items():
    metrics[f"{name}_length"] = float(samples.lengths.mean())
    metrics[f"{name}_truncated"] = float(samples.truncated.mean())
  if return_samples:
    metrics["samples"] = [
        {"prompt": prompt_rows[i], "sample": i % repeats,
         "policy_response": sides["policy"].responses[i],
         "baseline_response": sides["baseline"].responses[i],
         "preference": float(preferences[i]),
         **{f"{name}_reward": float(values[i]) for name, values in rewards.items()},
         "policy_truncated": bool(sides["policy"].truncated[i]),
         "baseline_truncated": bool(sides["baseline"].truncated[i])}
        for i in range(len(prompt_rows))]
  return metrics

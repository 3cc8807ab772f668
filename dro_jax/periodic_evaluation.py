"""Judged evaluation during training: every `eval_every` steps, the policy against a baseline.

Set `config.evaluation.judge` (a judge spec of dro_jax.judges, e.g. "demo" or
"preference_model:DIR") and the train runner
samples the current policy and the baseline (`config.evaluation.baseline`: a workdir, step
directory, HF or T5X folder; default `init_checkpoint`, the policy the run started from) on
held-out prompts, judges them side by side (both orders for a judge that is not symmetric,
unless `config.evaluation.debias` is off) and logs `eval/win_rate` with its prompt-clustered
interval,
`eval/policy_reward`, `eval/kl` (from the policy's own samples), lengths and the truncated share
into the JSONL and TensorBoard. With `best_metric="eval/win_rate"` the checkpoint manager keeps
the best step by win rate.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dro_jax import datasets, decoding, evaluation, judges, policies


class JudgedEvaluation:
  """Callable `(policy_params) -> {"eval/...": value}` against a fixed baseline and prompts."""

  def __init__(self, config: ml_collections.ConfigDict, model_config: Any, mesh: Any = None):
    """`mesh`: the run's; sampling and scoring then run over it, as the policy's shards do."""
    settings = config.evaluation
    baseline = settings.baseline or config.init_checkpoint
    if not baseline:
      raise ValueError("config.evaluation.judge needs config.evaluation.baseline or "
                       "config.init_checkpoint: the policy to compare against")
    self.model_config = model_config
    self.baseline = policies.load_policy(baseline).policy
    # On a pod, process 0 alone asks the judge and sends its verdicts to every process.
    self.judge = judges.on_process_zero(judges.judge_from_spec(
        settings.judge, **judges.judge_options(settings,
                                               max_calls=settings.get("judge_max_calls") or 0)))
    self.debias = bool(settings.get("debias", True))
    # The demo's held-out prompts for the run's seed, or the eval split's prompts.
    self.prompts = datasets.held_out_prompts(config, settings.prompts, seed=config.seed)
    self.vocabulary = datasets.task_vocabulary(config)
    self.sampling = decoding.SamplingParams(
        max_decode_length=settings.max_decode_length or config.max_target_length,
        temperature=settings.temperature, num_samples=settings.samples)
    self.seed, self.max_input_length = config.seed, config.max_input_length
    self.mesh = mesh
    self.baseline_samples = None  # The baseline's answers: the same at every evaluation.

  def __call__(self, policy_params: Any) -> dict[str, float]:
    # The same seeds at every evaluation: the curve's noise is shared across steps.
    policy = evaluation.Policy(policy_params, self.model_config)
    if self.baseline_samples is None:
      self.baseline_samples = evaluation.sample_baseline(
          self.baseline, self.vocabulary, self.prompts, sampling=self.sampling,
          baseline_seed=1000 * self.seed + 2, max_input_length=self.max_input_length,
          mesh=self.mesh)
    metrics = evaluation.evaluate_policies(
        policy, self.baseline, self.vocabulary, self.prompts, self.judge, sampling=self.sampling,
        policy_seed=1000 * self.seed + 1, baseline_seed=1000 * self.seed + 2,
        max_input_length=self.max_input_length, resamples=1000,
        baseline_samples=self.baseline_samples, mesh=self.mesh, debias=self.debias)
    return {f"eval/{key}": float(value) for key, value in metrics.items()
            if isinstance(value, (int, float))}

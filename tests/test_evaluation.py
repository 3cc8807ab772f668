"""Evaluation: intervals against scipy and closed forms; a checkpoint against itself is a fair coin
(independent seeds) or an exact tie (the same seed); the CLI runs end to end on a tiny workdir."""

import hashlib
import json
import math
import os
import re

import numpy as np
import pytest
import scipy.stats

from dro_jax import configs, decoding, evaluate, evaluation, judges, train
from dro_jax.data import synthetic, tasks

_WORKDIRS: dict[str, str] = {}


def tiny_sft_workdir(tmp_path_factory, request) -> str:
  """One 3-step SFT workdir (tiny T5.1.1, one layer per stack) per test session, shared by the
  evaluation and export tests."""
  if "workdir" not in _WORKDIRS:
    try:
      cache = request.getfixturevalue("demo_cache")
    except pytest.FixtureLookupError:
      cache = str(tmp_path_factory.mktemp("demo_cache"))
    config = configs.load("sft", "size=tiny")
    config.total_steps = 3
    config.model.num_encoder_layers = config.model.num_decoder_layers = 1
    config.batch_size = 8
    config.eval_every = 0
    config.data.cache_dir = cache
    workdir = str(tmp_path_factory.mktemp("sft_workdir"))
    train.run(config, workdir)
    _WORKDIRS["workdir"] = workdir
  return _WORKDIRS["workdir"]


@pytest.fixture(scope="session")
def sft_workdir(tmp_path_factory, request) -> str:
  return tiny_sft_workdir(tmp_path_factory, request)


class TextHashJudge:
  """A judge without a reward that prefers the response of the larger hash: ties only between
  equal texts, so a win rate of samples from one policy is a fair coin."""

  def prefer(self, prompts, responses_a, responses_b):
    def digest(prompt, response):
      return hashlib.sha256(f"{prompt}\0{response}".encode()).digest()
    return np.array([0.5 if a == b else float(digest(p, a) > digest(p, b))
                     for p, a, b in zip(prompts, responses_a, responses_b)])


# ------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("successes,n", [(0, 10), (3, 10), (10, 10), (212, 400), (1, 1),
                                         (57, 93)])
def test_wilson_interval_equals_scipy(successes, n):
  expected = scipy.stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
  low, high = evaluation.wilson_interval(successes, n)
  assert low == pytest.approx(expected.low, abs=1e-12)
  assert high == pytest.approx(expected.high, abs=1e-12)


@pytest.mark.parametrize("successes,n,level", [(10.5, 40, 0.95), (0.5, 3, 0.9), (199.5, 400, 0.99)])
def test_wilson_interval_solves_the_score_equation(successes, n, level):
  """Fractional successes (ties half): both ends are the roots of (p̂ - p)² = z² p (1 - p) / n."""
  z = scipy.stats.norm.ppf(0.5 + level / 2)
  assert evaluation.normal_quantile(level) == pytest.approx(z, rel=1e-12)
  estimate = successes / n
  for end in evaluation.wilson_interval(successes, n, level):
    assert (estimate - end) ** 2 == pytest.approx(z * z * end * (1 - end) / n, rel=1e-9)


def test_bootstrap_interval_agrees_with_scipy():
  values = np.random.default_rng(1).random(60)
  expected = scipy.stats.bootstrap((values,), np.mean, method="percentile", n_resamples=20000,
                                   random_state=0).confidence_interval
  low, high = evaluation.bootstrap_interval(values, resamples=20000, seed=3)
  assert low == pytest.approx(expected.low, abs=4e-3)
  assert high == pytest.approx(expected.high, abs=4e-3)
  # Seeded: the same interval again; a constant has no spread.
  assert evaluation.bootstrap_interval(values, resamples=20000, seed=3) == (low, high)
  assert evaluation.bootstrap_interval(np.full(9, 0.5)) == (0.5, 0.5)


def test_win_rate_counts_ties_half_and_folds():
  preferences = np.array([1, 0, 0.5, 1, 1, 0.5, 0, 1, 1, 0.25])
  rate = evaluation.win_rate(preferences)
  assert rate.rate == pytest.approx(0.625)
  assert (rate.n, rate.prompts, rate.wins, rate.ties, rate.losses) == (10, 10, 5, 2, 3)
  assert (rate.wilson_low, rate.wilson_high) == evaluation.wilson_interval(6.25, 10)
  assert (rate.low, rate.high) == evaluation.clustered_interval(preferences)[:2]
  folds = [preferences[i:i + 2].mean() for i in range(0, 10, 2)]
  assert rate.folds_mean == pytest.approx(np.mean(folds))
  assert rate.folds_std == pytest.approx(np.std(folds, ddof=1))
  # A tie and a quarter vary less than a win or a loss: n_eff above n. Only 3 prompts hold a
  # loss, so that spread is trusted in part (clustered_interval: n_eff shrunk towards prompts).
  assert rate.effective_n > rate.n
  assert rate.line() == "win_rate 0.62 [0.30, 0.86] (n=10, ties=2, 10 prompts x 1 samples)"
  # Several samples per prompt: the bootstrap resamples prompts, the Wilson interval comparisons.
  per_sample = evaluation.win_rate(np.array([[1, 0], [1, 1], [0.5, 0.5]]))
  assert (per_sample.n, per_sample.prompts, per_sample.ties) == (6, 3, 2)
  with pytest.raises(ValueError, match="probabilities"):
    evaluation.win_rate(np.array([1.5]))


def test_clustered_interval_covers_the_truth_when_samples_share_a_prompt():
  """1000 simulated evaluations, 4 samples per prompt that agree within a prompt (each prompt has
  its own win probability, Beta around the truth), some ties: the headline 95% interval covers the
  true win rate at least 92% of the time; the plain Wilson interval, which treats the samples as
  independent, does not."""
  rng = np.random.default_rng(0)
  mean_probability, covered, covered_wilson = 0.6, 0, 0
  truth = 0.9 * mean_probability + 0.1 * 0.5  # a tenth of the comparisons are ties
  for _ in range(1000):
    probability = rng.beta(mean_probability * 1.5, (1 - mean_probability) * 1.5, size=60)
    draws = rng.random((60, 4))
    outcomes = (draws < probability[:, None]).astype(np.float64)
    outcomes[rng.random((60, 4)) < 0.1] = 0.5  # a tie counts half
    rate = evaluation.win_rate(outcomes, resamples=10)
    covered += rate.low <= truth <= rate.high
    covered_wilson += rate.wilson_low <= truth <= rate.wilson_high
  assert covered / 1000 >= 0.92, covered
  assert covered_wilson / 1000 < 0.9, covered_wilson
  assert rate.samples_per_prompt == 4 and rate.prompts == 60 and rate.effective_n < rate.n


def test_student_t_quantile():
  for dof in (1, 2, 3, 5, 10, 30, 200):
    assert evaluation.student_t_quantile(0.95, dof) == pytest.approx(
        scipy.stats.t.ppf(0.975, dof), rel=2e-3)


# ------------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def loaded(sft_workdir):
  policy = evaluate.load_policy(sft_workdir)
  vocabulary = tasks.load_vocabulary(policy.vocabulary)
  return policy, vocabulary


SAMPLING = decoding.SamplingParams(max_decode_length=8)
BATCH = 16  # one sampler and one scorer shape for every test here (each compiles in seconds)


@pytest.mark.slow
def test_a_checkpoint_against_itself(loaded):
  policy, vocabulary = loaded
  prompts = synthetic.eval_prompts(48)
  independent = evaluation.evaluate_policies(
      policy.policy, policy.policy, vocabulary, prompts, TextHashJudge(), sampling=SAMPLING,
      policy_seed=0, baseline_seed=1, batch_size=BATCH)
  assert independent["n"] == 48 and independent["ties"] < 5
  assert independent["win_rate_low"] < 0.5 < independent["win_rate_high"]
  assert independent["win_rate_bootstrap_low"] < 0.5 < independent["win_rate_bootstrap_high"]
  assert independent["kl"] == 0.0  # the same network scores the policy's samples on both sides
  assert "policy_reward" not in independent  # this judge has no reward

  same = evaluation.evaluate_policies(
      policy.policy, policy.policy, vocabulary, prompts, TextHashJudge(), sampling=SAMPLING,
      policy_seed=7, baseline_seed=7, batch_size=BATCH, return_samples=True)
  assert same["win_rate"] == 0.5 and same["ties"] == 48
  assert same["win_rate_folds_mean"] == 0.5 and same["win_rate_folds_std"] == 0.0
  rows = same.pop("samples")
  assert [row["prompt"] for row in rows] == prompts
  assert all(row["policy_response"] == row["baseline_response"] for row in rows)
  assert same["policy_length"] == same["baseline_length"]
  assert 0.0 <= same["policy_truncated"] <= 1.0
  # The baseline's answers sampled once and passed back give the same evaluation.
  kept = evaluation.sample_baseline(policy.policy, vocabulary, prompts, sampling=SAMPLING,
                                    baseline_seed=1, batch_size=BATCH)
  again = evaluation.evaluate_policies(
      policy.policy, policy.policy, vocabulary, prompts, TextHashJudge(), sampling=SAMPLING,
      policy_seed=0, baseline_seed=1, batch_size=BATCH, baseline_samples=kept)
  assert again == independent
  with pytest.raises(ValueError, match="baseline_samples has 48 answers"):
    evaluation.evaluate_policies(
        policy.policy, policy.policy, vocabulary, prompts[:10], TextHashJudge(),
        sampling=SAMPLING, batch_size=BATCH, baseline_samples=kept)
  # Samples depend on (seed, prompt index) only, not on the batch they were drawn in.
  encoded = decoding.encode_prompts(vocabulary, prompts)
  shifted = evaluation.sample_policy(policy.policy, encoded[:BATCH + 3], vocabulary, SAMPLING, 7,
                                    batch_size=BATCH)
  assert shifted.responses == [row["policy_response"] for row in rows[:BATCH + 3]]
  assert shifted.lengths.max() <= SAMPLING.max_decode_length


def test_kl_is_the_mean_log_ratio_of_the_policy_samples(loaded):
  """Against a perturbed baseline: KL = mean(log π - log π_base) over π's own samples."""
  import jax
  policy, vocabulary = loaded
  halved = jax.tree.map(lambda x: 0.5 * x, policy.policy.params)  # same device: no recompile
  baseline = evaluation.Policy(halved, policy.policy.config)
  prompts = synthetic.eval_prompts(16)
  metrics = evaluation.evaluate_policies(policy.policy, baseline, vocabulary, prompts,
                                         judges.DemoJudge(), sampling=SAMPLING, batch_size=BATCH)
  encoded = decoding.encode_prompts(vocabulary, prompts)
  samples = evaluation.sample_policy(policy.policy, encoded, vocabulary, SAMPLING, 0,
                                    batch_size=BATCH)
  expected = np.mean(evaluation.sequence_logps(policy.policy, encoded, samples.tokens,
                                               batch_size=BATCH)
                     - evaluation.sequence_logps(baseline, encoded, samples.tokens,
                                                 batch_size=BATCH))
  assert metrics["kl"] == pytest.approx(expected, rel=1e-6)
  assert metrics["kl"] > 0
  assert {"policy_reward", "baseline_reward"} <= set(metrics)


def test_cli_end_to_end(sft_workdir, tmp_path, capsys):
  output = tmp_path / "eval"
  step_dir = os.path.join(sft_workdir, "checkpoints", "3")
  report = evaluate.main(["--policy", sft_workdir, "--baseline", step_dir, "--num_prompts", "24",
                          "--max_decode_length", "8", "--batch_size", str(BATCH),
                          "--output", str(output)])
  printed = capsys.readouterr().out
  assert re.search(r"^win_rate \d\.\d\d \[\d\.\d\d, \d\.\d\d\] \(n=24, ties=\d+, 24 prompts x 1 "
                   r"samples, symmetric judge\)$", printed, re.MULTILINE), printed
  assert printed.splitlines()[0].startswith("win_rate ")
  saved = json.loads((output / "evaluation.json").read_text())
  assert saved["line"] in printed and saved == json.loads(json.dumps(report))
  assert saved["judge"] == "demo" and saved["policy"]["step"] == saved["baseline"]["step"] == 3
  assert (saved["policy_seed"], saved["baseline_seed"]) == (0, 1)
  assert saved["sampling"]["temperature"] == 1.0 and saved["sampling"]["num_samples"] == 1
  rows = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
  assert [row["prompt"] for row in rows] == synthetic.eval_prompts(24)
  assert all(synthetic.is_eval_prompt(row["prompt"]) for row in rows)
  assert {"policy_response", "baseline_response", "preference", "policy_reward",
          "baseline_reward"} <= set(rows[0])
  assert all(math.isfinite(saved[key]) for key in ("win_rate", "kl", "policy_length"))


def test_a_first_position_biased_judge_is_debiased(sft_workdir, tmp_path, capsys):
  """A judge plugged as module:factory that prefers whichever response comes first: the policy
  against itself scores 0.5 +- 0.03 asked in both orders, and far from it in one order."""
  args = ["--policy", sft_workdir, "--baseline", sft_workdir, "--num_prompts", "400",
          "--num_samples", "2", "--max_decode_length", "8", "--batch_size", "64",
          "--judge", "fake_judges:first_position_biased"]
  debiased = evaluate.main(args + ["--output", str(tmp_path / "both")])
  assert abs(debiased["win_rate"] - 0.5) <= 0.03, debiased["win_rate"]
  assert debiased["debiased"] and debiased["judge_calls"] == 2 * 800
  assert "both orders" in capsys.readouterr().out.splitlines()[0]
  biased = evaluate.main(args + ["--no_debias", "--output", str(tmp_path / "one")])
  assert biased["win_rate"] > 0.6 and not biased["debiased"] and biased["judge_calls"] == 800
  assert "one order" in capsys.readouterr().out.splitlines()[0]


def test_demo_derived_workdirs_take_the_demo_prompts_and_judge(sft_workdir, tmp_path, capsys):
  """The demo's alignment stages train on `dro_jax_demo_samples_*` Tasks (no held-out split):
  evaluate still resolves the demo task's held-out prompts and the demo judge."""
  import shutil
  derived = tmp_path / "dro"
  shutil.copytree(sft_workdir, derived)
  config = json.loads((derived / "config.json").read_text())
  config["loss"], config["data"]["task"] = "dro", "dro_jax_demo_samples_0123456789abcdef"
  (derived / "config.json").write_text(json.dumps(config))
  evaluate.main(["--policy", str(derived), "--baseline", sft_workdir, "--num_prompts", "16",
                 "--max_decode_length", "8", "--batch_size", str(BATCH)])
  assert capsys.readouterr().out.startswith("win_rate ")
  saved = json.loads((derived / "evaluation" / "step_3" / "evaluation.json").read_text())
  assert saved["judge"] == "demo" and saved["n"] == 16
  rows = (derived / "evaluation" / "step_3" / "samples.jsonl").read_text().splitlines()
  assert [json.loads(row)["prompt"] for row in rows] == synthetic.eval_prompts(16)


def test_cli_errors(sft_workdir, tmp_path):
  with pytest.raises(ValueError, match="no such folder"):
    evaluate.main(["--policy", str(tmp_path / "missing"), "--baseline", sft_workdir])
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"text": "sort: 1 2"}\n')
  with pytest.raises(ValueError, match=r"prompts.jsonl:1: expected a JSON object"):
    evaluate.read_prompts(str(prompts))


@pytest.mark.slow
def test_keep_best_checkpoint_by_win_rate(sft_workdir, tmp_path, demo_cache, monkeypatch):
  """The periodic judged evaluation's win rate picks the checkpoint kept as best (max), next to
  the latest; the evaluation itself runs for real, its win rates are then scripted."""
  from dro_jax import checkpoint_manager, periodic_evaluation
  from run_helpers import read_metrics, shrink
  scripted = iter([0.3, 0.9, 0.2])
  real = periodic_evaluation.JudgedEvaluation.__call__

  def scripted_call(self, params):
    metrics = real(self, params)
    assert 0.0 <= metrics["eval/win_rate"] <= 1.0 and "eval/kl" in metrics
    return {**metrics, "eval/win_rate": next(scripted)}

  monkeypatch.setattr(periodic_evaluation.JudgedEvaluation, "__call__", scripted_call)
  config = shrink(configs.load("sft", "size=tiny"), demo_cache, steps=6)
  config.init_checkpoint = sft_workdir
  config.eval_every = config.checkpoint_every = 2
  config.keep_last, config.keep_best = 1, 1
  config.best_metric, config.best_mode = "eval/win_rate", "max"
  config.evaluation.judge = "demo"
  config.evaluation.prompts = 8
  config.evaluation.max_decode_length = 6
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  logged = {row["step"]: row["eval/win_rate"] for row in read_metrics(workdir)
            if "eval/win_rate" in row}
  assert logged == {2: 0.3, 4: 0.9, 6: 0.2}
  manager = checkpoint_manager.Checkpointer(workdir)
  try:
    assert sorted(manager.all_steps()) == [4, 6]  # the best by win rate, and the latest
  finally:
    manager.close()

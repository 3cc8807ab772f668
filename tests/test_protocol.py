"""benchmarks/protocol.py: disjoint prompt sets, choices that read validation only, the crossed
seeds x prompts bootstrap, paired and matched-KL differences."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

from dro_jax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _protocol():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  spec = importlib.util.spec_from_file_location("protocol", ROOT / "benchmarks" / "protocol.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_prompt_sets_are_disjoint_from_each_other_and_from_training():
  protocol = _protocol()
  sets = protocol.prompt_sets(300, 700, seed=3)
  assert len(sets["validation"]) == 300 and len(sets["test"]) == 700
  assert not set(sets["validation"]) & set(sets["test"])
  assert {protocol.split(p) for p in sets["validation"]} == {"validation"}
  assert {protocol.split(p) for p in sets["test"]} == {"test"}
  # Every prompt the demo trains on (SFT demonstrations, judged samples) is a training prompt.
  training = [p.prompt for p in synthetic.sample_problems(2000, 1000)]
  training += [row["prompt"] for row in synthetic.demonstrations(500, seed=5)]
  assert {protocol.split(p) for p in training} == {"train"}
  protocol.check_disjoint({"train": training, **sets})
  # Deterministic in the seed; another seed draws other prompts.
  assert protocol.prompt_sets(300, 700, seed=3) == sets
  assert protocol.prompt_sets(300, 700, seed=4)["test"] != sets["test"]
  with pytest.raises(ValueError, match="validation and test prompts share 1 prompts"):
    protocol.check_disjoint({"validation": sets["validation"],
                             "test": sets["test"] + sets["validation"][:1]})
  with pytest.raises(ValueError, match="belongs to validation"):
    protocol.check_disjoint({"test": sets["test"] + sets["validation"][:1]})
  with pytest.raises(ValueError, match="repeat"):
    protocol.check_disjoint({"x": ["a", "a"]})


def test_a_choice_reads_validation_only():
  protocol = _protocol()
  rng = np.random.default_rng(0)

  def runs(validation, test):
    return [{"validation": {"win_rate": v}, "test": {"win_rate": t}, "diverged": False}
            for v, t in zip(validation, test)]

  candidates = {label: runs(rng.uniform(0.5, 0.8, 3), rng.uniform(0.5, 0.8, 3))
                for label in ("3e-4", "1e-3", "3e-3")}
  pick, record = protocol.choose("learning_rate/X", candidates)
  assert record["selection"] == "validation" and record["grid"] == list(candidates)
  means = {label: np.mean([r["validation"]["win_rate"] for r in rs])
           for label, rs in candidates.items()}
  assert pick == max(means, key=means.get) and record["validation"] == pytest.approx(means)
  # Poisoned test scores (the best on test made the worst, and the other way round): no change.
  for label, rs in candidates.items():
    for run in rs:
      run["test"]["win_rate"] = 1.0 if label != pick else 0.0
  assert protocol.choose("learning_rate/X", candidates) == (pick, record)
  # A diverged run scores 0 on validation.
  candidates[pick][0]["diverged"] = True
  candidates[pick][1]["diverged"] = candidates[pick][2]["diverged"] = True
  assert protocol.choose("learning_rate/X", candidates)[0] != pick


def _crossed(rng, seeds, prompts, mean, seed_sd, prompt_sd, noise_sd):
  return (mean + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, prompt_sd, (1, prompts))
          + rng.normal(0, noise_sd, (seeds, prompts)))


def test_the_interval_holds_seed_and_prompt_variation():
  protocol = _protocol()
  rng = np.random.default_rng(1)
  table = _crossed(rng, 3, 400, 0.7, 0.0, 0.2, 0.3)
  replicates = protocol.Replicates(3, 400, resamples=1000)
  _, low, high = protocol.point_interval(table, replicates)
  # Prompts only (the seeds' mean per prompt, bootstrapped over prompts): no wider.
  per_prompt = table.mean(axis=0)
  boot = [per_prompt[rng.integers(0, 400, 400)].mean() for _ in range(1000)]
  assert high - low >= 0.9 * (np.quantile(boot, 0.975) - np.quantile(boot, 0.025))
  # A between-seed spread widens it: the seeds' term is in the interval.
  seeded = table + np.array([[-0.05], [0.0], [0.05]])
  _, low2, high2 = protocol.point_interval(seeded, replicates)
  assert high2 - low2 > 1.5 * (high - low)
  # Coverage of the true mean where evaluation noise dominates (the benchmarks' regime).
  covered = 0
  for trial in range(200):
    truth = 0.7
    table = _crossed(rng, 3, 200, truth, 0.005, 0.2, 0.3)
    _, low, high = protocol.point_interval(table, protocol.Replicates(3, 200, 400, seed=trial))
    covered += low <= truth <= high
  assert covered / 200 >= 0.9


def test_paired_differences_leave_out_what_both_sides_share():
  protocol = _protocol()
  rng = np.random.default_rng(2)
  shared = rng.normal(0, 0.3, (1, 500))  # the prompts' difficulty, SFT's answers
  a = 0.74 + shared + rng.normal(0, 0.05, (2, 500))
  b = 0.70 + shared + rng.normal(0, 0.05, (2, 500))
  replicates = protocol.Replicates(2, 500)
  mean, low, high = protocol.paired_difference(a, b, replicates)
  assert mean == pytest.approx(a.mean() - b.mean()) and low > 0
  # Unpaired, the same difference is indistinguishable from 0.
  _, a_low, a_high = protocol.point_interval(a, replicates)
  _, b_low, b_high = protocol.point_interval(b, replicates)
  assert a_low < b_high and b_low < a_high
  with pytest.raises(ValueError, match="differ in shape"):
    protocol.paired_difference(a, b[:, :10])


def test_matched_kl_readings_linear_and_log_and_no_extrapolation():
  protocol = _protocol()
  ones = np.ones((1, 50))
  # Win rate 0.6 at KL 0.1 and 0.8 at KL 1.0: at KL 0.4 linear in KL reads 0.6 + 0.2 * 1/3,
  # linear in log KL 0.6 + 0.2 * log(4)/log(10).
  curve = [(0.6 * ones, 0.1 * ones), (0.8 * ones, 1.0 * ones)]
  replicates = protocol.Replicates(1, 50, resamples=50)
  linear = protocol.matched_value(curve, 0.4, False, replicates)
  log = protocol.matched_value(curve, 0.4, True, replicates)
  assert linear["win_rate"] == pytest.approx(0.6 + 0.2 / 3)
  assert log["win_rate"] == pytest.approx(0.6 + 0.2 * np.log(4) / np.log(10))
  assert np.isnan(protocol.matched_value(curve, 2.0, False, replicates)["win_rate"])
  other = [(0.5 * ones, 0.2 * ones), (0.7 * ones, 2.0 * ones)]
  cell = protocol.matched_difference(curve, other, 0.5, False, replicates)
  assert cell["difference"] == pytest.approx((0.6 + 0.2 * 0.4 / 0.9) - (0.5 + 0.2 * 0.3 / 1.8))
  assert protocol.excludes_zero(cell)


def test_per_prompt_values_survive_packing():
  protocol = _protocol()
  values = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 0.123, 3.5, -0.02])
  back = protocol.unpack(protocol.pack(values))
  assert back[:5].tolist() == values[:5].tolist()
  assert np.allclose(back, values, rtol=1e-3, atol=1e-4)

"""benchmarks/online_vs_offline.py and the online loop's oracle budget: the labelling caps count
what they say (kept pairs after ties, oracle calls), offline's τ and steps are chosen from the
validation prompts only, and a quick run gives every run of a seed the same oracle calls."""

import copy
import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest

from dro_jax import configs, judges, online
from dro_jax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
  sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark's `import protocol`


def load_benchmark():
  spec = importlib.util.spec_from_file_location("online_vs_offline",
                                                ROOT / "benchmarks" / "online_vs_offline.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------------- the caps


def candidate_pairs(count: int, tie_every: int):
  """Pairs on demo prompts: every `tie_every`-th one two answers of equal reward (a tie)."""
  pairs = []
  for row, problem in enumerate(synthetic.sample_problems(count, 11)):
    answer = " ".join(map(str, problem.answer))
    wrong = "0 " * len(problem.answer)
    pairs.append({"prompt": problem.prompt, "row": row, "first_index": 0, "second_index": 1,
                  "first": answer, "second": answer + " " if row % tie_every == 0 else wrong})
  return pairs


def test_max_pairs_counts_the_pairs_kept_after_ties_and_asks_only_what_it_needs():
  config = configs.load("online", "size=tiny")
  oracle = judges.judge_from_spec("demo")
  pairs = candidate_pairs(60, tie_every=4)
  everything, counts, calls = online.label(pairs, oracle, config, 1)
  ties = counts["dropped_tie"]
  assert ties > 5 and len(everything) + ties == calls == 60  # the pool has ties to skip
  labelled, counts, calls = online.label_within(pairs, oracle, config, 1, max_pairs=30)
  assert len(labelled) == 30  # the cap counts kept pairs, not pairs shown
  # Asked in order, no more than needed: the first `calls` pairs, whose ties were replaced.
  assert calls == 30 + counts["dropped_tie"] and counts["dropped_over_cap"] == 60 - calls
  assert labelled == [pair for pair in everything if pair["row"] < calls]
  # Fewer pairs than the cap: all of them, as without one.
  labelled, counts, calls = online.label_within(pairs, oracle, config, 1, max_pairs=100)
  assert labelled == everything and calls == 60 and counts["dropped_over_cap"] == 0


def test_max_oracle_calls_spends_exactly_the_budget_ties_included():
  config = configs.load("online", "size=tiny")
  pairs = candidate_pairs(60, tie_every=3)
  for spec in ("demo", "noisy:0.2:demo"):
    oracle = judges.judge_from_spec(spec)
    labelled, counts, calls = online.label_within(pairs, oracle, config, 1, max_calls=25)
    assert calls == 25 and len(labelled) + counts["dropped_tie"] == 25
    assert counts["dropped_over_cap"] == 35
    assert getattr(oracle, "queries", 25) == 25  # a noisy oracle counted every query
  # Both caps: whichever binds first.
  labelled, counts, calls = online.label_within(pairs, judges.judge_from_spec("demo"), config,
                                                1, max_pairs=10, max_calls=40)
  assert len(labelled) == 10 and calls < 40


def test_the_caps_are_refused_below_zero(demo_cache):
  config = configs.load("online", "size=tiny")
  config.data.cache_dir = demo_cache
  config.online.max_oracle_calls = -1
  with pytest.raises(Exception, match="config.online.max_oracle_calls"):
    online.validate(config)


def test_a_noisy_oracle_draws_from_the_run_seed(demo_sft, demo_cache, tmp_path):
  """Each seed its own noise: the online loop's oracle is keyed by the run's seed."""
  built = {}
  for seed in (0, 1):
    config = configs.load("online", f"size=tiny,seed={seed},oracle=noisy:0.2:demo")
    config.data.cache_dir = demo_cache
    config.init_checkpoint = str(demo_sft)
    run = online.OnlineRun(config, str(tmp_path / f"seed_{seed}"))
    built[seed] = run.oracle
  assert built[0].seed == 0 and built[1].seed == 1
  assert isinstance(built[1], judges.NoisyJudge) and built[1].spec == "noisy:0.2:demo"
  prompts = ["p"] * 400
  assert not np.array_equal(built[0].flipped(prompts, prompts, prompts),
                            built[1].flipped(prompts, prompts, prompts))


def test_oracle_calls_count_the_tournament_only_when_the_oracle_ranks():
  bench = load_benchmark()
  calls = {"tournament": 300, "labelling": 40, "evaluation": 1000, "total": 1340}
  assert bench.oracle_calls(calls, "fit") == 40  # a learned ranker; evaluation is the truth's
  assert bench.oracle_calls(calls, "oracle") == 340


# ------------------------------------------------------------------------------- the choice


def fake_records(bench, seeds=(0, 1), prompts=40, seed=0):
  """Finished runs of one oracle with made-up per-prompt verdicts and KLs: offline's best
  validation point is τ 0.3 at 8 steps."""
  import protocol
  rng = np.random.default_rng(seed)
  grid = (4, 8, 12)

  def split(rate, kl):
    scores = np.clip(rng.normal(rate, 0.2, prompts), 0, 1)
    kls = np.maximum(rng.normal(kl, 0.1, prompts), 0)
    return {"win_rate": float(scores.mean()), "win_rate_low": 0.0, "win_rate_high": 1.0,
            "kl": float(kls.mean()), "prompt_scores": protocol.pack(scores),
            "prompt_kl": protocol.pack(kls)}

  records = {}
  for s in seeds:
    for method, tau in bench.RUNS:
      if method == "offline":
        points = [{"iteration": None, "step": step,
                   "validation": split(0.7 if (tau, step) == (0.3, 8) else 0.6, step / 10),
                   "test": split(0.6, step / 10)} for step in grid]
      else:
        points = [{"iteration": k / 2, "step": 3 * k, "test": split(0.55 + 0.05 * k, k / 4)}
                  for k in range(1, 5)]
      records[bench.run_name(s, "demo", method, tau)] = {
          "seed": s, "oracle": "demo", "method": method, "tau": 0.1 if tau is None else tau,
          "oracle_calls": 24, "labelled_pairs": 20, "ties": 4, "points": points}
  return records


def test_offline_is_chosen_on_validation_and_poisoned_test_scores_change_no_choice():
  import protocol
  bench = load_benchmark()
  records = fake_records(bench)
  report = bench.oracle_report(records, "demo")
  assert (report["offline_tau"], report["offline_steps"]) == (0.3, 8)
  assert report["choice"]["pick"] == "τ 0.3, 8 steps" and len(report["choice"]["grid"]) == 6
  assert report["equal_oracle_calls"]
  poisoned = copy.deepcopy(records)
  for record in poisoned.values():
    for point in record["points"]:
      worst = point["step"] == 8 and record["tau"] == 0.3 and record["method"] == "offline"
      point["test"]["win_rate"] = 0.0 if worst else 1.0
      point["test"]["prompt_scores"] = protocol.pack(
          np.full(40, 0.0 if worst else 1.0))
  again = bench.oracle_report(poisoned, "demo")
  assert again["choice"] == report["choice"]
  assert (again["offline_tau"], again["offline_steps"]) == (0.3, 8)
  # The test scores do reach the report (the poison is seen there, not in the choice).
  assert again["paired_differences"][0]["difference"] == pytest.approx(1.0)
  # The validation scores decide: moving the best validation point moves the choice.
  moved = copy.deepcopy(records)
  for record in moved.values():
    if record["method"] == "offline" and record["tau"] == 0.1:
      record["points"][2]["validation"]["win_rate"] = 0.9
  assert bench.oracle_report(moved, "demo")["choice"]["pick"] == "τ 0.1, 12 steps"


def test_unequal_budgets_are_reported_as_such():
  bench = load_benchmark()
  records = fake_records(bench)
  records[bench.run_name(1, "demo", "offline", 0.1)]["oracle_calls"] = 23
  assert not bench.oracle_report(records, "demo")["equal_oracle_calls"]


# ------------------------------------------------------------------------------- a quick run


@pytest.mark.slow
def test_quick_run_gives_every_run_the_same_oracle_calls(demo_sft, demo_cache, tmp_path):
  bench = load_benchmark()
  output = tmp_path / "bench"
  argv = ["--output", str(output), "--quick", "--seeds", "0", "--oracles", "noisy:0.2:demo",
          "--sft", str(demo_sft), "--data_cache", demo_cache]
  bench.main(argv)
  results = json.loads((output / "results.json").read_text())
  size = bench.SIZES["quick"]
  budget = size["budget"] * size["iterations"]
  runs = results["runs"]
  assert len(runs) == 2 + len(size["offline_taus"])
  for name, run in runs.items():
    assert run["oracle_calls"] == budget, name  # tournament by the learned ranker: no oracle
    # A symmetric oracle: one call per pair shown, each pair kept or a tie.
    assert run["labelled_pairs"] + run["ties"] == budget
    calls = [row["labelling_calls"] for row in run["per_iteration"]]
    assert calls == ([budget] if run["method"] == "offline"
                     else [size["budget"]] * size["iterations"]), name
    assert run["train_prompts"] > 0  # checked disjoint from validation and test
    assert all("test" in point for point in run["points"])
  report = results["oracles"]["noisy:0.2:demo"]
  assert report["equal_oracle_calls"] and report["seeds"] == [0]
  choice = results["choices"]["noisy:0.2:demo"]
  assert choice["selection"] == "validation" and choice["pick"] in choice["grid"]
  assert len(choice["grid"]) == len(size["offline_taus"]) * len(size["offline_grid"])
  assert results["protocol"]["test_prompts"] == size["test"]
  for cell in report["paired_differences"]:
    assert cell["low"] <= cell["difference"] <= cell["high"]
  text = (output / "online_vs_offline.md").read_text()
  for section in ("Paired differences at equal oracle calls", "Paired differences at matched KL",
                  "chosen on validation"):
    assert section in text
  assert (output / "online_vs_offline.png").stat().st_size > 0
  # Evaluation noise alone: the largest of every run's one-seed test interval's half-widths.
  widths = [(p["test"]["win_rate_high"] - p["test"]["win_rate_low"]) / 2
            for run in runs.values() for p in run["points"]]
  assert report["evaluation_half_width"]["largest"] == pytest.approx(max(widths))
  assert "Evaluation noise: each point's own 95% half-width" in text
  # Resumed: every run is read back, nothing is trained again, the same report.
  before = results["oracles"]
  bench.main(argv)
  assert json.loads((output / "results.json").read_text())["oracles"] == before
  # The report rebuilt from results.json alone (the runs' folders and records gone, as in a
  # results folder committed from another machine): the same numbers and the same text.
  alone = tmp_path / "alone"
  alone.mkdir()
  (alone / "results.json").write_text((output / "results.json").read_text())
  rebuilt_argv = [*argv[:1], str(alone), *argv[2:], "--report"]
  bench.main(rebuilt_argv)
  rebuilt = json.loads((alone / "results.json").read_text())
  assert rebuilt["oracles"] == before and rebuilt["runs"].keys() == runs.keys()
  assert (alone / "online_vs_offline.md").read_text() == text


def test_the_refit_preference_model_reads_whole_answers(demo_sft, demo_cache, tmp_path,
                                                        monkeypatch):
  """The learned ranker's inputs hold the policy's prompt and both answers in full: its answer
  length is the policy's max_target_length (a length of 2 kept one token of each answer, and the
  fitted ranker agreed with the oracle no more than chance)."""
  config = configs.load("online", "size=tiny,preference_model=fit")
  config.data.cache_dir = demo_cache
  config.init_checkpoint = str(demo_sft)
  run = online.OnlineRun(config, str(tmp_path / "run"))
  online.write_jsonl(run.path(1, "pairs.jsonl"), [
      {"prompt": "increment: 1 2", "chosen": "2 3", "rejected": "2 4", "p_chosen": 1.0}])
  seen = {}
  monkeypatch.setattr(online.train, "run", lambda pm, workdir: seen.update(config=pm))
  monkeypatch.setattr(online.judges, "PreferenceModelJudge", lambda workdir: workdir)
  run.fitted_preference_model(2)
  pm = seen["config"]
  assert pm.loss == "preference_model"
  assert pm.max_target_length == config.max_target_length == 12
  assert pm.max_input_length == config.max_input_length

"""The online iterative RLHF loop (dro_jax/online.py): it beats SFT under the programmatic
oracle, a run stopped in any phase resumes bitwise with no new judge calls for judged data,
iteration k starts from iterate k−1 (and with reference="previous" is regularised towards it),
and the enhancer's tournament picks good answers on real samples."""

import json
import os
import signal

import numpy as np
import pytest

from dro_jax import configs, files, judges, online, train
from dro_jax.data import synthetic

import run_helpers


def online_config(demo_cache, sft, arg="", **overrides):
  config = configs.load("online", "size=tiny" + (f",{arg}" if arg else ""))
  config.data.cache_dir = demo_cache
  config.init_checkpoint = str(sft)
  return run_helpers.set_dotted(config, overrides)


# A small run: 2 iterations of 16 steps on 64 prompts, evaluated on 48 prompts.
SMALL = {"online.iterations": 2, "online.steps": 16, "online.prompts": 64,
         "evaluation.prompts": 48, "evaluation.samples": 1, "checkpoint_every": 8,
         "log_every": 4}


@pytest.fixture(scope="session")
def online_run(tmp_path_factory, demo_sft, demo_cache):
  """The default tiny online IPO run (3 iterations) from the shared SFT policy."""
  workdir = tmp_path_factory.mktemp("online") / "run"
  result = online.run(online_config(demo_cache, demo_sft), str(workdir))
  return workdir, result


@pytest.mark.slow
def test_online_ipo_beats_sft_and_writes_its_report(online_run):
  workdir, result = online_run
  last = result["iterations"][-1]["evaluation"]["vs_sft"]
  assert last["win_rate_low"] > 0.5, last
  assert last["policy_reward"] > last["baseline_reward"]
  assert len(result["iterations"]) == 3
  text = (workdir / "online.md").read_text()
  assert text.count("\n| ") == 4 and (workdir / "online.png").stat().st_size > 10_000
  rows = files.metrics_rows(str(workdir / "metrics.jsonl"))
  per_iteration = [row for row in rows if "online/iteration" in row]
  assert [row["online/iteration"] for row in per_iteration] == [1, 2, 3]
  assert [row["step"] for row in per_iteration] == [120, 240, 360]
  totals = [row["judge_calls/total"] for row in per_iteration]
  assert totals == sorted(totals) and totals[-1] == result["judge_calls"]["total"]
  assert all(row["judge_calls/total"] == row["judge_calls/tournament"]
             + row["judge_calls/labelling"] + row["judge_calls/evaluation"]
             for row in per_iteration)
  assert any("loss" in row for row in rows)  # the training loop's own rows


@pytest.mark.slow
def test_the_tournament_under_the_oracle_picks_an_answer_at_least_the_median(online_run):
  """The enhancer on real samples: the knock-out winner's true reward is at least the median of
  its prompt's n answers, for every prompt (the demo's judge compares true rewards)."""
  workdir, _ = online_run
  for k in (1, 2, 3):
    samples = online.read_jsonl(str(workdir / "iterations" / str(k) / "samples.jsonl"))
    best = json.loads((workdir / "iterations" / str(k) / "judged.json").read_text())["best"]
    assert len(best) == len(samples) == 512
    below = 0
    for row, index in zip(samples, best):
      rewards = [synthetic.reward(row["prompt"], answer) for answer in row["responses"]]
      below += rewards[index] < np.median(rewards)
    assert below == 0, f"iteration {k}: {below} tournament winners below their median"


def _stop_at(monkeypatch, iteration: int, phase: str) -> None:
  def hook(k, name):
    if (k, name) == (iteration, phase):
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(online, "after_phase", hook)


def _stop_at_step(monkeypatch, stop_step: int) -> None:
  check = train.FiniteMonitor.check

  def checking(self, step, metrics):
    if step == stop_step:
      os.kill(os.getpid(), signal.SIGTERM)
    return check(self, step, metrics)
  monkeypatch.setattr(train.FiniteMonitor, "check", checking)


class CountingJudge:
  """The demo judge, counting the comparisons it is asked for."""
  symmetric = True
  calls = 0

  def __init__(self):
    self.inner = judges.judge_from_spec("demo")

  def score(self, prompts, responses):
    return self.inner.score(prompts, responses)

  def prefer(self, prompts, responses_a, responses_b):
    CountingJudge.calls += len(prompts)
    return self.inner.prefer(prompts, responses_a, responses_b)


@pytest.fixture
def counting_oracle():
  judges.register_judge("dro_jax_test_counting", CountingJudge, overwrite=True)
  CountingJudge.calls = 0
  return "dro_jax_test_counting"


@pytest.mark.slow
def test_a_stopped_run_resumes_bitwise_without_judging_again(tmp_path, demo_sft, demo_cache,
                                                             monkeypatch, counting_oracle):
  """Stopped by SIGTERM after iteration 1's pairs are judged, then again in the middle of
  iteration 2's training: each restart resumes where it stopped, asks the oracle nothing it
  answered before, and the run ends bitwise equal to an uninterrupted one, with the same judge
  calls. The oracle is noisy with a fresh flip per query (noisy:P:SPEC): each restart sets its
  query counter from the calls on disk, so it draws the flips an uninterrupted run draws. With
  reference="previous", iteration 2 starts from iterate 1's parameters and its reference equals
  them."""
  config = online_config(demo_cache, demo_sft,
                         "reference=previous,oracle=noisy:0.3:" + counting_oracle, **SMALL)
  restore = online.OnlineRun.restore_queries
  live = []

  def checked_restore(self, k, phase):
    before = self.oracle.queries
    restore(self, k, phase)
    live.append((k, phase, before, self.oracle.queries))
  monkeypatch.setattr(online.OnlineRun, "restore_queries", checked_restore)
  reference = online.run(config, str(tmp_path / "uninterrupted"))
  monkeypatch.undo()
  uninterrupted_calls = CountingJudge.calls
  # Uninterrupted, the counter read from disk is the one the oracle kept: no query index reused.
  assert [(k, phase) for k, phase, _, _ in live] == [
      (1, "judged"), (1, "evaluated"), (2, "judged"), (2, "evaluated")]
  assert all(before == after for _, _, before, after in live), live
  assert live[-1][3] > live[1][3] > 0

  workdir = tmp_path / "stopped"
  CountingJudge.calls = 0
  _stop_at(monkeypatch, 1, "judged")
  with pytest.raises(train.Preempted):
    online.run(config, str(workdir))
  judged_before = CountingJudge.calls
  assert (workdir / "iterations" / "1" / "pairs.jsonl").exists()
  assert not (workdir / "iterations" / "1" / "start.json").exists()  # stopped before training
  samples_written = (workdir / "iterations" / "1" / "samples.jsonl").stat().st_mtime_ns
  monkeypatch.undo()
  _stop_at_step(monkeypatch, 21)  # inside iteration 2 (steps 17..32)
  with pytest.raises(train.Preempted):
    online.run(config, str(workdir))
  monkeypatch.undo()
  resumed = online.run(config, str(workdir))

  assert resumed["final_policy_digest"] == reference["final_policy_digest"]
  assert resumed["judge_calls"] == reference["judge_calls"]
  # Each comparison asked once over the three segments: nothing judged twice.
  assert CountingJudge.calls == uninterrupted_calls
  assert judged_before > 0
  assert (workdir / "iterations" / "1" / "samples.jsonl").stat().st_mtime_ns == samples_written
  for k in (1, 2):
    assert (online.read_jsonl(str(workdir / "iterations" / str(k) / "pairs.jsonl"))
            == online.read_jsonl(str(tmp_path / "uninterrupted" / "iterations" / str(k)
                                     / "pairs.jsonl")))
  rows = files.metrics_rows(str(workdir / "metrics.jsonl"))
  assert rows[-1]["judge_calls/total"] == reference["judge_calls"]["total"]

  # Iteration 2 starts from iterate 1 and is regularised towards it (the reference in the state).
  end_1 = json.loads((workdir / "iterations" / "1" / "end.json").read_text())
  start_2 = json.loads((workdir / "iterations" / "2" / "start.json").read_text())
  start_1 = json.loads((workdir / "iterations" / "1" / "start.json").read_text())
  assert start_2["policy_digest"] == end_1["policy_digest"] != start_1["policy_digest"]
  assert start_2["reference_digest"] == end_1["policy_digest"]
  assert start_1["reference_digest"] == start_1["policy_digest"]  # iterate 0: SFT


def test_pairs_drop_identical_answers_and_the_main_sample_being_best():
  samples = [{"prompt": "p0", "responses": ["a", "b", "c", "d"]},
             {"prompt": "p1", "responses": ["a", "b", "a", "d"]},
             {"prompt": "p2", "responses": ["x", "y", "z", "w"]}]
  pairs, counts = online.make_pairs(samples, best=[2, 2, 0], worst=None, pairing="enhancer")
  assert [(p["prompt"], p["first"], p["second"]) for p in pairs] == [("p0", "a", "c")]
  assert counts == {"dropped_identical": 2}
  pairs, counts = online.make_pairs(samples, best=[2, 3, 1], worst=[1, 0, 1],
                                    pairing="best_worst")
  assert [(p["first"], p["second"]) for p in pairs] == [("b", "c"), ("a", "d")]
  assert counts == {"dropped_identical": 1}


class LengthJudge:
  """Prefers the longer answer; equal lengths tie. Not symmetric-declared: asked both orders."""

  def prefer(self, prompts, responses_a, responses_b):
    return np.array([0.5 if len(a) == len(b) else float(len(a) > len(b))
                     for a, b in zip(responses_a, responses_b)])


def test_labels_follow_the_oracle_in_either_shown_order_and_ties_are_dropped():
  config = configs.load("online", "size=tiny")
  pairs = [{"prompt": f"p{i}", "row": i, "first": first, "second": second,
            "first_index": 0, "second_index": 1}
           for i, (first, second) in enumerate([("aaa", "b"), ("b", "aaa"), ("cc", "dd")] * 8)]
  labelled, counts, calls = online.label(pairs, LengthJudge(), config, iteration=1)
  assert counts == {"dropped_tie": 8} and len(labelled) == 16
  assert all(row["chosen"] == "aaa" and row["rejected"] == "b" for row in labelled)
  assert [row["chosen_index"] for row in labelled[:2]] == [0, 1]
  assert calls == 2 * len(pairs)  # a judge not declared symmetric is asked both orders
  # The order shown is a function of (seed, iteration, row): both orders occur.
  swap = online._row_bits(config.seed, 1, "order", len(pairs)) < 0.5
  assert 0 < swap.sum() < len(pairs)
  again, _, _ = online.label(pairs, LengthJudge(), config, iteration=1)
  assert again == labelled


def test_ranking_is_a_tournament_over_a_seeded_bracket():
  config = configs.load("online", "size=tiny")
  config.online.enhancer = "shared"  # the n answers, the main agent's among them
  samples = [{"prompt": f"p{i}", "responses": ["a" * ((i + j) % 4 + 1) for j in range(4)]}
             for i in range(6)]
  best, worst, calls = online.rank(samples, LengthJudge(), config, 1, worst=True)
  for row, b, w in zip(samples, best, worst):
    lengths = [len(r) for r in row["responses"]]
    assert lengths[b] == max(lengths) and lengths[w] == min(lengths)
  assert calls == 2 * 2 * 3 * len(samples)  # two knock-outs of n-1 matches, both orders
  random_best, random_worst, none = online.rank(samples, None, config, 1, worst=True)
  assert none == 0 and all(b != w for b, w in zip(random_best, random_worst))


@pytest.mark.parametrize("arg, message", [
    ("pairing=random", "pairing"), ("reference=moving", "reference"), ("loss=kto", "loss")])
def test_the_recipe_refuses_unknown_settings(arg, message):
  with pytest.raises(ValueError, match=message):
    configs.load("online", "size=tiny," + arg)


def test_validation_names_the_key(demo_cache):
  config = configs.load("online", "size=tiny,reference=sft")
  config.reference.alpha = 0.5
  with pytest.raises(ValueError, match="reference.alpha"):
    online.validate(config)
  config = configs.load("online", "size=tiny")
  config.online.oracle = "no_such_judge"
  with pytest.raises(ValueError, match="no_such_judge"):
    online.validate(config)
  config = configs.load("online", "size=tiny")
  config.data.task = "some_registered_task"  # the demo task and a task of one's own
  with pytest.raises(ValueError, match=r"--config\.data\.task .*--config\.data\.demo=False"):
    online.validate(config)
  config.data.demo = False
  with pytest.raises(ValueError, match="init_checkpoint"):
    online.validate(config)


@pytest.mark.slow
def test_a_fitted_preference_model_ranks_from_the_second_iteration(tmp_path, demo_sft,
                                                                   demo_cache):
  """preference_model="fit": before any pair is labelled the ranking is random (no judge
  calls); iteration 2 ranks with a pairwise preference model trained on iteration 1's pairs,
  asked in both orders."""
  config = online_config(demo_cache, demo_sft, "preference_model=fit", **SMALL)
  config.online.fit_steps = 10
  result = online.run(config, str(tmp_path / "fit"))
  rankers = [it["judged"]["ranker"] for it in result["iterations"]]
  assert rankers == ["random", "fit"]
  judged = [json.loads((tmp_path / "fit" / "iterations" / str(k) / "judged.json").read_text())
            for k in (1, 2)]
  assert judged[0]["judge_calls"]["tournament"] == 0
  n, prompts = config.online.samples, config.online.prompts
  assert judged[1]["judge_calls"]["tournament"] == 2 * (n - 1) * prompts
  model = tmp_path / "fit" / "iterations" / "2" / "preference_model"
  assert (model / "checkpoints").is_dir()
  assert json.loads((model / "config.json").read_text())["loss"] == "preference_model"
  assert not (tmp_path / "fit" / "iterations" / "1" / "preference_model").exists()


def test_the_fitted_preference_model_skips_pairs_with_an_empty_answer(tmp_path, monkeypatch):
  """A policy may answer with EOS at once: such a labelled pair is left out of the preference
  model's training file (its reader refuses an empty answer), and the rest are kept."""
  rows = {1: [{"prompt": "sort: 3 1", "chosen": "1 3", "rejected": "", "p_chosen": 1.0},
              {"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1", "p_chosen": 1.0}],
          2: [{"prompt": "sort: 5 4", "chosen": " ", "rejected": "4 5", "p_chosen": 1.0},
              {"prompt": "sort: 9 8", "chosen": "8 9", "rejected": "9 9", "p_chosen": 1.0}]}
  for k, pairs in rows.items():
    (tmp_path / str(k)).mkdir()
    files.write_jsonl(str(tmp_path / str(k) / "pairs.jsonl"), pairs)
  run = object.__new__(online.OnlineRun)
  run.path = lambda k, name: str(tmp_path / str(k) / name)
  run.vocabulary_path, run.sft_dir = "vocabulary.model", str(tmp_path / "sft")
  run.config = configs.load("online", "size=tiny")
  run.user_config, run.settings = run.config, run.config.online
  trained = []
  monkeypatch.setattr(train, "run", lambda config, workdir: trained.append(config))
  monkeypatch.setattr(judges, "PreferenceModelJudge", lambda workdir: workdir)
  assert run.fitted_preference_model(3) == str(tmp_path / "3" / "preference_model")
  (config,) = trained
  assert config.data.train_files == str(tmp_path / "3" / "fit_pairs.jsonl")
  kept = files.read_jsonl(config.data.train_files)
  assert [row["prompt"] for row in kept] == ["sort: 2 1", "sort: 9 8"]


def test_the_independent_enhancer_ranks_fresh_samples_apart_from_the_main_agents():
  config = configs.load("online", "size=tiny")  # enhancer pairing, independent by default
  n = int(config.online.samples)
  assert online.answers_per_prompt(config) == n + 1
  # Answer 0 (the main agent's) is the longest everywhere: a shared enhancer would pick it.
  samples = [{"prompt": f"p{i}", "responses": ["z" * 9] + ["a" * ((i + j) % n + 1)
                                                            for j in range(n)]}
             for i in range(12)]
  best, worst, calls = online.rank(samples, LengthJudge(), config, 1, worst=False)
  for row, b in zip(samples, best):
    lengths = [len(r) for r in row["responses"][1:]]
    assert b != 0 and len(row["responses"][b]) == max(lengths)
  assert calls == 2 * (n - 1) * len(samples)  # one knock-out over the n fresh answers
  pairs, counts = online.make_pairs(samples, best, None, "enhancer")
  assert counts["dropped_identical"] == 0 and all(p["first_index"] == 0 for p in pairs)
  random_best, _, none = online.rank(samples, None, config, 1, worst=False)
  assert none == 0 and set(random_best) <= set(range(1, n + 1))
  config.online.enhancer = "shared"
  assert online.answers_per_prompt(config) == n
  shared_best, _, _ = online.rank(samples, LengthJudge(), config, 1, worst=False)
  assert shared_best == [0] * len(samples)
  config.online.pairing = "best_worst"  # the enhancer setting is the enhancer pairing's only
  config.online.enhancer = "independent"
  assert online.answers_per_prompt(config) == n


class ConstantJudge:
  """P(A) = p for every pair, whatever the order: a general preference, not a majority."""

  def __init__(self, p):
    self.p = p

  def prefer(self, prompts, responses_a, responses_b):
    return np.full(len(prompts), self.p)


def test_bernoulli_labels_draw_the_chosen_answer_with_the_oracles_probability():
  config = configs.load("online", "size=tiny")
  assert config.online.labels == "bernoulli"
  config.online.debias = False  # P(first shown) = 0.7, so P(first) is 0.7 or 0.3 by the order
  rows = 4000
  pairs = [{"prompt": f"p{i}", "row": i, "first": f"x{i}", "second": f"y{i}",
            "first_index": 0, "second_index": 1} for i in range(rows)]
  labelled, counts, calls = online.label(pairs, ConstantJudge(0.7), config, iteration=1)
  assert counts == {"dropped_tie": 0} and len(labelled) == rows and calls == rows
  swap = online._row_bits(config.seed, 1, "order", rows) < 0.5
  shown_first_chosen = np.array([(row["chosen"] == f"y{i}") == bool(swap[i])
                                 for i, row in enumerate(labelled)])
  # The answer shown first is chosen with probability 0.7: 4000 draws put it within 0.03.
  assert abs(shown_first_chosen.mean() - 0.7) < 0.03
  assert all(row["labels"] == "bernoulli" for row in labelled)
  again, _, _ = online.label(pairs, ConstantJudge(0.7), config, iteration=1)
  assert again == labelled  # drawn from (seed, iteration, row)
  other, _, _ = online.label(pairs, ConstantJudge(0.7), config, iteration=2)
  assert [r["chosen"] for r in other] != [r["chosen"] for r in labelled]
  config.online.labels = "threshold"
  thresholded, _, _ = online.label(pairs, ConstantJudge(0.7), config, iteration=1)
  assert all(((row["chosen"] == f"y{i}") == bool(swap[i])) for i, row in enumerate(thresholded))
  assert all(row["labels"] == "threshold" for row in thresholded)
  # Hard verdicts: both modes label alike.
  hard = [{"prompt": f"p{i}", "row": i, "first": "aaa" if i % 2 else "b",
           "second": "b" if i % 2 else "aaa", "first_index": 0, "second_index": 1}
          for i in range(40)]
  config.online.debias = True
  by_threshold, _, _ = online.label(hard, LengthJudge(), config, iteration=1)
  config.online.labels = "bernoulli"
  by_draw, _, _ = online.label(hard, LengthJudge(), config, iteration=1)
  assert [r["chosen"] for r in by_draw] == [r["chosen"] for r in by_threshold]
  assert all(r["chosen"] == "aaa" for r in by_draw)


def test_the_online_debias_is_fixed_on_resume_and_a_legacy_workdir_keeps_its_behaviour(tmp_path):
  from dro_jax import resume
  config = configs.load("online", "size=tiny")
  files.write_text(str(tmp_path / "config.json"), json.dumps(resume.config_json(config)))
  config.evaluation.debias = False  # the evaluation's own: free to change
  assert [key for key, _, _ in resume.check(config, str(tmp_path))] == []
  config.online.debias = False
  with pytest.raises(resume.ConfigChangeError, match="online.debias"):
    resume.check(config, str(tmp_path))
  # A workdir from before these keys was trained with the shared enhancer and threshold labels,
  # and the evaluation's debias for the tournament: today's defaults are refused by name.
  old = resume.config_json(configs.load("online", "size=tiny"))
  for key in ("enhancer", "labels", "debias"):
    del old["online"][key]
  old["evaluation"]["debias"] = False
  files.write_text(str(tmp_path / "config.json"), json.dumps(old))
  config = configs.load("online", "size=tiny")
  with pytest.raises(resume.ConfigChangeError) as refusal:
    resume.check(config, str(tmp_path))
  for key in ("online.enhancer", "online.labels", "online.debias"):
    assert key in str(refusal.value)
  config.online.enhancer, config.online.labels, config.online.debias = (
      "shared", "threshold", False)
  assert resume.check(config, str(tmp_path)) == []


def test_online_md_names_the_iteration_where_the_evaluation_changed(tmp_path):
  config = configs.load("online", "size=tiny")
  def result(k, debias):
    vs_sft = {"win_rate": 0.6, "win_rate_low": 0.5, "win_rate_high": 0.7, "kl": 1.0,
              "policy_length": 5.0, "baseline_length": 5.0}
    return {"iteration": k, "judged": {"pairs": 10}, "judge_calls": {"total": 3},
            "evaluation": {"iteration": k, "vs_sft": vs_sft, "vs_previous": None,
                           "settings": online.evaluation_settings(config, "demo", 200)
                           | {"debias": debias}}}
  online.write_report(str(tmp_path), config, [result(1, True), result(2, True),
                                              result(3, False)], "demo")
  text = (tmp_path / "online.md").read_text()
  assert "From iteration 3, the evaluation changed" in text and "`debias` true -> false" in text
  assert "iteration 2, the evaluation" not in text


@pytest.mark.slow
def test_a_learned_oracle_end_to_end_judged_by_the_true_judge(tmp_path, demo_sft, demo_cache):
  """The realistic setting at tiny scale: a preference model trained on the demo's pairs by
  configs/preference_model.py is the oracle (`online.oracle=preference_model:DIR`), the ranker is
  refit on its labels (`preference_model=fit`), and the iterates are judged by the true judge."""
  pm = run_helpers.shrink(configs.load("preference_model", "size=tiny"), demo_cache, steps=20)
  pm.max_input_length, pm.max_target_length = 16, 12
  pm.eval_every, pm.checkpoint_every = 0, 20
  pm_dir = tmp_path / "preference_model"
  train.run(pm, str(pm_dir))
  oracle = f"preference_model:{pm_dir}"
  config = online_config(demo_cache, demo_sft, f"oracle={oracle},preference_model=fit",
                         **{**SMALL, "online.fit_steps": 8, "evaluation.judge": "demo"})
  workdir = tmp_path / "online"
  result = online.run(config, str(workdir))
  assert len(result["iterations"]) == 2
  learned = judges.judge_from_spec(oracle)
  for k in (1, 2):
    folder = workdir / "iterations" / str(k)
    pairs = online.read_jsonl(str(folder / "pairs.jsonl"))
    assert pairs and all(row["labels"] == "bernoulli" for row in pairs)
    # The labels are draws from the learned oracle's own probabilities, asked in both orders
    # (a preference model is not symmetric) and averaged.
    prompts = [row["prompt"] for row in pairs]
    chosen, rejected = [row["chosen"] for row in pairs], [row["rejected"] for row in pairs]
    p_chosen = (learned.prefer(prompts, chosen, rejected)
                + 1 - learned.prefer(prompts, rejected, chosen)) / 2
    np.testing.assert_allclose([row["p_chosen"] for row in pairs], p_chosen, atol=1e-5)
    assert 0 < min(p_chosen) and max(p_chosen) < 1  # a general preference, not a hard rule
    evaluated = json.loads((folder / "evaluation.json").read_text())
    assert evaluated["judge"] == "demo"  # the true judge, not the learned oracle
  # Iteration 2 ranks with a preference model refit on iteration 1's learned labels.
  assert (workdir / "iterations" / "2" / "preference_model" / "checkpoints").is_dir()
  assert result["judge_calls"]["labelling"] > 0

"""The `api:MODEL@BASE_URL` judge (dro_jax/api_judge.py) against a real local HTTP server that
speaks chat completions and plays the demo's judge (tests/judge_server.py): its verdicts are the
rule's, debiasing removes the server's first-position bias, concurrency stays within
max_concurrency, 429 / 500 / malformed replies are retried (Retry-After waited out), an
unparseable reply is asked again and never taken as a verdict, the verdict cache makes a stopped
and restarted judging ask nothing twice, the budget stops before it is passed (exit 3 from the
command line), and the key appears in no file and on no console."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dro_jax import api_judge, errors, evaluation, judge_specs, judges
from dro_jax.data import synthetic

from judge_server import JudgeServer, rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARD = {"A": 1.0, "B": 0.0, "tie": 0.5}


def demo_pairs(count: int, seed: int = 3):
  """`count` demo prompts with two demonstrator answers each (some of equal reward: ties)."""
  rows = synthetic.feedback(count, 2, seed=seed)
  return ([r["prompt"] for r in rows[::2]], [r["response"] for r in rows[::2]],
          [r["response"] for r in rows[1::2]])


def make_judge(server, tmp_path, name="cache.sqlite", **options):
  options = {"cache": str(tmp_path / name), "backoff": 0.01, "max_backoff": 0.05, **options}
  return judges.judge_from_spec(f"api:judge@{server.url}", **options)


def test_specs_are_checked_and_an_unreachable_endpoint_fails_in_one_line_naming_it():
  assert api_judge.parse_spec("api:gpt-4o-mini@https://api.openai.com/v1") == (
      "gpt-4o-mini", "https://api.openai.com/v1")
  assert api_judge.parse_spec("api:Qwen/Qwen2.5-7B@http://h:8000/v1/") == (
      "Qwen/Qwen2.5-7B", "http://h:8000/v1")
  for bad in ("api:gpt-4o", "api:@http://h/v1", "api:m@ftp://h"):
    with pytest.raises(errors.UserError, match="expected api:MODEL@BASE_URL"):
      judge_specs.check(bad, "--judge")
  judge_specs.check("noisy:0.1:api:m@http://127.0.0.1:9/v1", "--judge")
  import socket
  with socket.socket() as probe:  # a port nobody listens on
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  url = f"http://127.0.0.1:{port}/v1"
  with pytest.raises(errors.UserError) as raised:
    judges.judge_from_spec(f"api:m@{url}")
  message = str(raised.value)
  assert f"cannot reach {url}" in message and "\n" not in message


def test_the_template_is_shipped_filled_in_one_pass_and_checked(tmp_path):
  text = api_judge.read_template(None)
  assert all("{" + field + "}" in text for field in api_judge.FIELDS)
  filled = api_judge.fill(text, "p {response_b}", "x {prompt}", "y")
  assert "p {response_b}" in filled and "x {prompt}" in filled
  bad = tmp_path / "bad.txt"
  bad.write_text("Which is better, {response_a} or {response_b}?")
  with pytest.raises(errors.UserError, match=r"bad.txt: has no \{prompt\}"):
    api_judge.read_template(str(bad), "--judge_template")


def test_replies_are_parsed_and_log_probabilities_give_p_of_a():
  assert [api_judge.parse_verdict(t) for t in ("A", " B.", "[[A]]", "tie", "Tie", "**B**",
                                                "Response A", "a", "I think A", "")] == [
      1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0, None, None, None]
  content = [{"token": "B", "top_logprobs": [{"token": "B", "logprob": np.log(0.6)},
                                             {"token": " A", "logprob": np.log(0.3)},
                                             {"token": "tie", "logprob": np.log(0.1)}]}]
  assert api_judge.probability_from_logprobs(content) == pytest.approx(0.35)
  assert api_judge.probability_from_logprobs([{"token": "C", "top_logprobs": []}]) is None


@pytest.mark.parametrize("logprobs", [False, True])
def test_verdicts_equal_the_rule_through_retries_of_429_500_and_malformed_replies(
    tmp_path, logprobs):
  prompts, a, b = demo_pairs(120)
  expected = [rule(*row) for row in zip(prompts, a, b)]
  assert {"A", "B", "tie"} <= set(expected)
  with JudgeServer(fail_429=0.05, fail_500=0.05, malformed_json=0.05, unparseable=0.05,
                   logprobs=logprobs, confidence=0.9) as server:
    judge = make_judge(server, tmp_path)
    values = judge.prefer(prompts, a, b)
    rest = 0.1 / 2  # the server's top tokens: the verdict at 0.9, the other two at 0.05
    soft = {"A": 0.9 + rest / 2, "B": rest + rest / 2, "tie": rest + 0.9 / 2}
    np.testing.assert_allclose(values, [(soft if logprobs else HARD)[v] for v in expected])
    assert all(server.statuses[kind] > 0 for kind in ("429", "500", "malformed",
                                                      "unparseable")), server.statuses
    counts = judge.counts()
    assert counts["paid"] == sum(server.verdicts.values()) + server.statuses["unparseable"]
    assert counts["unparseable"] == 0 and max(server.verdicts.values()) == 1


def test_debiasing_removes_the_servers_first_position_bias(tmp_path):
  prompts, a, b = demo_pairs(150, seed=5)
  truth = np.asarray([HARD[rule(*row)] for row in zip(prompts, a, b)])
  with JudgeServer(bias=0.3) as server:
    judge = make_judge(server, tmp_path)
    one_order, calls, debiased = judges.compare(judge, prompts, a, b, debias=False)
    swapped, _, _ = judges.compare(judge, prompts, b, a, debias=False)
    assert calls == 150 and not debiased
    # Asked one order, the first shown wins too often: (a, b) and (b, a) sum above 1.
    assert np.mean(one_order + swapped) > 1.2
    assert np.sum(one_order != truth) > 10
    both, calls, debiased = judges.compare(judge, prompts, a, b)
    reverse, _, _ = judges.compare(judge, prompts, b, a)
    assert calls == 300 and debiased
    np.testing.assert_allclose(both + reverse, 1.0)  # no side favoured by its position
    # Never the wrong side: a biased order only softens a verdict towards a tie.
    assert np.all((both - 0.5) * (truth - 0.5) >= 0)
    assert np.all(np.abs(both - truth) <= 0.5)
    # Only the second prefer call of the (a, b) rows and (b, a) rows was new: all cached.
    assert max(server.verdicts.values()) == 1


@pytest.mark.parametrize("limit", [3, 8])
def test_concurrency_stays_within_max_concurrency(tmp_path, limit):
  prompts, a, b = demo_pairs(40)
  with JudgeServer(latency=0.05) as server:
    judge = make_judge(server, tmp_path, max_concurrency=limit)
    start = time.perf_counter()
    judge.prefer(prompts, a, b)
    seconds = time.perf_counter() - start
  assert server.max_in_flight == limit
  assert seconds < 40 * 0.05 / limit * 2.5 + 0.5  # concurrent, not one at a time


def test_retry_after_is_waited_out(tmp_path):
  prompts, a, b = demo_pairs(4)
  with JudgeServer(first_429=True, retry_after=0.6) as server:
    judge = make_judge(server, tmp_path)
    values = judge.prefer(prompts, a, b)
  assert not np.isnan(values).any()
  gaps = [times[1] - times[0] for times in server.times.values()]
  assert len(gaps) == len(set(zip(prompts, a, b))) and min(gaps) >= 0.6, gaps


def test_a_request_that_times_out_is_asked_again(tmp_path):
  prompts, a, b = demo_pairs(6)
  with JudgeServer(slow_first=1.0) as server:
    judge = make_judge(server, tmp_path, timeout=0.3)
    values = judge.prefer(prompts, a, b)
    keys = len(set(zip(prompts, a, b)))
    assert len(server.per_key) == keys and set(server.per_key.values()) == {2}
  np.testing.assert_array_equal(values, [HARD[rule(*row)] for row in zip(prompts, a, b)])
  assert judge.counts()["paid"] == keys  # a timed-out request is not counted as paid


def test_an_unparseable_reply_is_asked_again_then_counted_and_never_a_verdict(tmp_path, capsys):
  prompts, a, b = demo_pairs(6)
  with JudgeServer(unparseable=1.0) as server:
    judge = make_judge(server, tmp_path)
    values = judge.prefer(prompts, a, b)
    assert np.isnan(values).all()
    assert server.requests == 2 * 6 and set(server.per_key.values()) == {2}
    assert judge.counts() == {"paid": 12, "cached": 0, "unparseable": 6}
    assert "6 of 6 replies could not be read as A, B or tie" in capsys.readouterr().out
    judge.prefer(prompts, a, b)  # not cached: asked again
    assert server.requests == 24
    # In both orders: no verdict at all; the evaluation leaves such prompts out, the online
    # labels drop the pair, the tournament keeps the earlier.
    p, _, _ = judges.compare(judge, prompts, a, b)
    assert np.isnan(p).all()
    assert judges.tournament(prompts[:2], [[a[0], b[0]], [a[1], b[1]]], judge)[0] == [0, 0]
  server.unparseable = 0.0


def test_one_order_without_a_verdict_leaves_the_other_orders():
  class Half:
    abstains = True

    def prefer(self, prompts, responses_a, responses_b):
      return np.asarray([np.nan if x < y else 1.0 for x, y in zip(responses_a, responses_b)])
  p, calls, _ = judges.compare(Half(), ["p", "p"], ["a", "b"], ["b", "a"])
  # (a, b): NaN, (b, a): 1 -> b wins, P(a) = 0 ; (b, a) asked first: 1, (a, b): NaN -> 1.
  np.testing.assert_array_equal(p, [0.0, 1.0])
  with pytest.raises(ValueError, match="outside"):
    judges.compare(type("Strict", (), {"prefer": Half.prefer})(), ["p"], ["a"], ["b"])


def test_the_online_labels_drop_a_pair_without_a_verdict():
  from dro_jax import configs, online
  config = configs.load("online", "size=tiny")
  pairs = [{"prompt": prompt, "row": i, "first": "aaa", "second": "b", "first_index": 0,
            "second_index": 1} for i, prompt in enumerate(["p0", "skip", "p2", "skip"])]
  for labels in ("bernoulli", "threshold"):
    if "labels" in config.online:
      config.online.labels = labels
    labelled, counts, _ = online.label(pairs, Abstaining(["skip"]), config, iteration=1)
    assert [row["prompt"] for row in labelled] == ["p0", "p2"]
    assert counts["dropped_tie"] == 2


def test_the_cache_is_keyed_by_spec_template_and_order_and_survives_a_new_judge(tmp_path):
  prompts, a, b = demo_pairs(20)
  with JudgeServer() as server:
    first = make_judge(server, tmp_path)
    values = first.prefer(prompts, a, b)
    asked = server.requests
    again = make_judge(server, tmp_path).prefer(prompts, a, b)  # a fresh process's judge
    np.testing.assert_array_equal(values, again)
    assert server.requests == asked
    forward = set(zip(prompts, a, b))
    assert asked == len(forward)
    make_judge(server, tmp_path).prefer(prompts, b, a)  # the other order: new comparisons
    swapped = set(zip(prompts, b, a)) - forward  # identical answers: the same comparison
    assert len(swapped) > 10 and server.requests == asked + len(swapped)
    template = tmp_path / "mine.txt"
    template.write_text(api_judge.read_template(None).replace("impartial", "fair"))
    make_judge(server, tmp_path, template=str(template)).prefer(prompts, a, b)
    assert server.requests == 2 * asked + len(swapped)
  counts = first.counts()  # the store's counters: this spec and template, every judge on it
  assert counts["paid"] == asked + len(swapped)
  assert counts["cached"] == 20 + (20 - len(swapped))


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_judging_stopped_by_a_signal_keeps_every_paid_verdict_and_asks_nothing_twice(
    tmp_path, signal_number):
  prompts, a, b = demo_pairs(60)
  with JudgeServer(latency=0.02) as server:
    server.on_request = lambda count: count == 20 and os.kill(os.getpid(), signal_number)
    judge = make_judge(server, tmp_path, max_concurrency=4)
    with pytest.raises(errors.JudgingStopped, match="the same command resumes"):
      judge.prefer(prompts, a, b)
    answered = sum(server.verdicts.values())
    assert 20 <= answered < 60 and judge.counts()["paid"] == answered
    assert signal.getsignal(signal.SIGTERM) is not None  # the handlers are put back
    server.on_request = None
    values = make_judge(server, tmp_path).prefer(prompts, a, b)
  assert max(server.verdicts.values()) == 1 and sum(server.verdicts.values()) == 60
  np.testing.assert_array_equal(values, [HARD[rule(*row)] for row in zip(prompts, a, b)])


def test_the_budget_stops_before_a_batch_would_pass_it(tmp_path):
  prompts, a, b = demo_pairs(50)
  with JudgeServer() as server:
    judge = make_judge(server, tmp_path, max_calls=30, budget_key="evaluation.judge_max_calls")
    judge.prefer(prompts[:20], a[:20], b[:20])
    with pytest.raises(errors.JudgeBudgetExceeded) as raised:
      judge.prefer(prompts, a, b)
    assert server.requests == 20  # nothing of the batch sent
    message = str(raised.value)
    assert "evaluation.judge_max_calls=30" in message and "20 calls paid" in message
    assert "30 more not in the cache" in message
    judge.prefer(prompts[:20], a[:20], b[:20])  # from the cache: free
    make_judge(server, tmp_path, max_calls=50).prefer(prompts, a, b)
  assert server.requests == 50 and max(server.verdicts.values()) == 1


class Abstaining:
  """Prefers the longer answer; no verdict at all on the prompts in `skip`."""
  abstains, symmetric = True, False

  def __init__(self, skip):
    self.skip = set(skip)

  def prefer(self, prompts, responses_a, responses_b):
    return np.asarray([np.nan if p in self.skip else 0.5 + 0.5 * np.sign(len(x) - len(y))
                       for p, x, y in zip(prompts, responses_a, responses_b)])


def test_unjudged_comparisons_leave_the_win_rate_by_prompt(one_step_sft):
  from dro_jax import decoding, policies
  loaded = policies.load_policy(str(one_step_sft))
  from dro_jax.datasets import task_vocabulary
  vocabulary = task_vocabulary(loaded.run_config)
  prompts = synthetic.eval_prompts(10, 0)
  sampling = decoding.SamplingParams(max_decode_length=8, num_samples=2)
  common = dict(sampling=sampling, max_input_length=32, return_samples=True)
  full = evaluation.evaluate_policies(loaded.policy, loaded.policy, vocabulary, prompts,
                                      Abstaining([]), **common)
  some = evaluation.evaluate_policies(loaded.policy, loaded.policy, vocabulary, prompts,
                                      Abstaining(prompts[:3]), **common)
  assert "unjudged" not in full
  assert some["unjudged"] == 6 and some["prompts_dropped_unjudged"] == 3
  assert some["prompts"] == 7 and some["n"] == 14
  kept = [row["preference"] for row in full["samples"][6:]]
  assert some["win_rate"] == pytest.approx(np.mean(kept))


# --------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_evaluate_with_an_api_judge_stops_at_its_budget_and_never_shows_the_key(
    tmp_path, one_step_sft):
  """`python -m dro_jax.evaluate --judge api:...`: stopped by --judge_max_calls before the batch
  that would pass it (exit 3, one line naming the calls paid and to do, nothing sent), then
  stopped by SIGTERM in the middle of judging (exit 143), then run to the end: each comparison
  answered once; the key (checked by the server) is in no file of the workdir, the output or
  the cache, and not on the console."""
  secret = "sk-test-" + "5ecret" * 6
  env = {**os.environ, "DRO_JAX_JUDGE_API_KEY": secret, "JAX_PLATFORMS": "cpu"}
  output, cache = tmp_path / "evaluation", tmp_path / "judge_cache.sqlite"
  with JudgeServer(api_key=secret, fail_500=0.05, latency=0.05) as server:
    command = [sys.executable, "-m", "dro_jax.evaluate", "--policy", str(one_step_sft),
               "--baseline", str(one_step_sft), "--judge", f"api:judge@{server.url}",
               "--num_prompts", "12", "--output", str(output), "--judge_cache", str(cache),
               "--judge_max_concurrency", "2"]
    stopped = subprocess.run(command + ["--judge_max_calls", "10"], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=600)
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("stopped: judge budget --judge_max_calls=10 reached: 0 calls paid")
    assert "more not in the cache remain" in line
    assert server.requests == 0
    # SIGTERM after the 6th request: the requests in flight are answered and stored.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env=env)
    server.on_request = lambda count: count == 6 and process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=600)
    server.on_request = None
    assert process.returncode == 143, err[-2000:]
    assert "preempted: stopped by SIGTERM while judging" in err
    paid_before = sum(server.verdicts.values())
    assert 6 <= paid_before < 24  # stopped part of the way
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
  assert server.bearers == {secret}
  assert max(server.verdicts.values()) == 1  # nothing answered twice over the three runs
  report = json.loads((output / "evaluation.json").read_text())
  assert report["judge_calls"] == 24
  assert report["judge_calls_paid"] == sum(server.verdicts.values()) - paid_before
  assert report["judge_calls_cached"] >= paid_before
  assert (f"{report['judge_calls_paid']} requests paid, {report['judge_calls_cached']} answered "
          f"from the cache") in finished.stdout
  for run_output in (stopped.stdout + stopped.stderr, out + err,
                     finished.stdout + finished.stderr):
    assert secret not in run_output
  assert cache.exists() and (output / "samples.jsonl").exists()
  for folder in (one_step_sft, tmp_path):
    for root, _, names in os.walk(folder):
      for name in names:
        with open(os.path.join(root, name), "rb") as f:
          assert secret.encode() not in f.read(), os.path.join(root, name)


def test_the_evaluate_command_caches_in_the_policy_workdir_by_default(tmp_path):
  from dro_jax import evaluate
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  args = evaluate.parse_args(["--policy", str(workdir / "checkpoints" / "7"), "--baseline", "b",
                              "--judge", "api:m@http://127.0.0.1:9/v1"])
  assert evaluate.judge_options(args)["cache"] == str(workdir / "judge_cache.sqlite")
  args = evaluate.parse_args(["--policy", "hf_folder", "--baseline", "b", "--output", "out"])
  assert evaluate.judge_options(args)["cache"] == os.path.join("out", "judge_cache.sqlite")


# ------------------------------------------------------------------------- the online loop


def test_the_online_loop_with_an_api_oracle_stops_and_resumes_asking_nothing_twice(
    tmp_path, one_step_sft, demo_cache, monkeypatch):
  """2 tiny iterations with `online.oracle=api:...@http://127.0.0.1:PORT/v1` (it ranks, labels
  and evaluates): stopped by SIGTERM during iteration 1's labelling, restarted under an
  `online.oracle_max_calls` the next batch would pass (stopped again before sending it, state
  and cache kept), then restarted with the budget lifted: the server sees each (pair, order)
  answered at most once, and the metrics count the paid and the cached calls."""
  from dro_jax import configs, files, online
  import run_helpers
  workdir = str(tmp_path / "online")
  with JudgeServer(fail_429=0.02, fail_500=0.02) as server:
    def config(**changes):
      made = configs.load("online", f"size=tiny,oracle=api:judge@{server.url}")
      made.data.cache_dir = demo_cache
      made.init_checkpoint = str(one_step_sft)
      return run_helpers.set_dotted(made, {
          "online.iterations": 2, "online.steps": 4, "online.prompts": 24,
          "evaluation.prompts": 12, "evaluation.samples": 1, "checkpoint_every": 4,
          "log_every": 2, **changes})

    label_within = online.label_within
    labelling = {}

    def stopping(*args, **kwargs):  # SIGTERM once 10 more requests came in while labelling
      labelling["from"] = server.requests
      server.on_request = lambda count: (count == labelling["from"] + 10
                                         and os.kill(os.getpid(), signal.SIGTERM))
      return label_within(*args, **kwargs)
    monkeypatch.setattr(online, "label_within", stopping)
    with pytest.raises(errors.JudgingStopped):
      online.run(config(), workdir)
    monkeypatch.undo()
    server.on_request = None
    assert not os.path.exists(os.path.join(workdir, "iterations", "1", "judged.json"))
    paid = sum(server.verdicts.values())
    assert paid > labelling["from"] - sum(server.statuses[k] for k in ("429", "500"))

    asked = server.requests
    with pytest.raises(errors.JudgeBudgetExceeded, match="online.oracle_max_calls"):
      online.run(config(**{"online.oracle_max_calls": paid + 2}), workdir)
    assert server.requests == asked  # the tournament came from the cache; nothing more sent

    result = online.run(config(), workdir)
  assert len(result["iterations"]) == 2
  assert max(server.verdicts.values()) == 1, "a (pair, order) was answered twice"
  rows = [row for row in files.metrics_rows(os.path.join(workdir, "metrics.jsonl"))
          if "online/iteration" in row]
  last = rows[-1]
  assert last["judge_calls/paid"] == sum(server.verdicts.values()) + server.statuses[
      "unparseable"]
  assert last["judge_calls/cached"] > 0  # the restarted iteration's tournament, at least
  # Each comparison the loop made was either paid once or answered from the cache.
  assert last["judge_calls/total"] <= last["judge_calls/paid"] + last["judge_calls/cached"]


def test_the_online_loop_refuses_an_unreachable_oracle_before_writing_anything(tmp_path,
                                                                             demo_cache):
  from dro_jax import configs, online
  url = "http://127.0.0.1:9/v1"  # the discard port: nothing answers there
  config = configs.load("online", f"size=tiny,oracle=api:judge@{url}")
  config.data.cache_dir = demo_cache
  with pytest.raises(errors.UserError, match=f"cannot reach {url}"):
    online.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config.online.oracle = "api:judge"
  with pytest.raises(errors.UserError, match="config.online.oracle api:judge: expected"):
    online.validate(config)
  # The driver's checks before any run (the demo's and training's periodic judge too).
  from dro_jax import main
  demo_config = configs.load("demo", "scale=0.3,methods=dro")
  demo_config.data.cache_dir = demo_cache
  demo_config.evaluation.judge = f"noisy:0.1:api:judge@{url}"
  with pytest.raises(errors.UserError, match=f"cannot reach {url}"):
    main.preflight(demo_config)


def test_the_demos_final_evaluation_judges_with_an_api_judge(tmp_path, one_step_sft):
  """The demo's `evaluation.judge` as an API judge: its final evaluation asks the server in both
  orders, and its result equals the demo judge's rule (the server plays it), debiased."""
  from dro_jax import configs, demo, policies
  from dro_jax.datasets import task_vocabulary
  loaded = policies.load_policy(str(one_step_sft))
  vocabulary = task_vocabulary(loaded.run_config)
  settings = configs.load("demo", "scale=0.3,methods=dro")
  settings.demo.eval_prompts, settings.demo.final_samples = 8, 1
  settings.max_input_length = 32
  results = {}
  with JudgeServer() as server:
    for spec in ("demo", f"api:judge@{server.url}"):
      settings.evaluation.judge = spec
      final = demo.FinalEvaluation(settings, loaded.policy, vocabulary)
      results[spec] = final(loaded.policy, str(tmp_path / spec.replace("/", "_")))
  api = results[f"api:judge@{server.url}"]
  assert api["judge"].startswith("api:") and api["debiased"] and api["judge_calls"] == 16
  assert api["win_rate"] == results["demo"]["win_rate"]
  assert api["judge_calls_paid"] == sum(server.verdicts.values()) > 0


def test_the_template_concurrency_and_cache_come_from_the_config_and_the_flags(tmp_path):
  from dro_jax import configs, evaluate
  config = configs.load("online", "size=tiny")
  config.evaluation.judge_template = str(tmp_path / "mine.txt")
  config.evaluation.judge_max_concurrency = 3
  default = str(tmp_path / "default.sqlite")
  options = judges.judge_options(config.evaluation, cache=default, max_calls=5)
  assert options["template"] == str(tmp_path / "mine.txt")
  assert (options["max_concurrency"], options["max_calls"]) == (3, 5)
  assert options["cache"] == default
  config.evaluation.judge_cache = str(tmp_path / "given.sqlite")
  assert judges.judge_options(config.evaluation, cache="x")["cache"] == str(
      tmp_path / "given.sqlite")
  (tmp_path / "mine.txt").write_text("{prompt} {response_a} {response_b}")
  with JudgeServer() as server:
    judge = judges.judge_from_spec(f"api:judge@{server.url}", **options)
    assert judge.max_concurrency == 3 and judge.template.startswith("{prompt}")
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  (tmp_path / "bad.txt").write_text("{prompt} {response_a}")
  args = evaluate.parse_args(["--policy", str(workdir), "--baseline", str(workdir), "--judge",
                              "api:m@http://127.0.0.1:9/v1", "--judge_template",
                              str(tmp_path / "bad.txt")])
  with pytest.raises(errors.UserError, match=r"--judge_template .*bad.txt: has no "
                                             r"\{response_b\}"):
    evaluate.check_args(args)

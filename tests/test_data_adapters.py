"""Each adapter on small files with the published schema (docs/datasets.md)."""

import json
import math
import string
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio

from dro_jax.data import adapters, pipeline, statistics, synthetic, tasks
from dro_jax.data.readers import DataError


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocabulary") / "spiece.model")
  corpus = [" ".join(string.ascii_letters + string.digits + string.punctuation)] * 5
  synthetic.train_sentencepiece(corpus, path, vocab_size=100)
  return path


@pytest.fixture
def register(vocabulary):
  """Registers a Task from rows written as JSONL (or parquet); returns its validated examples."""
  created = []

  def make(tmp_path, rows, *, pairwise=False, file_type="jsonl", **kwargs):
    name = f"test_data_adapters_{uuid.uuid4().hex[:10]}"
    created.append(name)
    path = tmp_path / f"{name}.{file_type}"
    if file_type == "parquet":
      pq.write_table(pa.Table.from_pylist(rows), str(path))
    else:
      path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    register_task = (tasks.register_pairwise_task if pairwise
                     else tasks.register_single_trajectory_task)
    register_task(name, str(path), vocabulary, **kwargs)
    return name, str(path)

  yield make
  for name in created:
    seqio.TaskRegistry.remove(name)


def examples(name):
  return list(tasks.feedback_source(name).examples("train"))


# ----------------------------------------------------------------------------- UltraFeedback


def uf_completion(response, overall, fine, ratings):
  aspects = dict(zip(adapters.ULTRAFEEDBACK_ASPECTS, ratings))
  return {
      "model": "some-model", "principle": "helpfulness", "custom_system_prompt": "Be helpful.",
      "response": response, "critique": "Fine.", "overall_score": overall,
      "fine-grained_score": fine,
      "annotations": {
          "instruction_following": {"Rating": aspects["instruction_following"], "Rationale": "r"},
          "honesty": {"Rating": aspects["honesty"], "Rationale": "r"},
          "truthfulness": {"Type": ["0"], "Rationale": "r", "Rating": aspects["truthfulness"],
                           "Rationale For Rating": "r"},
          "helpfulness": {"Type": ["1", "2"], "Rationale": "r", "Rating": aspects["helpfulness"],
                          "Rationale For Rating": "r"}}}


def uf_row(instruction, completions):
  return {"source": "evol_instruct", "instruction": instruction,
          "models": ["a", "b", "c", "d"][:len(completions)], "correct_answers": ["None"],
          "incorrect_answers": ["None"], "completions": completions}


UF_ROWS = [
    uf_row("Name a colour.", [
        uf_completion("Red.", 8.0, 4.5, ["5", "4", "5", "4"]),
        uf_completion("Blue, I think.", 6.5, None, ["4", "N/A", "3", "2"]),  # Recomputed: 3.0
        uf_completion("Dog.", 2.0, 1.25, ["1", "1", "2", "1"]),
        uf_completion("Green.", 7.0, float("nan"), ["N/A", "N/A", "4", "4"]),  # Recomputed: 4.0
    ]),
    uf_row("Say hi.", [uf_completion("Hi!", 9.0, 4.0, ["4"] * 4),
                       uf_completion("Hello!", 9.0, 4.0, ["4"] * 4)]),  # A tie.
]


@pytest.mark.parametrize("file_type", ["jsonl", "parquet"])
def test_ultrafeedback_triples_default_fine_grained(tmp_path, register, file_type):
  name, _ = register(tmp_path, UF_ROWS, file_type=file_type,
                     adapter=adapters.ultrafeedback_triples())
  got = [(example["inputs"], example["targets"], example["reward"]) for example in examples(name)]
  assert got == [("Name a colour.", "Red.", 4.5), ("Name a colour.", "Blue, I think.", 3.0),
                 ("Name a colour.", "Dog.", 1.25), ("Name a colour.", "Green.", 4.0),
                 ("Say hi.", "Hi!", 4.0), ("Say hi.", "Hello!", 4.0)]


def test_ultrafeedback_triples_other_scores_through_the_pipeline(tmp_path, register):
  name, _ = register(tmp_path, UF_ROWS, file_type="parquet",
                     adapter=adapters.ultrafeedback_triples("overall"))
  iterator = pipeline.input_pipeline(name, global_batch_size=6, process_index=0, process_count=1,
                                     shuffle=False, reward_mode="normalized")
  raw = np.array([8.0, 6.5, 2.0, 7.0, 9.0, 9.0])
  np.testing.assert_allclose(next(iterator)["reward"], (raw - raw.mean()) / raw.std(), rtol=1e-5)
  honesty, _ = register(tmp_path, UF_ROWS[1:], adapter=adapters.ultrafeedback_triples("honesty"))
  assert [example["reward"] for example in examples(honesty)] == [4.0, 4.0]
  with pytest.raises(ValueError, match="unknown UltraFeedback score"):
    adapters.ultrafeedback_triples("fine_grained")


def test_ultrafeedback_bad_completion_is_reported_or_skipped_alone(tmp_path, register):
  rows = [UF_ROWS[1], uf_row("Count.", [uf_completion("1 2 3", 8.0, 4.0, ["4"] * 4),
                                        uf_completion("", 1.0, 1.0, ["1"] * 4),
                                        uf_completion("one", 5.0, None, ["N/A"] * 4)])]
  name, path = register(tmp_path, rows, adapter=adapters.ultrafeedback_triples())
  with pytest.raises(DataError, match=rf"{path}:2: completions\[1\]: field 'response': empty"):
    examples(name)
  name, _ = register(tmp_path, rows, adapter=adapters.ultrafeedback_triples(), on_invalid="skip")
  stats = statistics.compute_statistics(name, "train")
  assert stats.count == 3 and stats.skipped == {"invalid": 2}


def test_ultrafeedback_pairs_best_against_worst_dropping_ties(tmp_path, register):
  name, _ = register(tmp_path, UF_ROWS, pairwise=True, adapter=adapters.ultrafeedback_pairs())
  assert examples(name) == [{"inputs": "Name a colour.", "chosen": "Red.", "rejected": "Dog."}]
  assert statistics.compute_statistics(name, "train").skipped == {"dropped": 1}

  name, _ = register(tmp_path, UF_ROWS, pairwise=True,
                     adapter=adapters.ultrafeedback_pairs(rejected="random", seed=3))
  (pair,) = examples(name)
  assert pair["chosen"] == "Red." and pair["rejected"] in ("Blue, I think.", "Dog.", "Green.")
  assert examples(name) == [pair]  # Deterministic.


def test_ultrafeedback_binarized(tmp_path, register):
  def chat(prompt, response):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
  rows = [{"prompt": "Why?", "prompt_id": "p1", "chosen": chat("Why?", "Because."),
           "rejected": chat("Why?", "No."), "messages": chat("Why?", "Because."),
           "score_chosen": 8.0, "score_rejected": 4.0},
          {"prompt": "Tie?", "prompt_id": "p2", "chosen": chat("Tie?", "Yes."),
           "rejected": chat("Tie?", "Also yes."), "messages": chat("Tie?", "Yes."),
           "score_chosen": 7.0, "score_rejected": 7.0}]
  name, _ = register(tmp_path, rows, pairwise=True, file_type="parquet",
                     adapter=adapters.ultrafeedback_binarized_pairs())
  assert examples(name) == [{"inputs": "User: Why?", "chosen": "Because.", "rejected": "No."},
                            {"inputs": "User: Tie?", "chosen": "Yes.", "rejected": "Also yes."}]
  name, _ = register(tmp_path, rows, pairwise=True,
                     adapter=adapters.ultrafeedback_binarized_pairs(drop_ties=True))
  assert len(examples(name)) == 1
  name, _ = register(tmp_path, rows[:1], adapter=adapters.ultrafeedback_binarized_triples())
  assert [(example["targets"], example["reward"]) for example in examples(name)] == [
      ("Because.", 8.0), ("No.", 4.0)]
  broken = [{**rows[0], "rejected": chat("Something else?", "No.")}]
  name, path = register(tmp_path, broken, pairwise=True,
                        adapter=adapters.ultrafeedback_binarized_pairs())
  with pytest.raises(DataError, match=rf"{path}:1: field 'rejected': its prompt messages differ"):
    examples(name)


# ---------------------------------------------------------------------------------- Anthropic HH

SHORT_HH = {"chosen": "\n\nHuman: Hm?\n\nAssistant: Yes.",
            "rejected": "\n\nHuman: Hm?\n\nAssistant: No."}


def test_anthropic_hh_prompt_ends_at_the_last_assistant_turn(tmp_path, register):
  prompt = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
  rows = [{"chosen": prompt + " I am good, thanks.", "rejected": prompt + " I am busy."},
          SHORT_HH]
  name, _ = register(tmp_path, rows, pairwise=True, adapter=adapters.anthropic_hh_pairs())
  assert examples(name) == [
      {"inputs": prompt, "chosen": " I am good, thanks.", "rejected": " I am busy."},
      {"inputs": "\n\nHuman: Hm?\n\nAssistant:", "chosen": " Yes.", "rejected": " No."}]
  name, path = register(tmp_path, [{"chosen": "\n\nHuman: no reply", "rejected": "x"}],
                        pairwise=True, adapter=adapters.anthropic_hh_pairs())
  with pytest.raises(DataError, match=rf"{path}:1: field 'chosen': has no"):
    examples(name)


def test_unpaired_hh_for_kto(tmp_path, register):
  rows = [SHORT_HH]
  name, _ = register(tmp_path, rows, thumbs=True,
                     adapter=adapters.unpair(adapters.anthropic_hh_pairs()))
  got = [(example["targets"], example["label"], example["reward"]) for example in examples(name)]
  assert got == [(" Yes.", 1, 1.0), (" No.", 0, 0.0)]


# ------------------------------------------------------------------------------------- TL;DR


def test_tldr_comparisons_reddit_and_article_rows(tmp_path, register):
  def summaries(first, second):
    return [{"text": first, "policy": "ref", "note": None},
            {"text": second, "policy": "sup2", "note": "ok"}]
  rows = [{"info": {"id": "t3_1", "post": "My cat sleeps all day.", "title": "Lazy cat",
                    "subreddit": "cats", "site": None, "article": None},
           "summaries": summaries("Cat sleeps.", " Cat is lazy and sleeps."), "choice": 1,
           "worker": "w1", "batch": "batch1", "split": "train", "extra": {"confidence": 7}},
          {"info": {"id": "cnn_1", "post": None, "title": None, "subreddit": None,
                    "site": "cnn", "article": "Rain fell."},
           "summaries": summaries("It rained.", "Sun."), "choice": 0, "worker": "w2",
           "batch": "batch2", "split": "valid2", "extra": {"confidence": None}}]
  name, _ = register(tmp_path, rows, pairwise=True, file_type="parquet",
                     adapter=adapters.tldr_comparisons())
  assert examples(name) == [
      {"inputs": "SUBREDDIT: r/cats\n\nTITLE: Lazy cat\n\nPOST: My cat sleeps all day.\n\nTL;DR:",
       "chosen": " Cat is lazy and sleeps.", "rejected": " Cat sleeps."},
      {"inputs": "ARTICLE: Rain fell.\n\nTL;DR:", "chosen": " It rained.", "rejected": " Sun."}]
  name, path = register(tmp_path, [{**rows[0], "choice": 2}], pairwise=True,
                        adapter=adapters.tldr_comparisons())
  with pytest.raises(DataError, match=rf"{path}:1: field 'choice': expected 0 or 1"):
    examples(name)


def test_tldr_processed_pairs_need_no_adapter(tmp_path, register):
  rows = [{"prompt": "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "chosen": " good",
           "rejected": " bad"}]
  name, _ = register(tmp_path, rows, pairwise=True)
  assert examples(name) == [{"inputs": rows[0]["prompt"], "chosen": " good", "rejected": " bad"}]


# ---------------------------------------------------------------------------------- unpaired


def test_unpaired_prompt_completion_label(tmp_path, register):
  rows = [{"prompt": [{"role": "user", "content": "Tell a joke."}],
           "completion": [{"role": "assistant", "content": "Knock knock."}], "label": True},
          {"prompt": "Tell a fact.", "completion": "Fish fly.", "label": False}]
  name, _ = register(tmp_path, rows, thumbs=True)
  assert examples(name) == [
      {"inputs": "User: Tell a joke.", "targets": "Knock knock.", "reward": 1.0, "label": 1},
      {"inputs": "Tell a fact.", "targets": "Fish fly.", "reward": 0.0, "label": 0}]
  name, path = register(tmp_path, [{"prompt": "p", "completion": "c", "label": "perhaps"}],
                        thumbs=True)
  with pytest.raises(DataError, match=rf"{path}:1: field 'label': not a thumbs label"):
    examples(name)
  assert math.isclose(statistics.compute_statistics(
      register(tmp_path, rows)[0], "train").reward_mean, 0.5)  # Labels as rewards 1 / 0.

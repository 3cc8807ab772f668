"""Preference-model labels on any vocabulary: `python -m dro_jax.vocabulary` reserves two label
pieces, the recipe picks two distinct known ids (the reserved pieces, the letters of T5's own
vocabulary, or T5's sentinels), refuses equal, unknown or out-of-vocabulary ids before anything is
written, records ids and pieces in config.json and in the judge's description; and on a
lowercase-only vocabulary the preference model reaches the reward model's held-out accuracy."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from dro_jax import configs, errors, judges, train, vocabulary
from dro_jax.data import tasks
from run_helpers import cli_env, read_metrics, shrink, write_jsonl

POLITE = "please kindly thank you would could gently maybe".split()
RUDE = "now hurry give must stop shut move quick".split()
TOPICS = "door window letter table dinner garden water music".split()
# Explicit lengths: the tests do not depend on what size=tiny fills in.
LENGTHS = {"max_input_length": 16, "max_target_length": 8}


def pair_rows(count, seed):
  """Rewrite-politely pairs, lowercase only: the chosen response is polite, the rejected rude,
  both about the prompt's topic."""
  rng = random.Random(seed)
  rows = []
  for i in range(count):
    topic = rng.choice(TOPICS)
    rows.append({"prompt": f"rewrite {topic} {rng.choice(RUDE)} {i % 7}",
                 "chosen": " ".join(rng.sample(POLITE, 3) + [topic]),
                 "rejected": " ".join(rng.sample(RUDE, 3) + [topic])})
  return rows


def corpus_lines():
  return [text for row in pair_rows(300, seed=99) for text in row.values()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  folder = tmp_path_factory.mktemp("labels_data")
  return {"train": write_jsonl(folder / "train.jsonl", pair_rows(256, seed=1)),
          "eval": write_jsonl(folder / "eval.jsonl", pair_rows(64, seed=2))}


@pytest.fixture(scope="module")
def labelled_vocabulary(tmp_path_factory, data):
  """A lowercase-only vocabulary as the command trains it (with the reserved label pieces)."""
  path = str(tmp_path_factory.mktemp("labelled") / "spiece.model")
  vocabulary.main(["--input", data["train"], "--output", path, "--vocab_size", "120",
                   "--model_type", "bpe"])
  return path


@pytest.fixture(scope="module")
def unlabelled_vocabulary(tmp_path_factory):
  """A lowercase-only vocabulary trained elsewhere: T5's ids, no "A" / "B", no label pieces."""
  path = str(tmp_path_factory.mktemp("unlabelled") / "spiece.model")
  vocabulary.train_sentencepiece(corpus_lines(), path, vocab_size=120, model_type="unigram")
  return path


def pm_config(vocabulary_path, data, demo_cache, steps=2, **preference):
  config = shrink(configs.load("preference_model", "size=tiny"), demo_cache, steps=steps)
  for key, value in LENGTHS.items():
    config[key] = value
  config.data.train_files, config.data.eval_files = data["train"], data["eval"]
  config.data.vocabulary = vocabulary_path
  config.eval_every = config.checkpoint_every = steps
  for key, value in preference.items():
    config.preference[key] = value
  return config


# ------------------------------------------------------------------------- the vocabulary


def test_the_vocabulary_command_reserves_two_label_pieces(labelled_vocabulary,
                                                          unlabelled_vocabulary):
  loaded = tasks.load_vocabulary(labelled_vocabulary)
  processor = loaded.tokenizer
  assert [processor.id_to_piece(i) for i in (3, 4)] == ["<preference_a>", "<preference_b>"]
  # Control pieces: text never tokenises into them, a literal "<preference_a>" included.
  for text in ("please kindly thank you door", "<preference_a> <preference_b>"):
    assert not {3, 4} & set(loaded.encode(text))
  labels = vocabulary.preference_labels(loaded)
  assert (labels.a_token, labels.b_token, labels.a_piece, labels.b_piece, labels.source) == (
      3, 4, "<preference_a>", "<preference_b>", "reserved pieces")
  # The lowercase vocabulary trained without them has no label: refused, naming the fix.
  with pytest.raises(errors.UserError) as raised:
    vocabulary.preference_labels(tasks.load_vocabulary(unlabelled_vocabulary), name="mine")
  message = str(raised.value)
  assert "\n" not in message and "mine" in message
  assert "python -m dro_jax.vocabulary" in message and "--config.preference.a_token" in message


def t5_like_vocabulary(path, lines):
  """A vocabulary laid out as T5's: unigram, "A" and "B" as the pieces "▁A" / "▁B", loaded with
  100 sentinel ids <extra_id_N> at its end."""
  vocabulary.train_sentencepiece(lines, str(path), vocab_size=120, model_type="unigram")
  return tasks.load_vocabulary(str(path), extra_ids=100)


def test_t5_vocabularies_keep_the_letters_else_use_two_sentinels(tmp_path):
  t5 = t5_like_vocabulary(tmp_path / "t5.model",
                          corpus_lines() + ["A or B", "option A is better than B"] * 40)
  labels = vocabulary.preference_labels(t5)
  assert labels.source == "letters"  # T5's own: "▁A" 71 and "▁B"
  assert (labels.a_piece.lstrip("▁"), labels.b_piece.lstrip("▁")) == ("A", "B")
  assert labels.a_token != labels.b_token
  assert [t5.decode([token]) for token in (labels.a_token, labels.b_token)] == ["A", "B"]
  # With sentinels but no letters (a lowercase vocabulary loaded with T5's extra ids).
  lowercase = t5_like_vocabulary(tmp_path / "lower.model", corpus_lines())
  labels = vocabulary.preference_labels(lowercase)
  assert labels.source == "T5 sentinels"
  assert (labels.a_token, labels.b_token) == (lowercase.vocab_size - 1, lowercase.vocab_size - 2)
  assert [lowercase.decode([token]) for token in (labels.a_token, labels.b_token)] == [
      "<extra_id_0>", "<extra_id_1>"]
  # Named by piece, or by id; two names of different labels are refused.
  by_piece = vocabulary.preference_labels(lowercase, a_piece="▁<extra_id_5>",
                                          b_piece="▁<extra_id_6>")
  assert (by_piece.a_token, by_piece.b_token) == (lowercase.vocab_size - 6,
                                                  lowercase.vocab_size - 7)
  with pytest.raises(errors.UserError, match="name different labels"):
    vocabulary.preference_labels(lowercase, a_token=5, a_piece="▁<extra_id_5>")


@pytest.mark.parametrize("preference, problem", [
    ({}, "has no two preference labels"),
    ({"a_token": 7, "b_token": 7}, "are both 7"),
    ({"a_token": 2, "b_token": 7}, "a_token=2: the unk id"),
    ({"a_token": 7, "b_token": 10_000}, "b_token=10000: not an id of"),
    ({"a_piece": "A", "b_piece": "B"}, "a_piece='A': the vocabulary"),
])
def test_bad_labels_are_refused_before_anything_is_written(tmp_path, data, demo_cache,
                                                           unlabelled_vocabulary, preference,
                                                           problem):
  config = pm_config(unlabelled_vocabulary, data, demo_cache, **preference)
  workdir = tmp_path / "run"
  with pytest.raises(errors.UserError) as raised:
    train.run(config, str(workdir))
  message = str(raised.value)
  assert problem in message and "\n" not in message, message
  assert unlabelled_vocabulary in message  # the vocabulary, named
  assert not workdir.exists()


def test_the_cli_refuses_unknown_labels_in_one_line_and_leaves_no_workdir(
    tmp_path, data, demo_cache, unlabelled_vocabulary):
  workdir = tmp_path / "pm"
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", "--config", "configs/preference_model.py:size=tiny",
       "--workdir", str(workdir), f"--config.data.train_files={data['train']}",
       f"--config.data.vocabulary={unlabelled_vocabulary}",
       *(f"--config.{key}={value}" for key, value in LENGTHS.items())],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=cli_env(tmp_path, demo_cache, "preference_labels_cli_cache"), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: config.preference.a_token / b_token: the vocabulary "
                              f"{unlabelled_vocabulary}"), result.stderr
  assert "has no two preference labels" in lines[-1]
  assert not workdir.exists()


# --------------------------------------------------------------- config.json and the judge


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data, demo_cache, labelled_vocabulary):
  workdir = str(tmp_path_factory.mktemp("short_pm") / "run")
  train.run(pm_config(labelled_vocabulary, data, demo_cache), workdir)
  return workdir


def test_the_ids_and_pieces_are_in_config_json_and_the_judge_description(short_run, tmp_path):
  with open(os.path.join(short_run, "config.json")) as stream:
    recorded = json.load(stream)["preference"]
  assert recorded == {"a_token": 3, "b_token": 4, "a_piece": "<preference_a>",
                      "b_piece": "<preference_b>"}
  judge = judges.judge_from_spec(f"preference_model:{short_run}")
  assert judge.labels == recorded
  description = judges.describe(judge)
  assert description.startswith(f"preference_model:{short_run} (step 2;")
  assert "A = id 3 '<preference_a>', B = id 4 '<preference_b>'" in description
  assert judge.spec == f"preference_model:{short_run}"  # the spec itself stays a spec
  noisy = judges.judge_from_spec(f"noisy:0.1:preference_model:{short_run}")
  assert noisy.spec == f"noisy:0.1:preference_model:{short_run}"
  # A workdir whose labels are one id (as earlier runs recorded on such vocabularies): refused.
  broken = tmp_path / "broken"
  shutil.copytree(short_run, broken)
  config = json.loads((broken / "config.json").read_text())
  config["preference"].update(a_token=2, b_token=2, a_piece=None, b_piece=None)
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="both 2"):
    judges.PreferenceModelJudge(str(broken))


def test_a_resumed_run_keeps_its_labels(short_run, data, demo_cache, labelled_vocabulary):
  """The same command resumes (the labels resolve to the recorded ones); other ids are a change
  of the run, refused by name."""
  from dro_jax import resume
  config = pm_config(labelled_vocabulary, data, demo_cache)
  from dro_jax import datasets, initialization
  initialization.resolve_preference_tokens(config, datasets.resolve_data(config)[0])
  assert resume.check(config, short_run) == []
  config.preference.a_token, config.preference.a_piece = 5, None
  with pytest.raises(resume.ConfigChangeError, match="preference.a_token: 3 -> 5"):
    resume.check(config, short_run)


# -------------------------------------------------------------------- the two models agree


def _held_out_accuracy(recipe, vocabulary_path, data, demo_cache, workdir, steps):
  config = shrink(configs.load(recipe, "size=tiny"), demo_cache, steps=steps)
  for key, value in LENGTHS.items():
    config[key] = value
  config.data.train_files, config.data.eval_files = data["train"], data["eval"]
  config.data.vocabulary = vocabulary_path
  config.optimizer.learning_rate = 3e-3
  config.eval_every = config.checkpoint_every = steps
  config.eval_batches = 64 // config.batch_size  # the whole held-out split
  config.log_every = steps
  train.run(config, workdir)
  rows = [row for row in read_metrics(workdir) if "eval/rewards/accuracies" in row]
  return rows[-1]["eval/rewards/accuracies"]


def test_the_preference_model_learns_as_the_reward_model_on_a_lowercase_vocabulary(
    tmp_path, data, demo_cache, labelled_vocabulary):
  """Same pairs, same lowercase-only vocabulary, same steps: the preference model's held-out
  accuracy is within 0.05 of the reward model's, and both learn the task (>= 0.9)."""
  steps = 200
  reward = _held_out_accuracy("reward_model", labelled_vocabulary, data, demo_cache,
                              str(tmp_path / "rm"), steps)
  preference = _held_out_accuracy("preference_model", labelled_vocabulary, data, demo_cache,
                                  str(tmp_path / "pm"), steps)
  assert reward >= 0.9, reward
  assert preference >= reward - 0.05, (preference, reward)

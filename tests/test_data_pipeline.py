"""Tasks -> converters -> batches: round trip, two-host sharding, determinism, resume, rewards."""

import json
import math
import os
import pathlib
import re
import string
import subprocess
import sys
import threading

import numpy as np
import pytest
import seqio

from dro_jax.data import converters, pipeline, statistics, synthetic, tasks
from dro_jax.data.readers import DataError
from run_helpers import write_jsonl

WORDS = ("red green blue cat dog sun moon tree river stone what is the answer please tell me "
         "about a very long story of one two three four five six seven eight nine ten").split()


def make_rows(count, offset=0):
  """Distinct prompts and responses with distinct rewards."""
  return [{"prompt": f"tell me about the {WORDS[i % 10]} number {i + offset}",
           "response": f"the {WORDS[(i + 3) % 10]} is {i + offset}", "reward": 0.25 * i}
          for i in range(count)]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocabulary") / "spiece.model")
  corpus = [" ".join(string.ascii_letters + string.digits + string.punctuation)]
  corpus += [f"{row['prompt']} {row['response']}" for row in make_rows(60)] + [" ".join(WORDS)]
  synthetic.train_sentencepiece(corpus, path, vocab_size=160)
  return path


@pytest.fixture(scope="module")
def decode(vocabulary):
  spm_vocabulary = tasks.load_vocabulary(vocabulary)
  return lambda ids: spm_vocabulary.decode([int(i) for i in ids])


def single_task(tmp_path, vocabulary, name, rows, **kwargs):
  path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
  kwargs = {"max_prompt_length": 24, "max_response_length": 16, **kwargs}
  tasks.register_single_trajectory_task(name, path, vocabulary, **kwargs)
  return name


def real_rows(batches, key):
  return [row for batch in batches for row, weight in zip(batch[key], batch["example_weights"])
          if weight == 1]


def one_host(name, **kwargs):
  kwargs = {"global_batch_size": 4, "process_index": 0, "process_count": 1, **kwargs}
  return pipeline.input_pipeline(name, **kwargs)


def assert_batches_equal(first, second):
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# ------------------------------------------------------------------------------- round trip


def test_single_trajectory_round_trip(tmp_path, vocabulary, decode, new_name, order):
  rows = make_rows(9)
  name = single_task(tmp_path, vocabulary, new_name(), rows)
  iterator = one_host(name, shuffle=False, num_epochs=1)
  assert iterator.stream()["order"] == order
  batches = list(iterator)
  assert len(batches) == 3
  batch = batches[0]
  assert {key: (value.shape, value.dtype.name) for key, value in batch.items()} == {
      "encoder_input_tokens": ((4, 24), "int32"), "decoder_input_tokens": ((4, 16), "int32"),
      "decoder_target_tokens": ((4, 16), "int32"), "decoder_loss_weights": ((4, 16), "float32"),
      "reward": ((4,), "float32"), "example_weights": ((4,), "float32"),
      "example_id": ((4,), "int64"), "truncated_prompt": ((4,), "int32"),
      "truncated_response": ((4,), "int32")}
  targets = batch["decoder_target_tokens"]
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])
  assert (batch["decoder_input_tokens"][:, 0] == 0).all()
  np.testing.assert_array_equal(batch["decoder_loss_weights"], (targets > 0).astype(np.float32))
  for tokens in (batch["encoder_input_tokens"], targets):
    lengths = (tokens > 0).sum(axis=1)
    assert (tokens[np.arange(4), lengths - 1] == 1).all()  # EOS closes every sequence.

  decoded = [{"prompt": decode(prompt), "response": decode(response), "reward": float(reward)}
             for batch in batches
             for prompt, response, reward, weight in zip(
                 batch["encoder_input_tokens"], batch["decoder_target_tokens"], batch["reward"],
                 batch["example_weights"]) if weight == 1]
  assert decoded == rows
  assert batches[-1]["example_weights"].tolist() == [1, 0, 0, 0]
  assert not batches[-1]["encoder_input_tokens"][1:].any()


def test_truncation_keeps_the_prompt_end_and_the_response_start(tmp_path, vocabulary, decode,
                                                                 new_name):
  prompt = " ".join(WORDS[:20])
  response = " ".join(WORDS[10:30])
  name = single_task(tmp_path, vocabulary, new_name(),
                     [{"prompt": prompt, "response": response, "reward": 1.0}],
                     max_prompt_length=8, max_response_length=6)
  batch = next(one_host(name, global_batch_size=1))
  assert batch["encoder_input_tokens"].shape == (1, 8)
  assert batch["encoder_input_tokens"][0, -1] == 1 and batch["decoder_target_tokens"][0, -1] == 1
  assert prompt.endswith(decode(batch["encoder_input_tokens"][0]))
  assert response.startswith(decode(batch["decoder_target_tokens"][0]))
  assert len(decode(batch["encoder_input_tokens"][0])) < len(prompt)


def test_chat_prompts_render_with_the_template(tmp_path, vocabulary, decode, new_name):
  rows = [{"prompt": [{"role": "user", "content": "what is the sun"},
                      {"role": "assistant", "content": "a star"},
                      {"role": "user", "content": "and the moon"}],
           "completion": [{"role": "assistant", "content": "a stone"}], "label": True}]
  name = single_task(tmp_path, vocabulary, new_name(), rows, thumbs=True, max_prompt_length=64)
  batch = next(one_host(name, global_batch_size=1))
  assert decode(batch["encoder_input_tokens"][0]) == (
      "User: what is the sun Assistant: a star User: and the moon")  # Newlines normalise to spaces.
  assert decode(batch["decoder_target_tokens"][0]) == "a stone"
  assert batch["label"].tolist() == [1] and batch["reward"].tolist() == [1.0]


def test_pairwise_round_trip(tmp_path, vocabulary, decode, new_name, order):
  rows = [{"prompt": row["prompt"], "chosen": row["response"], "rejected": f"no {i}"}
          for i, row in enumerate(make_rows(5))]
  name = new_name()
  tasks.register_pairwise_task(name, write_jsonl(tmp_path / "pairs.jsonl", rows), vocabulary,
                               max_prompt_length=20, max_response_length=12)
  batches = list(one_host(name, shuffle=False, num_epochs=1, global_batch_size=2))
  assert sorted(batches[0]) == sorted(
      ["encoder_input_tokens", "example_weights", "example_id", "truncated_prompt",
       "truncated_response"]
      + [f"{side}_decoder_{key}" for side in ("chosen", "rejected")
         for key in ("input_tokens", "target_tokens", "loss_weights")])
  assert batches[0]["chosen_decoder_target_tokens"].shape == (2, 12)
  decoded = [{"prompt": decode(batch["encoder_input_tokens"][i]),
              "chosen": decode(batch["chosen_decoder_target_tokens"][i]),
              "rejected": decode(batch["rejected_decoder_target_tokens"][i])}
             for batch in batches for i in range(2) if batch["example_weights"][i] == 1]
  assert decoded == rows
  np.testing.assert_array_equal(batches[0]["rejected_decoder_input_tokens"][:, 1:],
                                batches[0]["rejected_decoder_target_tokens"][:, :-1])


# ---------------------------------------------------------------------- hosts, order, resume


def test_two_hosts_cover_every_record_exactly_once(tmp_path, vocabulary, decode, new_name, order):
  rows = make_rows(23)
  name = single_task(tmp_path, vocabulary, new_name(), rows)
  per_host = [list(pipeline.input_pipeline(name, global_batch_size=4, process_index=index,
                                           process_count=2, seed=3, num_epochs=1))
              for index in (0, 1)]
  assert len(per_host[0]) == len(per_host[1]) == 6  # ceil(ceil(23 / 2) / 2)
  seen = [decode(tokens) for batches in per_host
          for tokens in real_rows(batches, "encoder_input_tokens")]
  assert sorted(seen) == sorted(row["prompt"] for row in rows)
  padding = [weight for batches in per_host for batch in batches
             for weight in batch["example_weights"] if weight == 0]
  assert len(padding) == 2 * 6 * 2 - 23


def test_order_is_a_function_of_seed_and_epoch(tmp_path, vocabulary, new_name, order):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(16))
  first = [next(one_host(name, seed=5)) for _ in range(2)]
  assert_batches_equal(first[0], first[1])
  iterator = one_host(name, seed=5)
  epochs = [np.concatenate([next(iterator)["reward"] for _ in range(4)]) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and not np.array_equal(epochs[0], epochs[1])
  other_seed = np.concatenate([batch["reward"] for batch in one_host(name, seed=6, num_epochs=1)])
  assert not np.array_equal(other_seed, epochs[0])


@pytest.mark.slow
@pytest.mark.parametrize("taken", [3, 7])  # Within the first epoch, and into the second.
def test_resume_continues_with_the_next_batch(tmp_path, vocabulary, new_name, order, taken):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(21))
  hosts = [pipeline.input_pipeline(name, global_batch_size=4, process_index=index,
                                   process_count=2, seed=11) for index in (0, 1)]
  for iterator in hosts:
    for _ in range(taken):
      next(iterator)
  saved = json.loads(json.dumps(hosts[0].position()))
  assert saved == hosts[1].position()
  assert saved["epoch"] == taken // hosts[0].batches_per_epoch
  for index, iterator in enumerate(hosts):
    resumed = pipeline.input_pipeline(name, global_batch_size=4, process_index=index,
                                      process_count=2, seed=11, position=saved)
    for _ in range(2):
      assert_batches_equal(next(resumed), next(iterator))


def test_resume_refuses_a_position_of_the_other_order(tmp_path, vocabulary, new_name,
                                                     monkeypatch):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(12))
  iterator = one_host(name, seed=2)
  next(iterator)
  saved = iterator.position()
  assert saved["order"] == "memory"
  monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", -1)
  with pytest.raises(ValueError, match="order"):
    one_host(name, seed=2, position=saved)


def legacy(position):
  """A position as written before the pipeline recorded its order."""
  return {key: value for key, value in json.loads(json.dumps(position)).items()
          if key != "order"}


def test_resume_refuses_a_legacy_position_mid_epoch_in_memory(tmp_path, vocabulary, new_name):
  """Without "order", the in-memory permutation would continue another order than the saved
  one's (repeating and missing examples): refused, with the way out."""
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(12))
  iterator = one_host(name, seed=2)
  next(iterator)
  assert iterator.position()["order"] == "memory"
  with pytest.raises(ValueError, match=r"data position has no 'order'.*mid-epoch \(epoch 0, 1 of "
                     r"3 batches\).*start the data stream afresh.*epoch boundary") as raised:
    one_host(name, seed=2, position=legacy(iterator.position()))
  assert "\n" not in str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize("taken", [0, 3, 6])  # epoch boundaries: before, after one, after two
def test_resume_continues_a_legacy_position_at_an_epoch_boundary(tmp_path, vocabulary, new_name,
                                                                 order, taken):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(12))
  iterator = one_host(name, seed=2)
  for _ in range(taken):
    next(iterator)
  resumed = one_host(name, seed=2, position=legacy(iterator.position()))
  for _ in range(4):
    assert_batches_equal(next(resumed), next(iterator))


@pytest.mark.parametrize("case", ["unshuffled", "tf.data"])
def test_resume_continues_a_legacy_position_whose_order_is_known(tmp_path, vocabulary, new_name,
                                                                 monkeypatch, case):
  """Mid-epoch is exact without shuffle (both orders are the file order) and on the tf.data order
  (the only one before positions recorded it)."""
  setting = {"shuffle": False} if case == "unshuffled" else {}
  if case == "tf.data":
    monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", -1)
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(12))
  iterator = one_host(name, seed=2, **setting)
  next(iterator)
  resumed = one_host(name, seed=2, position=legacy(iterator.position()), **setting)
  for _ in range(4):
    assert_batches_equal(next(resumed), next(iterator))


def test_a_kept_in_memory_stream_is_one_global_order_whatever_the_host_count(
    tmp_path, vocabulary, new_name):
  """In memory, each of several hosts takes its slice of one process's global batches, so a run
  resumes exactly on another host count."""
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(12))
  one = pipeline.input_pipeline(name, global_batch_size=4, process_index=0, process_count=1,
                                seed=5)
  hosts = [pipeline.input_pipeline(name, global_batch_size=4, process_index=index,
                                   process_count=2, seed=5) for index in (0, 1)]
  assert hosts[0].position()["order"] == "memory_global"
  for _ in range(5):  # across an epoch boundary (3 batches an epoch)
    whole = next(one)
    halves = [next(host) for host in hosts]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([half[key] for half in halves]), whole[key],
                                    err_msg=key)
  resumed = [pipeline.input_pipeline(name, global_batch_size=4, process_index=index,
                                     process_count=2, seed=5, position=one.position())
             for index in (0, 1)]
  back = pipeline.input_pipeline(name, global_batch_size=4, process_index=0, process_count=1,
                                 seed=5, position=hosts[0].position())
  whole = next(one)
  np.testing.assert_array_equal(np.concatenate([next(r)["example_id"] for r in resumed]),
                                whole["example_id"])
  np.testing.assert_array_equal(next(back)["example_id"], whole["example_id"])


def test_resume_refuses_a_different_setup(tmp_path, vocabulary, new_name, monkeypatch):
  monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", -1)  # per-host streams (tf.data)
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(12))
  iterator = one_host(name, seed=1)
  next(iterator)
  position = iterator.position()
  with pytest.raises(ValueError, match="written by 1 processes, this run has 2"):
    pipeline.input_pipeline(name, global_batch_size=4, process_index=0, process_count=2, seed=1,
                            position=position)
  restarted = pipeline.input_pipeline(name, global_batch_size=4, process_index=0, process_count=2,
                                      seed=1, position=position,
                                      on_host_count_change="restart_epoch")
  assert restarted.position()["batches_consumed"] == 0
  with pytest.raises(ValueError, match="the checkpoint has seed=1, this run has seed=2"):
    one_host(name, seed=2, position=position)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.input_pipeline(name, global_batch_size=4, process_index=0, process_count=3)


@pytest.mark.parametrize("change", [
    {"feature_lengths": {"inputs": 24, "targets": 12}}, {"shuffle": False},
    {"reward_mode": "normalized"}, {"num_epochs": 3}])
@pytest.mark.slow
def test_resume_refuses_a_changed_stream_setting(tmp_path, vocabulary, new_name, change):
  """Each of these gives other batches after the resume point, so none may change silently."""
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(12))
  setting = {"seed": 1, "feature_lengths": {"inputs": 24, "targets": 16}, "shuffle": True,
             "reward_mode": "raw", "num_epochs": None}
  iterator = one_host(name, **setting)
  next(iterator)
  position = json.loads(json.dumps(iterator.position()))
  assert_batches_equal(next(one_host(name, **setting, position=position)), next(iterator))
  (key, new), = change.items()
  with pytest.raises(ValueError, match=re.escape(
      f"the checkpoint has {key}={setting[key]!r}, this run has {key}={new!r}")):
    one_host(name, **{**setting, **change}, position=position)


def test_resume_refuses_changed_data_or_mixing_rates(tmp_path, vocabulary, new_name):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(8))
  mixture = new_name("mixture")
  tasks.register_mixture(mixture, [(name, 1.0)])
  position = one_host(mixture).position()
  assert position["tasks"] == [[name, 1.0]] and position["examples"] == {name: 8}
  tasks.register_mixture(mixture, [(name, 2.0)], overwrite=True)
  with pytest.raises(ValueError, match=re.escape(f"the checkpoint has tasks=[['{name}', 1.0]]")):
    one_host(mixture, position=position)
  task_position = one_host(name).position()
  single_task(tmp_path, vocabulary, name, make_rows(9), overwrite=True)  # The same file, grown.
  with pytest.raises(ValueError, match=re.escape(f"the checkpoint has examples={{'{name}': 8}}, "
                                                 f"this run has examples={{'{name}': 9}}")):
    one_host(name, position=task_position)
  legacy = {key: task_position[key] for key in pipeline.POSITION_KEYS}  # Written before the checks.
  assert one_host(name, position=legacy).position()["epoch"] == 0


# ------------------------------------------------------------------------------- rewards


def test_z_normalisation_same_statistics_on_every_host(tmp_path, vocabulary, new_name):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(19))
  workdir = str(tmp_path / "workdir")
  results = {}

  def build(index):
    results[index] = pipeline.input_pipeline(
        name, global_batch_size=4, process_index=index, process_count=2, num_epochs=1,
        reward_mode="normalized", cache_dir=workdir)

  waiting = threading.Thread(target=build, args=(1,))
  waiting.start()  # Process 1 waits until process 0 has written the statistics.
  build(0)
  waiting.join(timeout=60)
  assert results[0].statistics == results[1].statistics
  stats = results[0].statistics[name]
  rewards = [0.25 * i for i in range(19)]
  assert stats.count == 19
  assert stats.reward_mean == pytest.approx(np.mean(rewards))
  assert stats.reward_std == pytest.approx(np.std(rewards))
  normalized = np.array([reward for index in (0, 1)
                         for reward in real_rows(list(results[index]), "reward")])
  assert len(normalized) == 19
  assert abs(normalized.mean()) < 1e-6 and normalized.var() == pytest.approx(1.0, abs=1e-5)
  cached = list((tmp_path / "workdir" / "data_statistics").glob(f"{name}.train.*.json"))
  assert len(cached) == 1


def test_statistics_error_reaches_the_waiting_hosts(tmp_path, vocabulary, new_name):
  rows = [json.dumps(row) for row in make_rows(3)] + ['{"prompt": "p", "response": "r"}']
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(rows) + "\n")
  name = new_name()
  tasks.register_single_trajectory_task(name, str(path), vocabulary)
  workdir = str(tmp_path / "workdir")
  for index in (0, 1):
    with pytest.raises(DataError, match=rf"{path}:4: field 'reward': missing"):
      statistics.dataset_statistics(name, "train", cache_dir=workdir, process_index=index,
                                    timeout_seconds=5)


def test_unknown_piece_rate_is_reported_and_warned_about(tmp_path, vocabulary, new_name, caplog):
  """Text the vocabulary cannot spell becomes <unk>: a silent failure to learn, unless reported."""
  known = single_task(tmp_path, vocabulary, new_name(), make_rows(4))
  assert statistics.dataset_statistics(known, "train").unknown_piece_rate == 0.0
  assert "unknown to its vocabulary" not in caplog.text
  rows = [{**row, "response": f"{row['response']} \u00e9t\u00e9 \u6f22\u5b57 \u00fc"}
          for row in make_rows(4)]
  unknown = single_task(tmp_path, vocabulary, new_name(), rows)
  stats = one_host(unknown, cache_dir=str(tmp_path / "workdir")).statistics[unknown]
  assert statistics.UNKNOWN_PIECE_WARNING_RATE < stats.unknown_piece_rate < 0.5
  assert stats.pieces_checked > 0
  assert f"Task '{unknown}' split 'train'" in caplog.text
  assert "unknown to its vocabulary" in caplog.text


def test_a_vocabulary_larger_than_the_model_is_refused(tmp_path, vocabulary, new_name):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(2))
  size = tasks.load_vocabulary(vocabulary).vocab_size
  assert one_host(name, model_vocab_size=size).batches_per_epoch == 1
  mixture = new_name("mixture")
  tasks.register_mixture(mixture, [name])
  for provider in (name, mixture):
    with pytest.raises(ValueError, match=rf"Task '{name}' has a vocabulary of {size} pieces "
                       rf"\({re.escape(vocabulary)}\), more than the model's vocab_size "
                       f"{size - 1}"):
      one_host(provider, model_vocab_size=size - 1)


def test_thumbs_mode_labels_rewards_above_the_mean(tmp_path, vocabulary, new_name):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(8))
  batches = list(one_host(name, reward_mode="thumbs", num_epochs=1, shuffle=False))
  labels = np.concatenate([batch["label"] for batch in batches])
  assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  np.testing.assert_array_equal(np.concatenate([batch["reward"] for batch in batches]), labels)
  with pytest.raises(ValueError, match="needs rewards"):
    pairs = new_name()
    tasks.register_pairwise_task(pairs, write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"}]), vocabulary)
    one_host(pairs, reward_mode="normalized")


# ------------------------------------------------------------------------------- mixtures


def test_mixture_samples_both_tasks_and_resumes(tmp_path, vocabulary, decode, new_name):
  first = single_task(tmp_path, vocabulary, new_name(), make_rows(10))
  second = single_task(tmp_path, vocabulary, new_name(), make_rows(6, offset=100),
                       max_prompt_length=20, max_response_length=20)
  mixture = new_name("mixture")
  tasks.register_mixture(mixture, [first, (second, 2.0)])
  iterator = one_host(mixture, seed=4)
  assert iterator.feature_lengths == {"inputs": 24, "targets": 20}
  assert iterator.batches_per_epoch == math.ceil(16 / 4)
  batches = [next(iterator) for _ in range(6)]
  prompts = [decode(tokens) for tokens in real_rows(batches, "encoder_input_tokens")]
  numbers = [int(prompt.rsplit(" ", 1)[1]) for prompt in prompts]
  assert any(number < 100 for number in numbers) and any(number >= 100 for number in numbers)
  position = iterator.position()
  assert position["epoch"] == 1
  resumed = one_host(mixture, seed=4, position=position)
  assert_batches_equal(next(resumed), next(iterator))


def test_mixture_refuses_a_task_smaller_than_the_host_count(tmp_path, vocabulary, new_name):
  """Every Task, not only the largest: a host without one of them would skew the rates."""
  large = single_task(tmp_path, vocabulary, new_name(), make_rows(10))
  small = single_task(tmp_path, vocabulary, new_name(), make_rows(1, offset=100))
  mixture = new_name("mixture")
  tasks.register_mixture(mixture, [large, small])
  with pytest.raises(DataError, match=rf"mixture '{mixture}': Task '{small}' has 1 example in "
                     "split 'train', fewer than the 2 processes"):
    pipeline.input_pipeline(mixture, global_batch_size=4, process_index=0, process_count=2)
  assert one_host(mixture).batches_per_epoch == 3  # One host has every example.


def test_mixture_of_different_kinds_is_refused(tmp_path, vocabulary, new_name):
  single = single_task(tmp_path, vocabulary, new_name(), make_rows(3))
  thumbs = single_task(tmp_path, vocabulary, new_name(),
                       [{**row, "label": True} for row in make_rows(3)], thumbs=True)
  with pytest.raises(ValueError, match="contains Tasks with different output features"):
    tasks.register_mixture(new_name("mixture"), [single, thumbs])


def test_registering_a_name_twice_says_how_to_replace_it(tmp_path, vocabulary, decode, new_name,
                                                         caplog):
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(2))
  mixture = new_name("mixture")
  tasks.register_mixture(mixture, [name])
  for register in (lambda **kwargs: single_task(tmp_path, vocabulary, name, make_rows(3),
                                                **kwargs),
                   lambda **kwargs: tasks.register_mixture(name, [name], **kwargs)):
    with pytest.raises(ValueError, match=rf"a seqio Task named '{name}' is already registered; "
                       "pass overwrite=True to replace it"):
      register()
  single_task(tmp_path, vocabulary, name, make_rows(3, offset=50), overwrite=True)
  prompts = [decode(tokens) for tokens in real_rows(
      one_host(name, shuffle=False, num_epochs=1), "encoder_input_tokens")]
  assert prompts == [row["prompt"] for row in make_rows(3, offset=50)]
  assert "still hold the previous one" in caplog.text and mixture in caplog.text
  with pytest.raises(ValueError, match=f"a seqio Mixture named '{mixture}'.*overwrite=True"):
    tasks.register_mixture(mixture, [name])
  assert tasks.register_mixture(mixture, [name], overwrite=True).tasks[0] is (
      seqio.get_mixture_or_task(name))


def test_converters_never_pack():
  with pytest.raises(ValueError, match="never packs"):
    converters.SingleTrajectoryFeatureConverter(pack=True)
  assert converters.feature_converter("pairwise").get_model_feature_lengths(
      converters.PairwiseFeatureConverter().complete_lengths({"inputs": 8, "targets": 4}))[
          "rejected_decoder_loss_weights"] == 4


def test_seqio_get_dataset_with_the_converter(tmp_path, vocabulary, new_name):
  """The Tasks work with plain seqio too, as any T5 data does."""
  name = single_task(tmp_path, vocabulary, new_name(), make_rows(3))
  ds = seqio.get_dataset(name, {"inputs": 24, "targets": 16},
                         converters.SingleTrajectoryFeatureConverter(), shuffle=False)
  examples = list(ds.as_numpy_iterator())
  assert [float(example["reward"]) for example in examples] == [0.0, 0.25, 0.5]


# ------------------------------------------------------------------------------- TensorFlow


def test_tensorflow_is_quiet_and_off_the_gpus():
  """A CPU run logs no CUDA probe error; TF gets no GPU; CUDA_VISIBLE_DEVICES stays for JAX."""
  script = """if True:
    import os, sys
    import dro_jax.data
    assert "tensorflow" not in sys.modules, "the package must not import TensorFlow eagerly"
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("2", "3")
    import tensorflow as tf
    calls, hide = [], tf.config.set_visible_devices
    tf.config.set_visible_devices = lambda *args: (calls.append(args), hide(*args))
    import dro_jax.data.readers
    assert calls == [([], "GPU")], calls
    assert tf.config.get_visible_devices("GPU") == []
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    print("ok")
  """
  env = {key: value for key, value in os.environ.items()
         if key not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
  errors = [line for line in result.stderr.splitlines() if re.match(r"E\d{4} ", line)]
  assert not errors, errors

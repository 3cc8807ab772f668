"""Over-long prompts and responses: flagged in the graph, counted, warned about once, or refused."""

import json
import re
import string

import numpy as np
import pytest

from dro_jax import configs, datasets
from dro_jax.data import pipeline, records, synthetic, tasks
from run_helpers import write_jsonl

WORDS = "red green blue cat dog sun moon tree river stone one two three four five six".split()
PROMPT_LIMIT, RESPONSE_LIMIT = 10, 8  # Tokens with EOS.


def text(count, start):
  return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


# 10 examples: prompts of 2..11 words and responses of 11..2 words, so some of each are cut.
ROWS = [{"prompt": f"{text(2 + i, i)} {i}", "response": f"{text(11 - i, i + 3)} {i}",
         "reward": float(i)} for i in range(10)]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocabulary") / "spiece.model")
  corpus = [" ".join(string.ascii_letters + string.digits + string.punctuation), " ".join(WORDS)]
  corpus += [f"{row['prompt']} {row['response']}" for row in ROWS] * 5
  synthetic.train_sentencepiece(corpus, path, vocab_size=128)
  return path


def cut(vocabulary, value, limit):
  """Whether a text loses tokens under `limit` (which counts the EOS appended)."""
  return len(tasks.load_vocabulary(vocabulary).encode(value)) + 1 > limit


def one_host(name, **kwargs):
  kwargs = {"global_batch_size": 4, "process_index": 0, "process_count": 1, **kwargs}
  return pipeline.input_pipeline(name, **kwargs)


def test_truncated_rows_are_flagged_and_counted(tmp_path, vocabulary, new_name, order):
  name = new_name()
  tasks.register_single_trajectory_task(name, write_jsonl(tmp_path / "data.jsonl", ROWS),
                                        vocabulary, max_prompt_length=PROMPT_LIMIT,
                                        max_response_length=RESPONSE_LIMIT)
  prompts = [cut(vocabulary, row["prompt"], PROMPT_LIMIT) for row in ROWS]
  responses = [cut(vocabulary, row["response"], RESPONSE_LIMIT) for row in ROWS]
  assert 0 < sum(prompts) < len(ROWS) and 0 < sum(responses) < len(ROWS)

  iterator = one_host(name, shuffle=False, num_epochs=2)
  assert iterator.stream()["order"] == order
  assert iterator.truncation() == {"data/truncated_prompts": 0.0,
                                   "data/truncated_responses": 0.0}
  first = [next(iterator) for _ in range(iterator.batches_per_epoch)]  # 10 rows + 2 padding
  assert first[-1]["example_weights"].tolist() == [1, 1, 0, 0]
  flags = {key: np.concatenate([batch[key] for batch in first]) for key in records.TRUNCATION_FLAGS}
  assert all(value.dtype == np.int32 for value in flags.values())
  assert flags["truncated_prompt"].tolist() == prompts + [0, 0]  # Padding rows are 0.
  assert flags["truncated_response"].tolist() == responses + [0, 0]
  expected = {"data/truncated_prompts": sum(prompts) / len(ROWS),
              "data/truncated_responses": sum(responses) / len(ROWS)}
  assert iterator.truncation() == pytest.approx(expected)
  next(iterator)  # Cumulative over everything yielded: 4 more rows of the same 10.
  assert iterator.truncation() == pytest.approx({
      "data/truncated_prompts": (sum(prompts) + sum(prompts[:4])) / 14,
      "data/truncated_responses": (sum(responses) + sum(responses[:4])) / 14})

  # Host-side only: the step never sees the flags.
  assert set(records.TRUNCATION_FLAGS) <= set(datasets.HOST_KEYS)
  assert not set(records.TRUNCATION_FLAGS) & set(datasets.numeric(first[0]))


def test_a_pairwise_response_is_cut_if_either_is(tmp_path, vocabulary, new_name):
  long, short = text(12, 0), text(2, 5)
  rows = [{"prompt": "one", "chosen": long, "rejected": short},
          {"prompt": "two", "chosen": short, "rejected": long},
          {"prompt": "three", "chosen": short, "rejected": short}]
  name = new_name()
  tasks.register_pairwise_task(name, write_jsonl(tmp_path / "pairs.jsonl", rows), vocabulary,
                               max_prompt_length=PROMPT_LIMIT, max_response_length=RESPONSE_LIMIT)
  iterator = one_host(name, shuffle=False, num_epochs=1)
  batch = next(iterator)
  assert batch["truncated_response"].tolist() == [1, 1, 0, 0]
  assert batch["truncated_prompt"].tolist() == [0, 0, 0, 0]
  assert iterator.truncation() == pytest.approx({"data/truncated_prompts": 0.0,
                                                 "data/truncated_responses": 2 / 3})


def test_truncation_is_warned_about_once(tmp_path, vocabulary, new_name, order, caplog, capsys):
  name = new_name()
  tasks.register_single_trajectory_task(name, write_jsonl(tmp_path / "data.jsonl", ROWS),
                                        vocabulary, max_prompt_length=PROMPT_LIMIT,
                                        max_response_length=RESPONSE_LIMIT)
  prompts = sum(cut(vocabulary, row["prompt"], PROMPT_LIMIT) for row in ROWS)
  responses = sum(cut(vocabulary, row["response"], RESPONSE_LIMIT) for row in ROWS)
  iterator = one_host(name, num_epochs=3)
  for _ in iterator:
    pass
  again = one_host(name, num_epochs=1)  # Another iterator of the same Task and split: no repeat.
  for _ in again:
    pass
  line = (f"{100 * prompts / 10:.1f}% of prompts and {100 * responses / 10:.1f}% of responses of "
          f"Task {name} split train were cut to max_input_length={PROMPT_LIMIT} / "
          f"max_target_length={RESPONSE_LIMIT}")
  logged = [record.getMessage() for record in caplog.records if line in record.getMessage()]
  printed = [text for text in capsys.readouterr().out.splitlines() if line in text]
  assert len(logged) == 1 and len(printed) == 1, (logged, printed)
  assert "data.truncate=False" in logged[0] and "\n" not in logged[0]


def test_nothing_cut_warns_nothing(tmp_path, vocabulary, new_name, caplog, capsys):
  name = new_name()
  tasks.register_single_trajectory_task(name, write_jsonl(tmp_path / "data.jsonl", ROWS),
                                        vocabulary, max_prompt_length=64, max_response_length=64)
  iterator = one_host(name, num_epochs=1)
  for _ in iterator:
    pass
  assert iterator.truncation() == {"data/truncated_prompts": 0.0,
                                   "data/truncated_responses": 0.0}
  assert "were cut" not in caplog.text and "were cut" not in capsys.readouterr().out


def test_a_mixture_counts_the_rows_of_every_task(tmp_path, vocabulary, new_name, monkeypatch):
  monkeypatch.setattr(pipeline, "TRUNCATION_SAMPLE", 4)
  long_prompts = [{**row, "prompt": text(14, i)} for i, row in enumerate(ROWS[:4])]
  short = [{**row, "prompt": "one", "response": "two"} for row in ROWS[:4]]
  names = [new_name(), new_name()]
  for name, rows in zip(names, (long_prompts, short)):
    tasks.register_single_trajectory_task(name, write_jsonl(tmp_path / f"{name}.jsonl", rows),
                                          vocabulary, max_prompt_length=PROMPT_LIMIT,
                                          max_response_length=RESPONSE_LIMIT)
  mixture = new_name("mixture")
  tasks.register_mixture(mixture, names)
  iterator = one_host(mixture, seed=1)
  batches = [next(iterator) for _ in range(4)]
  ids = np.concatenate([batch["example_id"] for batch in batches])
  long_index = [task.name for task, _ in tasks.component_tasks(mixture)].index(names[0])
  from_long = ids >> pipeline.TASK_ID_SHIFT == long_index
  assert 0 < from_long.sum() < from_long.size
  assert iterator.truncation()["data/truncated_prompts"] == pytest.approx(from_long.mean())


def test_position_and_resume_are_unchanged(tmp_path, vocabulary, new_name, order):
  name = new_name()
  tasks.register_single_trajectory_task(name, write_jsonl(tmp_path / "data.jsonl", ROWS),
                                        vocabulary, max_prompt_length=PROMPT_LIMIT,
                                        max_response_length=RESPONSE_LIMIT)
  iterator = one_host(name, seed=3)
  for _ in range(2):
    next(iterator)
  saved = iterator.position()
  assert json.loads(json.dumps(saved)) == saved
  assert not any("trunc" in key for key in saved)
  resumed = one_host(name, seed=3, position=saved)
  for _ in range(3):
    first, second = next(resumed), next(iterator)
    assert first.keys() == second.keys()
    for key in first:
      np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def files_config(tmp_path, vocabulary, rows, **data):
  config = configs.load("dro", "size=tiny")  # max_input_length 16, max_target_length 12
  config.data.train_files = write_jsonl(tmp_path / "data.jsonl", rows)
  config.data.vocabulary = vocabulary
  for key, value in data.items():
    config.data[key] = value
  return config


def test_truncate_false_refuses_an_over_long_example(tmp_path, vocabulary):
  rows = [{"prompt": "red cat", "response": "a dog", "reward": 0.5}] * 2 + [
      {"prompt": text(40, 0), "response": "sun", "reward": 1.0}]
  config = files_config(tmp_path, vocabulary, rows, truncate=False)
  name = datasets._register_files(config)
  with pytest.raises(ValueError) as raised:
    datasets.train_iterator(config, name, str(tmp_path / "workdir"), None)
  message = str(raised.value)
  assert "\n" not in message
  assert re.search(rf"{tmp_path}/data.jsonl:3: field 'prompt': \d+ tokens with EOS, more than "
                   r"max_prompt_length=16 \(Task 'dro_jax_files_\w+' split 'train'", message)
  assert "max_input_length" in message and "data.truncate=True" in message

  config = files_config(tmp_path, vocabulary, rows)  # data.truncate=True: cut, and counted.
  assert config.data.truncate is True
  name = datasets._register_files(config)
  iterator = datasets.train_iterator(config, name, str(tmp_path / "workdir"), None)
  next(iterator)
  assert iterator.truncation()["data/truncated_prompts"] > 0

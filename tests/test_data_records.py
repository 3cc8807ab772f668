"""Readers (JSONL, parquet, TFRecord), record validation, the chat template and bad input."""

import gzip
import json
import math
import string
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from dro_jax.data import pipeline, readers, records, synthetic, tasks
from dro_jax.data.readers import DataError
from dro_jax.data.records import RecordError

ROWS = [{"prompt": f"what is {i} plus one", "response": f"it is {i + 1}", "reward": 0.5 * i}
        for i in range(5)]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vocabulary") / "spiece.model")
  corpus = [" ".join(string.ascii_letters + string.digits + string.punctuation)]
  corpus += [row["prompt"] + " " + row["response"] for row in ROWS] * 20
  synthetic.train_sentencepiece(corpus, path, vocab_size=120)
  return path


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def write_tfrecord(path, rows, compression=None):
  with tf.io.TFRecordWriter(str(path), options=compression) as writer:
    for row in rows:
      features = {}
      for key, value in row.items():
        if isinstance(value, str):
          features[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        else:
          features[key] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
      writer.write(tf.train.Example(features=tf.train.Features(feature=features))
                   .SerializeToString())
  return str(path)


# ---------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("writer,name", [(write_jsonl, "data.jsonl"),
                                         (write_parquet, "data.parquet"),
                                         (write_tfrecord, "data.tfrecord")])
def test_every_format_reads_the_same_records_with_locations(tmp_path, writer, name):
  path = writer(tmp_path / name, ROWS)
  read = list(readers.read_records(path))
  assert [record.fields for record in read] == ROWS
  assert [str(record.location) for record in read] == [f"{path}:{i}" for i in range(1, 6)]


def test_gzipped_jsonl_and_blank_lines(tmp_path):
  path = tmp_path / "data.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"a": 1}\n\n{"a": 2}\n'))
  read = list(readers.read_records(str(path)))
  assert [(record.fields, record.location.line) for record in read] == [({"a": 1}, 1),
                                                                        ({"a": 2}, 3)]


def test_gzipped_tfrecord(tmp_path):
  path = write_tfrecord(tmp_path / "data.tfrecord.gz", ROWS[:2], compression="GZIP")
  assert [record.fields for record in readers.read_records(path)] == ROWS[:2]


def test_format_inference_and_unknown_names():
  assert readers.infer_format("gs://b/x/train.jsonl") == "jsonl"
  assert readers.infer_format("x.parquet") == "parquet"
  assert readers.infer_format("train.tfrecord-00001-of-00004") == "tfrecord"
  with pytest.raises(DataError, match="pass file_format="):
    readers.infer_format("data.csv")


def test_globs_resolve_in_order_and_missing_files_fail(tmp_path):
  for name in ("b.jsonl", "a.jsonl"):
    write_jsonl(tmp_path / name, ROWS[:1])
  assert readers.resolve_files(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"),
                                                              str(tmp_path / "b.jsonl")]
  with pytest.raises(DataError, match="missing.jsonl: no such file"):
    readers.resolve_files(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------- records


def test_chat_template():
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
  assert records.render_messages(messages) == ("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello"
                                               "\n\nUser: Bye")
  with pytest.raises(RecordError, match=r"field 'prompt\[0\].content'"):
    records.render_messages([{"role": "user"}], "prompt")


def test_single_trajectory_example_variants():
  assert records.single_trajectory_example({"prompt": "p", "completion": "c", "reward": "2.5"}) == {
      "inputs": "p", "targets": "c", "reward": 2.5}
  thumbs = records.single_trajectory_example(
      {"prompt": [{"role": "user", "content": "q"}],
       "completion": [{"role": "assistant", "content": "a"}], "label": False}, thumbs=True)
  assert thumbs == {"inputs": "User: q", "targets": "a", "reward": 0.0, "label": 0}
  mapping = {"prompt": "q.text", "response": "a", "reward": "score"}
  mapped = records.single_trajectory_example({"q": {"text": "p"}, "a": "r", "score": 3}, mapping)
  assert mapped == {"inputs": "p", "targets": "r", "reward": 3.0}


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "response": "r"}, "field 'reward': missing"),
    ({"response": "r", "reward": 1}, "field 'prompt': missing"),
    ({"prompt": "p", "response": "r", "reward": "good"}, "field 'reward': not a number ('good')"),
    ({"prompt": "p", "response": "r", "reward": math.nan}, "field 'reward': not a finite number"),
    ({"prompt": "p", "response": "r", "reward": "inf"}, "field 'reward': not a finite number"),
    ({"prompt": "p", "response": "r", "reward": True}, "field 'reward': not a number"),
    ({"prompt": "p", "response": "  ", "reward": 1}, "field 'response': empty"),
    ({"prompt": "p", "response": 7, "reward": 1}, "field 'response': expected a string"),
])
def test_invalid_single_trajectory_records(record, message):
  with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
    records.single_trajectory_example(record)


def test_thumbs_labels_are_required_and_checked():
  with pytest.raises(RecordError, match="field 'label': missing"):
    records.single_trajectory_example({"prompt": "p", "response": "r", "reward": 1}, thumbs=True)
  with pytest.raises(RecordError, match="field 'label': not a thumbs label"):
    records.single_trajectory_example({"prompt": "p", "response": "r", "label": "maybe"},
                                      thumbs=True)


def test_pairwise_example_checks_both_responses():
  assert records.pairwise_example({"prompt": "p", "chosen": "a", "rejected": "b"}) == {
      "inputs": "p", "chosen": "a", "rejected": "b"}
  with pytest.raises(RecordError, match="field 'rejected': empty"):
    records.pairwise_example({"prompt": "p", "chosen": "a", "rejected": ""})


# ------------------------------------------------------------------ bad input, through a Task

BAD_LINES = {
    "malformed JSON": ('{"prompt": "p", "response": "r", "reward": 1', "malformed JSON"),
    "missing field": ('{"prompt": "p", "reward": 1}', "field 'response': missing"),
    "non-numeric reward": ('{"prompt": "p", "response": "r", "reward": "high"}',
                           "field 'reward': not a number ('high')"),
    "non-finite reward": ('{"prompt": "p", "response": "r", "reward": NaN}',
                          "field 'reward': not a finite number (nan)"),
    "empty response": ('{"prompt": "p", "response": "", "reward": 1}', "field 'response': empty"),
}


def _file_with_bad_line(tmp_path, bad_line):
  lines = [json.dumps(row) for row in ROWS[:2]] + [bad_line] + [json.dumps(ROWS[3])]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_names_file_line_and_field(tmp_path, vocabulary, new_name, case):
  bad_line, message = BAD_LINES[case]
  path = _file_with_bad_line(tmp_path, bad_line)
  name = new_name()
  tasks.register_single_trajectory_task(name, path, vocabulary)
  with pytest.raises(DataError) as raised:
    pipeline.input_pipeline(name, global_batch_size=2, process_index=0, process_count=1)
  assert str(raised.value).startswith(f"{path}:3: ")
  assert message in str(raised.value)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_is_skipped_and_counted(tmp_path, vocabulary, new_name, case):
  path = _file_with_bad_line(tmp_path, BAD_LINES[case][0])
  name = new_name()
  tasks.register_single_trajectory_task(name, path, vocabulary, on_invalid="skip")
  iterator = pipeline.input_pipeline(name, global_batch_size=3, process_index=0, process_count=1,
                                     num_epochs=1, shuffle=False)
  assert iterator.statistics[name].count == 3
  assert iterator.statistics[name].skipped == {"invalid": 1}
  batches = list(iterator)
  assert len(batches) == 1 and batches[0]["example_weights"].tolist() == [1, 1, 1]
  assert sorted(batches[0]["reward"].tolist()) == [0.0, 0.5, 1.5]


def test_error_inside_tensorflow_comes_out_as_data_error(tmp_path, vocabulary, new_name):
  """A file turning bad after the statistics pass still fails with file:line, not TF's error."""
  path = tmp_path / "data.jsonl"
  write_jsonl(path, ROWS)
  name = new_name()
  tasks.register_single_trajectory_task(name, str(path), vocabulary)
  iterator = pipeline.input_pipeline(name, global_batch_size=2, process_index=0, process_count=1,
                                     shuffle=False)
  path.write_text(path.read_text() + '{"prompt": "p", "response": "r", "reward": "x"}\n')
  with pytest.raises(DataError, match=rf"{path}:6: field 'reward': not a number"):
    for _ in range(3):
      next(iterator)


def test_nonexistent_file_fails_at_registration(tmp_path, vocabulary, new_name):
  with pytest.raises(DataError, match="nowhere.jsonl: no such file"):
    tasks.register_single_trajectory_task(new_name(), str(tmp_path / "nowhere.jsonl"), vocabulary)
  with pytest.raises(DataError, match="no sentencepiece model"):
    tasks.register_single_trajectory_task(new_name(), str(tmp_path), str(tmp_path / "none.model"))


def test_unknown_field_names_are_refused(tmp_path, vocabulary, new_name):
  path = write_jsonl(tmp_path / "data.jsonl", ROWS)
  with pytest.raises(ValueError, match=r"fields maps unknown names \['respons'\]"):
    tasks.register_single_trajectory_task(new_name(), path, vocabulary, fields={"respons": "r"})


def test_over_long_prompt_policies(tmp_path, vocabulary, new_name):
  rows = ROWS[:2] + [{"prompt": "a very long prompt " * 10, "response": "short", "reward": 1.0}]
  path = write_jsonl(tmp_path / "data.jsonl", rows)
  limits = {"max_prompt_length": 12, "max_response_length": 8}

  erroring = new_name()
  tasks.register_single_trajectory_task(erroring, path, vocabulary, too_long="error", **limits)
  with pytest.raises(DataError, match=rf"{path}:3: field 'prompt': \d+ tokens with EOS, more than "
                     "max_prompt_length=12"):
    pipeline.input_pipeline(erroring, global_batch_size=1, process_index=0, process_count=1)

  skipping = new_name()
  tasks.register_single_trajectory_task(skipping, path, vocabulary, too_long="skip", **limits)
  iterator = pipeline.input_pipeline(skipping, global_batch_size=1, process_index=0,
                                     process_count=1, num_epochs=1)
  assert iterator.statistics[skipping].skipped == {"too_long": 1}
  assert len(list(iterator)) == 2


def test_tfrecord_missing_field_and_parquet_nan(tmp_path, vocabulary, new_name):
  tfrecord = write_tfrecord(tmp_path / "data.tfrecord", ROWS[:2] + [{"prompt": "p", "reward": 1.0}])
  name = new_name()
  tasks.register_single_trajectory_task(name, tfrecord, vocabulary)
  with pytest.raises(DataError, match=rf"{tfrecord}:3: field 'response': missing"):
    pipeline.input_pipeline(name, global_batch_size=1, process_index=0, process_count=1)

  parquet = write_parquet(tmp_path / "data.parquet", ROWS[:3] + [
      {"prompt": "p", "response": "r", "reward": math.inf}])
  name = new_name()
  tasks.register_single_trajectory_task(name, parquet, vocabulary)
  with pytest.raises(DataError, match=rf"{parquet}:4: field 'reward': not a finite number \(inf\)"):
    pipeline.input_pipeline(name, global_batch_size=1, process_index=0, process_count=1)


def test_any_gfile_path_works_like_gs(tmp_path, vocabulary, new_name):
  """TensorFlow's in-memory filesystem stands in for gs://: data, glob and statistics cache."""
  root = f"ram://{uuid.uuid4().hex}"
  with tf.io.gfile.GFile(f"{root}/data/part-0.jsonl", "w") as stream:
    stream.write("".join(json.dumps(row) + "\n" for row in ROWS[:3]))
  with tf.io.gfile.GFile(f"{root}/data/part-1.parquet", "wb") as stream:
    write_parquet(tmp_path / "local.parquet", ROWS[3:])
    stream.write((tmp_path / "local.parquet").read_bytes())
  name = new_name()
  tasks.register_single_trajectory_task(name, [f"{root}/data/*.jsonl", f"{root}/data/*.parquet"],
                                        vocabulary)
  iterator = pipeline.input_pipeline(name, global_batch_size=5, process_index=0, process_count=1,
                                     shuffle=False, cache_dir=f"{root}/workdir")
  assert next(iterator)["reward"].tolist() == [row["reward"] for row in ROWS]
  assert tf.io.gfile.glob(f"{root}/workdir/data_statistics/{name}.train.*.json")

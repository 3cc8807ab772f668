"""Dataset statistics: example count, reward mean / standard deviation and the unknown-piece rate,
computed once and cached.

The count fixes how many batches every host yields per epoch; the reward statistics drive the DRO
paper's dataset-level z-normalisation. Both come from one pass over the validated examples in
Python; only the first `UNKNOWN_PIECE_SAMPLE` examples are tokenised, for the rate of pieces the
vocabulary does not know (a vocabulary that does not fit the data turns them into <unk>, and the
loss stays flat; above `UNKNOWN_PIECE_WARNING_RATE` a warning says so). With a cache folder (the
workdir), process 0 computes and writes `data_statistics/<task>.<split>.<fingerprint>.v<N>.json`
and the other processes wait for that file, so every host uses identical numbers; the fingerprint
changes with the files, so stale numbers are never reused. If process 0 finds bad data it writes
the error, and every host raises it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

from absl import logging

from dro_jax.data._tensorflow import tf
from dro_jax.data.readers import DataError
from dro_jax.data.tasks import PAIRWISE, feedback_source

UNKNOWN_PIECE_SAMPLE = 1000  # Examples tokenised for the unknown-piece rate.
UNKNOWN_PIECE_WARNING_RATE = 0.01
_VERSION = 2  # Of the cached file's fields; older files are recomputed, not misread.


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
  """What one pass over a Task's split found: examples kept, reward moments, records skipped,
  and the share of the first examples' pieces (all text features) unknown to the vocabulary."""
  count: int
  reward_mean: float | None
  reward_std: float | None
  skipped: dict[str, int]
  fingerprint: str
  unknown_piece_rate: float | None  # None: no piece checked, or a vocabulary without <unk>.
  pieces_checked: int


def compute_statistics(task_name: str, split: str) -> DatasetStatistics:
  """One pass over every validated example of the split (all shards), in float64."""
  source = feedback_source(task_name)
  report = source.skip_report()
  unk_id = getattr(source.vocabulary, "unk_id", None)
  count, rewards, pieces, unknown = 0, [], 0, 0
  for example in source.examples(split, report=report):
    if unk_id is not None and count < UNKNOWN_PIECE_SAMPLE:
      for feature in source.max_lengths:
        ids = source.vocabulary.encode(example[feature])
        pieces += len(ids)
        unknown += sum(1 for piece in ids if piece == unk_id)
    count += 1
    if source.kind != PAIRWISE:
      rewards.append(float(example["reward"]))
  mean = std = None
  if rewards:
    mean = math.fsum(rewards) / len(rewards)
    std = math.sqrt(math.fsum((reward - mean) ** 2 for reward in rewards) / len(rewards))
  return DatasetStatistics(count, mean, std, dict(report.counts), source.fingerprint(split),
                           unknown / pieces if pieces else None, pieces)


def warn_about_unknown_pieces(task_name: str, split: str, statistics: DatasetStatistics) -> None:
  """A vocabulary that does not fit the data passes silently otherwise: training sees <unk>."""
  rate = statistics.unknown_piece_rate
  if rate is not None and rate > UNKNOWN_PIECE_WARNING_RATE:
    vocabulary = feedback_source(task_name).vocabulary
    logging.warning(
        "Task '%s' split '%s': %.1f%% of the %d pieces of its first %d examples are unknown to "
        "its vocabulary (%s) and become <unk> (id %s), which the model cannot learn from; is "
        "this the model's vocabulary, and does it cover the data's language and characters?",
        task_name, split, 100 * rate, statistics.pieces_checked,
        min(statistics.count, UNKNOWN_PIECE_SAMPLE),
        getattr(vocabulary, "sentencepiece_model_file", vocabulary), vocabulary.unk_id)


def dataset_statistics(task_name: str, split: str, *, cache_dir: str | None = None,
                       process_index: int = 0, timeout_seconds: float = 3600.0,
                       poll_seconds: float = 1.0) -> DatasetStatistics:
  """The statistics of a Task's split, from the cache in `cache_dir` when there is one.

  Warns when the unknown-piece rate is above `UNKNOWN_PIECE_WARNING_RATE`.
  """
  if cache_dir is None:
    statistics = compute_statistics(task_name, split)
    warn_about_unknown_pieces(task_name, split, statistics)
    return statistics
  fingerprint = feedback_source(task_name).fingerprint(split)
  path = (f"{cache_dir.rstrip('/')}/data_statistics/"
          f"{task_name}.{split}.{fingerprint}.v{_VERSION}.json")
  if not tf.io.gfile.exists(path):
    if process_index == 0:
      _compute_and_write(task_name, split, path)
    else:
      _wait_for(path, timeout_seconds, poll_seconds)
  with tf.io.gfile.GFile(path) as stream:
    stored = json.load(stream)
  if "error" in stored:
    raise DataError(stored["error"])
  statistics = DatasetStatistics(**stored)
  warn_about_unknown_pieces(task_name, split, statistics)
  return statistics


def _compute_and_write(task_name: str, split: str, path: str) -> None:
  try:
    content = dataclasses.asdict(compute_statistics(task_name, split))
  except DataError as error:
    _write_atomically(path, {"error": str(error)})  # The waiting hosts raise it too.
    raise
  _write_atomically(path, content)
  logging.info("Dataset statistics of %s:%s written to %s: %s", task_name, split, path, content)


def _write_atomically(path: str, content: dict) -> None:
  """Write a temporary file and rename it, so a waiting reader never sees half a file."""
  tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
  temporary = f"{path}.tmp-{uuid.uuid4().hex}"
  with tf.io.gfile.GFile(temporary, "w") as stream:
    json.dump(content, stream)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _wait_for(path: str, timeout_seconds: float, poll_seconds: float) -> None:
  deadline = time.monotonic() + timeout_seconds
  while not tf.io.gfile.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f"waited {timeout_seconds:.0f} s for process 0 to write the dataset "
                         f"statistics {path}; is process 0 running with the same data and workdir?")
    time.sleep(poll_seconds)

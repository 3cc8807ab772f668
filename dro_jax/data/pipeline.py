"""The training input pipeline: per-host shards, deterministic order, exact resume.

The batches of an epoch are a pure function of (seed, epoch, process index, process count): host i
reads examples i, i + P, i + 2P, ... of the split (files permuted by the epoch's seed), shuffles
them with the epoch's seed and batches them; every host yields the same number of batches,
ceil(ceil(N / P) / per-host batch), the last ones padded with zero-weight examples
(`example_weights` 0, all tokens 0). The position is then just (epoch, batches consumed), saved
with everything else that fixes the stream (data, seed, batch size, feature lengths, shuffle,
reward mode, epochs, mixing rates: `DataIterator.stream()`) so that a resume with any of them
changed is refused rather than silently reading other batches. Resuming rebuilds the epoch and
skips the consumed batches, which costs reading and tokenising them once more (at most one epoch;
about 2,000 UltraFeedback-sized examples a second on two CPU cores). A single Task whose host share
of converted features fits in `IN_MEMORY_BYTES` is read and tokenised once and kept as arrays; its
epochs are numpy permutations of them (seeded the same way), so small datasets do not pay a
tf.data rebuild every epoch. Which of the two orders a stream uses is part of its position; a
position from before it was recorded ("order" absent) is resumed only where the order provably
does not matter (see `DataIterator.restore`).

A Mixture samples its Tasks by their rates from endless per-Task streams; its "epoch" is the same
number of batches as one pass over all its Tasks would give, after which the seeds change.

Every batch carries `example_id` (int64, see `tasks`; a Mixture adds the Task's index
<< TASK_ID_SHIFT; padding rows -1), which stays on the host. With `with_partners=True` a
single-trajectory batch also carries each example's fixed KTO partner (`kl_decoder_*`,
`kl_example_id`), the same on every host and in every epoch; other losses do not pay for it.

Prompts and responses over the limits are cut (`tasks.TruncateAndAppendEos`), and every batch
carries host-side int32 flags `truncated_prompt` / `truncated_response` (padding rows 0). The
iterator counts them: `truncation()` gives the shares of real rows cut since it started (for the
training metrics), and once a Task's share is known (its host share read, or TRUNCATION_SAMPLE rows
seen, or an epoch ended) a single warning, logged and printed, says how many were cut.

    iterator = input_pipeline("my_task", global_batch_size=32, seed=0, cache_dir=workdir,
                              reward_mode="normalized")
    batch = next(iterator)                 # numpy dict, this host's rows
    saved = iterator.position()            # JSON-serialisable; store it in the checkpoint
    iterator.truncation()                  # {"data/truncated_prompts": 0.02, ...}: for metrics
    iterator = input_pipeline(..., position=saved)   # next: the batch that would have come
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator, Mapping

from absl import logging
import numpy as np
import seqio

from dro_jax.data import converters
from dro_jax.data._tensorflow import tf
from dro_jax.data.readers import DataError
from dro_jax.data.records import TRUNCATION_FLAGS
from dro_jax.data.statistics import DatasetStatistics, dataset_statistics
from dro_jax.data.tasks import (PAIRWISE, FeedbackSource, TruncateAndAppendEos,
                                check_vocabulary_fits, component_tasks, feedback_source,
                                with_partners as partners_context)

REWARD_MODES = ("raw", "normalized", "thumbs")
POSITION_KEYS = ("dataset", "split", "seed", "epoch", "batches_consumed", "process_count",
                 "global_batch_size")  # Required to restore; `DataIterator.stream()` adds more.
TASK_ID_SHIFT = 56  # A Mixture's example_id: Task index << TASK_ID_SHIFT | the Task's example_id
ID_KEYS = ("example_id", "kl_example_id")
# A single Task whose share of one host is at most this many bytes of converted features is read
# once and kept in memory; each epoch is then a permutation of it (no per-epoch tf.data rebuild).
IN_MEMORY_BYTES = 256 << 20
# The truncation warning waits for this many real rows of a Task (or its host share, or the end of
# an epoch), so that its shares are not those of the first few batches.
TRUNCATION_SAMPLE = 1000
_TRUNCATION_WARNED: set[tuple[Any, ...]] = set()  # (Task, split, limits): warned once a process


def epoch_seed(seed: int, epoch: int, salt: str = "") -> int:
  """A 31-bit seed for one epoch (and one Task of a mixture), the same on every host."""
  digest = hashlib.sha256(f"{seed}:{epoch}:{salt}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def default_feature_lengths(name: str) -> dict[str, int]:
  """{"inputs", "targets"}: the largest token limits of the Task or of the Mixture's Tasks."""
  sources = [feedback_source(task) for task, _ in component_tasks(name)]
  targets = [length for source in sources for key, length in source.max_lengths.items()
             if key != "inputs"]
  return {"inputs": max(source.max_lengths["inputs"] for source in sources),
          "targets": max(targets)}


def transform_rewards(ds: tf.data.Dataset, mode: str,
                      statistics: DatasetStatistics) -> tf.data.Dataset:
  """"normalized": (r - mean) / std over the dataset; "thumbs": label = r > mean, reward = label."""
  if mode == "raw":
    return ds
  mean = statistics.reward_mean
  if mode == "thumbs":
    def binarize(features):
      label = tf.cast(tf.cast(features["reward"], tf.float64) > mean, tf.int32)
      return {**features, "label": label, "reward": tf.cast(label, tf.float32)}
    return ds.map(binarize, num_parallel_calls=tf.data.AUTOTUNE)
  std = statistics.reward_std
  if not std:
    logging.warning("All rewards are equal (%s); normalisation only subtracts the mean.", mean)
    std = 1.0

  def normalize(features):
    reward = (tf.cast(features["reward"], tf.float64) - mean) / std
    return {**features, "reward": tf.cast(reward, tf.float32)}
  return ds.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)


def _as_json(value: Any) -> Any:
  """A position value as it reads back from JSON (tuples become lists), for comparison."""
  if isinstance(value, Mapping):
    return {str(key): _as_json(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_as_json(item) for item in value]
  return value


def _zero_example(element_spec: Mapping[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
  """A padding row: zeros, and id -1 (no example has it)."""
  return {key: tf.fill(spec.shape, tf.constant(-1, spec.dtype)) if key in ID_KEYS
          else tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}


def task_ids(ids: np.ndarray, task_index: int) -> np.ndarray:
  """A component Task's example ids as the Mixture's batches carry them (padding stays -1)."""
  return np.where(ids >= 0, ids + (task_index << TASK_ID_SHIFT), ids)


def _tokenize_partners(ds: tf.data.Dataset, source: FeedbackSource,
                       targets_length: int) -> tf.data.Dataset:
  """The partner's response tokenised and truncated exactly as the example's own targets."""
  feature = {"kl_targets": seqio.Feature(source.vocabulary, add_eos=True)}
  ds = seqio.preprocessors.tokenize(ds, feature, copy_pretokenized=False)
  truncate = TruncateAndAppendEos({"kl_targets": source.max_lengths["targets"]},
                                  {"kl_targets": targets_length}, feature)
  return truncate(ds)


def _is_global(order: str | None, process_count: int) -> bool:
  """Whether a stream of `order` over `process_count` hosts is the one global order."""
  return order == "memory_global" or (order == "memory" and int(process_count) == 1)


class DataIterator:
  """Numpy batches of this host's rows; `position()` / `restore()` for checkpoints.

  Build it with `input_pipeline`.
  """

  def __init__(self, name: str, *, split: str, global_batch_size: int,
               feature_lengths: Mapping[str, int], seed: int, process_index: int,
               process_count: int, shuffle: bool, num_epochs: int | None, reward_mode: str,
               cache_dir: str | None, statistics_timeout_seconds: float,
               with_partners: bool = False):
    self.name, self.split, self.seed = name, split, seed
    self.with_partners = with_partners
    self.global_batch_size = global_batch_size
    self.process_index, self.process_count = process_index, process_count
    self.batch_size = global_batch_size // process_count
    self.feature_lengths = dict(feature_lengths)
    self.shuffle, self.num_epochs, self.reward_mode = shuffle, num_epochs, reward_mode
    self._is_mixture = isinstance(seqio.get_mixture_or_task(name), seqio.Mixture)
    self._tasks = component_tasks(name)
    self._sources: list[FeedbackSource] = [feedback_source(task) for task, _ in self._tasks]
    self.statistics = {
        task.name: dataset_statistics(task.name, split, cache_dir=cache_dir,
                                      process_index=process_index,
                                      timeout_seconds=statistics_timeout_seconds)
        for task, _ in self._tasks}
    for (task, _), source in zip(self._tasks, self._sources):
      statistics = self.statistics[task.name]
      if statistics.count == 0:
        # A Task made from files (data.train_files) is named by its files, not its hashed name.
        files = getattr(source, "_patterns", {}).get(split)
        where = (f"{', '.join(files)} (split '{split}')" if files else
                 f"task '{task.name}' split '{split}'")
        raise DataError(f"{where} has no valid example (skipped: {statistics.skipped})")
    if self._is_mixture:
      # A host with no example of a Task cannot sample it: its share would go to the other Tasks
      # there, and the mixture would no longer follow its rates.
      scarce = {task_name: statistics.count for task_name, statistics in self.statistics.items()
                if statistics.count < process_count}
      if scarce:
        counts = ", ".join(f"Task '{task_name}' has {count} example{'s' * (count != 1)}"
                           for task_name, count in scarce.items())
        raise DataError(f"mixture '{name}': {counts} in split '{split}', fewer than the "
                        f"{process_count} processes; some host would have none of them and the "
                        "mixing rates would skew; give each Task at least one example per "
                        "process, or leave it out of the mixture")
    total = sum(statistics.count for statistics in self.statistics.values())
    self.batches_per_epoch = math.ceil(math.ceil(total / process_count) / self.batch_size)
    self._converter = converters.feature_converter(
        self._sources[0].kind, with_label=self._sources[0].thumbs or reward_mode == "thumbs",
        with_partners=with_partners)
    self._epoch, self._batches_consumed = 0, 0
    self._batches: Iterator[dict[str, np.ndarray]] | None = None
    self._memory: dict[str, np.ndarray] | bool | None = None  # None: not decided yet
    # Kept in memory with several processes, every host holds the whole split and takes its
    # slice of each global batch: the batches are those of one process, whatever the host count.
    self._whole_split = False
    # Per Task (a Mixture's index): real rows yielded, prompts cut, responses cut.
    self._truncated = np.zeros((len(self._tasks), 3), np.int64)
    self._truncation_known: set[int] = set()  # Tasks whose warning is decided

  # ------------------------------------------------------------------------------ position

  def stream(self) -> dict[str, Any]:
    """What fixes the batches besides the host: JSON values, compared as such on restore.

    "tasks" lists [Task, mixing rate] pairs (a Mixture can be registered again with other rates);
    "examples" the valid examples per Task (changed data gives other batches).
    """
    return {"dataset": self.name, "split": self.split, "seed": int(self.seed),
            "global_batch_size": int(self.global_batch_size),
            "feature_lengths": {key: int(length)
                                for key, length in sorted(self.feature_lengths.items())},
            "shuffle": bool(self.shuffle), "reward_mode": self.reward_mode,
            "num_epochs": None if self.num_epochs is None else int(self.num_epochs),
            "tasks": [[task.name, float(rate)] for task, rate in self._tasks],
            "examples": {task_name: int(statistics.count)
                         for task_name, statistics in self.statistics.items()},
            "order": self._order()}

  def _order(self) -> str:
    """How the batches are drawn: "memory" (one process, or several each reading the whole
    split and taking its slice of every global batch: "memory_global"), or "tf.data" (each
    host its own shard)."""
    if not self._in_memory():
      return "tf.data"
    return "memory_global" if self._whole_split else "memory"

  def position(self) -> dict[str, Any]:
    """Where the stream is, and what fixes it: the same on every host; JSON-serialisable, to be
    stored in the checkpoint and given back to `restore`."""
    return {**self.stream(), "epoch": self._epoch, "batches_consumed": self._batches_consumed,
            "process_count": self.process_count}

  def restore(self, position: Mapping[str, Any], *, on_host_count_change: str = "error") -> None:
    """Continue from a saved position; the next batch is the one that would have come next.

    Anything else that fixes the stream (`stream()`: data, seed, batch size, feature lengths,
    shuffle, reward mode, epochs, mixing rates) must be as saved, or the batches would silently
    differ from those the run would have seen. A different host count cannot continue the same
    stream either: it is refused, or with on_host_count_change="restart_epoch" the saved epoch
    starts again from its first batch. A position without "order" (written before the pipeline
    recorded it) is refused mid-epoch where this run's order may not be the saved one's.
    """
    missing = [key for key in POSITION_KEYS if key not in position]
    if missing:
      raise ValueError(f"data position {dict(position)} lacks {missing}")
    unchecked = []
    # One global order (kept in memory: one process, or several each taking its slice of every
    # global batch) is the same stream whatever the host count: it continues exactly.
    global_stream = (_is_global(position.get("order"), position["process_count"])
                     and _is_global(self._order(), self.process_count))
    for key, mine in self.stream().items():
      if key not in position:
        if key != "order":  # Checked by _check_legacy_order below.
          unchecked.append(key)
      elif key == "order" and global_stream:
        continue
      elif _as_json(position[key]) != mine:
        raise ValueError(f"cannot resume the data stream: the checkpoint has {key}="
                         f"{position[key]!r}, this run has {key}={mine!r}; run with the "
                         f"checkpoint's {key}, or start the data stream afresh (no position)")
    if unchecked:
      logging.warning("The data position predates %s; resuming without checking them.",
                      unchecked)
    epoch, consumed = int(position["epoch"]), int(position["batches_consumed"])
    if position["process_count"] != self.process_count and not global_stream:
      message = (f"the checkpoint's data position was written by {position['process_count']} "
                 f"processes, this run has {self.process_count}: the per-host streams differ")
      if on_host_count_change != "restart_epoch":
        raise ValueError(message + "; resume with the same host count, or pass "
                         "on_host_count_change='restart_epoch' to restart epoch "
                         f"{epoch} from its first batch")
      logging.warning("%s; restarting epoch %d from its first batch.", message, epoch)
      consumed = 0
    if not 0 <= consumed <= self.batches_per_epoch:
      raise ValueError(f"data position has batches_consumed={consumed}, but an epoch has "
                       f"{self.batches_per_epoch} batches: is it the same data?")
    if "order" not in position:
      self._check_legacy_order(epoch, consumed)
    self._epoch, self._batches_consumed, self._batches = epoch, consumed, None

  def _check_legacy_order(self, epoch: int, consumed: int) -> None:  # noqa: D401
    """Refuses a position without "order" unless this run's remaining batches of its epoch are
    provably the ones the saving run would have read.

    Exact: at an epoch boundary (no batch of the epoch consumed, or all of them), where the next
    epoch is made afresh; without shuffle, where both orders are the file order; and on the
    tf.data order (a Mixture's, or a Task too large to keep in memory), the only order the
    pipeline had before positions recorded it. Mid-epoch on the in-memory permutation, the
    rest of the epoch would be another order than the saved one's: examples repeated and missed.
    """
    order = self.stream()["order"]
    if consumed in (0, self.batches_per_epoch) or not self.shuffle or order == "tf.data":
      return
    raise ValueError(
        f"the checkpoint's data position has no 'order' (it predates the in-memory order), and "
        f"it is mid-epoch (epoch {epoch}, {consumed} of {self.batches_per_epoch} batches): this "
        f"run reads '{self.name}' in the {order!r} order, another permutation than the saved "
        "one's, which would repeat and miss examples; start the data stream afresh (no position: "
        "an empty data_position {} in the checkpoint), or resume from a checkpoint saved at an "
        "epoch boundary")

  def close(self) -> None:
    """Releases the TensorFlow iterator (and its reader thread); iterating again reopens it."""
    self._batches = None

  # ------------------------------------------------------------------------------ iteration

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batches_consumed >= self.batches_per_epoch:
      self._epoch, self._batches_consumed, self._batches = self._epoch + 1, 0, None
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    if self._batches is None:
      if self._in_memory():
        self._batches = self._memory_batches(self._epoch, self._batches_consumed)
      else:
        self._batches = self._epoch_dataset(self._epoch,
                                            self._batches_consumed).as_numpy_iterator()
    try:
      batch = self._read(self._batches)
    except StopIteration:
      raise RuntimeError(f"epoch {self._epoch} ended after {self._batches_consumed} of "
                         f"{self.batches_per_epoch} batches: did the data change while "
                         "training?") from None
    self._batches_consumed += 1
    self._count_truncation(batch)
    return batch

  # ------------------------------------------------------------------------------ truncation

  def truncation(self) -> dict[str, float]:
    """The shares of real rows (example_weights > 0) this iterator has yielded whose prompt /
    response truncation cut (pairwise: either response), since it started; 0.0 before any."""
    rows, prompts, responses = (int(total) for total in self._truncated.sum(axis=0))
    return {"data/truncated_prompts": prompts / rows if rows else 0.0,
            "data/truncated_responses": responses / rows if rows else 0.0}

  def _count_truncation(self, batch: Mapping[str, np.ndarray]) -> None:
    prompt_key, response_key = TRUNCATION_FLAGS
    if prompt_key not in batch:
      return
    real = np.asarray(batch["example_weights"]) > 0
    index = (np.asarray(batch["example_id"])[real] >> TASK_ID_SHIFT if self._is_mixture
             else np.zeros(int(real.sum()), np.int64))
    counts = self._truncated
    np.add.at(counts[:, 0], index, 1)
    np.add.at(counts[:, 1], index, np.asarray(batch[prompt_key])[real] > 0)
    np.add.at(counts[:, 2], index, np.asarray(batch[response_key])[real] > 0)
    epoch_ended = self._batches_consumed >= self.batches_per_epoch
    for task_index in range(len(self._tasks)):
      if task_index not in self._truncation_known and (
          epoch_ended or counts[task_index, 0] >= TRUNCATION_SAMPLE):
        self._warn_truncation(task_index, *counts[task_index], "read so far on this host")

  def _warn_truncation(self, task_index: int, rows: int, prompts: int, responses: int,
                       what: str) -> None:
    """Decides a Task's warning: one line, logged and printed, if anything was cut."""
    self._truncation_known.add(task_index)
    if not rows or not (prompts or responses):
      return
    task, source = self._tasks[task_index][0], self._sources[task_index]
    inputs = min(source.max_lengths["inputs"], self.feature_lengths["inputs"])
    targets = min(length for key, length in source.max_lengths.items() if key != "inputs")
    targets = min(targets, self.feature_lengths["targets"])
    key = (task.name, self.split, inputs, targets)
    if key in _TRUNCATION_WARNED:
      return
    _TRUNCATION_WARNED.add(key)
    message = (f"{100 * prompts / rows:.1f}% of prompts and {100 * responses / rows:.1f}% of "
               f"responses of Task {task.name} split {self.split} were cut to "
               f"max_input_length={inputs} / max_target_length={targets} (tokens with EOS; "
               f"{prompts} and {responses} of the {rows} examples {what}): a prompt keeps its "
               "end, a response its start; raise the limits to keep them whole, or set "
               "data.truncate=False to refuse over-long examples")
    # Printed for the console; the record (marked printed) goes to the run's log file only.
    logging.warning("%s", message, extra={"printed": True})
    print(f"WARNING: {message}", flush=True)

  def _task_lengths(self, source: FeedbackSource) -> dict[str, int]:
    inputs, targets = self.feature_lengths["inputs"], self.feature_lengths["targets"]
    if source.kind == PAIRWISE:
      return {"inputs": inputs, "chosen": targets, "rejected": targets}
    return {"inputs": inputs, "targets": targets}

  def _read(self, iterator: Iterator[Any]) -> Any:
    """next(iterator), a data error surfacing as the file:line message, not TensorFlow's."""
    try:
      return next(iterator)
    except tf.errors.OpError:
      data_errors = [source.last_error for source in self._sources if source.last_error]
      if data_errors:
        raise data_errors[0] from None
      raise

  def _in_memory(self) -> bool:
    """A single Task whose host share fits in IN_MEMORY_BYTES is read once and kept as arrays."""
    if self._memory is None:
      self._memory = False
      if not self._is_mixture:
        whole = self.process_count > 1
        ds = self._task_examples(self._tasks[0][0], self._sources[0], 0, shuffle=False,
                                 whole_split=whole)
        # Without the truncation flags, as before they existed: a stream keeps its order.
        row_bytes = sum(int(np.prod(spec.shape)) * spec.dtype.size
                        for key, spec in ds.element_spec.items() if key not in TRUNCATION_FLAGS)
        count = self.statistics[self._tasks[0][0].name].count
        rows = count if whole else math.ceil(count / self.process_count)
        if rows * row_bytes <= IN_MEMORY_BYTES:
          self._memory = self._load(ds)
          self._whole_split = whole
          loaded = next(iter(self._memory.values())).shape[0]
          if whole:
            self.batches_per_epoch = max(math.ceil(loaded / self.global_batch_size), 1)
          if all(key in self._memory for key in TRUNCATION_FLAGS):
            prompts, responses = (int((self._memory[key] > 0).sum()) for key in TRUNCATION_FLAGS)
            self._warn_truncation(0, loaded, prompts, responses,
                                  "of the split" if whole else "of this host's share")
    return self._memory is not False

  def _load(self, ds: tf.data.Dataset) -> dict[str, np.ndarray]:
    chunks = []
    iterator = ds.batch(4096).as_numpy_iterator()
    while True:
      try:
        chunks.append(self._read(iterator))
      except StopIteration:
        break
    spec = ds.element_spec
    if not chunks:
      return {key: np.zeros((0,) + tuple(value.shape), value.dtype.as_numpy_dtype)
              for key, value in spec.items()}
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in spec}

  def _memory_batches(self, epoch: int, skip_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """The epoch's batches from the kept arrays: this host's rows in the epoch's permutation
    (the Task's file order without shuffle), then zero-weight rows (ids -1) to fill the epoch.
    Holding the whole split (several processes), this host takes its slice of each global
    batch of that permutation."""
    rows = self._memory
    count = next(iter(rows.values())).shape[0]
    order = np.arange(count)
    if self.shuffle:
      order = np.random.default_rng(
          epoch_seed(self.seed, epoch, self._tasks[0][0].name)).permutation(count)
    step = self.global_batch_size if self._whole_split else self.batch_size
    offset = self.process_index * self.batch_size if self._whole_split else 0
    total = self.batches_per_epoch * step
    for start in range(skip_batches * step, total, step):
      picked = order[start + offset:start + offset + self.batch_size]
      padding = self.batch_size - picked.size
      batch = {}
      for key, values in rows.items():
        part = values[picked]
        if padding:
          fill = np.full((padding,) + values.shape[1:], -1 if key in ID_KEYS else 0, values.dtype)
          part = np.concatenate([part, fill])
        batch[key] = part
      yield batch

  def _task_examples(self, task: seqio.Task, source: FeedbackSource, epoch: int,
                     task_index: int = 0, shuffle: bool | None = None,
                     whole_split: bool = False) -> tf.data.Dataset:
    """This host's converted examples of one Task for an epoch (all of them: `whole_split`)."""
    shuffle = self.shuffle if shuffle is None else shuffle
    shard = (seqio.ShardInfo(0, 1) if whole_split
             else seqio.ShardInfo(self.process_index, self.process_count))

    def make() -> tf.data.Dataset:
      return task.get_dataset(
          sequence_length=self._task_lengths(source), split=self.split, shuffle=shuffle,
          seed=epoch_seed(self.seed, epoch, task.name), num_epochs=1,
          shard_info=shard, try_in_mem_cache=False)
    if self.with_partners:
      with partners_context():
        ds = _tokenize_partners(make(), source, self.feature_lengths["targets"])
    else:
      ds = make()
    if task_index:
      offset = tf.constant(task_index << TASK_ID_SHIFT, tf.int64)
      ds = ds.map(lambda features: {**features, **{key: features[key] + offset
                                                   for key in ID_KEYS if key in features}})
    ds = transform_rewards(ds, self.reward_mode, self.statistics[task.name])
    return self._converter(ds, self.feature_lengths)

  def _epoch_dataset(self, epoch: int, skip_batches: int) -> tf.data.Dataset:
    if self._is_mixture:
      # Each Task repeats (reshuffled every pass, deterministically from the seed) and is
      # sampled by its rate. Repeating after the shuffle keeps its buffer to one pass.
      streams = [self._task_examples(task, source, epoch, index).repeat()
                 for index, ((task, _), source) in enumerate(zip(self._tasks, self._sources))]
      rates = np.array([rate for _, rate in self._tasks], np.float64)
      ds = tf.data.Dataset.sample_from_datasets(streams, weights=list(rates / rates.sum()),
                                                seed=epoch_seed(self.seed, epoch, "mixture"))
    else:
      ds = self._task_examples(self._tasks[0][0], self._sources[0], epoch)
      # Zero-weight rows fill the last batches, so every host yields the same number of batches.
      ds = ds.concatenate(tf.data.Dataset.from_tensors(_zero_example(ds.element_spec)).repeat())
    ds = ds.take(self.batches_per_epoch * self.batch_size).skip(skip_batches * self.batch_size)
    options = tf.data.Options()
    options.deterministic = True
    return ds.batch(self.batch_size, drop_remainder=True).prefetch(2).with_options(options)


def input_pipeline(name: str, *, global_batch_size: int, split: str = "train", seed: int = 0,
                   feature_lengths: Mapping[str, int] | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   shuffle: bool = True, num_epochs: int | None = None,
                   reward_mode: str = "raw", cache_dir: str | None = None,
                   position: Mapping[str, Any] | None = None,
                   on_host_count_change: str = "error",
                   statistics_timeout_seconds: float = 3600.0,
                   model_vocab_size: int | None = None,
                   with_partners: bool = False) -> DataIterator:
  """This host's batches of a Task or Mixture registered with `dro_jax.data.tasks`.

  Args:
    name: the Task or Mixture.
    global_batch_size: rows per step over all hosts; each host yields global / process_count.
    split: the split to read.
    seed: fixes the order of every epoch.
    feature_lengths: {"inputs", "targets"} token lengths; default, the Tasks' limits (shorter
      lengths truncate by the same policy: prompts keep their end, responses their start).
    process_index, process_count: this host and the number of hosts (default: JAX's).
    shuffle: shuffle files and examples (with the epoch's seed).
    num_epochs: stop after this many epochs; None repeats forever.
    reward_mode: "raw", "normalized" (z-normalised over the whole split, as the DRO paper) or
      "thumbs" (label 1 above the dataset's mean reward, else 0; reward = label).
    cache_dir: where the dataset statistics are cached (the workdir; process 0 writes them).
    position: a saved `DataIterator.position()` to continue from.
    on_host_count_change: "error" or "restart_epoch", when `position` has another host count.
    statistics_timeout_seconds: how long other processes wait for process 0's statistics.
    model_vocab_size: the model's vocab_size (`T5Config.vocab_size`); a Task whose vocabulary
      has more pieces is refused (its ids would index past the embedding). The statistics warn
      about a high rate of unknown pieces in any case.
    with_partners: batches also carry each example's fixed KTO partner, the next valid example
      of its file with another prompt (cyclically): kl_decoder_input_tokens,
      kl_decoder_target_tokens, kl_decoder_loss_weights and kl_example_id (single-trajectory
      Tasks only).
  """
  if process_index is None or process_count is None:
    import jax  # Only for the defaults: the pipeline itself needs no JAX.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  if reward_mode not in REWARD_MODES:
    raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
  if model_vocab_size is not None:
    check_vocabulary_fits(name, model_vocab_size)
  sources = [feedback_source(task) for task, _ in component_tasks(name)]
  if reward_mode != "raw" and sources[0].kind == PAIRWISE:
    raise ValueError(f"reward_mode={reward_mode!r} needs rewards; '{name}' is pairwise")
  if reward_mode == "thumbs" and sources[0].thumbs:
    raise ValueError(f"'{name}' already carries thumbs labels; use reward_mode='raw'")
  if with_partners and sources[0].kind == PAIRWISE:
    raise ValueError(f"with_partners gives KTO's mismatched responses; '{name}' is pairwise")
  iterator = DataIterator(
      name, split=split, global_batch_size=global_batch_size,
      feature_lengths=feature_lengths or default_feature_lengths(name), seed=seed,
      process_index=process_index, process_count=process_count, shuffle=shuffle,
      num_epochs=num_epochs, reward_mode=reward_mode, cache_dir=cache_dir,
      statistics_timeout_seconds=statistics_timeout_seconds, with_partners=with_partners)
  if position is not None:
    iterator.restore(position, on_host_count_change=on_host_count_change)
  return iterator

"""seqio Tasks from feedback files: single-trajectory (prompt, response, reward) and pairwise.

    register_single_trajectory_task("my_feedback", "gs://bucket/feedback-*.jsonl",
                                    "t5/spiece.model",
                                    fields={"response": "answer", "reward": "score"})
    register_pairwise_task("hh", {"train": "hh/train.jsonl", "test": "hh/test.jsonl"},
                           "t5_checkpoint_dir", adapter=adapters.anthropic_hh_pairs())
    register_mixture("both", ["my_feedback", ("other_feedback", 0.5)])

Records are read and validated in Python (`FeedbackSource`), so a bad record is reported with its
file, line and field (`DataError`), or skipped and counted when `on_invalid="skip"`. Tokens are
limited per task: a prompt keeps its LAST max_prompt_length - 1 tokens (the end of a prompt is what
the response answers), a response its FIRST max_response_length - 1, and EOS is always appended.
With too_long="skip" or "error" an over-long record is skipped (counted) or reported instead.
Each example carries int32 flags "truncated_prompt" and "truncated_response" (1 where truncation
cut it; pairwise: either response), which the pipeline counts, warns about and reports
(`DataIterator.truncation()`).

Task features: "inputs" and "targets" (or "chosen" and "rejected") as token ids, "reward" float32
and, for thumbs data, "label" int32 (1 up, 0 down); the converters in `converters.py` turn them into
model batches. Every example also carries "example_id" (int64): (index of its file among the split's
files in sorted order) << 32 | (its index among the file's adapter outputs), the same whatever the
shuffling or the host count, so per-example values computed once (the frozen reference's log-probs,
`reference_cache.py`) can be looked up by it. Within `with_partners()`, a single-trajectory example
also carries its fixed KTO partner, the next valid example of the same file with another prompt
(cyclically): "kl_targets" (the partner's response) and "kl_example_id".
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import itertools
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import seqio

from dro_jax.data import records as records_lib
from dro_jax.data._tensorflow import tf
from dro_jax.data.adapters import Adapter
from dro_jax.data.readers import DataError, read_records, resolve_files
from dro_jax.data.records import CONTEXT_KEY, RecordError

SINGLE_TRAJECTORY = "single_trajectory"
PAIRWISE = "pairwise"
ON_INVALID = ("error", "skip")
TOO_LONG = ("truncate", "skip", "error")
_FIELD_OF_FEATURE = {"inputs": "prompt", "targets": "response", "chosen": "chosen",
                     "rejected": "rejected"}

SourceSpec = str | Sequence[str] | Mapping[str, str | Sequence[str]]

FILE_ID_SHIFT = 32  # example_id = file index << FILE_ID_SHIFT | index within the file
PARTNER_KEYS = ("kl_targets", "kl_example_id")
_WITH_PARTNERS = contextvars.ContextVar("dro_jax_with_partners", default=False)


@contextlib.contextmanager
def with_partners() -> Iterator[None]:
  """Datasets made from FeedbackSources within it carry each example's fixed partner.

  A context rather than an argument because seqio's Task.get_dataset passes the source nothing
  of its own; the source reads it when the dataset is made, so iterating later is unaffected.
  """
  token = _WITH_PARTNERS.set(True)
  try:
    yield
  finally:
    _WITH_PARTNERS.reset(token)


def load_vocabulary(vocabulary: str | seqio.Vocabulary, extra_ids: int = 0) -> seqio.Vocabulary:
  """A sentencepiece vocabulary from a .model file or a folder holding T5's `spiece.model`.

  A model whose pad, eos or unk id is not T5's (0, 1, 2) is refused with the fix (a UserError;
  `dro_jax.vocabulary`): sentencepiece's defaults would leave the policy unable to stop.
  """
  if isinstance(vocabulary, seqio.Vocabulary):
    return vocabulary
  path = vocabulary
  if tf.io.gfile.isdir(path):
    path = f"{path.rstrip('/')}/spiece.model"
  if not tf.io.gfile.exists(path):
    raise DataError(f"{path}: no sentencepiece model here (give a .model file or a checkpoint "
                    "folder that holds spiece.model)")
  loaded = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  from dro_jax import vocabulary as vocabulary_lib
  vocabulary_lib.check_t5_ids(loaded.tokenizer, path)
  return loaded


class SkipReport:
  """Counts the records a pass skipped (or raises, where the policy says "error")."""

  def __init__(self, on_invalid: str = "error", too_long: str = "error"):
    self.on_invalid, self.too_long = on_invalid, too_long
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: list[str] = []

  def problem(self, message: str, *, is_length: bool = False, fix: str = "") -> None:
    """Counts the problem, or raises it (with `fix` appended) where the policy is "error"."""
    policy = self.too_long if is_length else self.on_invalid
    if policy == "error":
      raise DataError(message + fix)
    self.counts["too_long" if is_length else "invalid"] += 1
    if len(self.examples) < 3:
      self.examples.append(message)

  def dropped(self) -> None:
    """A row the adapter turned into nothing (e.g. a tie): expected, counted, not an error."""
    self.counts["dropped"] += 1

  def log(self, what: str) -> None:
    if self.counts:
      logging.warning("%s: skipped %d invalid and %d over-long records, the adapter dropped %d "
                      "rows; for example: %s", what, self.counts["invalid"],
                      self.counts["too_long"], self.counts["dropped"],
                      " | ".join(self.examples) or "-")


class _TooLong(RecordError):
  pass


class FeedbackSource(seqio.DataSource):
  """A seqio DataSource reading validated examples from JSONL / parquet / TFRecord files.

  Sharding is on examples (example k goes to shard k % num_shards), so hosts split a split evenly
  whatever the number of files; `examples` is the same stream in Python, for statistics.
  """

  def __init__(self, files_by_split: Mapping[str, Sequence[str]], *, kind: str, thumbs: bool,
               make_example: Callable[[Mapping[str, Any]], dict[str, Any]],
               adapter: Adapter | None, file_format: str | None, on_invalid: str, too_long: str,
               max_lengths: Mapping[str, int], vocabulary: seqio.Vocabulary, description: str,
               task_name: str = ""):
    super().__init__(splits=tuple(files_by_split))
    self.task_name = task_name  # For messages only: not part of the fingerprint.
    self._patterns = dict(files_by_split)
    self.kind, self.thumbs = kind, thumbs
    self.max_lengths = dict(max_lengths)
    self.vocabulary = vocabulary
    self._make_example, self._adapter, self._file_format = make_example, adapter, file_format
    self._on_invalid, self._too_long = on_invalid, too_long
    self._description = description
    self.last_error: DataError | None = None  # Surfaced by the pipeline through TF's wrapping.

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    if split not in self._patterns:
      raise DataError(f"no split {split!r}; this source has {sorted(self._patterns)}")
    return resolve_files(self._patterns[split])

  @property
  def output_signature(self) -> dict[str, tf.TensorSpec]:
    text, example_id = tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int64)
    if self.kind == PAIRWISE:
      return {"inputs": text, "chosen": text, "rejected": text, "example_id": example_id}
    signature = {"inputs": text, "targets": text, "reward": tf.TensorSpec((), tf.float32),
                 "example_id": example_id}
    if self.thumbs:
      signature["label"] = tf.TensorSpec((), tf.int32)
    return signature

  def _signature(self, partners: bool) -> dict[str, tf.TensorSpec]:
    signature = self.output_signature
    if partners:
      signature.update(kl_targets=tf.TensorSpec((), tf.string),
                       kl_example_id=tf.TensorSpec((), tf.int64))
    return signature

  def fingerprint(self, split: str) -> str:
    """Changes whenever the files (name, size, mtime) or how they are read change."""
    parts = [self._description]
    for path in self.list_shards(split):
      stat = tf.io.gfile.stat(path)
      parts.append(f"{path}:{stat.length}:{stat.mtime_nsec}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

  def skip_report(self) -> SkipReport:
    """A fresh counter under this source's policies."""
    return SkipReport(self._on_invalid, self._too_long)

  def examples(self, split: str, *, shard_info: seqio.ShardInfo | None = None,
               file_seed: int | None = None, report: SkipReport | None = None,
               with_ids: bool = False, partners: bool = False) -> Iterator[dict]:
    """Validated examples of this shard, in file order (files permuted by `file_seed`).

    with_ids: add "example_id"; partners: add "kl_targets" and "kl_example_id" (the next valid
    example of the same file with another prompt, cyclically; single-trajectory data only).
    """
    if partners and self.kind == PAIRWISE:
      raise ValueError("partners are KTO's mismatched responses; pairwise data has none")
    files = self.list_shards(split)
    file_index = {path: index for index, path in enumerate(sorted(files))}
    if file_seed is not None:
      random.Random(file_seed).shuffle(files)
    report = report or self.skip_report()
    index = 0
    for path in files:
      first_id = file_index[path] << FILE_ID_SHIFT
      examples: Iterator[dict] = (
          {**example, "example_id": first_id + row} if with_ids or partners else example
          for row, example in self._file_examples(path, report, split))
      if partners:
        examples = _with_partners(examples)
      for example in examples:
        if shard_info is None or index % shard_info.num_shards == shard_info.index:
          yield example
        index += 1
    report.log(f"{split} of {', '.join(files)}")

  def _file_examples(self, path: str, report: SkipReport,
                     split: str = "") -> Iterator[tuple[int, dict]]:
    """(index among the file's adapter outputs, valid or not; the example) of its valid ones."""
    row = -1
    for raw in read_records(path, self._file_format):
      if raw.problem:
        report.problem(f"{raw.location}: {raw.problem}")
        continue
      try:
        outputs = list(self._adapter(raw.fields)) if self._adapter else [raw.fields]
      except RecordError as error:
        report.problem(f"{raw.location}: {error}")
        continue
      if not outputs:
        report.dropped()
      for output in outputs:
        row += 1
        context = output.get(CONTEXT_KEY) if isinstance(output, Mapping) else None
        where = f"{raw.location}: {context}: " if context else f"{raw.location}: "
        try:
          if isinstance(output, RecordError):
            raise output
          example = self._make_example(output)
          self._check_lengths(example)
        except RecordError as error:
          too_long = isinstance(error, _TooLong)
          report.problem(f"{where}{error}", is_length=too_long,
                         fix=self._too_long_fix(split) if too_long else "")
          continue
        yield row, example

  def _too_long_fix(self, split: str) -> str:
    task = f"Task '{self.task_name}' " if self.task_name else ""
    return (f" ({task}split '{split}', too_long='error'); raise max_prompt_length / "
            "max_response_length (a training config's max_input_length / max_target_length), "
            "or let over-long examples be truncated (too_long='truncate'; in a training config "
            "data.truncate=True)")

  def _check_lengths(self, example: Mapping[str, Any]) -> None:
    if self._too_long == "truncate":
      return  # Truncated in TensorFlow; no Python tokenisation needed.
    for feature, limit in self.max_lengths.items():
      length = len(self.vocabulary.encode(example[feature])) + 1  # + EOS
      if length > limit:
        limit_name = "max_prompt_length" if feature == "inputs" else "max_response_length"
        raise _TooLong(_FIELD_OF_FEATURE[feature],
                       f"{length} tokens with EOS, more than {limit_name}={limit}")

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # Handled by the Task.
    file_seed = (int(seed) if seed is not None else random.randrange(2**31)) if shuffle else None

    partners = _WITH_PARTNERS.get()
    signature = self._signature(partners)

    def generate() -> Iterator[dict[str, np.ndarray]]:
      self.last_error = None
      try:
        yield from _columns(self.examples(split, shard_info=shard_info, file_seed=file_seed,
                                          with_ids=True, partners=partners), signature)
      except DataError as error:
        self.last_error = error
        raise

    # Chunks of examples cross into TensorFlow together: one Python call per example is slow.
    chunk_signature = {key: tf.TensorSpec((None,), spec.dtype) for key, spec in signature.items()}
    return tf.data.Dataset.from_generator(generate, output_signature=chunk_signature).unbatch()


def _with_partners(examples: Iterator[dict]) -> Iterator[dict]:
  """Each example with its partner: the next example of the file with ANOTHER prompt, cyclically.

  "Another prompt" because datasets list a prompt's responses together (UltraFeedback's four),
  and KTO's mismatched pairs estimate the KL from a response to some other prompt. Streams one
  run of equal prompts at a time; a file with a single prompt pairs each response with the next.
  """
  run: list[dict] = []  # consecutive examples of one prompt, waiting for the next prompt
  heads: list[dict] = []  # the first examples of the file's first two runs: the last run's partner
  for example in examples:
    if run and example["inputs"] != run[0]["inputs"]:
      yield from (_partnered(member, example) for member in run)
      run = []
    if not run and len(heads) < 2:
      heads.append(example)
    run.append(example)
  if not run:
    return
  partner = next((head for head in heads if head["inputs"] != run[0]["inputs"]), None)
  if partner is None:
    yield from (_partnered(member, run[(i + 1) % len(run)]) for i, member in enumerate(run))
  else:
    yield from (_partnered(member, partner) for member in run)


def _partnered(example: dict, partner: Mapping[str, Any]) -> dict:
  return {**example, "kl_targets": partner["targets"], "kl_example_id": partner["example_id"]}


def _columns(examples: Iterator[dict[str, Any]], signature: Mapping[str, tf.TensorSpec],
             chunk_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
  """Examples -> dicts of arrays of up to `chunk_size` examples each."""
  dtypes = {key: object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype
            for key, spec in signature.items()}
  while chunk := list(itertools.islice(examples, chunk_size)):
    yield {key: np.array([example[key] for example in chunk], dtype=dtype)
           for key, dtype in dtypes.items()}


@dataclasses.dataclass(frozen=True)
class TruncateAndAppendEos:
  """Limits token features and appends EOS: "inputs" keeps its last tokens, others their first.

  The limit of a feature is the smaller of `max_lengths` (the Task's) and the requested sequence
  length, both counting EOS. With `flag_truncated`, every example also gets the int32 flags
  `records.TRUNCATION_FLAGS`: "truncated_prompt" (1 when "inputs" lost tokens) and
  "truncated_response" (1 when any other feature did: a pairwise example's chosen or rejected),
  which the pipeline counts.
  """
  max_lengths: Mapping[str, int]
  sequence_length: Mapping[str, int] | None = None  # Filled in by seqio.
  output_features: Mapping[str, seqio.Feature] | None = None  # Filled in by seqio.
  flag_truncated: bool = False

  def __call__(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(self._truncate, num_parallel_calls=tf.data.AUTOTUNE)

  def _truncate(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    features = dict(features)
    prompt_cut, response_cut = tf.constant(False), tf.constant(False)
    for key, limit in self.max_lengths.items():
      if self.sequence_length and self.sequence_length.get(key):
        limit = min(limit, self.sequence_length[key])
      ids = features[key][records_lib.kept_tokens(key, limit)]
      cut = tf.size(ids) < tf.size(features[key])
      if key == "inputs":
        prompt_cut = prompt_cut | cut
      else:
        response_cut = response_cut | cut
      eos = tf.constant([self.output_features[key].vocabulary.eos_id], ids.dtype)
      features[key] = tf.concat([ids, eos], axis=0)
    if self.flag_truncated:
      prompt_key, response_key = records_lib.TRUNCATION_FLAGS
      features[prompt_key] = tf.cast(prompt_cut, tf.int32)
      features[response_key] = tf.cast(response_cut, tf.int32)
    return features


def _callable_name(function: Callable[..., Any] | None) -> str:
  """A description stable across processes (reprs of functions hold memory addresses)."""
  if function is None:
    return "None"
  if isinstance(function, functools.partial):
    keywords = ", ".join(f"{key}={_callable_name(value) if callable(value) else repr(value)}"
                         for key, value in sorted(function.keywords.items()))
    return f"{_callable_name(function.func)}({keywords})"
  qualified_name = getattr(function, "__qualname__", type(function).__qualname__)
  return f"{getattr(function, '__module__', '')}.{qualified_name}"


def _files_by_split(source: SourceSpec) -> dict[str, list[str]]:
  if isinstance(source, Mapping):
    return {split: [paths] if isinstance(paths, str) else list(paths)
            for split, paths in source.items()}
  return {"train": [source] if isinstance(source, str) else list(source)}


def _add(registry: type[seqio.dataset_providers.DatasetProviderRegistry],
         provider: seqio.Task | seqio.Mixture, what: str, overwrite: bool) -> None:
  """Registers a built Task or Mixture, replacing one of the same name only when asked.

  seqio's own refusal does not say how to replace; and seqio keeps Tasks and Mixtures in separate
  registries but resolves names across both, so a name is taken if either holds it. The provider
  is built before anything is removed, so a failed registration keeps the old one.
  """
  name = provider.name
  holders = [(holder, kind) for holder, kind in ((seqio.TaskRegistry, "Task"),
                                                  (seqio.MixtureRegistry, "Mixture"))
             if name in holder.names()]
  if holders and not overwrite:
    holder, kind = holders[0]
    raise ValueError(f"a seqio {kind} named '{name}' is already registered; pass overwrite=True "
                     f"to replace it with this {what}, or call "
                     f"seqio.{holder.__name__}.remove('{name}') first")
  for holder, _ in holders:
    holder.remove(name)
  registry.add_provider(name, provider)
  if not holders:
    return
  stale = sorted(mixture_name for mixture_name in seqio.MixtureRegistry.names()
                 if name in {task.name for task in seqio.MixtureRegistry.get(mixture_name).tasks})
  if stale:
    logging.warning("'%s' is replaced, but the Mixtures %s still hold the previous one; "
                    "register them again (overwrite=True) to use the new one.", name, stale)


def _register(name: str, kind: str, source: SourceSpec, vocabulary: str | seqio.Vocabulary, *,
              thumbs: bool, adapter: Adapter | None, file_format: str | None,
              max_prompt_length: int, max_response_length: int, too_long: str, on_invalid: str,
              shuffle_buffer_size: int, fields: Mapping[str, str] | None,
              overwrite: bool, require_reward: bool = True) -> seqio.Task:
  if on_invalid not in ON_INVALID:
    raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
  if too_long not in TOO_LONG:
    raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
  if min(max_prompt_length, max_response_length) < 2:
    raise ValueError("max_prompt_length and max_response_length count EOS and must be >= 2, got "
                     f"{max_prompt_length} and {max_response_length}")
  if kind == PAIRWISE:
    canonical = records_lib.PAIRWISE_FIELDS
    make_example = functools.partial(records_lib.pairwise_example, fields=fields)
  else:
    canonical = records_lib.SINGLE_TRAJECTORY_FIELDS
    make_example = functools.partial(records_lib.single_trajectory_example, fields=fields,
                                     thumbs=thumbs, require_reward=require_reward)
  unknown = sorted(set(fields or {}) - set(canonical))
  if unknown:
    raise ValueError(f"fields maps unknown names {unknown}; the {kind} fields are "
                     f"{sorted(canonical)}")
  vocabulary = load_vocabulary(vocabulary)
  files_by_split = _files_by_split(source)
  for patterns in files_by_split.values():
    resolve_files(patterns)  # Fail now, with the path, rather than inside the first training step.
  targets = ("chosen", "rejected") if kind == PAIRWISE else ("targets",)
  max_lengths = {"inputs": max_prompt_length, **{key: max_response_length for key in targets}}
  data_source = FeedbackSource(
      files_by_split, kind=kind, thumbs=thumbs, make_example=make_example, adapter=adapter,
      file_format=file_format, on_invalid=on_invalid, too_long=too_long, max_lengths=max_lengths,
      vocabulary=vocabulary,
      description=(f"{kind} thumbs={thumbs} adapter={_callable_name(adapter)} "
                   f"format={file_format} on_invalid={on_invalid} too_long={too_long} "
                   f"lengths={sorted(max_lengths.items())} fields={sorted((fields or {}).items())} "
                   f"vocabulary={getattr(vocabulary, 'sentencepiece_model_file', vocabulary)}"
                   + ("" if require_reward else " reward optional")),
      task_name=name)
  output_features = {key: seqio.Feature(vocabulary, add_eos=True) for key in max_lengths}
  if kind == SINGLE_TRAJECTORY:
    output_features["reward"] = _scalar_feature(tf.float32)
    if thumbs:
      output_features["label"] = _scalar_feature(tf.int32)
  task = seqio.Task(
      name, source=data_source, output_features=output_features,
      preprocessors=[seqio.preprocessors.tokenize,
                     TruncateAndAppendEos(max_lengths, flag_truncated=True)],
      shuffle_buffer_size=shuffle_buffer_size)
  _add(seqio.TaskRegistry, task, f"{kind} Task", overwrite)
  return task


def _scalar_feature(dtype: tf.dtypes.DType) -> seqio.Feature:
  """A scalar that tokenisation passes through unchanged (seqio wants a vocabulary per feature)."""
  return seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=dtype, rank=0)


def register_single_trajectory_task(
    name: str, source: SourceSpec, vocabulary: str | seqio.Vocabulary, *,
    fields: Mapping[str, str] | None = None, adapter: Adapter | None = None, thumbs: bool = False,
    file_format: str | None = None, max_prompt_length: int = 512, max_response_length: int = 512,
    too_long: str = "truncate", on_invalid: str = "error",
    shuffle_buffer_size: int = 10_000, overwrite: bool = False,
    require_reward: bool = True) -> seqio.Task:
  """Registers a Task of (prompt, response, reward) examples read from files.

  Args:
    name: the seqio Task name.
    source: a path or glob (any tf.io.gfile path), a list of them, or {split: paths}; a bare path
      or list is the "train" split.
    vocabulary: a sentencepiece .model file, a folder holding spiece.model, or a seqio Vocabulary.
    fields: canonical name -> record field, e.g. {"response": "answer", "reward": "score"}
      (dotted names reach into nested objects; with an adapter, the fields of its output);
      defaults: prompt, response (else completion), reward, label. The reward may be absent
      when a thumbs label gives it (1.0 up, 0.0 down).
    adapter: turns each raw record into records with the canonical names (see `adapters`).
    thumbs: the data carries a thumbs label (required per record), kept as the "label" feature.
    file_format: "jsonl", "parquet" or "tfrecord"; by default from each file name.
    max_prompt_length, max_response_length: token limits, EOS included.
    too_long: "truncate" (prompt from the left, response from the right; counted and warned
      about by the pipeline), "skip" or "error" (DataError naming file, line, length and limit).
    on_invalid: "error" (DataError naming file, line, field) or "skip" (counted and logged).
    shuffle_buffer_size: the examples shuffled together when the Task is read shuffled.
    overwrite: replace a Task or Mixture already registered under `name` (else ValueError).
    require_reward: False lets a record have neither reward nor label (its reward is 0.0): data
      for SFT, which reads only the prompt and the response.
  """
  return _register(name, SINGLE_TRAJECTORY, source, vocabulary, thumbs=thumbs, adapter=adapter,
                   file_format=file_format, max_prompt_length=max_prompt_length,
                   max_response_length=max_response_length, too_long=too_long,
                   on_invalid=on_invalid, shuffle_buffer_size=shuffle_buffer_size, fields=fields,
                   overwrite=overwrite, require_reward=require_reward)


def register_pairwise_task(
    name: str, source: SourceSpec, vocabulary: str | seqio.Vocabulary, *,
    fields: Mapping[str, str] | None = None, adapter: Adapter | None = None,
    file_format: str | None = None, max_prompt_length: int = 512, max_response_length: int = 512,
    too_long: str = "truncate", on_invalid: str = "error",
    shuffle_buffer_size: int = 10_000, overwrite: bool = False) -> seqio.Task:
  """Registers a Task of (prompt, chosen, rejected) examples read from files.

  Arguments as `register_single_trajectory_task`; the canonical fields are prompt, chosen and
  rejected, and max_response_length limits each of chosen and rejected.
  """
  return _register(name, PAIRWISE, source, vocabulary, thumbs=False, adapter=adapter,
                   file_format=file_format, max_prompt_length=max_prompt_length,
                   max_response_length=max_response_length, too_long=too_long,
                   on_invalid=on_invalid, shuffle_buffer_size=shuffle_buffer_size, fields=fields,
                   overwrite=overwrite)


def feedback_source(task: seqio.Task | str) -> FeedbackSource:
  """The FeedbackSource of a Task registered here (a clear error for any other Task)."""
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  if not isinstance(task, seqio.Task) or not isinstance(task.source, FeedbackSource):
    raise ValueError(f"'{task.name}' was not registered with register_single_trajectory_task or "
                     "register_pairwise_task; the dro_jax pipeline reads only those Tasks")
  return task.source


def component_tasks(name: str) -> list[tuple[seqio.Task, float]]:
  """[(task, mixing rate)] of a Mixture, or [(task, 1.0)] of a Task."""
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return [(task, float(provider.get_rate(task))) for task in provider.tasks]
  return [(provider, 1.0)]


def check_vocabulary_fits(name: str, model_vocab_size: int, fix: str | None = None) -> None:
  """Refuses a Task (or any Task of a Mixture) whose vocabulary is larger than the model's.

  Ids at or past the model's vocab_size have no embedding row, and no lookup fails on them:
  JAX fills out-of-range gathers with NaN or clamps them. `fix`: what the user should do (by
  default: a model with a larger vocab_size, or a smaller vocabulary).
  """
  from dro_jax import errors
  for task, _ in component_tasks(name):
    vocabulary = feedback_source(task).vocabulary
    if vocabulary.vocab_size > model_vocab_size:
      path = getattr(vocabulary, "sentencepiece_model_file", None)
      size = vocabulary.vocab_size
      rounded = -(-size // 128) * 128  # T5's embeddings are a multiple of 128 rows
      advice = fix or (f"train from scratch with --config.model.vocab_size={rounded} (or any "
                       f"size of at least {size}), or give the data a vocabulary of at most "
                       f"{model_vocab_size} pieces")
      raise errors.UserError(
          f"Task '{task.name}' has a vocabulary of {size} pieces"
          + (f" ({path})" if path else "") + f", more than the model's vocab_size "
          f"{model_vocab_size}: ids from {model_vocab_size} on would have no embedding; fix: "
          f"{advice}")


def register_mixture(name: str, tasks: Sequence[str | tuple[str, float]], *,
                     overwrite: bool = False) -> seqio.Mixture:
  """Registers a seqio Mixture of feedback Tasks; a bare name has rate 1.0.

  seqio refuses Tasks with different features (single-trajectory with pairwise, thumbs with not).
  overwrite: replace a Task or Mixture already registered under `name` (else ValueError).
  """
  tasks_and_rates = [(task, 1.0) if isinstance(task, str) else tuple(task) for task in tasks]
  for task, _ in tasks_and_rates:
    feedback_source(task)  # Only Tasks the pipeline can read.
  mixture = seqio.Mixture(name, tasks_and_rates)
  _add(seqio.MixtureRegistry, mixture, "Mixture", overwrite)
  return mixture

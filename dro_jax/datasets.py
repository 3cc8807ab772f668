"""A run's data, resolved from its config: Tasks, vocabulary, input pipelines, held-out prompts.

Shared by every runner (train, the demo, evaluate, the judges, periodic evaluation, the reference
cache). Heavy imports (seqio, TensorFlow) happen inside the functions, so importing this module
stays cheap.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

Batch = dict[str, Any]

# The demo task each recipe trains on when no data is given.
DEMO_TASK_ROLE = {"sft": "sft", "dro": "feedback", "dro_v": "feedback", "dro_p": "feedback",
                  "kto": "feedback", "dpo": "pairs", "ipo": "pairs", "reward_model": "pairs",
                  "preference_model": "pairs"}
# Tasks over the demo's judged samples (demo.py: its alignment stages train on them).
DEMO_DERIVED_PREFIXES = ("dro_jax_demo_samples_", "dro_jax_demo_pairs_")

# For host-side lookups and counts; the step never sees them. truncated_prompt / _response: 1
# where truncation cut the example (the data iterator counts them: `DataIterator.truncation()`).
HOST_KEYS = ("example_id", "kl_example_id", "truncated_prompt", "truncated_response")


def _synthetic_task_names() -> set[str]:
  from dro_jax.data import synthetic
  names = set(synthetic.TASK_NAMES.values())
  names.update(getattr(synthetic, "INTRANSITIVE_TASK_NAMES", {}).values())
  return names


def _register_synthetic(task: str, cache_dir: str | None) -> None:
  """Registers the embedded Task `task` if it is one (the demo's or the intransitive ones)."""
  from dro_jax.data import synthetic
  if task in getattr(synthetic, "INTRANSITIVE_TASK_NAMES", {}).values():
    synthetic.register_intransitive_tasks(cache_dir)
  elif task in synthetic.TASK_NAMES.values():
    synthetic.register_demo_tasks(cache_dir)


def resolve_data(config: ml_collections.ConfigDict) -> tuple[str, str | None]:
  """(train Task, eval Task): the configured ones, Tasks made from files, or the demo's."""
  data = config.data
  if data.register_module:
    import importlib
    importlib.import_module(data.register_module)
  if data.train_files:
    name = _register_files(config)
    # Held-out files are the Task's eval split: the eval/ metrics and judged evaluation read them.
    return name, data.eval_task or (name if data.get("eval_files") else None)
  if data.task:
    if data.task in _synthetic_task_names():
      _register_synthetic(data.task, data.cache_dir)
    return data.task, data.eval_task or data.task
  from dro_jax.data import synthetic
  names = synthetic.register_demo_tasks(data.cache_dir)
  name = names[DEMO_TASK_ROLE[config.loss]]
  return name, name


def loss_kind(config: ml_collections.ConfigDict) -> str:
  """"pairs" for the pairwise losses, else the single-trajectory role of the demo data."""
  return DEMO_TASK_ROLE[config.loss]


PAIRWISE_RECIPES = ("dpo", "ipo", "reward_model", "preference_model")
SINGLE_RECIPES = ("sft", "dro", "dro_p", "kto")


def check_files(config: ml_collections.ConfigDict) -> None:
  """Refuses, before anything is written, `data.train_files` / `eval_files` that are missing or
  empty, and JSONL rows of the other kind than the loss trains on (pairs for a single-response
  loss, single responses for a pairwise one) when no adapter maps the fields."""
  from dro_jax import errors
  data = config.data
  if not data.get("train_files"):
    return
  if not data.vocabulary:
    raise errors.UserError("config.data.train_files needs config.data.vocabulary (a "
                           "sentencepiece model, e.g. --config.data.vocabulary=spiece.model)")
  from dro_jax.data import tasks
  tasks.load_vocabulary(data.vocabulary)  # Missing, or ids other than T5's: refused here.
  field_names(config)
  from dro_jax.data import adapters
  if data.adapter:
    if not hasattr(adapters, data.adapter):
      names = sorted(name for name in dir(adapters) if not name.startswith("_")
                     and callable(getattr(adapters, name)))
      raise errors.UserError(f"config.data.adapter: no adapter {data.adapter!r} in "
                             f"dro_jax.data.adapters; choose from {names}")
  from dro_jax.data import readers
  for key in ("train_files", "eval_files"):
    if not data.get(key):
      continue
    for path in readers.resolve_files(data[key].split(",")):
      records = readers.read_records(path)
      try:
        first = next(records, None)
      finally:
        records.close()
      if first is None:
        raise errors.UserError(f"config.data.{key}: {path} is empty (no records); give a file "
                               f"with one example per line")
      if not data.adapter and first.fields is not None:
        _check_kind(config, first)
  if (config.loss == "kto" and data.reward_mode == "thumbs"
      and _carries_labels(data.train_files.split(","), None if not data.adapter else
                          getattr(adapters, data.adapter)(), field_names(config))):
    raise errors.UserError(
        "config.data.reward_mode='thumbs' labels responses by their reward, but the records of "
        f"{data.train_files} carry labels, which KTO takes as given; drop "
        "--config.data.reward_mode=thumbs (or --config.data.reward_mode=raw)")


def field_names(config: ml_collections.ConfigDict) -> dict[str, str]:
  """`config.data.fields` ("canonical:field,..."): canonical name -> the records' field name.

  Refuses (UserError) a pair that is not canonical:field, or a canonical name the loss's records
  do not have (single responses: prompt, response, reward, label; pairs: prompt, chosen,
  rejected).
  """
  from dro_jax import errors
  from dro_jax.data import records
  canonical = (records.PAIRWISE_FIELDS if loss_kind(config) == "pairs"
               else records.SINGLE_TRAJECTORY_FIELDS)
  mapping = {}
  for item in (config.data.get("fields") or "").split(","):
    if not item.strip():
      continue
    name, separator, field = (part.strip() for part in item.partition(":"))
    if not separator or not name or not field:
      raise errors.UserError(f"config.data.fields: {item.strip()!r} is not canonical:field; "
                             "e.g. --config.data.fields=label:thumbs,response:answer")
    if name not in canonical:
      raise errors.UserError(f"config.data.fields: {config.loss} records have no field {name!r};"
                             f" name one of {', '.join(canonical)} (canonical:field)")
    mapping[name] = field
  return mapping


def _names(mapping: Mapping[str, str], defaults: Mapping[str, tuple[str, ...]],
           canonical: str) -> tuple[str, ...]:
  return (mapping[canonical],) if canonical in mapping else defaults[canonical]


def _has_field(record: Mapping[str, Any], names: tuple[str, ...]) -> bool:
  from dro_jax.data import records
  try:
    records.lookup(record, names)
  except records.RecordError:
    return False
  return True


def _check_kind(config: ml_collections.ConfigDict, record) -> None:
  from dro_jax import errors
  from dro_jax.data import records
  mapping = field_names(config)
  fields = record.fields
  is_pair = all(_has_field(fields, _names(mapping, records.PAIRWISE_FIELDS, name))
                for name in ("chosen", "rejected"))
  is_single = _has_field(fields, _names(mapping, records.SINGLE_TRAJECTORY_FIELDS, "response"))
  pairwise = loss_kind(config) == "pairs"
  if is_pair and not is_single and not pairwise:
    raise errors.UserError(
        f"{record.location} holds a preference pair (prompt, chosen, rejected), but the "
        f"{config.loss} loss trains on single responses (prompt, response and a reward or "
        f"label); train on pairs with {_recipe('dpo')} or {_recipe('ipo')} (or "
        f"{' / '.join(PAIRWISE_RECIPES[2:])}), or give {config.loss} single-response rows")
  if is_single and not is_pair and pairwise:
    raise errors.UserError(
        f"{record.location} holds a single response (prompt, response), but the {config.loss} "
        f"loss trains on preference pairs (prompt, chosen, rejected); train on single "
        f"responses with {' / '.join(_recipe(name) for name in SINGLE_RECIPES)}, or give "
        f"{config.loss} pairs")


def _recipe(name: str) -> str:
  """configs/NAME.py as a path that exists from the working folder."""
  from dro_jax import configs
  return configs.recipe_path(name)


def _register_files(config: ml_collections.ConfigDict) -> str:
  from dro_jax import errors
  from dro_jax.data import adapters, tasks
  data = config.data
  if not data.vocabulary:
    raise errors.UserError("config.data.train_files needs config.data.vocabulary (a "
                           "sentencepiece model, e.g. --config.data.vocabulary=spiece.model)")
  adapter = None
  if data.adapter:
    if not hasattr(adapters, data.adapter):
      raise errors.UserError(f"config.data.adapter: no adapter {data.adapter!r} in "
                             f"dro_jax.data.adapters")
    adapter = getattr(adapters, data.adapter)()
  source = {"train": data.train_files.split(",")}
  if data.eval_files:
    source[data.eval_split] = data.eval_files.split(",")
  mapping = field_names(config)
  pairwise = loss_kind(config) == "pairs"
  register = tasks.register_pairwise_task if pairwise else tasks.register_single_trajectory_task
  # A stable name (not Python's per-process hash): the data position records it for resume.
  parts = [data.train_files, data.eval_files, data.adapter, loss_kind(config)]
  if mapping:  # Only then, so that the runs of before data.fields keep their Task's name.
    parts.append(sorted(mapping.items()))
  key = json.dumps(parts)
  name = f"dro_jax_files_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
  import seqio
  seqio.TaskRegistry.remove(name)
  options = {}
  if not pairwise:
    # KTO on records with a label: the label is the desirability, as given (the "label" feature;
    # step.KTO compares rewards with the batch mean only without it). SFT needs no reward.
    options = {"thumbs": config.loss == "kto" and _carries_labels(source["train"], adapter,
                                                                    mapping),
               "require_reward": config.loss != "sft"}
  # data.truncate: cut over-long prompts / responses (counted, warned about); False refuses them.
  register(name, source, data.vocabulary, adapter=adapter, fields=mapping or None,
           max_prompt_length=config.max_input_length,
           max_response_length=config.max_target_length,
           too_long="truncate" if data.get("truncate", True) else "error", **options)
  return name


def _carries_labels(patterns: list[str], adapter, mapping: Mapping[str, str]) -> bool:
  """Whether the first record of the files (as the adapter gives it) has a thumbs label: the
  field data.fields names "label", else "label"."""
  from dro_jax.data import readers, records
  names = _names(mapping, records.SINGLE_TRAJECTORY_FIELDS, "label")
  records_read = readers.read_records(readers.resolve_files(patterns)[0])
  try:
    for raw in records_read:
      if raw.fields is None:
        continue
      try:
        outputs = list(adapter(raw.fields)) if adapter else [raw.fields]
      except records.RecordError:
        continue
      for output in outputs:
        if isinstance(output, Mapping):
          return _has_field(output, names)
  finally:
    records_read.close()
  return False


def feature_lengths(config: ml_collections.ConfigDict) -> dict[str, int]:
  return {"inputs": config.max_input_length, "targets": config.max_target_length}


def train_iterator(config, task: str, workdir: str, position: Mapping[str, Any] | None,
                   with_partners: bool = False):
  from dro_jax.data import pipeline
  return pipeline.input_pipeline(
      task, global_batch_size=config.batch_size, seed=config.seed,
      feature_lengths=feature_lengths(config), shuffle=config.data.shuffle,
      reward_mode=config.data.reward_mode, cache_dir=workdir, position=position or None,
      with_partners=with_partners)


def eval_batches(config, task: str | None, workdir: str,
                 with_partners: bool = False) -> list[Batch]:
  """The first `eval_batches` batches of the eval split, kept on the host for every evaluation."""
  if not task or not config.eval_every or not config.eval_batches:
    return []
  from dro_jax.data import pipeline
  try:
    iterator = pipeline.input_pipeline(
        task, split=config.data.eval_split, global_batch_size=config.batch_size,
        seed=config.seed, feature_lengths=feature_lengths(config), shuffle=False, num_epochs=1,
        reward_mode=config.data.reward_mode, cache_dir=workdir, with_partners=with_partners)
  except Exception as error:  # A Task without an eval split trains without evaluation.
    logging.warning("no evaluation: task %s split %s: %s", task, config.data.eval_split, error)
    return []
  batches = []
  for batch in iterator:
    batches.append(batch)
    if len(batches) == config.eval_batches:
      break
  return batches


def vocabulary_of(task: str):
  from dro_jax.data import tasks
  first, _ = tasks.component_tasks(task)[0]
  return tasks.feedback_source(first).vocabulary


def device_batch(batch: Batch, shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
  """This host's rows -> global arrays laid out over the mesh."""
  return {key: jax.make_array_from_process_local_data(shardings[key], np.asarray(batch[key]))
          for key in shardings}


def numeric(batch: Batch) -> Batch:
  return {key: value for key, value in batch.items()
          if isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
          and key not in HOST_KEYS}


# --------------------------------------------------------------- a finished run's task, by config


def _is_demo_task(task: str | None) -> bool:
  """The embedded demo's own Tasks, and those over its judged samples (the demo's stages)."""
  from dro_jax.data import synthetic
  return bool(task) and (task in synthetic.TASK_NAMES.values()
                         or str(task).startswith(DEMO_DERIVED_PREFIXES))


def is_demo(run_config: ml_collections.ConfigDict) -> bool:
  """Whether the run is on the embedded demo task: its config's `data.demo` (set by the demo
  configs, and recorded by `resolve_demo` for a training recipe given no data). A config.json
  written before the key existed: no data given, or one of the demo's Tasks."""
  data = run_config.data
  demo = data.get("demo")
  if demo is not None:
    return bool(demo)
  if data.get("train_files"):
    return False
  return not data.get("task") or _is_demo_task(data.get("task"))


def _user_data(config: ml_collections.ConfigDict) -> list[str]:
  """The keys that give data of the user's own (set, and not the demo's Tasks)."""
  data = config.data
  keys = [f"data.{key}" for key in ("train_files", "eval_files", "vocabulary", "register_module",
                                    "adapter", "fields")
          if data.get(key)]
  keys += [f"data.{key}" for key in ("task", "eval_task")
           if data.get(key) and not _is_demo_task(data.get(key))]
  if "online" in config and config.online.get("prompts_file"):
    keys.append("online.prompts_file")
  if _trained_off_the_demo(config.get("init_checkpoint")):
    keys.append("init_checkpoint")
  return keys


def _trained_off_the_demo(path: str | None) -> bool:
  """Whether `path` is a dro_jax workdir whose run had data of its own (files, a vocabulary, a
  Task other than the demo's)."""
  if not path:
    return False
  import os
  from dro_jax import files
  try:
    if not files.gfile().isdir(os.path.join(path, "checkpoints")):
      return False
    saved = files.read_json(os.path.join(path, "config.json"))
  except (OSError, ValueError):
    return False
  if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict):
    return False
  data = saved["data"]
  return bool(data.get("train_files") or data.get("vocabulary")
              or (data.get("task") and not _is_demo_task(data["task"])))


def resolve_demo(config: ml_collections.ConfigDict) -> None:
  """Whether the run is on the demo task, decided before anything is written.

  `data.demo=True` with data of the user's own is refused (UserError), naming the keys: the demo
  never replaces what the user set. A training recipe given no data at all, or one of the
  demo's Tasks, trains on the demo task: `data.demo` is recorded True (config.json says so).
  """
  from dro_jax import errors
  data = config.data
  if "demo" not in data:  # a config made before the key existed
    return
  own = _user_data(config)
  if data.demo:
    if own:
      keys = ", ".join(f"--config.{key}" + (" (a run on data of your own)"
                                            if key == "init_checkpoint" else "") for key in own)
      raise errors.UserError(
          f"config.data.demo=True runs on the embedded demo task (its data, vocabulary and "
          f"prompts), but {keys} {'is' if len(own) == 1 else 'are'} your own: pass "
          f"--config.data.demo=False to run on yours (configs/online.py: with init=<your SFT> or "
          f"task=...), or leave the demo its own data")
    return
  runner = config.get("runner", "train")
  given = data.get("train_files") or data.get("task")
  if runner == "train" and not given:
    if own:  # a vocabulary (say) with no data: the demo task would replace it
      named = f"config.{own[0]}" + (" (a run on data of your own)"
                                    if own[0] == "init_checkpoint" else "")
      raise errors.UserError(
          f"{named} is set but the run has no data: give --config.data.train_files (your "
          f"files) or --config.data.task (a registered Task); with neither, a run trains on the "
          f"embedded demo task")
    data.demo = True  # the recipe's documented default: the demo task
  elif runner == "train" and not own and _is_demo_task(data.task):
    data.demo = True
  elif runner == "online" and not (given or config.online.get("prompts_file")):
    raise errors.UserError(
        "the online loop on your own task needs its prompts: --config.online.prompts_file=FILE "
        "(JSONL with \"prompt\", or one per line) or --config.data.task / data.train_files; "
        "the demo task is configs/online.py:size=tiny without init (or --config.data.demo=True)")


def run_vocabulary(run_config: ml_collections.ConfigDict) -> str | None:
  """The sentencepiece model of the run's data when a path is known without registering Tasks."""
  from dro_jax.data import synthetic
  if is_demo(run_config) or run_config.data.get("task") in _synthetic_task_names():
    return synthetic.demo_vocabulary(run_config.data.get("cache_dir"))
  return run_config.data.get("vocabulary") or None


def task_vocabulary(run_config: ml_collections.ConfigDict) -> Any:
  """The vocabulary of the run's data: a known sentencepiece path, else its registered Task's."""
  path = run_vocabulary(run_config)
  if path:
    from dro_jax.data import tasks
    return tasks.load_vocabulary(path)
  task, _ = resolve_data(run_config)
  return vocabulary_of(task)


def held_out_prompts(run_config: ml_collections.ConfigDict, count: int,
                     seed: int = 0) -> list[str]:
  """`count` held-out prompts of the run's task: the demo's evaluation prompts, or the distinct
  prompts of the eval split of its eval Task, in file order."""
  from dro_jax.data import synthetic
  if is_demo(run_config):
    return synthetic.eval_prompts(count, seed)
  from dro_jax.data import tasks
  task, eval_task = resolve_data(run_config)
  split = run_config.data.get("eval_split", "validation")
  prompts: dict[str, None] = {}
  for component, _ in tasks.component_tasks(eval_task or task):
    for example in tasks.feedback_source(component).examples(split):
      prompts.setdefault(example["inputs"])
      if len(prompts) == count:
        return list(prompts)
  if not prompts:
    raise ValueError(f"Task {eval_task or task} has no {split} prompts; pass --prompts FILE")
  return list(prompts)


def read_prompts(path: str) -> list[str]:
  """Prompts from a file: JSON lines with a "prompt" field (.jsonl), or one prompt per line."""
  from etils import epath
  text = epath.Path(path).read_text()
  if path.endswith(".jsonl"):
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
          raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" string")
        prompts.append(row["prompt"])
    return prompts
  return [line for line in text.splitlines() if line.strip()]

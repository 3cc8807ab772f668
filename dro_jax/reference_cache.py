"""The frozen reference's log-probs: computed once, stored in the workdir, looked up by example_id.

With a frozen reference (`config.reference.alpha == 0`) the reference log-prob sums of an example
are the same at every step, so one forward pass over the training split (and the evaluation's
held-out examples) computes them with the initial policy, which IS the reference. Training then
looks them up on the host by each row's `example_id` (batch keys `ref_logps`, KTO's
`ref_kl_logps`, DPO/IPO's `ref_chosen_logps` and `ref_rejected_logps`, which the step's
objectives read when present) and the train state holds no reference parameters: no reference
forward pass per step, and no second copy of the weights in memory or in checkpoints.

KTO's mismatched pairs are fixed at the data level (`input_pipeline(with_partners=True)`: the
partner's response as `kl_decoder_*`), so `ref_kl_logps` is a property of the example as well.

Files: `<workdir>/reference_cache/<role>-<kind>-<data>-<init>.npz` (sorted ids and the values),
written atomically by process 0 (every process computes the same pass, sharded over the training
mesh, and keeps the gathered result). The name hashes a data fingerprint (Task, split, feature
lengths, vocabulary, example count, the source's file fingerprint) and the init's (the init
checkpoint's path and its files' sizes and mtimes, or a dro_jax workdir's latest step;
"scratch:<seed>" for a new model; the model config), never the weights, which are tens of GB at
XL/XXL. `run.json` records the files a run started with, so a resumed run keeps them.

`config.reference_cache`: "auto" (default) uses the cache whenever it is valid; "off" scores the
reference in the step; "on" insists, and is refused where the reference moves (a trust region).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dro_jax import datasets, files, initialization, partitioning, reference, scoring
from dro_jax import step as step_lib

PyTree = Any
Batch = dict[str, Any]

MODES = ("auto", "on", "off")
KINDS = {"dro": "single", "dro_v": "single", "dro_p": "single", "kto": "kto", "dpo": "pairs",
         "ipo": "pairs"}
VALUE_KEYS = {"single": ("ref_logps",), "kto": ("ref_logps", "ref_kl_logps"),
              "pairs": ("ref_chosen_logps", "ref_rejected_logps")}
PASS_ROWS = 256  # Rows per call of the pass (in chunks of the step's microbatch): fewer dispatches.
_VERSION = 1  # Of the stored values; bump when how they are computed changes.


def _gfile():
  import tensorflow as tf  # tf.io.gfile: local paths and gs:// alike.
  return tf.io.gfile


# ------------------------------------------------------------------------------------- decisions


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether this run uses the cache; an explicit "on" that cannot be right is refused."""
  mode = config.get("reference_cache", "auto")
  if mode not in MODES:
    raise ValueError(f"config.reference_cache must be one of {MODES}, got {mode!r}")
  if mode == "off":
    return False
  if config.loss not in KINDS:
    if mode == "on":
      raise ValueError(f"reference_cache='on': loss {config.loss!r} uses no reference policy")
    return False
  if not reference.is_frozen(config.reference.alpha):
    if mode == "on":
      raise ValueError(
          f"reference_cache='on' needs a frozen reference, but this run's reference moves "
          f"(trust region: reference.alpha={config.reference.alpha}, sync_every="
          f"{config.reference.sync_every}), so log-probs computed once would go stale; use "
          f"reference_cache='auto' (the step scores the moving reference) or tr=none")
    return False
  return True


def _checkpoint_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  gfile = _gfile()
  if not gfile.isdir(folder):
    return []
  return sorted(int(name.rstrip("/")) for name in gfile.listdir(folder)
                if name.rstrip("/").isdigit())


def _check_state_has_reference(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A run trained with the cache has no `reference` item: resuming it without the cache would
  find no reference to restore (and take every checkpoint for corrupt)."""
  if not step_lib.OBJECTIVES[config.loss].uses_reference:
    return
  steps = _checkpoint_steps(workdir)
  if not steps:
    return
  latest = os.path.join(workdir, "checkpoints", str(steps[-1]))
  gfile = _gfile()
  if gfile.isdir(os.path.join(latest, "policy")) and not gfile.isdir(
      os.path.join(latest, "reference")):
    raise ValueError(
        f"{latest} holds no reference parameters: this run trained with the frozen-reference "
        f"cache (reference_cache='auto'); resume it with reference_cache='auto' and the same "
        f"frozen reference (reference.alpha=0)")


# ------------------------------------------------------------------------------------ the tables


@dataclasses.dataclass(frozen=True)
class Table:
  """Reference log-prob sums by example_id, for one split (ids sorted and unique)."""
  ids: np.ndarray  # int64
  values: Mapping[str, np.ndarray]  # float32, aligned with ids
  partner_ids: np.ndarray | None  # KTO: the kl_example_id each ref_kl_logps was scored with
  path: str

  def lookup(self, batch: Batch) -> Batch:
    """`batch` with the reference keys of its rows (0 for padding rows, whose id is -1)."""
    ids = np.asarray(batch["example_id"], np.int64)
    real = ids >= 0
    position = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
    missing = real & (self.ids[position] != ids)
    if missing.any():
      raise ValueError(f"example_id {int(ids[missing][0])} is not in the reference cache "
                       f"{self.path}: the data changed since it was computed; delete the file "
                       f"to recompute it, or run with reference_cache='off'")
    if self.partner_ids is not None and "kl_example_id" in batch:
      wrong = real & (self.partner_ids[position] != np.asarray(batch["kl_example_id"]))
      if wrong.any():
        raise ValueError(f"example {int(ids[wrong][0])} has another KTO partner than when the "
                         f"reference cache {self.path} was computed; delete it to recompute")
    looked_up = dict(batch)
    for key, values in self.values.items():
      looked_up[key] = np.where(real, values[position], 0.0).astype(np.float32)
    return looked_up

  def to_bytes(self, description: Mapping[str, Any]) -> bytes:
    arrays = {"ids": self.ids, **{f"value:{key}": value for key, value in self.values.items()},
              "description": np.asarray(json.dumps(description, sort_keys=True))}
    if self.partner_ids is not None:
      arrays["partner_ids"] = self.partner_ids
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()

  @classmethod
  def from_bytes(cls, data: bytes, path: str, keys: tuple[str, ...]) -> "Table":
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
      ids = stored["ids"].astype(np.int64)
      values = {key: stored[f"value:{key}"].astype(np.float32) for key in keys}
      partner_ids = stored["partner_ids"].astype(np.int64) if "partner_ids" in stored else None
    if ids.ndim != 1 or np.any(np.diff(ids) <= 0) or any(v.shape != ids.shape
                                                          for v in values.values()):
      raise ValueError(f"{path}: not a reference cache (ids unsorted or sizes differ)")
    return cls(ids, values, partner_ids, path)


def _write_atomically(path: str, data: bytes) -> None:
  gfile = _gfile()
  gfile.makedirs(os.path.dirname(path))
  temporary = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
  with gfile.GFile(temporary, "wb") as f:
    f.write(data)
  gfile.rename(temporary, path, overwrite=True)


def _read(path: str) -> bytes | None:
  gfile = _gfile()
  if not gfile.exists(path):
    return None
  with gfile.GFile(path, "rb") as f:
    return f.read()


@dataclasses.dataclass(frozen=True)
class ReferenceCache:
  """The run's tables: the training split and the evaluation's held-out examples (or None)."""
  kind: str
  train: Table
  eval: Table | None

  @property
  def partners(self) -> bool:
    """Whether batches must carry data-level KTO partners (the cache holds their log-probs)."""
    return self.kind == "kto"


class _Looked:
  """A data iterator whose batches carry the cached reference keys; position() as the data's."""

  def __init__(self, table: Table, iterator):
    self.table, self.iterator = table, iterator

  def __iter__(self) -> "_Looked":
    return self

  def __next__(self) -> Batch:
    return self.table.lookup(next(self.iterator))

  def __getattr__(self, name: str):
    return getattr(self.iterator, name)


def attach(cache: ReferenceCache | None, iterator):
  """The training batches with their reference keys (unchanged when there is no cache)."""
  return iterator if cache is None else _Looked(cache.train, iterator)


def attach_eval(cache: ReferenceCache | None, batches: list[Batch]) -> list[Batch]:
  """The held-out batches with their reference keys (unchanged when there is no cache)."""
  if cache is None or not batches:
    return batches
  if cache.eval is None:
    raise ValueError("the reference cache holds no evaluation examples")
  return [cache.eval.lookup(batch) for batch in batches]


# ---------------------------------------------------------------------------------- fingerprints


def init_fingerprint(config: ml_collections.ConfigDict, model_config) -> dict[str, Any]:
  """What the initial policy (= the frozen reference) is, from metadata only: never the weights."""
  model = json.loads(json.dumps(dataclasses.asdict(model_config), sort_keys=True, default=str))
  path = config.init_checkpoint
  if not path:
    return {"init": f"scratch:{config.seed}", "model": model}
  kind = initialization.init_checkpoint_kind(path)
  gfile = _gfile()
  if kind == "workdir":
    steps = _checkpoint_steps(path)
    marker = os.path.join(path, "checkpoints", str(steps[-1]) if steps else "", "policy")
    files = _file_stats(marker) if steps and gfile.isdir(marker) else []
    return {"init": path, "kind": kind, "step": steps[-1] if steps else None,
            "files": files, "model": model}
  return {"init": path, "kind": kind, "files": _file_stats(path), "model": model}


def _file_stats(folder: str) -> list[str]:
  """name:size:mtime of the files directly in `folder` (folders by name only)."""
  gfile = _gfile()
  stats = []
  for name in sorted(gfile.listdir(folder)):
    full = os.path.join(folder, name.rstrip("/"))
    if gfile.isdir(full):
      stats.append(f"{name.rstrip('/')}/")
    else:
      stat = gfile.stat(full)
      stats.append(f"{name}:{stat.length}:{stat.mtime_nsec}")
  return stats


def data_fingerprint(task: str, split: str, feature_lengths: Mapping[str, int],
                     statistics: Mapping[str, Any], partners: bool,
                     max_examples: int | None = None) -> dict[str, Any]:
  """The data a table covers: Task, split, lengths, and per component Task its vocabulary,
  example count and source fingerprint (files, their sizes and mtimes, how they are read)."""
  from dro_jax.data import tasks
  components = []
  for component, _ in tasks.component_tasks(task):
    source = tasks.feedback_source(component)
    vocabulary = source.vocabulary
    components.append({
        "task": component.name, "fingerprint": statistics[component.name].fingerprint,
        "count": int(statistics[component.name].count),
        "vocabulary": str(getattr(vocabulary, "sentencepiece_model_file", vocabulary)),
        "vocab_size": int(vocabulary.vocab_size)})
  return {"task": task, "split": split,
          "feature_lengths": {key: int(value) for key, value in sorted(feature_lengths.items())},
          "components": components, "partners": bool(partners), "max_examples": max_examples}


def _digest(description: Any) -> str:
  text = json.dumps(description, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_name(role: str, kind: str, data: Mapping[str, Any], init: Mapping[str, Any]) -> str:
  """`<role>-<kind>-<data digest>-<init digest>.npz`: a new name whenever either changes."""
  return f"{role}-{kind}-{_digest([_VERSION, data])}-{_digest([_VERSION, init])}.npz"


# ------------------------------------------------------------------------------------- the pass


@dataclasses.dataclass
class _Split:
  """One table to provide: its component iterators (one pass each, unshuffled) and its name."""
  role: str
  iterators: list[Any]
  max_examples: int | None
  data: dict[str, Any]
  name: str = ""


def _split(config, role: str, task: str, split: str, workdir: str, partners: bool,
           rows: int, max_examples: int | None) -> _Split:
  from dro_jax.data import pipeline, tasks
  lengths = datasets.feature_lengths(config)
  iterators, statistics = [], {}
  for component, _ in tasks.component_tasks(task):
    iterator = pipeline.input_pipeline(
        component.name, split=split, global_batch_size=rows, seed=config.seed,
        feature_lengths=lengths, shuffle=False, num_epochs=1, reward_mode="raw",
        cache_dir=workdir, with_partners=partners)
    iterators.append(iterator)
    statistics.update(iterator.statistics)
  data = data_fingerprint(task, split, lengths, statistics, partners, max_examples)
  return _Split(role, iterators, max_examples, data)


def _model_keys(batch: Batch) -> list[str]:
  return sorted(key for key in batch if key.endswith(("_tokens", "_loss_weights")))


def _score_fn(config, kind: str, mesh, chunks: int):
  """(params, batch) -> {value key: [rows]}: the reference log-prob sums exactly as the step's
  objectives compute them, in `chunks` sequential chunks (the step's microbatch memory)."""
  objective = step_lib.make_objective(config)
  constrain = partitioning.microbatch_constraint(mesh)

  def one(params: PyTree, batch: Batch) -> dict[str, jax.Array]:
    if kind == "pairs":
      scores = scoring.score_pairs(objective.model, params, batch)
      return {"ref_chosen_logps": scores["chosen_logps"],
              "ref_rejected_logps": scores["rejected_logps"]}
    values = {"ref_logps": objective.sequence_scores(params, batch)["logps"]}
    if kind == "kto":
      values["ref_kl_logps"] = objective.sequence_scores(params, batch, prefix="kl_")["logps"]
    return values

  def score(params: PyTree, batch: Batch) -> dict[str, jax.Array]:
    # The step's reference is a float32 copy of the initial policy (reference.init).
    params = jax.tree.map(lambda x: x.astype(jnp.float32)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    if chunks == 1:
      return one(params, batch)
    micro = constrain(step_lib.split_microbatches(batch, chunks))
    return step_lib.merge_microbatches(jax.lax.map(lambda mb: one(params, mb), micro))

  return score


def initial_policy(config, model_config, mesh, rules) -> PyTree:
  """The policy a new run starts from (= the frozen reference), as `initialization.build_state` makes it."""
  abstract, shardings = initialization.state_layout(config, model_config, mesh, rules,
                                           with_reference=False)
  if config.init_checkpoint:
    return initialization.load_init_policy(config, config.init_checkpoint, abstract.policy,
                                  shardings.policy)
  init = initialization.make_init_fn(config, model_config, with_reference=False)
  with partitioning.activate(mesh, rules):  # Only the policy is kept: the rest is compiled away.
    return jax.jit(lambda rng: init(rng, None).policy, out_shardings=shardings.policy)(
        jax.random.PRNGKey(config.seed))


def _ids_on_mesh(ids: np.ndarray, sharding) -> tuple[jax.Array, jax.Array]:
  """int64 ids as two 32-bit global arrays laid out like the batch (JAX runs without x64)."""
  high = (ids >> 32).astype(np.int32)
  low = (ids & 0xFFFFFFFF).astype(np.uint32)
  return (jax.make_array_from_process_local_data(sharding, high),
          jax.make_array_from_process_local_data(sharding, low))


def _ids_from(high: np.ndarray, low: np.ndarray) -> np.ndarray:
  return (high.astype(np.int64) << 32) | low.astype(np.uint32).astype(np.int64)


def scorer(config, kind: str, mesh, rows: int):
  """The jitted pass over `rows` rows, in chunks of the step's microbatch."""
  chunks = rows // (config.batch_size // config.num_microbatches)
  return jax.jit(_score_fn(config, kind, mesh, chunks),
                 out_shardings=partitioning.batch_sharding(mesh, 1))


def compute_table(kind: str, spec: _Split, score, policy: PyTree, mesh, rules,
                  path: str) -> Table:
  """One unshuffled pass over `spec`'s iterators, sharded over `mesh` as training is; every
  process gets the whole table (process_allgather)."""
  from jax.experimental import multihost_utils
  from dro_jax.data import pipeline
  rows = spec.iterators[0].global_batch_size
  row_sharding = partitioning.batch_sharding(mesh, 1)
  pending = []  # device arrays, gathered once at the end (no sync per batch)
  for index, iterator in enumerate(spec.iterators):
    seen = 0
    for batch in iterator:
      ids = pipeline.task_ids(batch["example_id"], index)
      model_batch = {key: batch[key] for key in _model_keys(batch)}
      layout = partitioning.batch_shardings(
          {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in model_batch.items()}, mesh)
      with partitioning.activate(mesh, rules):
        values = score(policy, datasets.device_batch(model_batch, layout))
      entry = {"values": values, "ids": _ids_on_mesh(ids, row_sharding)}
      if kind == "kto":
        entry["partners"] = _ids_on_mesh(pipeline.task_ids(batch["kl_example_id"], index),
                                         row_sharding)
      pending.append(entry)
      seen += rows
      if spec.max_examples is not None and seen >= spec.max_examples:
        break
    iterator.close()
  gathered = multihost_utils.process_allgather(pending, tiled=True)
  ids = np.concatenate([_ids_from(*entry["ids"]) for entry in gathered])
  real = ids >= 0
  order = np.argsort(ids[real], kind="stable")
  ids = ids[real][order]
  if np.any(np.diff(ids) == 0):
    raise ValueError(f"duplicate example ids in {spec.data['task']}:{spec.data['split']}")
  values = {key: np.concatenate([np.asarray(entry["values"][key], np.float32)
                                 for entry in gathered])[real][order]
            for key in VALUE_KEYS[kind]}
  partner_ids = None
  if kind == "kto":
    partner_ids = np.concatenate([_ids_from(*entry["partners"]) for entry in gathered])
    partner_ids = partner_ids[real][order]
  return Table(ids, values, partner_ids, path)


# --------------------------------------------------------------------------------------- prepare


def _agree(flag: bool) -> bool:
  """Process 0's answer on every process (the pass is collective: all must decide alike)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def _load(path: str, kind: str) -> Table | None:
  """The stored table, or None when absent or unreadable (then it is computed again)."""
  ok = False
  table = None
  if jax.process_index() == 0:
    try:
      data = _read(path)
      table = None if data is None else Table.from_bytes(data, path, VALUE_KEYS[kind])
      ok = table is not None
    except Exception as error:  # A torn or foreign file: recompute rather than fail.
      logging.warning("reference cache %s is unreadable (%s); computing it again", path, error)
  if not _agree(ok):
    return None
  if table is None:
    table = Table.from_bytes(_read(path), path, VALUE_KEYS[kind])
  return table


def prepare(config: ml_collections.ConfigDict, task: str, eval_task: str | None, workdir: str,
            model_config, mesh, rules) -> ReferenceCache | None:
  """The run's reference cache, computed now where missing; None when the step must score the
  reference (`enabled` is False)."""
  if not enabled(config):
    _check_state_has_reference(config, workdir)
    return None
  kind = KINDS[config.loss]
  partners = kind == "kto"
  rows = config.batch_size * max(1, -(-PASS_ROWS // config.batch_size))
  folder = os.path.join(workdir, "reference_cache")
  init = init_fingerprint(config, model_config)

  specs = [_split(config, "train", task, "train", workdir, partners, rows, None)]
  if eval_task and config.eval_every and config.eval_batches:
    # The held-out batches are the first eval_batches of the unshuffled split: of a Task, its
    # first eval_batches * batch_size examples; a Mixture samples them, so all of it.
    import seqio
    is_task = isinstance(seqio.get_mixture_or_task(eval_task), seqio.Task)
    limit = config.eval_batches * config.batch_size if is_task else None
    try:
      specs.append(_split(config, "eval", eval_task, config.data.eval_split, workdir, partners,
                          rows, limit))
    except Exception as error:  # As datasets.eval_batches: no eval split, no evaluation.
      logging.warning("reference cache: no evaluation examples (%s:%s: %s)", eval_task,
                      config.data.eval_split, error)
  recorded = {}
  if _checkpoint_steps(workdir):  # A resumed run keeps the tables it started with.
    recorded = json.loads(files.read_text(os.path.join(folder, "run.json")) or "{}")
  for spec in specs:
    spec.name = cache_name(spec.role, kind, spec.data, init)
    kept = recorded.get(spec.role, "")
    if kept != spec.name and kept.rsplit("-", 1)[0] == spec.name.rsplit("-", 1)[0]:
      logging.warning("reference cache: the init checkpoint's metadata changed since this run "
                      "started; keeping the reference it started with (%s)", kept)
      spec.name = kept

  tables: dict[str, Table] = {}
  missing = []
  for spec in specs:
    path = os.path.join(folder, spec.name)
    table = _load(path, kind)
    if table is None:
      missing.append((spec, path))
    else:
      tables[spec.role] = table
      logging.info("reference cache: %d examples from %s", len(table.ids), path)
  if missing:
    start = time.perf_counter()
    policy = initial_policy(config, model_config, mesh, rules)
    score = scorer(config, kind, mesh, rows)
    for spec, path in missing:
      table = compute_table(kind, spec, score, policy, mesh, rules, path)
      if jax.process_index() == 0:
        _write_atomically(path, table.to_bytes({"data": spec.data, "init": init}))
      tables[spec.role] = table
      print(f"reference cache: {spec.role} {len(table.ids)} examples scored in "
            f"{time.perf_counter() - start:.1f} s -> {path}", flush=True)
    jax.tree.map(lambda leaf: leaf.delete(), policy)  # before the train state is built
  for spec in specs:
    for iterator in spec.iterators:
      iterator.close()
  if jax.process_index() == 0:
    files.write_text(os.path.join(folder, "run.json"),
                     json.dumps({spec.role: spec.name for spec in specs}, indent=2))
  return ReferenceCache(kind, tables["train"], tables.get("eval"))

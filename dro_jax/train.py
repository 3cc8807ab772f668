"""The `train` runner: the project's one training loop, read top to bottom.

config -> data -> mesh -> state (restored, or initialised from `init_checkpoint`, straight into
its shards) -> steps, with metrics read one step late, periodic evaluation, and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dro_jax import checkpoint_manager, partitioning, reference, reference_cache
from dro_jax import step as step_lib
from dro_jax.models import scan as scan_lib
from dro_jax.models import t5 as t5_lib
from dro_jax.models import value as value_lib
from dro_jax.state import TrainState

PyTree = Any
Batch = dict[str, Any]

DEMO_TASK_ROLE = {"sft": "sft", "dro": "feedback", "dro_v": "feedback", "dro_p": "feedback",
                  "kto": "feedback", "dpo": "pairs", "ipo": "pairs", "reward_model": "pairs",
                  "preference_model": "pairs"}


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or gradient (the message names the step and metric)."""


class Preempted(Exception):
  """SIGTERM (or the pod's preemption notice): the state was saved at `step`; exit 143."""

  def __init__(self, step: int):
    super().__init__(f"preempted: saved a checkpoint at step {step}")
    self.step = step


class Preemption:
  """Whether the run was asked to stop, agreed by every host at the same step.

  With several processes, `jax.distributed` installs the preemption notifier and
  `multihost_utils.reached_preemption_sync_point` tells every host the same step; a single
  process installs its own SIGTERM handler (never replacing JAX's).
  """

  def __init__(self):
    import signal
    self.requested = False
    self.distributed = jax.process_count() > 1
    self._previous = None
    if not self.distributed:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._request)
      except ValueError:  # not the main thread (a notebook's worker thread): no handler
        logging.warning("SIGTERM is not handled: train.run is not on the main thread")

  def _request(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self.distributed:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption sync manager (e.g. a local multi-process run)
        return False
    return self.requested

  def close(self) -> None:
    import signal
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class FiniteMonitor:
  """`on_nonfinite`: "stop" raises on the first non-finite step; "skip" counts the skipped
  steps (the step left the state unchanged) and stops after `max_consecutive_skips` in a row."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.mode, self.limit = config.on_nonfinite, config.max_consecutive_skips
    self.skipped, self.consecutive = 0, 0

  def check(self, step: int, metrics: Mapping[str, float]) -> None:
    if metrics.get("finite", 1.0):
      self.consecutive = 0
      return
    if self.mode == "skip":
      self.skipped += 1
      self.consecutive += 1
      print(f"step {step}: non-finite {_nonfinite_metric(metrics)}; step skipped "
            f"({self.skipped} in all)", flush=True)
      if self.consecutive <= self.limit:
        return
    raise NonFiniteError(
        f"step {step}: {_nonfinite_metric(metrics)} is {metrics.get(_nonfinite_metric(metrics))} "
        f"(non-finite)" + (f", {self.consecutive} steps in a row" if self.mode == "skip" else "")
        + "; the last checkpoint is intact")


# ------------------------------------------------------------------------------------------ files


def _gfile():
  import tensorflow as tf  # tf.io.gfile: local paths and gs:// alike.
  return tf.io.gfile


def write_text(path: str, text: str) -> None:
  gfile = _gfile()
  gfile.makedirs(os.path.dirname(path) or ".")
  with gfile.GFile(path + ".tmp", "w") as f:
    f.write(text)
  gfile.rename(path + ".tmp", path, overwrite=True)


def read_text(path: str) -> str | None:
  gfile = _gfile()
  if not gfile.exists(path):
    return None
  with gfile.GFile(path) as f:
    return f.read()


class MetricsLog:
  """Metrics as JSONL (`<workdir>/metrics.jsonl`) and TensorBoard events; process 0 writes."""

  def __init__(self, workdir: str, resumed_step: int | None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    from clu import metric_writers
    # TensorBoard events only: the JSONL and the progress bar already show every value.
    self.writer = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
    existing = read_text(self.path) or ""
    rows = [line for line in existing.splitlines() if line.strip()]
    if resumed_step is not None:  # Rows past the checkpoint are replayed by this run.
      rows = [line for line in rows if json.loads(line).get("step", 0) <= resumed_step]
    elif rows:
      rows = []
    write_text(self.path, "".join(line + "\n" for line in rows))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{key: float(value) for key, value in metrics.items()}}
    with _gfile().GFile(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    self.writer.write_scalars(int(step), {key: float(v) for key, v in metrics.items()})

  def close(self) -> None:
    if self.active:
      self.writer.flush()
      self.writer.close()


# ------------------------------------------------------------------------------------------- data


def resolve_data(config: ml_collections.ConfigDict) -> tuple[str, str | None]:
  """(train Task, eval Task): the configured ones, Tasks made from files, or the demo's."""
  data = config.data
  if data.register_module:
    import importlib
    importlib.import_module(data.register_module)
  if data.train_files:
    return _register_files(config), (data.eval_task or None)
  if data.task:
    return data.task, data.eval_task or data.task
  from dro_jax.data import synthetic
  names = synthetic.register_demo_tasks(data.cache_dir)
  name = names[DEMO_TASK_ROLE[config.loss]]
  return name, name


def loss_kind(config: ml_collections.ConfigDict) -> str:
  """"pairs" for the pairwise losses, else the single-trajectory role of the demo data."""
  return DEMO_TASK_ROLE[config.loss]


def _register_files(config: ml_collections.ConfigDict) -> str:
  from dro_jax.data import adapters, tasks
  data = config.data
  if not data.vocabulary:
    raise ValueError("config.data.train_files needs config.data.vocabulary (a sentencepiece model)")
  adapter = None
  if data.adapter:
    if not hasattr(adapters, data.adapter):
      raise ValueError(f"config.data.adapter: no adapter {data.adapter!r} in dro_jax.data.adapters")
    adapter = getattr(adapters, data.adapter)()
  source = {"train": data.train_files.split(",")}
  if data.eval_files:
    source[data.eval_split] = data.eval_files.split(",")
  pairwise = loss_kind(config) == "pairs"
  register = tasks.register_pairwise_task if pairwise else tasks.register_single_trajectory_task
  # A stable name (not Python's per-process hash): the data position records it for resume.
  key = json.dumps([data.train_files, data.eval_files, data.adapter, loss_kind(config)])
  name = f"dro_jax_files_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
  import seqio
  seqio.TaskRegistry.remove(name)
  register(name, source, data.vocabulary, adapter=adapter,
           max_prompt_length=config.max_input_length,
           max_response_length=config.max_target_length)
  return name


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


HOST_KEYS = ("example_id", "kl_example_id")  # for host-side lookups; the step never sees them


def numeric(batch: Batch) -> Batch:
  return {key: value for key, value in batch.items()
          if isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
          and key not in HOST_KEYS}


# ------------------------------------------------------------------------------------------ state


def abstract_policy(config: ml_collections.ConfigDict, model_config: t5_lib.T5Config) -> PyTree:
  """Boxed abstract parameters of the trained network (a reward model's is an encoder + head)."""
  if config.loss == "reward_model":
    return value_lib.DoubleNetMultipleValues(model_config).abstract_params()
  return t5_lib.abstract_params(model_config)


def _unboxed_shapes(tree: PyTree) -> PyTree:
  import flax.linen as nn
  return nn.unbox(tree)


def state_layout(config, model_config, mesh, rules,
                 with_reference: bool = True) -> tuple[TrainState, TrainState]:
  """(abstract state, its shardings): nothing is allocated. `with_reference=False`: no reference
  parameters even for a loss that uses one (its log-probs come with the batch)."""
  value_fn = step_lib.make_value_function(config)
  optimizers = step_lib.make_optimizers(config)
  boxed_policy = abstract_policy(config, model_config)
  policy_shardings = partitioning.params_shardings(boxed_policy, mesh, rules)
  policy = _unboxed_shapes(boxed_policy)
  value = value_shardings = None
  if value_fn is not None:
    boxed_value = value_fn.abstract_params()
    value_shardings = partitioning.params_shardings(boxed_value, mesh, rules)
    value = _unboxed_shapes(boxed_value)
  uses_reference = with_reference and step_lib.OBJECTIVES[config.loss].uses_reference
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
      policy=policy, policy_opt=jax.eval_shape(optimizers["policy"].init, policy),
      value=value,
      value_opt=None if value is None else jax.eval_shape(optimizers["value"].init, value),
      reference=reference.abstract(policy, reference.dtype_from_config(config))
      if uses_reference else None)
  replicated = partitioning.replicated(mesh)
  shardings = TrainState(
      step=replicated, rng=replicated, policy=policy_shardings,
      policy_opt=partitioning.optimizer_state_shardings(abstract.policy_opt, policy,
                                                        policy_shardings, mesh),
      value=value_shardings,
      value_opt=None if value is None else partitioning.optimizer_state_shardings(
          abstract.value_opt, value, value_shardings, mesh),
      reference=policy_shardings if uses_reference else None)
  return abstract, shardings


def make_init_fn(config, model_config, with_reference: bool = True):
  """init(rng, policy or None) -> TrainState; jitted with the state's out_shardings."""
  value_fn = step_lib.make_value_function(config)
  optimizers = step_lib.make_optimizers(config)
  uses_reference = with_reference and step_lib.OBJECTIVES[config.loss].uses_reference

  def init(rng: jax.Array, policy: PyTree | None) -> TrainState:
    policy_rng, value_rng, state_rng = jax.random.split(rng, 3)
    if policy is None:
      policy = init_policy(config, model_config, policy_rng)
    elif config.loss == "reward_model" and "decoder" in policy:
      policy = value_lib.DoubleNetMultipleValues(model_config).init(policy, policy_rng)
    value = None if value_fn is None else value_fn.init(policy, value_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32), rng=state_rng, policy=policy,
        policy_opt=optimizers["policy"].init(policy), value=value,
        value_opt=None if value is None else optimizers["value"].init(value),
        reference=reference.init(policy, reference.dtype_from_config(config))
        if uses_reference else None)

  return init


def init_policy(config, model_config: t5_lib.T5Config, rng: jax.Array) -> PyTree:
  import flax.linen as nn
  if config.loss == "reward_model":
    network = value_lib.EncoderValueNetwork(model_config)
    return nn.unbox(network.init(rng, jnp.ones((1, 2), jnp.int32))["params"])
  model = t5_lib.T5(model_config)
  return nn.unbox(model.init(rng, jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))["params"])


def init_checkpoint_kind(path: str) -> str:
  """"workdir", "hf" or "t5x", or a ValueError saying what was expected."""
  gfile = _gfile()
  if gfile.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if gfile.exists(os.path.join(path, "config.json")) and gfile.glob(
      os.path.join(path, "*.safetensors*")):
    return "hf"
  if gfile.exists(os.path.join(path, "checkpoint")):
    return "t5x"
  raise ValueError(f"init_checkpoint {path}: not a dro_jax workdir (no checkpoints/), an HF "
                   f"folder (config.json + *.safetensors) or a T5X checkpoint_N folder "
                   f"(no 'checkpoint' file)")


def load_init_policy(config, path: str, like: PyTree, shardings: PyTree) -> PyTree:
  """The initial policy parameters from `path`, read straight into their shards, in the layer
  layout this run uses (`model.scan_layers`) whatever the layout they were saved in."""
  kind = init_checkpoint_kind(path)
  model_config = step_lib.t5_config(config)
  if kind == "workdir":
    other = checkpoint_manager.Checkpointer(path)
    step = other.latest_step()
    if step is None:
      raise ValueError(f"init_checkpoint {path}: the workdir has no complete checkpoint")
    # The other run may keep its layers in the other layout (model.scan_layers).
    source = json.loads(read_text(os.path.join(path, "config.json")) or "{}")
    source_scanned = bool(source.get("model", {}).get("scan_layers", False))
    source_config = model_config.replace(scan_layers=source_scanned)
    source_like = scan_lib.to_config_layout(like, source_config)

    def read(source_shardings):
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              source_like, source_shardings)
      return other.restore_item(step, "policy", abstract)

    try:
      policy = scan_lib.read_in_layout(read, shardings, model_config,
                                       source_scanned=source_scanned)
    finally:
      other.close()
    logging.info("policy initialised from %s step %d", path, step)
    return policy
  from dro_jax import checkpoints
  loader = checkpoints.load_hf_t5 if kind == "hf" else checkpoints.load_t5x
  # Published checkpoints are unrolled; a scanned run stacks them into its own shards.
  params = scan_lib.read_in_layout(lambda s: loader(path, s)[1], shardings, model_config)
  logging.info("policy initialised from the %s checkpoint %s", kind, path)
  return params


def build_state(config, model_config, mesh, rules, abstract, shardings) -> TrainState:
  """A new state straight into its shards (the policy from `init_checkpoint` or from scratch)."""
  init = make_init_fn(config, model_config, with_reference=shardings.reference is not None)
  rng = jax.random.PRNGKey(config.seed)
  policy = None
  if config.init_checkpoint:
    # A reward model starts from a T5's encoder: read the T5, then build its own tree.
    if config.loss == "reward_model":
      boxed = t5_lib.abstract_params(model_config)
      like, policy_shardings = _unboxed_shapes(boxed), partitioning.params_shardings(
          boxed, mesh, rules)
    else:
      like, policy_shardings = abstract.policy, shardings.policy
    policy = load_init_policy(config, config.init_checkpoint, like, policy_shardings)
  with partitioning.activate(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng, policy)


def compile_step(config, mesh, rules, shardings: TrainState, example_batch: Batch):
  """(the jitted train step, the batch's shardings) for batches shaped like `example_batch`."""
  batch_layout = partitioning.batch_shardings(
      {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
       for k, v in example_batch.items()}, mesh)
  train_step = partitioning.jit_step(
      step_lib.make_train_step(config, partitioning.microbatch_constraint(mesh)), mesh,
      shardings, batch_layout, rules)
  return train_step, batch_layout


def resolve_model_config(config: ml_collections.ConfigDict, task: str) -> t5_lib.T5Config:
  """The policy's T5Config; refuses a vocabulary larger than the model's embedding."""
  from dro_jax.data import tasks
  model_config = step_lib.t5_config(config)
  tasks.check_vocabulary_fits(task, model_config.vocab_size)
  return model_config


def resolve_preference_tokens(config: ml_collections.ConfigDict, task: str) -> None:
  if config.loss != "preference_model":
    return
  vocabulary = vocabulary_of(task)
  if config.preference.a_token is None:
    config.preference.a_token = int(vocabulary.encode("A")[-1])
  if config.preference.b_token is None:
    config.preference.b_token = int(vocabulary.encode("B")[-1])


# ------------------------------------------------------------------------------------------- loop


def _host(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  return {key: float(value) for key, value in jax.device_get(dict(metrics)).items()}


def _nonfinite_metric(metrics: Mapping[str, float]) -> str:
  bad = [key for key, value in metrics.items() if not np.isfinite(value)]
  return "loss" if "loss" in bad else (bad[0] if bad else "grad_norm")


def evaluate(eval_step, state, batches, shardings) -> dict[str, float]:
  totals: dict[str, float] = {}
  for batch in batches:
    metrics = _host(eval_step(state, device_batch(numeric(batch), shardings)))
    for key, value in metrics.items():
      totals[key] = totals.get(key, 0.0) + value / len(batches)
  return {f"eval/{key}": value for key, value in totals.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state."""
  # 1. Data and model.
  task, eval_task = resolve_data(config)
  model_config = resolve_model_config(config, task)
  resolve_preference_tokens(config, task)
  if jax.process_index() == 0:
    write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  # 2. Mesh, shardings, and the checks that need numbers.
  mesh = partitioning.mesh_from_config(config)
  rules = partitioning.rules_from_config(config)
  partitioning.validate(mesh, batch_size=config.batch_size,
                        num_microbatches=config.num_microbatches,
                        num_heads=model_config.num_heads, process_count=jax.process_count())
  # A frozen reference's log-probs, computed once (reference_cache.py): the state then holds no
  # reference parameters. None: the step scores the reference.
  cache = reference_cache.prepare(config, task, eval_task, workdir, model_config, mesh, rules)
  partners = cache is not None and cache.partners
  abstract, shardings = state_layout(config, model_config, mesh, rules,
                                     with_reference=cache is None)

  # 3. State: the latest checkpoint, or a new one.
  checkpointer = checkpoint_manager.Checkpointer(
      workdir, keep_last=config.keep_last, keep_best=config.keep_best,
      best_metric=config.best_metric, best_mode=config.best_mode)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
  restored = checkpointer.restore_latest_valid(like)
  latest, position = None, None
  if restored is not None:
    state, position, latest = restored
    logging.info("resumed from step %d", latest)
    print(f"resumed from step {latest}", flush=True)
  else:
    state = build_state(config, model_config, mesh, rules, abstract, shardings)
  start = int(jax.device_get(state.step))

  # 4. Steps.
  batches = reference_cache.attach(cache, train_iterator(config, task, workdir, position,
                                                         with_partners=partners))
  first = numeric(next(batches))
  train_step, batch_layout = compile_step(config, mesh, rules, shardings, first)
  eval_step = jax.jit(step_lib.make_eval_step(config))
  held_out = reference_cache.attach_eval(
      cache, eval_batches(config, eval_task, workdir, with_partners=partners))
  judged = None
  if config.evaluation.judge and config.eval_every:  # win rate against a baseline, judged
    from dro_jax import periodic_evaluation
    judged = periodic_evaluation.JudgedEvaluation(config, model_config, mesh)
  log = MetricsLog(workdir, latest)
  progress = _progress(config.total_steps, start)
  monitor, preemption = FiniteMonitor(config), Preemption()
  report = lambda pending: _report(pending, log, progress, config, monitor)
  pending: tuple[int, Any] | None = None
  batch = first
  try:
    for step in range(start + 1, config.total_steps + 1):
      if batch is None:
        batch = numeric(next(batches))
      state, metrics = train_step(state, device_batch(batch, batch_layout))
      batch = None
      if pending is not None:  # The previous step's metrics, read while this one runs.
        report(pending)
      pending = (step, metrics)
      evaluate_now = bool(held_out or judged) and config.eval_every and (
          step % config.eval_every == 0 or step == config.total_steps)
      save_now = step % config.checkpoint_every == 0 or step == config.total_steps
      preempted = preemption.reached(step)
      if not (evaluate_now or save_now or preempted):
        continue
      report(pending)  # `finite` is known before any save: the last checkpoint is good.
      pending = None
      eval_metrics = {}
      if evaluate_now:
        if held_out:
          with partitioning.activate(mesh, rules):
            eval_metrics = evaluate(eval_step, state, held_out, batch_layout)
        if judged:  # It places its own arrays on the mesh.
          eval_metrics.update(judged(state.policy))
        log.write(step, eval_metrics)
      if save_now or preempted:
        checkpointer.save(state, batches.position(), eval_metrics)
      if preempted:
        raise Preempted(step)
    if pending is not None:
      report(pending)
  finally:
    preemption.close()
    progress.close()
    checkpointer.close()
    log.close()
  return state


def _report(pending, log: MetricsLog, progress, config, monitor: FiniteMonitor) -> None:
  step, metrics = pending
  values = _host(metrics)
  monitor.check(step, values)
  progress.update(step, values["loss"])
  if step % config.log_every == 0 or step == config.total_steps or not values["finite"]:
    values = {**values, "steps_per_second": progress.rate(), "skipped_steps": monitor.skipped}
    log.write(step, values)
    logging.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))


class _progress:
  """A one-line progress bar with the live loss and steps/s (process 0 only)."""

  def __init__(self, total: int, start: int):
    self.total, self.start, self.begin = total, start, time.perf_counter()
    self.enabled = jax.process_index() == 0
    self.bar = None
    if self.enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                      mininterval=1.0)
    self.last = start

  def rate(self) -> float:
    elapsed = time.perf_counter() - self.begin
    return (self.last - self.start) / elapsed if elapsed > 0 else 0.0

  def update(self, step: int, loss: float) -> None:
    if self.bar is not None:
      self.bar.update(step - self.last)
      self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    self.last = step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

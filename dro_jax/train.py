"""The `train` runner: the project's one training loop, read top to bottom.

config -> data -> mesh -> state (restored, or initialised from `init_checkpoint`, straight into
its shards) -> steps, with metrics read one step late, periodic evaluation, and checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from dro_jax import checkpoint_manager, files, partitioning, reference_cache, resume, stops
from dro_jax import step as step_lib
# The shared setup (data, state, the init checkpoint) lives below every runner; these names are
# this loop's vocabulary and stay reachable as train.<name>.
from dro_jax.datasets import (DEMO_TASK_ROLE, HOST_KEYS, device_batch, eval_batches,  # noqa: F401
                              feature_lengths, loss_kind, numeric, resolve_data, train_iterator,
                              vocabulary_of)
from dro_jax.files import read_text, write_text  # noqa: F401
from dro_jax.initialization import (abstract_policy, build_state, compile_step,  # noqa: F401
                                    init_checkpoint_kind, init_policy, load_init_policy,
                                    make_init_fn, resolve_model_config,
                                    resolve_preference_tokens, state_layout)
from dro_jax.state import TrainState

PyTree = Any
Batch = dict[str, Any]


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or gradient (the message names the step and metric)."""


Preempted = stops.Preempted  # train.Preempted, as before


class Preemption:
  """Whether the run was asked to stop, agreed by every host at the same step.

  With several processes, `jax.distributed` installs the preemption notifier and
  `multihost_utils.reached_preemption_sync_point` tells every host the same step; a single
  process installs its own SIGTERM and SIGINT handlers (never replacing JAX's): Ctrl-C saves at
  the current step and stops like a preemption, with no traceback.
  """

  SIGNALS = ("SIGTERM", "SIGINT")

  def __init__(self):
    import signal
    self.requested = False
    self.signal_name = "SIGTERM"
    self.distributed = jax.process_count() > 1
    self._previous: dict[int, Any] = {}
    # On pods JAX's notifier owns SIGTERM and every host must stop at the same step, so the
    # handlers are a single process's (a multi-process Ctrl-C keeps Python's default).
    names = () if self.distributed else self.SIGNALS
    for name in names:
      number = getattr(signal, name)
      try:
        self._previous[number] = signal.signal(number, self._request)
      except ValueError:  # not the main thread (a notebook's worker thread): no handler
        logging.warning("%s is not handled: train.run is not on the main thread", name)
    stops.register(self)

  def _request(self, signum, frame) -> None:
    del frame
    import signal
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def reached(self, step: int | None = None) -> bool:
    """Whether to stop now: every process gets the same answer at the same check (a training
    step, or a check between a phase's batches: `stops.check`)."""
    del step  # the checks are numbered by one counter, the same sequence on every process
    if self.distributed:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(stops.next_check())
      except RuntimeError:  # no preemption sync manager (the preemption service is off)
        return False
    return self.requested

  def close(self) -> None:
    import signal
    stops.unregister(self)
    for number, previous in self._previous.items():
      if previous is not None:
        signal.signal(number, previous)


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


class MetricsLog:
  """Metrics as JSONL (`<workdir>/metrics.jsonl`) and TensorBoard events; process 0 writes.

  The JSONL is only ever appended to: a resumed run replays the steps after its checkpoint and
  appends their rows again, which supersede the first ones (`files.metrics_rows` merges the rows
  of a step, later values winning). TensorBoard gets a SessionLog START at the resumed step,
  which makes it drop the first run's events past that step the same way.
  """

  def __init__(self, workdir: str, resumed_step: int | None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if self.active:
      # The first step this segment writes: TensorBoard drops earlier events from it on.
      first = 0 if resumed_step is None else resumed_step + 1
      self.events = TensorBoardEvents(os.path.join(workdir, "tensorboard"), first)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{key: float(value) for key, value in metrics.items()}}
    with files.gfile().GFile(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    self.events.write(int(step), row)

  def close(self) -> None:
    if self.active:
      self.events.close()


class TensorBoardEvents:
  """Scalars as TensorBoard event files, one file per run segment (a start or a resume), each
  opening with a SessionLog START at its first step: TensorBoard then drops the events an
  earlier segment wrote past that step, as the JSONL's readers do. TensorBoard reads a folder's
  files in name order, so each segment's name carries a time stamp later than every earlier
  file's."""

  def __init__(self, logdir: str, start_step: int):
    import re
    from tensorboard.compat.proto import event_pb2
    from dro_jax.data._tensorflow import tf
    gfile = files.gfile()
    gfile.makedirs(logdir)
    stamps = [int(match.group(1)) for path in gfile.glob(os.path.join(logdir, "*tfevents*"))
              if (match := re.search(r"tfevents\.(\d+)", os.path.basename(path)))]
    stamp = max([int(time.time())] + [value + 1 for value in stamps])
    self._event_pb2 = event_pb2
    self.writer = tf.io.TFRecordWriter(
        os.path.join(logdir, f"events.out.tfevents.{stamp:010d}.dro_jax"))
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self._add(event_pb2.Event(step=int(start_step), wall_time=time.time(), session_log=(
        event_pb2.SessionLog(status=event_pb2.SessionLog.START))))

  def _add(self, event) -> None:
    self.writer.write(event.SerializeToString())
    self.writer.flush()

  def write(self, step: int, values: Mapping[str, float]) -> None:
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, types_pb2
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=key, metadata=metadata, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, float_val=[float(value)]))
        for key, value in values.items() if key != "step"])
    self._add(self._event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary))

  def close(self) -> None:
    self.writer.close()


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


def claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The workdir's run, or refused before anything is written (resume.py); then config.json."""
  accepted = resume.check(config, workdir)
  if jax.process_index() == 0:
    if accepted:
      kept = resume.keep_previous(workdir)
      print(f"config change accepted ({', '.join(key for key, _, _ in accepted)}); the previous "
            f"config is kept as {kept}", flush=True)
    write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state."""
  # 1. Data and model.
  task, eval_task = resolve_data(config)
  model_config = resolve_model_config(config, task)
  resolve_preference_tokens(config, task)
  claim_workdir(config, workdir)

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
  try:
    return loop(config, state, batches, train_step=train_step, batch_layout=batch_layout,
                checkpointer=checkpointer, log=log, mesh=mesh, rules=rules, first=first,
                eval_step=eval_step, held_out=held_out, judged=judged)
  finally:
    checkpointer.close()
    log.close()


def loop(config: ml_collections.ConfigDict, state: TrainState, batches: Iterator[Batch], *,
         train_step, batch_layout, checkpointer: checkpoint_manager.Checkpointer,
         log: "MetricsLog", mesh, rules, end_step: int | None = None, first: Batch | None = None,
         eval_step=None, held_out: list[Batch] | None = None, judged=None,
         extra_items: Callable[[int, bool], Mapping[str, Any]] | None = None,
         preemption: "Preemption | None" = None) -> TrainState:
  """The steps from `state.step` + 1 to `end_step` (default `config.total_steps`): the training
  loop as a function, for every runner that trains (train.run, the online loop).

  Each step's metrics are read one step late; every `eval_every` steps the held-out batches
  and the judged evaluation run; every `checkpoint_every` steps and at `end_step` the state is
  saved with `batches.position()` and `extra_items(step, final)` (JSON items beside the state,
  e.g. the online loop's iteration). A SIGTERM / Ctrl-C (`preemption`, installed here when not
  given) saves the step and raises Preempted. The caller owns `checkpointer` and `log`.
  """
  end_step = config.total_steps if end_step is None else int(end_step)
  start = int(jax.device_get(state.step))
  owns_preemption = preemption is None
  progress = _progress(end_step, start)
  monitor = FiniteMonitor(config)
  preemption = Preemption() if owns_preemption else preemption
  # The share of prompts and responses cut at the max lengths so far (data.truncate).
  truncation = getattr(batches, "truncation", None)
  report = lambda pending: _report(pending, log, progress, config, monitor, truncation,
                                   end_step)
  pending: tuple[int, Any] | None = None
  batch = first
  try:
    for step in range(start + 1, end_step + 1):
      if batch is None:
        batch = numeric(next(batches))
      state, metrics = train_step(state, device_batch(batch, batch_layout))
      batch = None
      if pending is not None:  # The previous step's metrics, read while this one runs.
        report(pending)
      pending = (step, metrics)
      evaluate_now = bool(held_out or judged) and config.eval_every and (
          step % config.eval_every == 0 or step == end_step)
      save_now = step % config.checkpoint_every == 0 or step == end_step
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
        extra = dict(extra_items(step, step == end_step)) if extra_items else None
        checkpointer.save(state, batches.position(), eval_metrics, extra=extra)
      if preempted:
        raise Preempted(step, preemption.signal_name)
    if pending is not None:
      report(pending)
  finally:
    if owns_preemption:
      preemption.close()
    progress.close()
  return state


def _report(pending, log: MetricsLog, progress, config, monitor: FiniteMonitor,
            truncation=None, end_step: int | None = None) -> None:
  step, metrics = pending
  values = _host(metrics)
  monitor.check(step, values)
  progress.update(step, values["loss"])
  last = config.total_steps if end_step is None else end_step
  if step % config.log_every == 0 or step == last or not values["finite"]:
    values = {**values, "steps_per_second": progress.rate(), "skipped_steps": monitor.skipped,
              **(truncation() if truncation is not None else {})}
    log.write(step, values)
    logging.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))


class _progress:
  """A one-line progress bar with the live loss and steps/s (process 0 only)."""

  def __init__(self, total: int, start: int):
    self.total, self.start, self.begin = total, start, time.perf_counter()
    self.enabled = jax.process_index() == 0
    self.bar = None
    # A worker process's parent shows its progress from this file (console.StageBoard).
    from dro_jax import console
    self.file = console.progress_file() if self.enabled else None
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
    if self.file is not None:
      self.file.write(step, self.total, self.rate())

  def close(self) -> None:
    if self.file is not None:
      self.file.write(self.last, self.total, self.rate(), force=True)
    if self.bar is not None:
      self.bar.close()

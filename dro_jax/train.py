"""The `train` runner: the project's one training loop, read top to bottom.

config -> data -> mesh -> state (restored, or initialised from `init_checkpoint`, straight into
its shards) -> steps, with metrics read one step late, periodic evaluation, and checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from dro_jax import checkpoint_manager, files, partitioning, reference_cache
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
    with files.gfile().GFile(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    self.writer.write_scalars(int(step), {key: float(v) for key, v in metrics.items()})

  def close(self) -> None:
    if self.active:
      self.writer.flush()
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

"""The run's orbax CheckpointManager at `<workdir>/checkpoints`: save, keep, restore.

Each step directory holds the items `policy`, `policy_opt`, `value`, `value_opt`, `reference`
(those the run has), `rng_step` ({"step", "rng"}) and `data_position` (JSON), so any of them can
be read back with orbax alone:

    mngr = ocp.CheckpointManager(f"{workdir}/checkpoints", item_names=("policy",))
    policy = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        policy=ocp.args.StandardRestore()))["policy"]

Retention is one manager with one preservation policy: the last `keep_last` steps plus the
`keep_best` best by a metric (checkpoints without that metric are not kept for it), so periodic
saves never pile up. The metrics handed to orbax hold no timings: two identical runs write
identical items.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from dro_jax.state import TrainState

PyTree = Any

ITEM_NAMES = ("policy", "policy_opt", "value", "value_opt", "reference", "rng_step",
              "data_position")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def _abstract(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying each leaf's sharding, what StandardRestore restores into."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """One CheckpointManager for a run (every process constructs it and calls save / restore)."""

  def __init__(self, workdir: str, *, keep_last: int = 3, keep_best: int = 0,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
    self.workdir = workdir
    self._settings = dict(keep_last=keep_last, keep_best=keep_best, best_metric=best_metric,
                          best_mode=best_mode, async_save=async_save)
    self._open(**self._settings)

  def _open(self, *, keep_last: int, keep_best: int, best_metric: str | None, best_mode: str,
            async_save: bool) -> None:
    workdir = self.workdir
    policies: list[Any] = [checkpoint_managers.LatestN(n=max(int(keep_last), 1))]
    if keep_best and best_metric:
      if best_mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
          n=int(keep_best), keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True)
    self.directory = checkpoint_dir(workdir)
    self.best_metric = best_metric
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=ITEM_NAMES)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_position: Mapping[str, Any] | None,
           metrics: Mapping[str, float] | None = None, *, force: bool = True) -> bool:
    """Saves `state` at its own step (asynchronously); `metrics` only for the best-N choice."""
    step = int(jax.device_get(state.step))
    items = {name: ocp.args.StandardSave(tree) for name, tree in state.items().items()}
    items["data_position"] = ocp.args.JsonSave(dict(data_position or {}))
    kept = None
    if metrics and self.best_metric in metrics:
      kept = {self.best_metric: float(metrics[self.best_metric])}
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=kept, force=force)

  def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The state of `step` laid out as `like` (arrays or ShapeDtypeStructs with shardings)."""
    items = {name: ocp.args.StandardRestore(_abstract(tree))
             for name, tree in like.items().items()}
    items["data_position"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = TrainState.from_items({name: restored[name] for name in like.items()})
    return state, dict(restored["data_position"] or {})

  def restore_item(self, step: int, name: str, like: PyTree | None = None) -> PyTree:
    """One item (e.g. "policy" for a later stage's init), into `like`'s shardings if given."""
    restore = ocp.args.StandardRestore(None if like is None else _abstract(like))
    return self.manager.restore(step, args=ocp.args.Composite(**{name: restore}))[name]

  def restore_latest_valid(self, like: TrainState
                           ) -> tuple[TrainState, dict[str, Any], int] | None:
    """The newest step that restores, newest first; a corrupt or partial step is reported by
    name and moved to `<workdir>/checkpoints_corrupt/<step>` (so that step number can be saved
    again). None when no step restores."""
    while (step := self.latest_step()) is not None:
      try:
        state, position = self.restore(step, like)
        return state, position, step
      except Exception as error:  # orbax / tensorstore raise many kinds on damaged files
        path = os.path.join(self.directory, str(step))
        print(f"checkpoint {path} is corrupt or incomplete ({type(error).__name__}: "
              f"{str(error)[:300]}); moving it to checkpoints_corrupt/{step} and trying the "
              f"previous step", flush=True)
        self.quarantine(step)
    return None

  def quarantine(self, step: int) -> None:
    """Moves step `step` aside (process 0) and reopens the manager, which forgets it."""
    import jax
    from jax.experimental import multihost_utils
    self.manager.close()
    if jax.process_index() == 0:  # epath: local folders and gs:// alike
      target = epath.Path(self.workdir) / "checkpoints_corrupt" / str(step)
      if target.exists():
        target.rmtree()
      target.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"dro_jax_quarantine_{step}")
    self._open(**self._settings)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

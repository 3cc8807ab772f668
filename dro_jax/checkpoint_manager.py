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

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from dro_jax.state import TrainState

PyTree = Any

ITEM_NAMES = ("policy", "policy_opt", "value", "value_opt", "reference", "rng_step",
              "data_position", "online")
# JSON items a runner may save beside the state (`save(..., extra=...)`): the online loop's
# iteration, phase and judge calls.
EXTRA_ITEMS = ("online",)


class CheckpointMismatchError(ValueError):
  """A checkpoint whose files read back intact but do not fit the run's state."""


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
               async_save: bool = True, keep_every: int = 0):
    """`keep_every`: also keep every step that is a multiple of it (the online loop's
    iterates)."""
    self.workdir = workdir
    self._settings = dict(keep_last=keep_last, keep_best=keep_best, best_metric=best_metric,
                          best_mode=best_mode, async_save=async_save, keep_every=keep_every)
    self._open(**self._settings)

  def _open(self, *, keep_last: int, keep_best: int, best_metric: str | None, best_mode: str,
            async_save: bool, keep_every: int = 0) -> None:
    workdir = self.workdir
    policies: list[Any] = [checkpoint_managers.LatestN(n=max(int(keep_last), 1))]
    if keep_every:
      policies.append(checkpoint_managers.EveryNSteps(interval_steps=int(keep_every)))
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
           metrics: Mapping[str, float] | None = None, *, force: bool = True,
           extra: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
    """Saves `state` at its own step (asynchronously); `metrics` only for the best-N choice;
    `extra`: JSON items (names in EXTRA_ITEMS) saved beside it."""
    step = int(jax.device_get(state.step))
    items = {name: ocp.args.StandardSave(tree) for name, tree in state.items().items()}
    items["data_position"] = ocp.args.JsonSave(dict(data_position or {}))
    for name, value in (extra or {}).items():
      if name not in EXTRA_ITEMS:
        raise ValueError(f"checkpoint item {name!r}: choose from {EXTRA_ITEMS}")
      items[name] = ocp.args.JsonSave(dict(value))
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

  def restore_json(self, step: int, name: str) -> dict[str, Any] | None:
    """A JSON item saved with `extra` at `step`, or None when that step has none."""
    try:
      metadata = json.loads((epath.Path(self.directory) / str(step) /
                             "_CHECKPOINT_METADATA").read_text())
      if name not in (metadata.get("item_handlers") or {}):
        return None
    except (OSError, ValueError):
      pass
    return dict(self.manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.JsonRestore()}))[name] or {})

  def restore_latest_valid(self, like: TrainState
                           ) -> tuple[TrainState, dict[str, Any], int] | None:
    """The newest step that restores, newest first. A step whose files are unreadable or
    missing (a kill mid-save, a truncated chunk, a damaged manifest or metadata) is reported by
    name and moved, intact, to `<workdir>/checkpoints_corrupt/<step>` (so that step number can
    be saved again), and the previous step is tried. A step whose files all read but do not fit
    this run's state (other code or config) raises `CheckpointMismatchError`: nothing is moved.
    None when no step restores."""
    while (step := self.latest_step()) is not None:
      path = os.path.join(self.directory, str(step))
      damaged = self.metadata_damage(step, like)
      try:
        if damaged:
          raise ValueError("damaged metadata")
        state, position = self.restore(step, like)
        return state, position, step
      except Exception as error:  # orbax / tensorstore raise many kinds on damaged files
        damaged = damaged or self.unreadable_items(step, like)
        if not damaged:
          raise CheckpointMismatchError(
              f"checkpoint {path} reads back intact but does not fit this run's state "
              f"({type(error).__name__}: {str(error)[:300]}); was the code or the config "
              f"changed since it was saved? Nothing was moved; resume with the code and config "
              f"that wrote it, or start a fresh --workdir") from error
        target = self.quarantine(step)
        print(f"checkpoint {path} is corrupt or incomplete (unreadable: "
              f"{'; '.join(f'{name}: {reason}' for name, reason in damaged.items())}); moved it "
              f"to {target} and trying the previous step", flush=True)
    return None

  def metadata_damage(self, step: int, like: TrainState) -> dict[str, str]:
    """{file: why} for the metadata of `step` that is missing or not JSON: the step's
    `_CHECKPOINT_METADATA` and each saved item's `_METADATA` (a restore into a known
    structure may not read them, but a checkpoint without them is incomplete)."""
    import json
    folder = epath.Path(self.directory) / str(step)
    damaged: dict[str, str] = {}
    names = [name for name in like.items() if (folder / name).exists()]
    for relative in ["_CHECKPOINT_METADATA", *(f"{name}/_METADATA" for name in names)]:
      try:
        json.loads((folder / relative).read_text())
      except Exception as error:  # noqa: BLE001
        damaged[relative] = f"{type(error).__name__}: {str(error)[:120]}"
    return damaged

  def unreadable_items(self, step: int, like: TrainState) -> dict[str, str]:
    """{item: why} for the items of `step` whose files cannot be read back as saved (no target
    structure: every array chunk, manifest and metadata file is read); empty when all read."""
    import json

    import numpy as np
    damaged: dict[str, str] = {}
    saved_items = None
    try:  # the step's own list of the items it holds
      metadata = json.loads((epath.Path(self.directory) / str(step) /
                             "_CHECKPOINT_METADATA").read_text())
      saved_items = set(metadata.get("item_handlers") or {}) or None
    except Exception as error:  # noqa: BLE001
      damaged["_CHECKPOINT_METADATA"] = f"{type(error).__name__}: {str(error)[:160]}"
    for name in [*like.items(), "data_position", *EXTRA_ITEMS]:
      if name in EXTRA_ITEMS and saved_items is None:
        continue  # optional, and the metadata that would list it is already reported
      if saved_items is not None and name not in saved_items:
        continue  # never saved in this step: a different state, not damage
      try:
        if name == "data_position" or name in EXTRA_ITEMS:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              **{name: ocp.args.JsonRestore()}))[name]
        else:
          restored = self.restore_item(step, name)
        for leaf in jax.tree.leaves(restored):  # every chunk is read, then freed
          if isinstance(leaf, jax.Array):
            np.asarray(leaf)
            leaf.delete()
      except Exception as error:  # noqa: BLE001 (any failure to read is damage)
        damaged[name] = f"{type(error).__name__}: {str(error)[:160]}"
    return damaged

  def quarantine(self, step: int) -> str:
    """Moves step `step` aside (process 0) to checkpoints_corrupt/<step> (or <step>.1, .2, ...
    when that name is taken: nothing is ever deleted) and reopens the manager, which forgets
    it. Returns the new path."""
    import jax
    from jax.experimental import multihost_utils
    self.manager.close()
    corrupt = epath.Path(self.workdir) / "checkpoints_corrupt"
    target = corrupt / str(step)
    number = 0
    while target.exists():
      number += 1
      target = corrupt / f"{step}.{number}"
    if jax.process_index() == 0:  # epath: local folders and gs:// alike
      corrupt.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"dro_jax_quarantine_{step}")
    self._open(**self._settings)
    return str(target)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""Loading a trained network from disk to use it: a policy to sample from and score with, or a
judge's network (`load_network`).

A path is a training workdir (its latest checkpoint; the model rebuilt from its config.json), one
step directory of it (`<workdir>/checkpoints/<step>`), or a Hugging Face or T5X checkpoint folder.
Below every runner: evaluate, periodic evaluation, export, the judges and the online loop stand on
it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
from etils import epath

from dro_jax import checkpoint_manager, checkpoints, datasets
from dro_jax import step as step_lib
from dro_jax.models import t5 as t5_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Policy:
  """A T5 to sample from and score with."""

  params: PyTree
  config: t5_lib.T5Config


@dataclasses.dataclass
class LoadedPolicy:
  """A policy read from disk, with what is known about how it was trained."""

  policy: Policy
  path: str
  kind: str  # "workdir" (a workdir or one of its steps), "hf" or "t5x"
  step: int | None = None
  workdir: str | None = None
  run_config: ml_collections.ConfigDict | None = None  # the training config (workdirs only)
  vocabulary: str | None = None  # a sentencepiece model known to belong to it


def step_dir(path: epath.Path) -> tuple[epath.Path, int] | None:
  """(workdir, step) for `<workdir>/checkpoints/<step>`."""
  if path.name.isdigit() and path.parent.name == "checkpoints" and (
      path.parent.parent / "config.json").exists():
    return path.parent.parent, int(path.name)
  return None


def workdir_and_step(path: str) -> tuple[str, int | None] | None:
  """(workdir, step or None for the latest) when `path` is a workdir or a step folder of one."""
  location = epath.Path(path)
  found = step_dir(location)
  if found:
    return str(found[0]), found[1]
  if (location / "checkpoints").is_dir() and (location / "config.json").exists():
    return str(location), None
  return None


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error})") from error


def first_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def restore_network(workdir: str, step: int | None, abstract: PyTree) -> tuple[PyTree, int]:
  """The trained network (`policy` item) of `step` (default: the latest), shaped like the boxed
  or unboxed `abstract`, on this process's first device."""
  checkpointer = checkpoint_manager.Checkpointer(workdir)
  try:
    if step is None:
      step = checkpointer.latest_step()
      if step is None:
        raise ValueError(f"{workdir}: the workdir has no complete checkpoint")
    elif step not in checkpointer.all_steps():
      raise ValueError(f"{workdir}: no checkpoint of step {step} (steps: "
                       f"{checkpointer.all_steps()})")
    device = first_device()
    import flax.linen as nn
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nn.unbox(abstract))
    return checkpointer.restore_item(step, "policy", like), step
  finally:
    checkpointer.close()


def load_policy(path: str, *, dtype: str | None = None) -> LoadedPolicy:
  """A workdir (latest step), a step directory of one, or an HF / T5X checkpoint folder."""
  location = epath.Path(path)
  if not location.exists():
    raise ValueError(f"{path}: no such folder")
  found = workdir_and_step(path)
  if found:
    workdir, step = found
    run_config = read_run_config(workdir)
    if run_config.loss == "reward_model":
      raise ValueError(f"{path}: a reward model's workdir holds no policy to sample from")
    config = step_lib.t5_config(run_config)
    if dtype:
      config = config.replace(dtype=dtype)
    params, step = restore_network(workdir, step, t5_lib.abstract_params(config))
    return LoadedPolicy(Policy(params, config), path, "workdir", step, workdir, run_config,
                        datasets.run_vocabulary(run_config))
  kind = checkpoints.checkpoint_kind(path)
  config, params = checkpoints.load_checkpoint(path, dtype=dtype)
  # Placed as a restored workdir policy is, so both share one compiled sampler.
  params = jax.device_put(params, first_device())
  spiece = location / "spiece.model"
  return LoadedPolicy(Policy(params, config), path, kind,
                      vocabulary=str(spiece) if spiece.exists() else None)

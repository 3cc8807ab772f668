"""Meshes, logical-to-mesh axis rules and shardings: the only module that speaks mesh axes.

Models name their axes logically (`batch, length, embed, mlp, heads, kv, joined_kv, vocab`);
these rules map them onto the mesh axes `data, fsdp, model`: the batch over data and fsdp,
parameters fully sharded over fsdp on `embed`, and tensor parallelism over `model`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `shape` (one -1 entry takes the remaining devices) over all devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def logical_to_mesh_sharding(logical_specs: Any, mesh: Mesh,
                             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def check_divisible(shapes: Any, shardings: Any) -> None:
  """Fail early, naming the parameter, if a dimension does not split over its mesh axes."""
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, shape), sharding in zip(flat_shapes, flat_shardings):
    for dim, axes in zip(shape.shape, sharding.spec):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      parts = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if dim % parts:
        name = jax.tree_util.keystr(path)
        raise ValueError(f"{name}: dimension {dim} of shape {shape.shape} does not split over "
                         f"mesh axes {axes} of size {parts}")


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Leading (batch) axis over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (rank - 1))))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  parts = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % parts:
    raise ValueError(f"batch size {batch_size} does not split over the mesh's data x fsdp = "
                     f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {parts} devices")


def params_shardings(abstract_boxed_params: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedShardings for a boxed (logically annotated) abstract parameter tree."""
  shardings = logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed_params), mesh, rules)
  check_divisible(nn.unbox(abstract_boxed_params), shardings)
  return shardings


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """Initialise parameters straight into their shards (never whole on one device)."""
  abstract = jax.eval_shape(init_fn, rng)
  shardings = params_shardings(abstract, mesh, rules)
  init = jax.jit(lambda key: nn.unbox(init_fn(key)), out_shardings=shardings)
  return init(rng)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Context in which the models' logical activation constraints map onto `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield

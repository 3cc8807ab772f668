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
    ("layers", None),  # the stacked axis of scanned layers (T5Config.scan_layers)
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `shape` over the devices: one -1 entry takes the remaining ones; a shape
  without -1 that needs fewer devices than there are takes the first ones."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  processes = len({device.process_index for device in devices})
  if -1 not in shape and known < len(devices) and processes > 1:
    if known != 1:
      raise ValueError(f"mesh shape {tuple(shape)} takes {known} of the {len(devices)} devices "
                       f"of {processes} processes: a run of several processes needs a mesh over "
                       f"every process's devices (give one axis as -1)")
    # One device's mesh (the tiny presets) on several processes: one device of each process's,
    # along data, so that every process takes part.
    firsts: dict[int, jax.Device] = {}
    for device in devices:
      firsts.setdefault(device.process_index, device)
    devices, shape = list(firsts.values()), [len(firsts), 1, 1][:len(shape)] + [1] * (
        len(shape) - 3)
  elif -1 not in shape and known < len(devices):
    devices = devices[:known]
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def put(tree: Any, shardings: Any) -> Any:
  """jax.device_put(tree, shardings), also from one process's own devices onto a mesh that
  spans several processes (a policy restored on this host's first device, placed for sampling
  over the whole mesh): such a leaf goes through host memory, every process giving the same
  value."""
  if jax.process_count() > 1:
    def host_if_local(leaf, sharding):
      if (isinstance(leaf, jax.Array) and leaf.is_fully_addressable
          and not sharding.is_fully_addressable):
        return np.asarray(jax.device_get(leaf))
      return leaf
    tree = jax.tree.map(host_if_local, tree, shardings)
  return jax.device_put(tree, shardings)


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


# ----------------------------------------------------------------------------------------------
# The train state and the batch: shardings from the config, validation, and the one jit.


def mesh_from_config(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh `config.mesh_shape` = (data, fsdp, model); one entry may be -1."""
  return make_mesh(tuple(config.mesh_shape), devices=devices)


def rules_from_config(config: Any) -> tuple[tuple[str, Any], ...]:
  """`config.logical_axis_rules` when set (pairs of logical name, mesh axes), else the defaults."""
  rules = config.get("logical_axis_rules", None)
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def validate(mesh: Mesh, *, batch_size: int, num_microbatches: int, num_heads: int,
             process_count: int = 1) -> None:
  """Fail before compiling, with the numbers: batch vs data x fsdp x microbatches, heads vs model.
  A user's mistake in the config (UserError: one line, and a workdir this run created goes)."""
  from dro_jax.errors import UserError
  data, fsdp, model = mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["model"]
  if num_microbatches < 1:
    raise UserError(f"num_microbatches must be >= 1, got {num_microbatches}")
  if batch_size % (data * fsdp * num_microbatches):
    raise UserError(
        f"batch_size {batch_size} does not split over data x fsdp x num_microbatches = "
        f"{data} x {fsdp} x {num_microbatches} = {data * fsdp * num_microbatches}")
  if batch_size % process_count:
    raise UserError(f"batch_size {batch_size} does not split over {process_count} processes")
  if num_heads % model:
    raise UserError(f"num_heads {num_heads} does not split over the mesh's model axis {model}")


def _names(path: tuple[Any, ...]) -> tuple[str, ...] | None:
  keys = []
  for key in path:
    if not isinstance(key, jax.tree_util.DictKey):
      return None
    keys.append(str(key.key))
  return tuple(keys)


def _derived_spec(shape: tuple[int, ...], param_shape: tuple[int, ...],
                  spec: PartitionSpec) -> PartitionSpec:
  """The spec of an optimizer-state leaf from its parameter's: equal shapes share the spec; a
  factored statistic (one dimension reduced away, as Adafactor's) drops that dimension's axes;
  anything else is replicated."""
  spec = tuple(spec) + (None,) * (len(param_shape) - len(spec))
  if tuple(shape) == tuple(param_shape):
    return PartitionSpec(*spec)
  if len(shape) == len(param_shape) - 1:
    for dropped in range(len(param_shape) - 1, -1, -1):
      if tuple(param_shape[:dropped] + param_shape[dropped + 1:]) == tuple(shape):
        return PartitionSpec(*(spec[:dropped] + spec[dropped + 1:]))
  return PartitionSpec()


def optimizer_state_shardings(abstract_opt_state: Any, abstract_params: Any,
                              params_shardings_tree: Any, mesh: Mesh) -> Any:
  """Shardings of an optax state that follow its parameters' (matched by key-path suffix)."""
  by_path = {}
  shapes = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  shardings = jax.tree.leaves(params_shardings_tree,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(shapes, shardings):
    by_path[_names(path)] = (leaf.shape, sharding.spec)

  def sharding_of(path, leaf):
    for start in range(len(path)):
      names = _names(path[start:])
      if names is not None and names in by_path:
        param_shape, spec = by_path[names]
        return NamedSharding(mesh, _derived_spec(leaf.shape, param_shape, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt_state)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shardings(abstract_batch: Any, mesh: Mesh) -> Any:
  """Every batch leaf split on its leading axis over data x fsdp."""
  return jax.tree.map(lambda x: batch_sharding(mesh, max(len(x.shape), 1)), abstract_batch)


def microbatch_constraint(mesh: Mesh) -> Callable[[Any], Any]:
  """Pins [M, B/M, ...] microbatches to the batch's own layout (the B/M axis over data x fsdp)."""
  def constrain(tree: Any) -> Any:
    def pin(x):
      spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.tree.map(pin, tree)
  return constrain


def jit_step(step: Callable, mesh: Mesh, state_shardings: Any, batch_shardings_tree: Any,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Callable:
  """The one place a train step is jitted: in/out shardings and the state donated."""
  metrics_sharding = replicated(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings_tree),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=0)

  def run(state, batch):
    with activate(mesh, rules):
      return jitted(state, batch)
  run.jitted = jitted
  return run

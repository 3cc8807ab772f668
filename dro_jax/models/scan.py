"""Lossless conversion between the unrolled t5x parameter tree and the scanned one.

Unrolled (t5x's layout, what checkpoints and exports hold): `encoder/layers_0/...`,
`encoder/layers_1/...`, ..., the same under `decoder`. Scanned (`T5Config.scan_layers=True`):
`encoder/layers/...` and `decoder/layers/...` whose leaves stack the layers on a new leading axis
(logical axis "layers"). Everything else (embedder, relpos_bias, norms, logits_dense) is
unchanged. A tree with only an encoder (a value network's) converts too.

Optimizers whose statistics are per leaf (Adafactor's factored moments, parameter scale and
update clipping) see one stacked leaf where the unrolled model has one per layer; `per_layer`
runs such an optimizer on each layer of the stacked leaves, so a scanned run takes the unrolled
run's steps (elementwise optimizers such as AdamW need nothing).

Leaves may be numpy arrays (stacked on the host), jax arrays or tracers (stacked with jnp, so
`jax.jit(stack_layers, out_shardings=...)` writes the stacked tree straight into its shards),
ShapeDtypeStructs (shapes only) or NamedShardings (their specs gain / lose the leading axis,
replicated, as the default "layers" rule maps it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dro_jax.models import t5 as t5_lib

PyTree = Any
LAYERS = "layers"


def _stack_counts(config: t5_lib.T5Config) -> dict[str, int]:
  return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}


def _is_leaf(x: Any) -> bool:
  return isinstance(x, (jax.ShapeDtypeStruct, NamedSharding))


def _stacked_sharding(sharding: Any) -> Any:
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  return sharding


def _layer_sharding(sharding: Any) -> Any:
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
  return sharding


def _stack_leaves(*leaves: Any) -> Any:
  first = leaves[0]
  if isinstance(first, NamedSharding):
    return _stacked_sharding(first)
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype,
                                sharding=_stacked_sharding(first.sharding))
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _layer_of(leaf: Any, index: int) -> Any:
  if isinstance(leaf, NamedSharding):
    return _layer_sharding(leaf)
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape)[1:], leaf.dtype,
                                sharding=_layer_sharding(leaf.sharding))
  return leaf[index]


def _layer_keys(stack: Mapping[str, Any]) -> list[str]:
  return sorted((key for key in stack if key.startswith("layers_")),
                key=lambda key: int(key[len("layers_"):]))


def stack_layers(params: PyTree, config: t5_lib.T5Config) -> PyTree:
  """The unrolled tree (`layers_0`, `layers_1`, ...) -> the scanned tree (`layers`, stacked on a
  leading axis). Fails naming the stack when its layers are not exactly 0..n-1 of the config."""
  out = dict(params)
  for name, count in _stack_counts(config).items():
    if name not in params:
      continue
    stack = dict(params[name])
    keys = _layer_keys(stack)
    expected = [f"layers_{index}" for index in range(count)]
    if keys != expected or LAYERS in stack:
      found = keys + ([LAYERS] if LAYERS in stack else [])
      raise ValueError(f"stack_layers: {name} has {found}; the config expects layers_0.."
                       f"layers_{count - 1} ({count} layers, unrolled)")
    layers = [stack.pop(key) for key in keys]
    structure = jax.tree.structure(layers[0], is_leaf=_is_leaf)
    for key, layer in zip(keys, layers):
      if jax.tree.structure(layer, is_leaf=_is_leaf) != structure:
        raise ValueError(f"stack_layers: {name}/{key} has a different parameter tree from "
                         f"{name}/{keys[0]}")
    stack[LAYERS] = jax.tree.map(_stack_leaves, *layers, is_leaf=_is_leaf)
    out[name] = stack
  return out


def unstack_layers(scanned: PyTree, config: t5_lib.T5Config) -> PyTree:
  """The scanned tree -> the unrolled t5x tree (what checkpoints and exports hold)."""
  out = dict(scanned)
  for name, count in _stack_counts(config).items():
    if name not in scanned:
      continue
    stack = dict(scanned[name])
    if LAYERS not in stack or _layer_keys(stack):
      raise ValueError(f"unstack_layers: {name} is not a scanned stack (keys "
                       f"{sorted(stack)[:6]}); expected '{LAYERS}' and no layers_N")
    layers = stack.pop(LAYERS)
    for leaf in jax.tree.leaves(layers, is_leaf=_is_leaf):
      size = None if isinstance(leaf, NamedSharding) else leaf.shape[0]
      if size is not None and size != count:
        raise ValueError(f"unstack_layers: {name}/{LAYERS} stacks {size} layers; the config "
                         f"has {count}")
    for index in range(count):
      stack[f"layers_{index}"] = jax.tree.map(lambda leaf: _layer_of(leaf, index), layers,
                                              is_leaf=_is_leaf)
    out[name] = stack
  return out


def is_scanned(params: PyTree) -> bool:
  """Whether a T5 (or encoder-only) parameter tree is in the scanned layout."""
  return any(isinstance(params.get(name), Mapping) and LAYERS in params[name]
             for name in ("encoder", "decoder"))


def to_config_layout(params: PyTree, config: t5_lib.T5Config) -> PyTree:
  """`params` in either layout -> the layout `config.scan_layers` runs (a no-op when it is)."""
  if config.scan_layers and not is_scanned(params):
    return stack_layers(params, config)
  if not config.scan_layers and is_scanned(params):
    return unstack_layers(params, config)
  return params


def read_in_layout(read: Callable[[PyTree | None], PyTree], shardings: PyTree | None,
                   config: t5_lib.T5Config, *, source_scanned: bool = False) -> PyTree:
  """Parameters from a reader of trees in the source layout (unrolled for `load_t5x` /
  `load_hf_t5`; `source_scanned` for a scanned run's checkpoint), in the layout `config` runs.
  `read(shardings of the source layout, or None) -> params`.

  With `shardings` (of the config's layout), the arrays are read straight into the matching
  shards of the source layout and converted by one jit into `shardings`, so no host holds the
  whole model.
  """
  if bool(source_scanned) == bool(config.scan_layers):
    return read(shardings)
  convert, to_source = ((stack_layers, unstack_layers) if config.scan_layers
                        else (unstack_layers, stack_layers))
  if shardings is None:
    return convert(read(None), config)
  params = read(to_source(shardings, config))
  return jax.jit(functools.partial(convert, config=config), out_shardings=shardings)(params)


STACKED, UNSTACKED = "stacked", "unstacked"


def stacked_labels(params: PyTree) -> PyTree:
  """STACKED for leaves under `encoder/layers` or `decoder/layers` (found anywhere on the path, so
  a value network's encoder counts), UNSTACKED for the rest: labels for optax.multi_transform."""

  def label(path: tuple[Any, ...], _: Any) -> str:
    names = [getattr(key, "key", None) for key in path]
    for parent, child in zip(names, names[1:]):
      if parent in ("encoder", "decoder") and child == LAYERS:
        return STACKED
    return UNSTACKED

  return jax.tree_util.tree_map_with_path(label, params)


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` applied to each layer of stacked leaves independently (vmapped over the leading
  axis): its state gains that axis too. Use it on the STACKED labels only, e.g.
  `optax.multi_transform({STACKED: per_layer(tx), UNSTACKED: tx}, stacked_labels)`."""

  def init(params):
    return jax.vmap(inner.init)(params)

  def update(updates, state, params=None):
    if params is None:
      return jax.vmap(lambda u, s: inner.update(u, s))(updates, state)
    return jax.vmap(inner.update)(updates, state, params)

  return optax.GradientTransformation(init, update)

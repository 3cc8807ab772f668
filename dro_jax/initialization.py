"""A run's model and state, built from its config: layouts, initialisation, the init checkpoint,
the compiled step.

Below every runner (train, the demo, the reference cache, sizing, the online loop): nothing here
imports a runner.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dro_jax import checkpoint_manager, datasets, errors, files, partitioning, reference
from dro_jax import step as step_lib
from dro_jax.models import scan as scan_lib
from dro_jax.models import t5 as t5_lib
from dro_jax.models import value as value_lib
from dro_jax.state import TrainState

PyTree = Any
Batch = dict[str, Any]


def abstract_policy(config: ml_collections.ConfigDict, model_config: t5_lib.T5Config) -> PyTree:
  """Boxed abstract parameters of the trained network (a reward model's is an encoder + head)."""
  if config.loss == "reward_model":
    return value_lib.DoubleNetMultipleValues(model_config).abstract_params()
  return t5_lib.abstract_params(model_config)


def unboxed(tree: PyTree) -> PyTree:
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
  policy = unboxed(boxed_policy)
  value = value_shardings = None
  if value_fn is not None:
    boxed_value = value_fn.abstract_params()
    value_shardings = partitioning.params_shardings(boxed_value, mesh, rules)
    value = unboxed(boxed_value)
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
  """"workdir", "hf" or "t5x", or a UserError saying what was expected."""
  gfile = files.gfile()
  if not gfile.exists(path):
    raise errors.UserError(
        f"init_checkpoint {path} does not exist; give a dro_jax workdir (e.g. an SFT run's "
        f"--workdir), a Hugging Face T5 folder or a T5X checkpoint_N folder")
  if gfile.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if gfile.exists(os.path.join(path, "config.json")) and gfile.glob(
      os.path.join(path, "*.safetensors*")):
    return "hf"
  if gfile.exists(os.path.join(path, "checkpoint")):
    return "t5x"
  raise errors.UserError(f"init_checkpoint {path}: not a dro_jax workdir (no checkpoints/), an HF "
                   f"folder (config.json + *.safetensors) or a T5X checkpoint_N folder "
                   f"(no 'checkpoint' file)")


# ------------------------------------------------------------- the model of an init checkpoint

# The model's dimensions (config.model keys), taken from init_checkpoint when one is given.
MODEL_DIM_KEYS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "num_encoder_layers",
                  "num_decoder_layers", "mlp_dim", "mlp_activations", "logits_via_embedding")
# Fields of T5Config that shape parameters but are no config key: they must agree.
_FIXED_SHAPE_FIELDS = ("relative_attention_num_buckets",)
# Where a value may come from and still give way to the checkpoint's.
_YIELDING_ORIGINS = ("default", "recipe", "size preset", "init checkpoint")


def _misfit(path: str, error: Exception) -> errors.UserError:
  first = next((line.strip() for line in str(error).splitlines() if line.strip()), repr(error))
  return errors.UserError(f"init_checkpoint {path}: its parameters do not fit this run's model "
                          f"({first[:300]}); give a checkpoint of this model, or leave the "
                          f"config.model dimensions to the checkpoint")


def _check_fits(path: str, source: t5_lib.T5Config, model: t5_lib.T5Config) -> None:
  for key in MODEL_DIM_KEYS + _FIXED_SHAPE_FIELDS:
    if getattr(source, key) != getattr(model, key):
      raise errors.UserError(
          f"init_checkpoint {path}: its {key} is {getattr(source, key)!r} but this run's model "
          f"has {getattr(model, key)!r}; leave config.model.{key} to the checkpoint (unset) or "
          f"give a checkpoint of this model")


def checkpoint_model_config(path: str) -> t5_lib.T5Config:
  """The model an init checkpoint holds, from its description alone (no parameter is read): a
  dro_jax workdir's config.json, a Hugging Face folder's config.json (and which tensors it
  has), a T5X checkpoint's parameter shapes."""
  from dro_jax import checkpoints
  kind = init_checkpoint_kind(path)
  try:
    if kind == "workdir":
      source = files.read_json(os.path.join(path, "config.json"))
      if not isinstance(source, dict) or not isinstance(source.get("model"), dict):
        raise errors.UserError(f"init_checkpoint {path}: the workdir has no config.json with a "
                               f"model section; is it a dro_jax workdir?")
      return step_lib.t5_config(ml_collections.ConfigDict(
          {"model": source["model"], "compute_dtype": source.get("compute_dtype")}))
    if kind == "hf":
      hf_config = files.read_json(os.path.join(path, "config.json"))
      names = checkpoints._hf_tensors(path)  # pylint: disable=protected-access (memory-mapped)
      tied = bool(hf_config.get("tie_word_embeddings", True)) or "lm_head.weight" not in names
      scaled = bool(hf_config.get("scale_decoder_outputs",
                                  hf_config.get("tie_word_embeddings", True)))
      # An explicit dtype: the default asks the backend, which multi-host runs start later.
      return checkpoints.hf_config_to_t5(hf_config, tied_output=tied and scaled,
                                         dtype="float32")
    from flax import serialization
    checkpoint_file = f"{path.rstrip('/')}/checkpoint"
    raw = checkpoints._read_bytes(checkpoint_file)  # pylint: disable=protected-access
    target = serialization.msgpack_restore(raw)["optimizer"]["target"]
    return checkpoints._t5x_config(target, "float32")  # pylint: disable=protected-access
  except errors.UserError:
    raise
  except (ValueError, KeyError, TypeError, OSError) as error:
    raise errors.UserError(f"init_checkpoint {path}: cannot read its model's description "
                           f"({errors.one_line(error)})") from error


def _shown(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def resolve_init_dims(config: ml_collections.ConfigDict) -> list[str]:
  """With `init_checkpoint`, the model's dimensions (MODEL_DIM_KEYS) become the checkpoint's,
  written into `config.model` (config.json records them) over what a size preset or a recipe
  gave; a value set on purpose (the command line, or in code after loading) that differs is
  refused by name (UserError), before anything is written. Returns the keys it set."""
  path = config.get("init_checkpoint")
  if not path:
    return []
  from dro_jax import configs
  source = checkpoint_model_config(path)
  current = step_lib.t5_config(config)
  sources = configs.origins(config)
  differing = [key for key in MODEL_DIM_KEYS if getattr(source, key) != getattr(current, key)]
  for key in differing:
    origin = sources.get(f"model.{key}")
    if config.model[key] is None or origin in _YIELDING_ORIGINS:
      continue
    have, want = _shown(getattr(current, key)), _shown(getattr(source, key))
    named = (f"--config.model.{key}={have}" if origin == "command line" else
             f"config.model.{key}={have!r}")
    raise errors.UserError(
        f"{named} conflicts with the init checkpoint {path}'s {want!r}: the model's dimensions "
        f"come from init_checkpoint; drop {named.split('=')[0]}, or give an init_checkpoint "
        f"whose {key} is {have!r}")
  for key in _FIXED_SHAPE_FIELDS:
    if getattr(source, key) != getattr(current, key):
      raise errors.UserError(
          f"init_checkpoint {path}: its {key} is {getattr(source, key)} where this model has "
          f"{getattr(current, key)}; dro_jax cannot initialise from it")
  if not differing:
    return []
  for key in MODEL_DIM_KEYS:  # every dimension, so that nothing is derived from the preset
    value = getattr(source, key)
    config.model[key] = (tuple(value) if key == "mlp_activations" else
                         bool(value) if key == "logits_via_embedding" else int(value))
  configs.mark(config, "init checkpoint", [f"model.{key}" for key in MODEL_DIM_KEYS])
  resolved = step_lib.t5_config(config)
  _check_fits(path, source, resolved)
  logging.info("model dimensions from init_checkpoint %s: %s", path,
               {key: getattr(resolved, key) for key in differing})
  return list(differing)


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
    source = json.loads(files.read_text(os.path.join(path, "config.json")) or "{}")
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
    except ValueError as error:  # orbax: a stored shape that is not the requested one
      raise _misfit(path, error) from error
    finally:
      other.close()
    logging.info("policy initialised from %s step %d", path, step)
    return policy
  from dro_jax import checkpoints
  loader = checkpoints.load_hf_t5 if kind == "hf" else checkpoints.load_t5x

  def read(source_shardings):
    source_config, params = loader(path, source_shardings)
    _check_fits(path, source_config, model_config)
    return params

  # Published checkpoints are unrolled; a scanned run stacks them into its own shards.
  try:
    params = scan_lib.read_in_layout(read, shardings, model_config)
  except checkpoints.CheckpointError as error:
    raise _misfit(path, error) from error
  logging.info("policy initialised from the %s checkpoint %s", kind, path)
  return params


def build_state(config, model_config, mesh, rules, abstract, shardings,
                policy: PyTree | None = None) -> TrainState:
  """A new state straight into its shards: the policy given (already in its shards), else from
  `init_checkpoint`, else from scratch."""
  init = make_init_fn(config, model_config, with_reference=shardings.reference is not None)
  rng = jax.random.PRNGKey(config.seed)
  if policy is None and config.init_checkpoint:
    # A reward model starts from a T5's encoder: read the T5, then build its own tree.
    if config.loss == "reward_model":
      boxed = t5_lib.abstract_params(model_config)
      like, policy_shardings = unboxed(boxed), partitioning.params_shardings(boxed, mesh, rules)
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
  datasets.resolve_demo(config)
  resolve_init_dims(config)
  model_config = step_lib.t5_config(config)
  if config.init_checkpoint:
    fix = (f"the model's vocab_size comes from init_checkpoint {config.init_checkpoint}, so give "
           f"the data that checkpoint's own vocabulary (--config.data.vocabulary=<its "
           f"spiece.model>)")
  else:
    fix = None  # the generic one: a larger --config.model.vocab_size, or a smaller vocabulary
  tasks.check_vocabulary_fits(task, model_config.vocab_size, fix=fix)
  return model_config


def resolve_preference_tokens(config: ml_collections.ConfigDict, task: str) -> None:
  """A preference model's two label ids and their pieces, into `config.preference` (config.json
  records them): the config's, else chosen from the task's vocabulary
  (`dro_jax.vocabulary.preference_labels`). Ids that are equal, unknown or outside the
  vocabulary are refused (UserError) here, before the run writes anything."""
  if config.loss != "preference_model":
    return
  from dro_jax import vocabulary as vocabulary_lib
  preference = config.preference
  name = (f"the vocabulary {config.data.vocabulary}" if config.data.get("train_files")
          and config.data.get("vocabulary") else f"the vocabulary of task {task}")
  labels = vocabulary_lib.preference_labels(
      datasets.vocabulary_of(task), a_token=preference.a_token, b_token=preference.b_token,
      a_piece=preference.get("a_piece"), b_piece=preference.get("b_piece"), name=name)
  preference.a_token, preference.b_token = labels.a_token, labels.b_token
  preference.a_piece, preference.b_piece = labels.a_piece, labels.b_piece
  logging.info("preference-model labels: %s", labels.describe())

"""A bfloat16 reference copy (`config.reference.dtype`): frozen or hard-synced, checkpointed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import checkpoint_manager, configs, partitioning, reference, train
from dro_jax import step as step_lib

B = 8


def tiny(name: str, arg: str, dtype: str):
  config = configs.load(name, f"size=tiny,{arg}")
  config.batch_size = B
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1  # compile time
  config.reference.dtype = dtype
  return config


def batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = lambda length: rng.integers(2, 90, size=(B, length)).astype(np.int32)
  targets = tokens(6)
  return {"encoder_input_tokens": tokens(8), "decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
          "decoder_loss_weights": np.ones((B, 6), np.float32),
          "reward": rng.normal(size=B).astype(np.float32),
          "example_weights": np.ones(B, np.float32)}


def one_step(config):
  mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = partitioning.rules_from_config(config)
  model_config = step_lib.t5_config(config)
  abstract, shardings = train.state_layout(config, model_config, mesh, rules)
  state = train.build_state(config, model_config, mesh, rules, abstract, shardings)
  first = jax.tree.map(np.asarray, state)
  train_step, layout = train.compile_step(config, mesh, rules, shardings, batch())
  state, metrics = train_step(state, train.device_batch(batch(), layout))
  return abstract, shardings, first, state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def dro_runs():
  # A hard sync every step: the reference is the policy after each update, cast to its dtype.
  return {dtype: one_step(tiny("dro", "tr=hard,sync_every=1", dtype))
          for dtype in ("float32", "bfloat16")}


def test_bfloat16_reference_step_matches_float32(dro_runs):
  abstract, _, first, state, metrics = dro_runs["bfloat16"]
  *_, metrics32 = dro_runs["float32"]
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(abstract.reference)} == {"bfloat16"}
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(first.reference)} == {"bfloat16"}
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(state.reference)} == {"bfloat16"}
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(state.policy)} == {"float32"}
  np.testing.assert_allclose(metrics["loss"], metrics32["loss"], rtol=2e-2, atol=1e-3)
  assert np.isfinite(metrics["loss"])
  for ref, policy in zip(jax.tree.leaves(state.reference), jax.tree.leaves(state.policy)):
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(policy.astype(jnp.bfloat16)))


def test_bfloat16_reference_checkpoints_round_trip(dro_runs, tmp_path):
  abstract, shardings, _, state, _ = dro_runs["bfloat16"]
  checkpointer = checkpoint_manager.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(state, {"epoch": 0})
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
  restored, position = checkpointer.restore(checkpointer.latest_step(), like)
  checkpointer.close()
  assert position == {"epoch": 0}
  for got, want in zip(jax.tree.leaves(restored.reference), jax.tree.leaves(state.reference)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_frozen_bfloat16_reference_is_allowed_and_soft_ema_is_refused():
  frozen = tiny("dpo", "tr=none", "bfloat16")
  assert reference.dtype_from_config(frozen) == jnp.bfloat16
  soft = tiny("dpo", "tr=soft", "bfloat16")
  mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"config\.reference\.dtype='bfloat16'.*float32 master"):
    train.state_layout(soft, step_lib.t5_config(soft), mesh, partitioning.DEFAULT_RULES)
  with pytest.raises(ValueError, match="config.reference.dtype must be one of"):
    reference.storage_dtype("float16", 0.0)


def test_init_and_abstract_cast_floating_leaves_only():
  params = {"w": jnp.ones((3,)), "n": jnp.arange(2)}
  copy = reference.init(params, jnp.bfloat16)
  assert copy["w"].dtype == jnp.bfloat16 and copy["n"].dtype == params["n"].dtype
  shapes = reference.abstract(params, jnp.bfloat16)
  assert shapes["w"].dtype == jnp.bfloat16 and shapes["n"].shape == (2,)

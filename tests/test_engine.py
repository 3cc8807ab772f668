"""The train step: sharded == one device, microbatched == whole batch, state leaves sharded."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dro_jax import configs, partitioning, step as step_lib, train
from run_helpers import set_dotted

B, SOURCE = 16, 10
TARGETS = {"": 8, "chosen_": 8, "rejected_": 6}  # unequal target lengths


def make_batch(seed: int = 0, padding_rows=(3, 7, 11)) -> dict[str, np.ndarray]:
  """Random tokens with ragged padding; the padding rows all fall in microbatch 3 of 4."""
  rng = np.random.default_rng(seed)

  def tokens(length, minimum=1):
    lengths = rng.integers(minimum, length + 1, size=B)
    array = rng.integers(2, 90, size=(B, length)).astype(np.int32)
    array[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return array

  batch = {"encoder_input_tokens": tokens(SOURCE, 2)}
  for prefix, length in TARGETS.items():
    targets = tokens(length)
    batch[f"{prefix}decoder_target_tokens"] = targets
    batch[f"{prefix}decoder_input_tokens"] = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    batch[f"{prefix}decoder_loss_weights"] = (targets > 0).astype(np.float32)
  batch["reward"] = rng.normal(size=B).astype(np.float32)
  weights = np.ones(B, np.float32)
  weights[list(padding_rows)] = 0.0
  batch["example_weights"] = weights
  return batch


def tiny_config(name: str, arg: str = "", **changes):
  config = configs.load(name, f"size=tiny{',' + arg if arg else ''}")
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e-2
  config.batch_size = B
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1  # compile time
  return set_dotted(config, changes)


def run_steps(config, mesh_shape, steps: int = 2, batch=None, devices=None):
  config.mesh_shape = mesh_shape
  mesh = partitioning.mesh_from_config(config, devices=devices)
  rules = partitioning.rules_from_config(config)
  model_config = step_lib.t5_config(config)
  abstract, shardings = train.state_layout(config, model_config, mesh, rules)
  state = train.build_state(config, model_config, mesh, rules, abstract, shardings)
  batch = make_batch() if batch is None else batch
  train_step, layout = train.compile_step(config, mesh, rules, shardings, batch)
  metrics = None
  for _ in range(steps):
    state, metrics = train_step(state, train.device_batch(batch, layout))
  return state, jax.device_get(metrics), shardings


def assert_trees_close(a, b, rtol=2e-5, atol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


SHARDED_RUNS = [("dro", ""), ("kto", ""), ("dpo", "tr=soft")]
MICROBATCH_RUNS = SHARDED_RUNS + [("dro_p", ""), ("sft", "")]


@pytest.fixture(scope="module")
def one_device_runs():
  """The reference: one device, the whole batch at once."""
  return {(name, arg): run_steps(tiny_config(name, arg), (1, 1, 1), devices=jax.devices()[:1])
          for name, arg in MICROBATCH_RUNS}


def assert_same_run(run, reference_run, name):
  (state, metrics, _), (reference_state, reference_metrics, _) = run, reference_run
  assert_trees_close(state.policy, reference_state.policy)
  if state.value is not None:
    assert_trees_close(state.value, reference_state.value)
  if state.reference is not None:  # moved with the policy under a trust region
    assert_trees_close(state.reference, reference_state.reference)
  for key in ("loss", "grad_norm", "kto/z0", "value/mean", "logps/policy"):
    if key in reference_metrics:
      np.testing.assert_allclose(metrics[key], reference_metrics[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
@pytest.mark.parametrize("name,arg", SHARDED_RUNS)
def test_sharded_runs_equal_one_device(one_device_runs, name, arg, mesh_shape):
  run = run_steps(tiny_config(name, arg), mesh_shape)
  assert_same_run(run, one_device_runs[(name, arg)], name)
  state, _, shardings = run
  # The state is laid out as intended, not replicated.
  embedding = state.policy["token_embedder"]["embedding"]
  assert embedding.sharding.spec == shardings.policy["token_embedder"]["embedding"].spec
  if mesh_shape == (1, 4, 2):
    assert embedding.sharding.spec == PartitionSpec("model", "fsdp")
    assert embedding.addressable_shards[0].data.shape == (256 // 2, 32 // 4)
    kernel = state.policy["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "model")
    assert kernel.addressable_shards[0].data.shape == (32 // 4, 32 // 2)


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", MICROBATCH_RUNS)
def test_four_microbatches_give_the_same_update(one_device_runs, name, arg):
  """M = 4 on a (2, 1, 1) mesh; every zero-weight row sits in microbatch 3."""
  run = run_steps(tiny_config(name, arg, num_microbatches=4), (2, 1, 1),
                  devices=jax.devices()[:2])
  assert_same_run(run, one_device_runs[(name, arg)], name)


def test_a_bfloat16_frozen_reference_runs_as_the_float32_one(one_device_runs, tmp_path):
  """config.reference.dtype=bfloat16: the copy is bfloat16 from the first step through donation,
  the losses are the float32 reference's to bfloat16 precision, and it checkpoints as bfloat16.
  (A hard sync's cast back to bfloat16 is tested on `reference.update`.)"""
  import jax.numpy as jnp

  from dro_jax import checkpoint_manager
  state, metrics, shardings = run_steps(tiny_config("dro", **{"reference.dtype": "bfloat16"}),
                                        (1, 1, 1), devices=jax.devices()[:1])
  state32, metrics32, _ = one_device_runs[("dro", "")]
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(state.reference)} == {"bfloat16"}
  assert {str(leaf.dtype) for leaf in jax.tree.leaves(state.policy)} == {"float32"}
  for ref, ref32 in zip(jax.tree.leaves(state.reference), jax.tree.leaves(state32.reference)):
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(ref32.astype(jnp.bfloat16)))
  assert np.isfinite(metrics["loss"])
  np.testing.assert_allclose(metrics["loss"], metrics32["loss"], rtol=2e-2, atol=1e-3)
  np.testing.assert_allclose(metrics["logps/policy"], metrics32["logps/policy"], rtol=2e-2)
  checkpointer = checkpoint_manager.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(state, {"epoch": 0})
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
  restored, position = checkpointer.restore(checkpointer.latest_step(), like)
  checkpointer.close()
  assert position == {"epoch": 0}
  for got, want in zip(jax.tree.leaves(restored.reference), jax.tree.leaves(state.reference)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_microbatch_split_is_rows_modulo_m_and_merges_back():
  x = np.arange(12)
  split = np.asarray(step_lib.split_microbatches(x, 4))
  np.testing.assert_array_equal(split[1], [1, 5, 9])
  np.testing.assert_array_equal(step_lib.merge_microbatches(split), x)


def test_validation_names_the_numbers():
  mesh = partitioning.make_mesh((2, 2, 2))
  with pytest.raises(ValueError, match=r"batch_size 12 .* 2 x 2 x 2 = 8"):
    partitioning.validate(mesh, batch_size=12, num_microbatches=2, num_heads=4)
  with pytest.raises(ValueError, match="num_heads 3 .* model axis 2"):
    partitioning.validate(mesh, batch_size=16, num_microbatches=1, num_heads=3)

"""Model structure: presets, logical axes, and sharded == unsharded on 8 fake devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import partitioning
from dro_jax.models import t5 as t5_lib

# Parameter counts of the published checkpoints (vocabulary 32128).
PUBLISHED_SIZES = {
    "t5_1_0_small": 60_506_624, "t5_1_0_base": 222_903_552, "t5_1_0_large": 737_668_096,
    "t5_1_0_xl": 2_851_598_336, "t5_1_0_xxl": 11_307_321_344,
    "t5_1_1_small": 76_961_152, "t5_1_1_base": 247_577_856, "t5_1_1_large": 783_150_080,
    "t5_1_1_xl": 2_849_757_184, "t5_1_1_xxl": 11_135_332_352,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_presets_have_the_published_sizes(name):
  abstract = nn.unbox(t5_lib.abstract_params(t5_lib.get_config(name)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == PUBLISHED_SIZES[name]


def test_flan_presets_are_t5_1_1_and_unknown_names_fail():
  assert t5_lib.get_config("flan_t5_xl") == t5_lib.get_config("t5_1_1_xl")
  with pytest.raises(ValueError, match="unknown T5 preset 'flan_t5_huge'"):
    t5_lib.get_config("flan_t5_huge")
  with pytest.raises(ValueError, match="unknown activation"):
    t5_lib.T5Config(mlp_activations=("swishy",))


def test_overridden_width_or_heads_derive_head_dim():
  assert t5_lib.get_config("tiny").head_dim == 8
  assert t5_lib.get_config("t5_1_0_xl").head_dim == 128  # the published value, kept
  assert t5_lib.get_config("tiny", emb_dim=64).head_dim == 16
  assert t5_lib.get_config("tiny", num_heads=8).head_dim == 4
  assert t5_lib.get_config("t5_1_1_small", num_heads=8).head_dim == 64
  assert t5_lib.get_config("tiny", emb_dim=64, head_dim=8).head_dim == 8  # explicit wins
  assert t5_lib.get_config("tiny", vocab_size=64).head_dim == 8
  with pytest.raises(ValueError, match="emb_dim 32 is not a multiple of num_heads 3.*head_dim"):
    t5_lib.get_config("tiny", num_heads=3)
  abstract = nn.unbox(t5_lib.abstract_params(t5_lib.get_config("tiny", emb_dim=64)))
  assert abstract["encoder"]["layers_0"]["attention"]["query"]["kernel"].shape == (64, 64)


def test_every_parameter_has_logical_axes_with_t5x_names():
  axes = t5_lib.logical_axes(t5_lib.get_config("t5_1_1_tiny"))
  flat = {jax.tree_util.keystr(k): tuple(v) for k, v in jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
  assert all(len(v) > 0 for v in flat.values())
  assert flat["['token_embedder']['embedding']"] == ("vocab", "embed")
  assert flat["['encoder']['layers_0']['attention']['query']['kernel']"] == ("embed", "joined_kv")
  assert flat["['decoder']['layers_1']['self_attention']['out']['kernel']"] == ("joined_kv",
                                                                                 "embed")
  assert flat["['encoder']['relpos_bias']['rel_embedding']"] == ("heads", "relpos_buckets")
  assert flat["['decoder']['logits_dense']['kernel']"] == ("embed", "vocab")
  assert flat["['decoder']['layers_0']['mlp']['wi_1']['kernel']"] == ("embed", "mlp")


def test_bfloat16_activations_keep_float32_params_and_logits_close():
  config = t5_lib.get_config("tiny")
  params = t5_lib.init_params(config, jax.random.PRNGKey(1))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jnp.array([[5, 9, 3, 1, 0, 0]]), jnp.array([[0, 4, 7, 2]])
  full = t5_lib.T5(config).apply({"params": params}, *tokens)
  half = t5_lib.T5(config.replace(dtype="bfloat16")).apply({"params": params}, *tokens)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=0.15, rtol=0.05)


def test_sharded_forward_equals_single_device():
  config = t5_lib.get_config("tiny")
  model = t5_lib.T5(config)
  mesh = partitioning.make_mesh((2, 2, 2))
  rng = np.random.default_rng(0)
  encoder_tokens = rng.integers(0, config.vocab_size, (8, 12)).astype(np.int32)
  decoder_tokens = rng.integers(0, config.vocab_size, (8, 10)).astype(np.int32)

  def init(key):
    return model.init(key, encoder_tokens[:1], decoder_tokens[:1])["params"]

  sharded_params = partitioning.sharded_init(init, jax.random.PRNGKey(0), mesh)
  single_params = jax.device_get(sharded_params)
  expected = model.apply({"params": single_params}, encoder_tokens, decoder_tokens)

  batch_sharding = partitioning.batch_sharding(mesh)
  with partitioning.activate(mesh):
    forward = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
    logits = forward(sharded_params, jax.device_put(encoder_tokens, batch_sharding),
                     jax.device_put(decoder_tokens, batch_sharding))
  kernel = sharded_params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_indivisible_shapes_and_batches_fail_with_numbers():
  mesh = partitioning.make_mesh((2, 2, 2))
  config = t5_lib.get_config("tiny", num_heads=3, head_dim=8)
  with pytest.raises(ValueError, match=r"rel_embedding.*dimension 3 of shape \(3, 32\)"):
    partitioning.params_shardings(t5_lib.abstract_params(config), mesh)
  with pytest.raises(ValueError, match=r"batch size 6 does not split .* 4 devices"):
    partitioning.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match=r"needs 16 devices, 8 are available"):
    partitioning.make_mesh((4, 2, 2))

"""The model's optional paths (T5Config.remat, scan_layers, attention) against the plain model.

Each path must give the plain model's logits, sequence scores and gradients on the tiny config;
the scanned tree must be exactly `stack_layers` of the unrolled one, and the converter lossless on
a real T5X checkpoint.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import checkpoints, decoding, scoring
from dro_jax.models import scan as scan_lib
from dro_jax.models import t5 as t5_lib

# Right-padded encoder rows (one long, one short) and decoder rows with padding at the end.
ENCODER = np.array([[5, 9, 13, 7, 21, 4, 3, 1], [17, 6, 1, 0, 0, 0, 0, 0]], np.int32)
TARGETS = np.array([[8, 3, 11, 1, 0, 0], [12, 19, 7, 15, 2, 1]], np.int32)
DECODER_INPUTS = np.concatenate([np.zeros((2, 1), np.int32), TARGETS[:, :-1]], axis=1)


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _assert_trees_close(actual, expected, rtol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(expected)):
    assert np.shape(a) == np.shape(b), jax.tree_util.keystr(path)
    assert _relative_error(a, b) <= rtol, (jax.tree_util.keystr(path), _relative_error(a, b))


@functools.lru_cache(maxsize=None)
def _value_and_grad(config: t5_lib.T5Config, deterministic: bool = True):
  model = t5_lib.T5(config)

  def loss(params, rng):
    rngs = None if deterministic else {"dropout": rng}
    scores = scoring.score(model, params, ENCODER, DECODER_INPUTS, TARGETS,
                           deterministic=deterministic, rngs=rngs)
    return -jnp.sum(scores["logps"]), scores["logps"]

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def plain():
  config = t5_lib.get_config("tiny")
  params = jax.jit(t5_lib.init_params, static_argnums=0)(config, jax.random.PRNGKey(0))
  (loss, logps), grads = _value_and_grad(config)(params, jax.random.PRNGKey(1))
  return config, params, loss, logps, grads


def test_the_levers_are_config_keys_and_validated():
  from dro_jax import configs
  config = configs.base_config("dpo", configs.parse_arg("", "dpo"))
  for key, default in (("remat", "none"), ("scan_layers", False), ("attention", "xla")):
    assert config.model[key] == default
    assert getattr(t5_lib.T5Config(), key) == default
  with pytest.raises(ValueError, match=r"T5Config.remat.*'sometimes'"):
    t5_lib.get_config("tiny", remat="sometimes")
  with pytest.raises(ValueError, match=r"T5Config.attention.*'flash'"):
    t5_lib.get_config("tiny", attention="flash")
  with pytest.raises(ValueError, match=r"T5Config.scan_layers"):
    t5_lib.get_config("tiny", scan_layers="yes")


# Full remat without scan runs in the dropout test, scan with minimal remat in the engine test.
@pytest.mark.parametrize("levers", [dict(remat="minimal"), dict(scan_layers=True, remat="full")])
def test_remat_and_scan_give_the_plain_loss_and_gradients(plain, levers):
  config, params, loss, logps, grads = plain
  lever_config = config.replace(**levers)
  scanned = lever_config.scan_layers
  lever_params = scan_lib.stack_layers(params, config) if scanned else params
  (lever_loss, lever_logps), lever_grads = _value_and_grad(lever_config)(
      lever_params, jax.random.PRNGKey(1))
  assert _relative_error(lever_loss, loss) <= 1e-6
  assert _relative_error(lever_logps, logps) <= 1e-6
  expected = scan_lib.stack_layers(grads, config) if scanned else grads
  _assert_trees_close(lever_grads, expected, 1e-5)


def test_remat_and_scan_are_in_the_traced_gradient():
  config = t5_lib.get_config("tiny")
  shapes = jax.eval_shape(lambda: t5_lib.init_params(config, jax.random.PRNGKey(0)))

  def gradient_jaxpr(**levers) -> str:
    lever_config = config.replace(**levers)
    params = scan_lib.stack_layers(shapes, config) if lever_config.scan_layers else shapes
    loss = lambda p: t5_lib.T5(lever_config).apply({"params": p}, ENCODER, DECODER_INPUTS).sum()
    return str(jax.make_jaxpr(jax.grad(loss))(params))

  plain_jaxpr = gradient_jaxpr()
  assert "remat" not in plain_jaxpr and "scan[" not in plain_jaxpr
  assert "only_if_no_batch_dims=True" in gradient_jaxpr(remat="minimal")
  full = gradient_jaxpr(remat="full", scan_layers=True)
  assert "remat" in full and "scan[" in full and "only_if_no_batch_dims" not in full


def test_remat_keeps_dropout_identical(plain):
  """deterministic=False goes through remat as a static argument; the same rng, the same mask."""
  config, params, *_ = plain
  # One layer per stack halves the compile time: the plain params without their layers_1.
  params = {name: ({key: value for key, value in tree.items() if key != "layers_1"}
                   if name in ("encoder", "decoder") else tree) for name, tree in params.items()}
  dropout = config.replace(num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.25)

  @functools.partial(jax.jit, static_argnums=0)
  def logps(model_config, rng):
    return scoring.score(t5_lib.T5(model_config), params, ENCODER, DECODER_INPUTS, TARGETS,
                         deterministic=False, rngs={"dropout": rng})["logps"]

  rng = jax.random.key(7, impl="rbg")  # compiles far faster than threefry on CPU
  expected = logps(dropout, rng)
  assert _relative_error(logps(dropout.replace(remat="full"), rng), expected) <= 1e-6
  # Dropout did act: another rng, another mask (the same executable).
  assert _relative_error(logps(dropout, jax.random.key(8, impl="rbg")), expected) > 1e-3


def test_scanned_parameter_tree_is_stack_layers_of_the_unrolled_one():
  config = t5_lib.get_config("t5_1_0_tiny", num_encoder_layers=3)
  scanned_config = config.replace(scan_layers=True)
  unrolled = nn.unbox(t5_lib.abstract_params(config))
  scanned = nn.unbox(t5_lib.abstract_params(scanned_config))
  expected = scan_lib.stack_layers(unrolled, config)
  assert jax.tree.structure(scanned) == jax.tree.structure(expected)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), scanned) == jax.tree.map(
      lambda x: (x.shape, x.dtype), expected)
  assert scanned["encoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (3, 32, 64)
  # init_params gives arrays of the same tree; the logical axes lead with "layers".
  initialised = jax.eval_shape(lambda: t5_lib.init_params(scanned_config, jax.random.PRNGKey(0)))
  assert jax.tree.map(lambda x: x.shape, initialised) == jax.tree.map(lambda x: x.shape, scanned)
  axes = t5_lib.logical_axes(scanned_config)
  assert tuple(axes["decoder"]["layers"]["self_attention"]["query"]["kernel"]) == (
      "layers", "embed", "joined_kv")
  assert tuple(axes["decoder"]["relpos_bias"]["rel_embedding"]) == ("heads", "relpos_buckets")
  # The converter goes back, and refuses a tree that does not fit the config.
  assert jax.tree.map(lambda x: x.shape, scan_lib.unstack_layers(expected, config)) == \
      jax.tree.map(lambda x: x.shape, unrolled)
  with pytest.raises(ValueError, match="encoder"):
    scan_lib.stack_layers(unrolled, config.replace(num_encoder_layers=2))
  with pytest.raises(ValueError, match="not a scanned stack"):
    scan_lib.unstack_layers(unrolled, config)


def test_the_converter_round_trips_a_t5x_checkpoint_and_the_scanned_model_matches_t5x(
    fixtures_dir):
  folder = fixtures_dir / "t5x" / "t5_1_1_tiny"
  config, params = checkpoints.load_t5x(str(folder / "checkpoint_1000"), dtype="float32")
  reference = dict(np.load(folder / "reference_outputs.npz"))
  stacked = scan_lib.stack_layers(params, config)
  back = scan_lib.unstack_layers(stacked, config)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  scanned_config = config.replace(scan_layers=True, remat="minimal")
  assert scan_lib.to_config_layout(params, scanned_config)["encoder"].keys() == \
      stacked["encoder"].keys()
  logits = np.asarray(t5_lib.T5(scanned_config).apply(
      {"params": stacked}, reference["encoder_input_tokens"], reference["decoder_input_tokens"]))
  valid = reference["decoder_target_tokens"] > 0
  error = np.abs(logits - reference["logits"])[valid].max()
  assert error <= 1e-5 * np.abs(reference["logits"][valid]).max()


def test_unrolled_checkpoints_read_straight_into_scanned_shards(fixtures_dir):
  from dro_jax import partitioning
  path = str(fixtures_dir / "t5x" / "t5_1_1_tiny" / "checkpoint_1000")
  config, params = checkpoints.load_t5x(path, dtype="float32")
  scanned_config = config.replace(scan_layers=True)
  mesh = partitioning.make_mesh((2, 2, 2))
  shardings = partitioning.params_shardings(t5_lib.abstract_params(scanned_config), mesh)
  read = scan_lib.read_in_layout(lambda s: checkpoints.load_t5x(path, s, dtype="float32")[1],
                                 shardings, scanned_config)
  kernel = read["encoder"]["layers"]["attention"]["query"]["kernel"]
  assert tuple(kernel.sharding.spec) == (None, "fsdp", "model")  # "layers" -> replicated
  expected = scan_lib.stack_layers(params, config)
  for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The other way: a scanned run's tree into an unrolled config's shards; abstract trees keep
  # their shardings through the converter.
  unrolled_shardings = partitioning.params_shardings(t5_lib.abstract_params(config), mesh)
  back = scan_lib.read_in_layout(lambda s: read, unrolled_shardings, config, source_scanned=True)
  wo = back["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
  assert tuple(wo.sharding.spec) == ("model", "fsdp")
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(t5_lib.abstract_params(config)), unrolled_shardings)
  assert scan_lib.stack_layers(like, config)["encoder"]["layers"]["mlp"]["wo"]["kernel"] == \
      jax.ShapeDtypeStruct((2, 64, 32), jnp.float32, sharding=read["encoder"]["layers"]["mlp"][
          "wo"]["kernel"].sharding)


def test_per_layer_adafactor_on_stacked_leaves_takes_the_unrolled_steps(plain):
  """Adafactor's parameter scale and update clipping are per leaf: on stacked leaves it needs
  per_layer, and then a scanned run takes exactly the unrolled run's updates."""
  import optax
  config, params, _, _, grads = plain
  # The encoder's tree alone (the converter takes encoder-only trees, as a value network's).
  params, grads = {"encoder": params["encoder"]}, {"encoder": grads["encoder"]}
  # Layers of different scales, as after training: the parameter scale is then per layer.
  params = dict(params, encoder=dict(params["encoder"], layers_1=jax.tree.map(
      lambda x: 10.0 * x, params["encoder"]["layers_1"])))
  adafactor = optax.adafactor(1e-2, multiply_by_parameter_scale=True)
  stacked_params = scan_lib.stack_layers(params, config)
  stacked_grads = scan_lib.stack_layers(grads, config)
  per_layer = optax.multi_transform(
      {scan_lib.STACKED: scan_lib.per_layer(adafactor), scan_lib.UNSTACKED: adafactor},
      scan_lib.stacked_labels)

  def two_steps(tx, p, g):
    def run(p, g):
      state = tx.init(p)
      for _ in range(2):
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
      return p
    return jax.jit(run)(p, g)

  expected = scan_lib.stack_layers(two_steps(adafactor, params, grads), config)
  _assert_trees_close(two_steps(per_layer, stacked_params, stacked_grads), expected, 1e-6)
  # Without per_layer the stacked leaves take different steps.
  whole = two_steps(adafactor, stacked_params, stacked_grads)
  assert _relative_error(whole["encoder"]["layers"]["mlp"]["wo"]["kernel"],
                         expected["encoder"]["layers"]["mlp"]["wo"]["kernel"]) > 1e-3


def test_scanned_cached_decoding_matches_the_unrolled_model(plain):
  config, params, *_ = plain
  sampling = decoding.SamplingParams(max_decode_length=7, temperature=0.0, num_samples=2,
                                     suppress_pad=True, eos_id=1)
  sample = jax.jit(decoding.sample, static_argnames=("config", "sampling"))
  rng = jax.random.PRNGKey(3)
  expected = sample(params, ENCODER, rng, config=config, sampling=sampling)
  scanned_config = config.replace(scan_layers=True, remat="full")
  got = sample(scan_lib.stack_layers(params, config), ENCODER, rng, config=scanned_config,
               sampling=sampling)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(expected.lengths))
  np.testing.assert_allclose(np.asarray(got.logps), np.asarray(expected.logps), rtol=1e-5,
                             atol=1e-6)
  # The scanned caches keep the batch leading: [batch, layers, heads, length, head_dim].
  model = t5_lib.T5(scanned_config)
  stacked = scan_lib.stack_layers(params, config)
  encoded = jax.ShapeDtypeStruct((2, ENCODER.shape[1], config.emb_dim), jnp.float32)
  cache = jax.eval_shape(lambda e: decoding.create_cache(model, stacked, e, ENCODER, 7), encoded)
  attention_cache = cache["decoder"]["layers"]["self_attention"]
  assert attention_cache["cached_key"].shape == (2, 2, 4, 7, 8)
  assert "cache_index" not in attention_cache


@pytest.mark.parametrize("attention", ["auto", "fused_xla"])
def test_attention_paths_match_the_einsum_path_on_cpu(plain, attention):
  """On CPU "auto" falls back to the einsum path; "fused_xla" runs jax.nn.dot_product_attention
  with the lengths / is_causal / scale=1 interface cuDNN gets, so its masking is checked here."""
  config, params, loss, logps, grads = plain
  fused = config.replace(attention=attention)
  (fused_loss, fused_logps), fused_grads = _value_and_grad(fused)(params, jax.random.PRNGKey(1))
  assert _relative_error(fused_loss, loss) <= 1e-6
  assert _relative_error(fused_logps, logps) <= 1e-6
  _assert_trees_close(fused_grads, grads, 1e-5)
  for stack in ("encoder", "decoder"):
    relpos = fused_grads[stack]["relpos_bias"]["rel_embedding"]
    assert np.abs(np.asarray(relpos)).max() > 0


def test_fused_attention_keeps_an_all_padding_row_finite(plain):
  config, params, *_ = plain
  encoder = np.concatenate([ENCODER, np.zeros((1, ENCODER.shape[1]), np.int32)])
  decoder = np.concatenate([DECODER_INPUTS, np.zeros((1, DECODER_INPUTS.shape[1]), np.int32)])
  fused = config.replace(attention="fused_xla")
  logits = np.asarray(jax.jit(t5_lib.T5(fused).apply)({"params": params}, encoder, decoder))
  assert np.isfinite(logits).all()
  assert t5_lib.sequence_lengths(jnp.asarray(encoder)).tolist() == [8, 3, 1]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off GPU")
def test_cudnn_attention_refuses_clearly_off_gpu(plain):
  config, params, *_ = plain
  with pytest.raises(ValueError, match=r"attention='cudnn' cannot run: the backend is 'cpu'.*"
                                       r"dtype is float32.*attention='auto'"):
    t5_lib.T5(config.replace(attention="cudnn")).apply({"params": params}, ENCODER,
                                                       DECODER_INPUTS)
  with pytest.raises(ValueError, match=r"head_dim 12 is not a multiple of 8"):
    t5_lib.attention_implementation(config.replace(attention="cudnn", head_dim=12,
                                                   dtype="bfloat16"), 8, 8)
  # "auto" never picks cuDNN off GPU, nor for float32 or an unsupported head_dim.
  assert t5_lib.attention_implementation(config.replace(attention="auto"), 8, 8) == "einsum"


# GPU ONLY: the one test skipped on CPU. It compares cuDNN attention with the einsum path in
# bfloat16 (logits, scores and gradients of every parameter), with padded encoder rows.
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_the_einsum_path_on_gpu():
  config = t5_lib.get_config("tiny", dtype="bfloat16", head_dim=16)
  params = t5_lib.init_params(config, jax.random.PRNGKey(0))
  assert t5_lib.attention_implementation(config.replace(attention="auto"), 6, 8) == "cudnn"
  (loss, logps), grads = _value_and_grad(config)(params, jax.random.PRNGKey(1))
  for attention in ("cudnn", "auto"):
    (fused_loss, fused_logps), fused_grads = _value_and_grad(config.replace(
        attention=attention))(params, jax.random.PRNGKey(1))
    # bfloat16 activations: agreement to bfloat16 resolution, not float32's.
    np.testing.assert_allclose(np.asarray(fused_logps), np.asarray(logps), rtol=2e-2, atol=2e-2)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(grads)):
      assert _relative_error(a, b) <= 5e-2
    assert abs(float(fused_loss) - float(loss)) <= 2e-2 * abs(float(loss))


# -------------------------------------------------------------------------- through the engine


@pytest.mark.slow
def test_a_scanned_run_takes_the_unrolled_runs_steps_from_a_t5x_checkpoint(fixtures_dir, tmp_path):
  """DRO-V with Adafactor (the optimizer's per-matrix statistics per stacked layer), started from
  a real T5X checkpoint read into the scanned layout: the same losses and parameters as the
  unrolled run; the exported HF tensors are the same too."""
  from dro_jax import configs, export, partitioning, step as step_lib, train
  from test_engine import make_batch

  def two_steps(scan_layers: bool):
    config = configs.load("dro", "size=tiny")
    config.batch_size = 16
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-2
    config.model.scan_layers = scan_layers
    config.model.remat = "minimal" if scan_layers else "none"
    config.init_checkpoint = str(fixtures_dir / "t5x" / "t5_1_1_tiny" / "checkpoint_1000")
    config.mesh_shape = (2, 2, 1)
    mesh = partitioning.mesh_from_config(config, devices=jax.devices()[:4])
    rules = partitioning.rules_from_config(config)
    model_config = step_lib.t5_config(config)
    abstract, shardings = train.state_layout(config, model_config, mesh, rules)
    state = train.build_state(config, model_config, mesh, rules, abstract, shardings)
    batch = make_batch()
    train_step, layout = train.compile_step(config, mesh, rules, shardings, batch)
    losses = []
    for _ in range(2):
      state, metrics = train_step(state, train.device_batch(batch, layout))
      losses.append(float(metrics["loss"]))
    return model_config, jax.device_get(state.policy), losses

  unrolled_config, unrolled, unrolled_losses = two_steps(False)
  scanned_config, scanned, scanned_losses = two_steps(True)
  assert scan_lib.is_scanned(scanned) and not scan_lib.is_scanned(unrolled)
  np.testing.assert_allclose(scanned_losses, unrolled_losses, rtol=1e-5)
  _assert_trees_close(scan_lib.unstack_layers(scanned, scanned_config), unrolled, 2e-5)
  exported = export.hf_tensors(scanned, scanned_config)
  for name, tensor in export.hf_tensors(unrolled, unrolled_config).items():
    np.testing.assert_allclose(exported[name], tensor, rtol=2e-5, atol=1e-6, err_msg=name)


def test_init_from_a_workdir_of_the_other_layout(tmp_path):
  """A run reads a workdir's policy whichever layer layout either run uses. (The driver test
  runs a scanned recipe through the whole loop and checks its checkpoint is scanned.)"""
  from dro_jax import checkpoint_manager, configs, partitioning, step as step_lib, train

  def layout(scan_layers: bool):
    config = configs.load("sft", "size=tiny")
    config.model.scan_layers = scan_layers
    config.mesh_shape = (1, 1, 1)
    mesh = partitioning.mesh_from_config(config, devices=jax.devices()[:1])
    rules = partitioning.rules_from_config(config)
    model_config = step_lib.t5_config(config)
    abstract, shardings = train.state_layout(config, model_config, mesh, rules)
    return config, mesh, rules, model_config, abstract, shardings

  # Each layout's workdir (a saved state and its config.json), read by a run of the other.
  for source_scanned in (True, False):
    config, mesh, rules, model_config, abstract, shardings = layout(source_scanned)
    rng = np.random.default_rng(int(source_scanned))  # random values, placed without a compile
    state = jax.tree.map(
        lambda x, s: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype) if
                                    jnp.issubdtype(x.dtype, jnp.floating)
                                    else np.zeros(x.shape, x.dtype), s), abstract, shardings)
    source = str(tmp_path / f"scanned_{source_scanned}")
    checkpointer = checkpoint_manager.Checkpointer(source, async_save=False)
    checkpointer.save(state, {"epoch": 0})
    checkpointer.close()
    train.write_text(f"{source}/config.json", config.to_json_best_effort())
    saved = jax.device_get(state.policy)
    assert scan_lib.is_scanned(saved) == source_scanned
    config, _, _, model_config, abstract, shardings = layout(not source_scanned)
    loaded = train.load_init_policy(config, source, abstract.policy, shardings.policy)
    assert scan_lib.is_scanned(loaded) == (not source_scanned)
    expected = (scan_lib.unstack_layers(saved, model_config) if source_scanned
                else scan_lib.stack_layers(saved, model_config))
    _assert_trees_close(loaded, expected, 0.0)

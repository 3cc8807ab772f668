"""Reference updates: frozen, soft EMA (closed form, float32, lr 1e-6), hard sync, hybrid,
no aliasing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_jax import losses, reference, scoring
from dro_jax.models import t5 as t5_lib


@pytest.fixture(scope="module")
def tiny():
  config = t5_lib.get_config("tiny")
  return t5_lib.T5(config), t5_lib.init_params(config, jax.random.PRNGKey(0))


@jax.jit
def _sgd_like_step(params, key, learning_rate):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x - learning_rate * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


def _trajectory(params, steps, learning_rate, seed=0):
  """θ_t = θ_{t−1} − lr·g_t in float32, g_t standard normal (an SGD-like path)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), steps)
  path = [params]
  for key in keys:
    path.append(_sgd_like_step(path[-1], key, jnp.float32(learning_rate)))
  return path


def _numpy_rule(path, alpha, sync_every):
  """The rule in float64 numpy: if t % sync_every == 0: ref ← α·θ_t + (1−α)·ref."""
  ref = [np.asarray(x, np.float64) for x in jax.tree.leaves(path[0])]
  for t in range(1, len(path)):
    if t % sync_every == 0:
      ref = [alpha * np.asarray(p, np.float64) + (1 - alpha) * r
             for p, r in zip(jax.tree.leaves(path[t]), ref)]
  return ref


def _run(path, alpha, sync_every):
  traces = []

  @jax.jit
  def update(ref, params, step):
    traces.append(step)
    return reference.update(ref, params, step, alpha=alpha, sync_every=sync_every)

  ref = reference.init(path[0])
  for t in range(1, len(path)):
    ref = update(ref, path[t], jnp.int32(t))
  assert len(traces) == 1  # the step is traced, not branched on: one trace serves every step
  return ref


@pytest.mark.parametrize("learning_rate", [1e-2, 1e-6])
def test_soft_update_is_the_closed_form_ema_in_float32(tiny, learning_rate):
  _, params = tiny
  steps, alpha = 12, 0.6
  path = _trajectory(params, steps, learning_rate)
  ref = _run(path, alpha, 1)
  # Closed form: ref_n = (1−α)^n·θ_0 + Σ_t α(1−α)^{n−t}·θ_t, in float64.
  closed = [(1 - alpha) ** steps * np.asarray(x, np.float64) for x in jax.tree.leaves(path[0])]
  for t in range(1, steps + 1):
    weight = alpha * (1 - alpha) ** (steps - t)
    closed = [c + weight * np.asarray(p, np.float64) for c, p in
              zip(closed, jax.tree.leaves(path[t]))]
  largest = [np.max([np.abs(np.asarray(leaf)) for leaf in leaves], axis=0)
             for leaves in zip(*[jax.tree.leaves(p) for p in path])]
  for got, want, start, scale in zip(jax.tree.leaves(ref), closed, jax.tree.leaves(path[0]),
                                     largest):
    assert got.dtype == jnp.float32
    got, start = np.asarray(got, np.float64), np.asarray(start, np.float64)
    # Rounding of each step decays geometrically: a few float32 ulps of the path's magnitude.
    ulp = np.spacing(scale.astype(np.float32)).astype(np.float64)
    np.testing.assert_array_less(np.abs(got - want), 4 * ulp + 1e-30)
    # At lr 1e-6 the update is still tracked: the drift matches the closed form's.
    drift, want_drift = got - start, want - start
    assert np.linalg.norm(drift - want_drift) < 0.05 * np.linalg.norm(want_drift)


def test_soft_update_refuses_a_bfloat16_reference(tiny):
  _, params = tiny
  bf16_ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  # What a bfloat16 copy would do at lr 1e-6: the update rounds away entirely.
  leaf = jax.tree.leaves(bf16_ref)[0]
  moved = (0.6 * (leaf.astype(jnp.float32) - 1e-6) + 0.4 * leaf.astype(jnp.float32))
  assert bool(jnp.all(moved.astype(jnp.bfloat16) == leaf))
  with pytest.raises(ValueError, match="float32 master copy"):
    reference.update(bf16_ref, params, 1, alpha=0.6, sync_every=1)
  # Frozen and hard-synced bfloat16 references are exact, so they are allowed.
  reference.update(bf16_ref, params, 1, alpha=0.0, sync_every=1)
  reference.update(bf16_ref, params, 1, alpha=1.0, sync_every=4)


@pytest.mark.parametrize("alpha, sync_every", [(0.6, 4), (1.0, 3), (0.0, 1)])
def test_every_schedule_follows_the_rule(tiny, alpha, sync_every):
  _, params = tiny
  path = _trajectory(params, 9, 1e-2, seed=1)
  ref = _run(path, alpha, sync_every)
  for got, want in zip(jax.tree.leaves(ref), _numpy_rule(path, alpha, sync_every)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)


def test_init_copies_and_presets():
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  ref = reference.init(params)
  assert ref["w"].dtype == jnp.float32
  assert ref["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
  f32 = {"w": jnp.ones((3,))}
  copied = reference.update(reference.init(f32), f32, 5, alpha=1.0, sync_every=1)
  assert copied["w"].unsafe_buffer_pointer() != f32["w"].unsafe_buffer_pointer()
  assert reference.PRESETS["trl"] == {"alpha": 0.6, "sync_every": 512}
  assert reference.PRESETS["hard"]["alpha"] == 1.0
  with pytest.raises(ValueError, match="stale"):
    reference.validate(0.6, 1, precomputed_ref_logps=True)
  reference.validate(0.0, 1, precomputed_ref_logps=True)
  with pytest.raises(ValueError):
    reference.validate(1.5, 1)
  with pytest.raises(ValueError):
    reference.validate(1.0, 0)


# ----------------------------------------------------------------------------------------------
# Hard sync inside a donated train step on the tiny T5, for DPO, IPO and KTO alike.


def _pair_batch(rng, batch=4, source=6, target=5):
  def tokens(length):
    array = rng.integers(2, 256, size=(batch, length)).astype(np.int32)
    array[1, length - 2:] = 0
    return array

  chosen, rejected = tokens(target), tokens(target)
  shift = lambda t: np.concatenate([np.zeros((batch, 1), np.int32), t[:, :-1]], 1)
  return {"encoder_input_tokens": jnp.asarray(tokens(source)),
          "chosen_decoder_target_tokens": jnp.asarray(chosen),
          "chosen_decoder_input_tokens": jnp.asarray(shift(chosen)),
          "rejected_decoder_target_tokens": jnp.asarray(rejected),
          "rejected_decoder_input_tokens": jnp.asarray(shift(rejected))}


def _loss(name, policy, ref):
  if name == "dpo":
    return losses.dpo_loss(policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"],
                           ref["rejected_logps"], beta=0.1)
  if name == "ipo":
    return losses.ipo_loss(policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"],
                           ref["rejected_logps"], tau=0.1, chosen_lengths=policy["chosen_lengths"],
                           rejected_lengths=policy["rejected_lengths"])
  # KTO: the rejected responses stand in for the mismatched pairs.
  desirable = jnp.array([True, False, True, False])
  return losses.kto_loss(policy["chosen_logps"], ref["chosen_logps"], policy["rejected_logps"],
                         ref["rejected_logps"], desirable, beta=0.1)


@pytest.mark.parametrize("loss_name", ["dpo", "ipo", "kto"])
def test_hard_sync_copies_exactly_at_multiples_of_tau(tiny, loss_name):
  model, params = tiny
  sync_every = 3
  batch = _pair_batch(np.random.default_rng(2))
  optimizer = optax.adam(1e-2)

  def train_step(state, batch):
    def loss_fn(p):
      policy = scoring.score_pairs(model, p, batch)
      ref = scoring.score_pairs(model, state["ref"], batch)
      loss, metrics = _loss(loss_name, policy, ref)
      return losses.reduce_loss(loss), metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    ref = reference.update(state["ref"], new_params, step, alpha=1.0, sync_every=sync_every)
    return {"params": new_params, "ref": ref, "opt_state": opt_state, "step": step}, metrics

  step_fn = jax.jit(train_step, donate_argnums=0)
  score_fn = jax.jit(lambda p: scoring.score_pairs(model, p, batch)["chosen_logps"])
  own = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  state = {"params": own(params), "ref": reference.init(params),
           "opt_state": optimizer.init(params), "step": jnp.int32(0)}
  last_synced = jax.tree.map(np.asarray, params)
  for t in range(1, 8):
    state, metrics = step_fn(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    current = jax.tree.map(np.asarray, state["params"])
    ref = jax.tree.map(np.asarray, state["ref"])
    if t % sync_every == 0:
      jax.tree.map(np.testing.assert_array_equal, ref, current)
      last_synced = current
      # Right after a sync ℓ = 0 exactly: the same log-probs to the last bit.
      np.testing.assert_array_equal(np.asarray(score_fn(state["params"])),
                                    np.asarray(score_fn(state["ref"])))
    else:
      jax.tree.map(np.testing.assert_array_equal, ref, last_synced)
      assert not np.array_equal(np.asarray(score_fn(state["params"])),
                                np.asarray(score_fn(state["ref"])))
    # Donation is safe: the reference never shares a buffer with the policy.
    for p, r in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["ref"])):
      assert p.unsafe_buffer_pointer() != r.unsafe_buffer_pointer()
  # Step 7's loss was computed from the state synced at step 6, before its own update: ℓ = 0.
  assert float(metrics["logratio/mean"]) == 0.0

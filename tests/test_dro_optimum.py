"""DRO-V recovers its closed-form optimum on a tabular problem; without V it does not.

A few prompts, a finite response set, arbitrary π_ref and rewards, and an offline dataset drawn
from a behaviour policy μ (full support, μ ≠ π_ref). A softmax policy table and a value table are
trained on minibatches (with padding rows) by the project's dro_loss and joint optimizer (AdamW,
the 1/τ policy-update scale, a separate value learning rate). The optimum is
π* ∝ π_ref·exp(r/τ) and V* = τ·log E_{π_ref}[exp(r/τ)], whatever μ is.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import losses, optim

PROMPTS, RESPONSES, DATASET, BATCH, PADDING, STEPS = 3, 5, 512, 64, 8, 4000


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  pi_ref = rng.dirichlet(np.ones(RESPONSES), size=PROMPTS)
  rewards = rng.normal(size=(PROMPTS, RESPONSES))
  mu = 0.5 * rng.dirichlet(np.ones(RESPONSES), size=PROMPTS) + 0.5 / RESPONSES
  prompts = rng.integers(0, PROMPTS, size=DATASET)
  responses = np.array([rng.choice(RESPONSES, p=mu[x]) for x in prompts])
  assert len(set(zip(prompts, responses))) == PROMPTS * RESPONSES  # μ's support is covered
  return pi_ref, rewards, prompts, responses


def _train(problem, tau: float, learn_value: bool, learning_rate: float = 0.02,
           value_learning_rate: float = 0.05, steps: int = STEPS):
  pi_ref, rewards, prompts, responses = problem
  config = optim.default_config()
  config.name = "adamw"
  config.learning_rate = learning_rate
  config.value_learning_rate = value_learning_rate
  config.warmup_steps = 0
  optimizer = optim.make_joint_optimizer(config, tau=tau)
  log_ref = jnp.log(jnp.asarray(pi_ref, jnp.float32))
  reward_table = jnp.asarray(rewards, jnp.float32)
  data_x, data_y = jnp.asarray(prompts), jnp.asarray(responses)
  weights = (jnp.arange(BATCH) < BATCH - PADDING).astype(jnp.float32)

  def loss_fn(params, x, y):
    logps = jax.nn.log_softmax(params["policy"], axis=-1)
    values = params["value"][x] if learn_value else jnp.zeros(x.shape)
    loss, _ = losses.dro_loss(logps[x, y], log_ref[x, y], values, reward_table[x, y], tau=tau,
                              weights=weights)
    return losses.reduce_loss(loss, weights)

  @jax.jit
  def train(params, key):
    def step(carry, key):
      params, state = carry
      index = jax.random.randint(key, (BATCH,), 0, DATASET)
      # Padding rows point at garbage (a different prompt/response); weight 0 removes them.
      x = jnp.where(weights > 0, data_x[index], 0)
      y = jnp.where(weights > 0, data_y[index], RESPONSES - 1)
      updates, state = optimizer.update(jax.grad(loss_fn)(params, x, y), state, params)
      return (jax.tree.map(jnp.add, params, updates), state), None

    carry = (params, optimizer.init(params))
    return jax.lax.scan(step, carry, jax.random.split(key, steps))[0][0]

  init = {"policy": jax.random.normal(jax.random.PRNGKey(1), (PROMPTS, RESPONSES)),
          "value": jnp.zeros(PROMPTS)}
  params = train(init, jax.random.PRNGKey(0))
  policy = np.asarray(jax.nn.softmax(params["policy"], axis=-1), np.float64)
  return policy, np.asarray(params["value"], np.float64)


def _optimum(problem, tau):
  pi_ref, rewards, _, _ = problem
  tilted = pi_ref * np.exp(rewards / tau)
  return tilted / tilted.sum(-1, keepdims=True), tau * np.log(tilted.sum(-1))


def _total_variation(p, q):
  return float(0.5 * np.abs(p - q).sum(-1).max())


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_dro_v_converges_to_the_closed_form_optimum(problem, tau):
  policy, values = _train(problem, tau, learn_value=True)
  pi_star, v_star = _optimum(problem, tau)
  assert _total_variation(policy, pi_star) < 1e-2
  np.testing.assert_allclose(values, v_star, atol=1e-2)


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_without_a_value_function_the_optimum_is_missed(problem, tau):
  policy, _ = _train(problem, tau, learn_value=False)
  pi_star, _ = _optimum(problem, tau)
  # Off-policy data: dropping V biases the fit towards μ's least-squares solution.
  assert _total_variation(policy, pi_star) > 3e-2

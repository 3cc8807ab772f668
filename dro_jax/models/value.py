"""Value functions V(x) for DRO-V: the four variants of the DRO paper's ablation (docs/methods.md).

| name              | parameters                                    |
|-------------------|-----------------------------------------------|
| double_multiple   | own T5 encoder (from the policy's) + head     |
| double_single     | one scalar                                    |
| single_multiple   | head on the POLICY's encoder output           |
| single_single     | one scalar in the policy's trainable tree     |

Every variant is called as `value_fn(value_params, policy_params, encoder_input_tokens) ->
values [B]` in float32. The trainable tree of a DRO-V run is {"policy": θ, "value": φ}. By
default (`config.dro.value_optimizer="value"`) φ gets the value optimizer in every variant
(optim.py: on the policy's chain a zero-initialised value barely moves), so single_single then
trains exactly as double_single; `value_optimizer="policy"` puts a single-net variant's φ on the
POLICY's chain, as the DRO paper's ablation (double-net variants keep the value chain either way).
`trained_with_policy` marks the single-net variants. The head mean-pools the
encoder output over the prompt's real tokens (token != 0) and is zero-initialised, so V ≡ 0 at
step 0. Dropout is off.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from dro_jax.models import t5 as t5_lib

Array = jax.Array
PyTree = Any


def scale_gradient(x: Array, scale: float | Array) -> Array:
  """Identity forward (exactly: x + scale·0), gradient multiplied by `scale` (may be traced)."""
  frozen = jax.lax.stop_gradient(x)
  return frozen + scale * (x - frozen)


def masked_mean_pool(encoded_BxSxE: Array, mask_BxS: Array) -> Array:
  """Float32 mean over the valid positions; an empty prompt pools to 0."""
  mask_BxS = mask_BxS.astype(jnp.float32)
  # HIGHEST: on TPU a default-precision float32 matmul rounds its inputs to bfloat16.
  total_BxE = jnp.einsum("bse,bs->be", encoded_BxSxE.astype(jnp.float32), mask_BxS,
                         precision=jax.lax.Precision.HIGHEST)
  return total_BxE / jnp.maximum(jnp.sum(mask_BxS, axis=1), 1.0)[:, None]


class ValueHead(nn.Module):
  """Masked mean-pool -> dense -> scalar, in float32, zero-initialised."""

  @nn.compact
  def __call__(self, encoded_BxSxE: Array, mask_BxS: Array) -> Array:
    pooled_BxE = masked_mean_pool(encoded_BxSxE, mask_BxS)
    zeros = nn.initializers.zeros
    kernel = self.param("kernel", nn.with_logical_partitioning(zeros, ("embed", None)),
                        (pooled_BxE.shape[-1], 1), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(zeros, (None,)), (1,), jnp.float32)
    values_Bx1 = jnp.dot(pooled_BxE, kernel, precision=jax.lax.Precision.HIGHEST)
    return (values_Bx1 + bias)[:, 0]


class EncoderValueNetwork(nn.Module):
  """A T5 encoder (t5x parameter names: token_embedder, encoder) with a ValueHead."""

  config: t5_lib.T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = t5_lib.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = t5_lib.Encoder(cfg, self.token_embedder)
    self.head = ValueHead()

  def __call__(self, encoder_input_tokens: Array) -> Array:
    encoded = self.encoder(encoder_input_tokens, deterministic=True)
    return self.head(encoded, encoder_input_tokens > 0)


class ValueFunction(Protocol):
  trained_with_policy: bool

  def init(self, policy_params: PyTree, rng: Array) -> PyTree: ...

  def abstract_params(self) -> PyTree: ...

  def __call__(self, value_params: PyTree, policy_params: PyTree,
               encoder_input_tokens: Array) -> Array: ...


def _copy(tree: PyTree) -> PyTree:
  # Own buffers: the value encoder must not alias the policy's when the state is donated.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _dummy_tokens() -> Array:
  return jnp.ones((1, 2), jnp.int32)


class DoubleNetMultipleValues:
  """Separate encoder (initialised from the policy's encoder) + head; the paper's best."""

  trained_with_policy = False

  def __init__(self, config: t5_lib.T5Config, value_loss_weight: float = 1.0):
    self.config = config
    self.network = EncoderValueNetwork(config.replace(dropout_rate=0.0))
    del value_loss_weight  # separate networks: φ gets exactly ∂L/∂φ, with its own optimizer

  def abstract_params(self) -> PyTree:
    return jax.eval_shape(self.network.init, jax.random.PRNGKey(0), _dummy_tokens())["params"]

  def init(self, policy_params: PyTree, rng: Array) -> PyTree:
    head = ValueHead().init(rng, jnp.zeros((1, 1, self.config.emb_dim)), jnp.ones((1, 1)))
    return {"token_embedder": _copy(policy_params["token_embedder"]),
            "encoder": _copy(policy_params["encoder"]),
            "head": nn.unbox(head["params"])}

  def __call__(self, value_params: PyTree, policy_params: PyTree,
               encoder_input_tokens: Array) -> Array:
    del policy_params  # V has no path to θ: the policy gets no value gradient.
    return self.network.apply({"params": value_params}, encoder_input_tokens)


class _ScalarValue:
  """One learned scalar, V(x) = v for every prompt, zero-initialised."""

  trained_with_policy: bool

  def __init__(self, config: t5_lib.T5Config, value_loss_weight: float = 1.0):
    self.config = config
    # The weight is a single-net setting; a double-net scalar takes exactly ∂L/∂φ.
    self.value_loss_weight = value_loss_weight if self.trained_with_policy else 1.0

  def abstract_params(self) -> PyTree:
    return {"value": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((), jnp.float32), ())}

  def init(self, policy_params: PyTree, rng: Array) -> PyTree:
    del policy_params, rng
    return {"value": jnp.zeros((), jnp.float32)}

  def __call__(self, value_params: PyTree, policy_params: PyTree,
               encoder_input_tokens: Array) -> Array:
    del policy_params
    values = jnp.broadcast_to(value_params["value"].astype(jnp.float32),
                              encoder_input_tokens.shape[:1])
    return scale_gradient(values, self.value_loss_weight)


class DoubleNetSingleValue(_ScalarValue):
  trained_with_policy = False


class SingleNetSingleValue(_ScalarValue):
  trained_with_policy = True


class SingleNetMultipleValues:
  """A head on the policy's encoder output: the shared encoder gets both gradients, the value
  term's weighted by `value_loss_weight`."""

  trained_with_policy = True

  def __init__(self, config: t5_lib.T5Config, value_loss_weight: float = 1.0):
    self.config = config
    self.policy = t5_lib.T5(config.replace(dropout_rate=0.0))
    self.value_loss_weight = value_loss_weight

  def abstract_params(self) -> PyTree:
    encoded = jnp.zeros((1, 1, self.config.emb_dim))
    return {"head": jax.eval_shape(ValueHead().init, jax.random.PRNGKey(0), encoded,
                                   jnp.ones((1, 1)))["params"]}

  def init(self, policy_params: PyTree, rng: Array) -> PyTree:
    del policy_params
    head = ValueHead().init(rng, jnp.zeros((1, 1, self.config.emb_dim)), jnp.ones((1, 1)))
    return {"head": nn.unbox(head["params"])}

  def from_encoded(self, value_params: PyTree, encoded_BxSxE: Array,
                   encoder_input_tokens: Array) -> Array:
    """Values from an encoder output the caller already has (saves a second encoder pass)."""
    values = ValueHead().apply({"params": value_params["head"]}, encoded_BxSxE,
                               encoder_input_tokens > 0)
    return scale_gradient(values, self.value_loss_weight)

  def __call__(self, value_params: PyTree, policy_params: PyTree,
               encoder_input_tokens: Array) -> Array:
    encoded = self.policy.apply({"params": policy_params}, encoder_input_tokens,
                                method=t5_lib.T5.encode)
    return self.from_encoded(value_params, encoded, encoder_input_tokens)


VALUE_FUNCTIONS: dict[str, type] = {
    "double_multiple": DoubleNetMultipleValues,
    "double_single": DoubleNetSingleValue,
    "single_multiple": SingleNetMultipleValues,
    "single_single": SingleNetSingleValue,
}


def make_value_function(name: str, config: t5_lib.T5Config,
                        value_loss_weight: float = 1.0) -> ValueFunction:
  """The variant `name` (a VALUE_FUNCTIONS key) for a policy of shape `config`."""
  if name not in VALUE_FUNCTIONS:
    raise ValueError(f"unknown value function {name!r}; choose from {sorted(VALUE_FUNCTIONS)}")
  return VALUE_FUNCTIONS[name](config, value_loss_weight)

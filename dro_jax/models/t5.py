"""T5 encoder-decoder in Flax linen: T5.1.0 and T5.1.1 / Flan-T5.

The parameter tree uses t5x's names and 2-D attention kernels, so T5X checkpoints map one to one,
and every parameter carries logical axis names (`vocab, embed, joined_kv, mlp, heads,
relpos_buckets`) that partitioning.py maps onto a mesh. Parameters are float32; activations use
`config.dtype`; attention logits and softmax are float32. Padding (token 0) of the encoder input is
masked from the tokens; the decoder is causal, so its padding only affects padded positions.

Decoding uses the flax `cache` collection: `decode=True` on a [batch, 1] decoder input reads and
writes a key/value cache for self-attention, reuses encoder keys/values projected once for
cross-attention, and takes the relative-position bias row of the current cache index. Caches are
heads-major ([batch, heads, length, head_dim]) so each step reads them without a transpose.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e10


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shapes and numerics of a T5 model (hashable, so it can be a static jit argument)."""

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  mlp_dim: int = 1024
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = "bfloat16"
  float32_attention_logits: bool = True

  def __post_init__(self):
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    for activation in self.mlp_activations:
      if activation not in ACTIVATIONS:
        raise ValueError(f"T5Config.mlp_activations: unknown activation {activation!r}; "
                         f"choose from {sorted(ACTIVATIONS)}")

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def replace(self, **changes: Any) -> "T5Config":
    return dataclasses.replace(self, **changes)


ACTIVATIONS = {
    # t5x and Hugging Face's "gelu_new" both use the tanh approximation.
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}

_T5_1_1 = dict(mlp_activations=("gelu", "linear"), logits_via_embedding=False)
_T5_1_0 = dict(mlp_activations=("relu",), logits_via_embedding=True)

PRESETS: dict[str, T5Config] = {
    # T5.1.1 and Flan-T5 share shapes.
    "t5_1_1_small": T5Config(emb_dim=512, num_heads=6, head_dim=64, num_encoder_layers=8,
                             num_decoder_layers=8, mlp_dim=1024, **_T5_1_1),
    "t5_1_1_base": T5Config(emb_dim=768, num_heads=12, head_dim=64, num_encoder_layers=12,
                            num_decoder_layers=12, mlp_dim=2048, **_T5_1_1),
    "t5_1_1_large": T5Config(emb_dim=1024, num_heads=16, head_dim=64, num_encoder_layers=24,
                             num_decoder_layers=24, mlp_dim=2816, **_T5_1_1),
    "t5_1_1_xl": T5Config(emb_dim=2048, num_heads=32, head_dim=64, num_encoder_layers=24,
                          num_decoder_layers=24, mlp_dim=5120, **_T5_1_1),
    "t5_1_1_xxl": T5Config(emb_dim=4096, num_heads=64, head_dim=64, num_encoder_layers=24,
                           num_decoder_layers=24, mlp_dim=10240, **_T5_1_1),
    # T5.1.0: the 3B and 11B models keep d_model=1024 and grow heads and the MLP.
    "t5_1_0_small": T5Config(emb_dim=512, num_heads=8, head_dim=64, num_encoder_layers=6,
                             num_decoder_layers=6, mlp_dim=2048, **_T5_1_0),
    "t5_1_0_base": T5Config(emb_dim=768, num_heads=12, head_dim=64, num_encoder_layers=12,
                            num_decoder_layers=12, mlp_dim=3072, **_T5_1_0),
    "t5_1_0_large": T5Config(emb_dim=1024, num_heads=16, head_dim=64, num_encoder_layers=24,
                             num_decoder_layers=24, mlp_dim=4096, **_T5_1_0),
    "t5_1_0_xl": T5Config(emb_dim=1024, num_heads=32, head_dim=128, num_encoder_layers=24,
                          num_decoder_layers=24, mlp_dim=16384, **_T5_1_0),
    "t5_1_0_xxl": T5Config(emb_dim=1024, num_heads=128, head_dim=128, num_encoder_layers=24,
                           num_decoder_layers=24, mlp_dim=65536, **_T5_1_0),
    # Tiny models for tests and the CPU demo, float32.
    "t5_1_1_tiny": T5Config(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8,
                            num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64,
                            dtype="float32", **_T5_1_1),
    "t5_1_0_tiny": T5Config(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8,
                            num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64,
                            dtype="float32", **_T5_1_0),
}
for _size in ("small", "base", "large", "xl", "xxl"):
  PRESETS[f"flan_t5_{_size}"] = PRESETS[f"t5_1_1_{_size}"]
PRESETS["tiny"] = PRESETS["t5_1_1_tiny"]


def default_dtype() -> str:
  """Activation dtype for the default backend: bfloat16 on accelerators, float32 on CPU."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def get_config(name: str, **overrides: Any) -> T5Config:
  """A named preset (`t5_1_1_large`, `flan_t5_xl`, `t5_1_0_base`, `tiny`, ...) with overrides.

  The presets set head_dim as published (64, or 128 for T5.1.0 XL and XXL, not always
  emb_dim / num_heads). Overriding emb_dim or num_heads without head_dim derives it as
  emb_dim // num_heads, so the attention width follows the model width instead of keeping the
  preset's; pass head_dim to choose another.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown T5 preset {name!r}; known presets: {sorted(PRESETS)}")
  preset = PRESETS[name]
  if ({"emb_dim", "num_heads"} & set(overrides)) and "head_dim" not in overrides:
    emb_dim = overrides.get("emb_dim", preset.emb_dim)
    num_heads = overrides.get("num_heads", preset.num_heads)
    if emb_dim % num_heads:
      raise ValueError(f"get_config({name!r}): emb_dim {emb_dim} is not a multiple of num_heads "
                       f"{num_heads}, so head_dim cannot be derived; pass head_dim")
    overrides["head_dim"] = emb_dim // num_heads
  return preset.replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Relative position buckets (computed on the host: shapes are static).


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucketing of (memory - query) positions: half exact, half log-spaced, then clamped."""
  bucket = np.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 with an epsilon, as t5x computes it, so bucket boundaries agree exactly.
  log_ratio = np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
  val_if_large = max_exact + (log_ratio / np.log(max_distance / max_exact) *
                              (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return bucket + np.where(is_small, n, val_if_large)


@functools.lru_cache(maxsize=64)
def relative_position_buckets(query_length: int, key_length: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
  """[query_length, key_length] int32 bucket ids for positions 0..length-1."""
  context = np.arange(query_length, dtype=np.int32)[:, None]
  memory = np.arange(key_length, dtype=np.int32)[None, :]
  buckets = relative_position_bucket(memory - context, bidirectional=bidirectional,
                                     num_buckets=num_buckets, max_distance=max_distance)
  buckets.setflags(write=False)
  return buckets


# ----------------------------------------------------------------------------------------------
# Layers.


def _param(module: nn.Module, name: str, init, shape: Sequence[int], axes: tuple[str, ...]):
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32)


class LayerNorm(nn.Module):
  """T5's RMS norm: no mean subtraction, no bias; computed in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (x32 * scale).astype(self.dtype)


class Dense(nn.Module):
  """Bias-free dense layer with a 2-D kernel carrying logical axis names."""

  features: int
  axes: tuple[str, str]
  init_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    kernel = _param(self, "kernel", init, (x.shape[-1], self.features), self.axes)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class MlpBlock(nn.Module):
  """T5's feed-forward block; more than one activation means a gated (GLU) MLP."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg, dtype = self.config, self.config.activation_dtype
    activations = cfg.mlp_activations
    hidden = None
    for index, name in enumerate(activations):
      dense_name = "wi" if len(activations) == 1 else f"wi_{index}"
      h = ACTIVATIONS[name](Dense(cfg.mlp_dim, ("embed", "mlp"), dtype=dtype, name=dense_name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic)
    return Dense(x.shape[-1], ("mlp", "embed"), dtype=dtype, name="wo")(hidden)


class RelativePositionBiases(nn.Module):
  """One table [heads, buckets] per stack, shared by all its layers."""

  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, buckets: Array) -> Array:
    """buckets: int [q, k] -> bias [1, heads, q, k] in float32."""
    cfg = self.config
    table = _param(self, "rel_embedding",
                   nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                   (cfg.num_heads, cfg.relative_attention_num_buckets),
                   ("heads", "relpos_buckets"))
    # A gather of table columns: [heads, q, k].
    return jnp.take(table, buckets, axis=1)[None]

  def static_buckets(self, query_length: int, key_length: int) -> np.ndarray:
    cfg = self.config
    return relative_position_buckets(query_length, key_length, bidirectional=self.bidirectional,
                                     num_buckets=cfg.relative_attention_num_buckets,
                                     max_distance=cfg.relative_attention_max_distance)


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None,
                          float32_logits: bool, heads_major: bool = False) -> Array:
  """query [b, q, h, d], key/value [b, k, h, d], bias broadcastable to [b, h, q, k]. No 1/sqrt(d):
  T5 folds it into the query initialisation."""
  if float32_logits:
    query, key = query.astype(jnp.float32), key.astype(jnp.float32)
  kspec = "bhkd" if heads_major else "bkhd"
  logits = jnp.einsum(f"bqhd,{kspec}->bhqk", query, key)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  return jnp.einsum(f"bhqk,{kspec}->bqhd", weights, value)


class MultiHeadAttention(nn.Module):
  """Attention with t5x's 2-D kernels (embed, joined_kv) and (joined_kv, embed)."""

  config: T5Config
  is_cross_attention: bool = False

  def _project(self, name: str, x: Array, init_scale: float = 1.0) -> Array:
    cfg = self.config
    joined = cfg.num_heads * cfg.head_dim
    y = Dense(joined, ("embed", "joined_kv"), init_scale=init_scale,
              dtype=cfg.activation_dtype, name=name)(x)
    y = y.reshape(y.shape[:-1] + (cfg.num_heads, cfg.head_dim))
    return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array | None, *,
               decode: bool = False, max_decode_length: int | None = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    # The 1/sqrt(head_dim) of scaled dot-product attention lives in the query initialisation.
    query = self._project("query", inputs_q, init_scale=1.0 / cfg.head_dim)
    if decode and self.is_cross_attention:
      key, value = self._cached_cross_key_value(inputs_kv)
    else:
      key = self._project("key", inputs_kv)
      value = self._project("value", inputs_kv)
      if decode:
        key, value = self._update_self_attention_cache(key, value, max_decode_length)
    out = dot_product_attention(query, key, value, bias, cfg.float32_attention_logits,
                                heads_major=decode)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic)
    out = out.reshape(out.shape[:-2] + (cfg.num_heads * cfg.head_dim,))
    return Dense(inputs_q.shape[-1], ("joined_kv", "embed"), dtype=cfg.activation_dtype,
                 name="out")(out)

  def _cached_cross_key_value(self, inputs_kv: Array) -> tuple[Array, Array]:
    """Encoder keys/values are projected once, when the cache is created, then reused."""
    initialized = self.has_variable("cache", "cross_key")
    if not initialized:
      key = self._project("key", inputs_kv)
      value = self._project("value", inputs_kv)
      key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
      self.variable("cache", "cross_key", lambda: key)
      self.variable("cache", "cross_value", lambda: value)
      return key, value
    # Parameters must exist even when only the cache is read (apply checks the tree).
    return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")

  def _update_self_attention_cache(self, key: Array, value: Array,
                                   max_decode_length: int | None) -> tuple[Array, Array]:
    initialized = self.has_variable("cache", "cached_key")
    batch, _, heads, head_dim = key.shape
    if not initialized and max_decode_length is None:
      raise ValueError("creating a decoding cache needs max_decode_length")
    shape = (batch, heads, max_decode_length or 0, head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
    if not initialized:
      return key, value
    if key.shape[2] != 1:
      raise ValueError(f"cached decoding takes one token per step, got length {key.shape[2]}")
    position = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(
        cached_key.value.dtype), (0, 0, position, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(
        cached_value.value.dtype), (0, 0, position, 0))
    index.value = position + 1
    return cached_key.value, cached_value.value


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="pre_attention_layer_norm")(x)
    h = MultiHeadAttention(cfg, name="attention")(h, h, bias, deterministic=deterministic)
    x = x + nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic)
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="pre_mlp_layer_norm")(x)
    h = MlpBlock(cfg, name="mlp")(h, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_bias: Array, cross_bias: Array, *,
               decode: bool = False, max_decode_length: int | None = None,
               deterministic: bool = True) -> Array:
    cfg, eps, dtype = self.config, self.config.layer_norm_epsilon, self.config.activation_dtype
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    h = LayerNorm(eps, dtype, name="pre_self_attention_layer_norm")(y)
    h = MultiHeadAttention(cfg, name="self_attention")(
        h, h, self_bias, decode=decode, max_decode_length=max_decode_length,
        deterministic=deterministic)
    y = y + dropout(h, deterministic)
    h = LayerNorm(eps, dtype, name="pre_cross_attention_layer_norm")(y)
    h = MultiHeadAttention(cfg, is_cross_attention=True, name="encoder_decoder_attention")(
        h, encoded, cross_bias, decode=decode, deterministic=deterministic)
    y = y + dropout(h, deterministic)
    h = LayerNorm(eps, dtype, name="pre_mlp_layer_norm")(y)
    h = MlpBlock(cfg, name="mlp")(h, deterministic)
    y = y + dropout(h, deterministic)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def padding_bias(query_valid: Array | None, key_valid: Array) -> Array:
  """[b, 1, q or 1, k] additive bias that removes invalid keys (and rows of invalid queries)."""
  mask = key_valid[:, None, None, :]
  if query_valid is not None:
    mask = jnp.logical_and(mask, query_valid[:, None, :, None])
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


class Encoder(nn.Module):
  config: T5Config
  embedder: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    length = encoder_input_tokens.shape[1]
    relpos = RelativePositionBiases(cfg, bidirectional=True, name="relpos_bias")
    valid = encoder_input_tokens > 0
    bias = relpos(relpos.static_buckets(length, length)) + padding_bias(valid, valid)
    x = self.embedder(encoder_input_tokens).astype(cfg.activation_dtype)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic)
    for index in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f"layers_{index}")(x, bias, deterministic)
    x = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic)


class Decoder(nn.Module):
  config: T5Config
  embedder: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
               decode: bool = False, max_decode_length: int | None = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    relpos = RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")
    length = decoder_input_tokens.shape[1]
    if decode:
      self_bias = self._decoding_self_bias(relpos, max_decode_length)
    else:
      causal = np.tril(np.ones((length, length), dtype=bool))
      self_bias = relpos(relpos.static_buckets(length, length)) + np.where(
          causal, 0.0, NEG_INF).astype(np.float32)[None, None]
    cross_bias = padding_bias(None, encoder_input_tokens > 0)
    y = self.embedder(decoder_input_tokens).astype(cfg.activation_dtype)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic)
    for index in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, name=f"layers_{index}")(
          y, encoded, self_bias, cross_bias, decode=decode, max_decode_length=max_decode_length,
          deterministic=deterministic)
    y = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic)
    if cfg.logits_via_embedding:
      logits = self.embedder.attend(y) / jnp.sqrt(jnp.asarray(y.shape[-1], y.dtype))
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.activation_dtype,
                     name="logits_dense")(y)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _decoding_self_bias(self, relpos: RelativePositionBiases,
                          max_decode_length: int | None) -> Array:
    """Bias row of the current position: relative positions and the causal mask of the cache."""
    if max_decode_length is None:
      raise ValueError("cached decoding needs max_decode_length on every step")
    initialized = self.has_variable("cache", "position")
    position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return jnp.zeros((1, 1, 1, 1), jnp.float32)
    buckets = jnp.asarray(relpos.static_buckets(max_decode_length, max_decode_length))
    row = jax.lax.dynamic_slice_in_dim(buckets, position.value, 1, axis=0)
    causal = jnp.arange(max_decode_length)[None, :] <= position.value
    bias = relpos(row) + jnp.where(causal, 0.0, NEG_INF)[None, None]
    position.value = position.value + 1
    return bias


class Embed(nn.Module):
  """Token embedding; `attend` gives logits against the same table (T5.1.0's tied output)."""

  vocab_size: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.vocab_size, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, query: Array) -> Array:
    return jnp.dot(query, self.embedding.astype(self.dtype).T)


class T5(nn.Module):
  """`apply({"params": p}, encoder_input_tokens, decoder_input_tokens) -> logits [b, t, vocab]`."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, deterministic: bool = True) -> Array:
    """Encoder output [b, s, embed] in the activation dtype."""
    return self.encoder(encoder_input_tokens, deterministic)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
             decode: bool = False, max_decode_length: int | None = None,
             deterministic: bool = True) -> Array:
    """Decoder logits; with decode=True, one cached step (see the module docstring)."""
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decode=decode,
                        max_decode_length=max_decode_length, deterministic=deterministic)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               deterministic: bool = True) -> Array:
    encoded = self.encode(encoder_input_tokens, deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       deterministic=deterministic)


def init_params(config: T5Config, rng: Array, encoder_length: int = 8,
                decoder_length: int = 8) -> dict:
  """Unboxed float32 parameters (plain arrays). For sharded init use partitioning.py."""
  model = T5(config)
  variables = model.init(rng, jnp.ones((1, encoder_length), jnp.int32),
                         jnp.ones((1, decoder_length), jnp.int32))
  return nn.unbox(variables["params"])


def abstract_params(config: T5Config) -> dict:
  """Boxed ShapeDtypeStructs with logical axis metadata, without allocating anything."""
  model = T5(config)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32),
                             jnp.ones((1, 2), jnp.int32))
  return variables["params"]


def logical_axes(config: T5Config) -> dict:
  """Parameter tree of logical PartitionSpecs (e.g. P('embed', 'joined_kv'))."""
  return nn.get_partition_spec(abstract_params(config))

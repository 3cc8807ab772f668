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

Three optional paths, all off by default and numerically equivalent to the default:
- `remat`: each encoder/decoder layer is rematerialised in the backward pass ("minimal" keeps the
  projection and MLP matmul outputs, "full" keeps nothing inside a layer). Cached decoding never
  rematerialises.
- `scan_layers`: each layer stack runs under `nn.scan` over parameters stacked on a leading
  "layers" axis (`encoder/layers/...`, `decoder/layers/...`); `dro_jax.models.scan` converts
  between that tree and the unrolled t5x tree (`layers_0`, `layers_1`, ...). Decoding caches stack
  on axis 1 ([batch, layers, ...]) so the batch stays the leading axis.
- `attention`: "xla" is the einsum path; "cudnn" (and "auto" where cuDNN applies) calls
  `jax.nn.dot_product_attention` with scale 1, the relative-position bias [1, heads, q, k],
  `is_causal` for the decoder and the encoder padding as lengths (right padding assumed);
  "fused_xla" is that same call computed by XLA (see `T5Config.attention`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

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
  # Rematerialisation of each layer in the backward pass: "none", "minimal" (saves the matmul
  # outputs without batch dimensions: the q/k/v/out projections and the MLP; recomputes attention
  # logits, softmax, norms and activations) or "full" (saves only each layer's input).
  remat: str = "none"
  # Run each layer stack under nn.scan over parameters stacked on a leading "layers" axis.
  scan_layers: bool = False
  # "xla": the einsum attention (logits in float32 when float32_attention_logits).
  # "cudnn": jax.nn.dot_product_attention(implementation="cudnn") for the full-sequence
  #   (training / scoring) attentions; GPU, bfloat16/float16 and head_dim % 8 == 0 only.
  # "auto": "cudnn" where it applies (GPU, bfloat16/float16, head_dim % 8 == 0 and <= 128, even
  #   lengths), else "xla".
  # "fused_xla": the interface "cudnn" uses (lengths, is_causal, scale 1) computed by XLA, so
  #   the fused path's masking can be checked on any backend.
  # The fused paths take the encoder padding as lengths (the count of tokens > 0): they assume
  # right padding, as seqio's converters produce. Cached decoding always uses the einsum path.
  attention: str = "xla"

  def __post_init__(self):
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    for activation in self.mlp_activations:
      if activation not in ACTIVATIONS:
        raise ValueError(f"T5Config.mlp_activations: unknown activation {activation!r}; "
                         f"choose from {sorted(ACTIVATIONS)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"T5Config.remat: unknown value {self.remat!r}; choose from "
                       f"{sorted(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"T5Config.attention: unknown value {self.attention!r}; choose from "
                       f"{list(ATTENTION_IMPLEMENTATIONS)}")
    if not isinstance(self.scan_layers, (bool, np.bool_)):
      raise ValueError(f"T5Config.scan_layers: expected a bool, got {self.scan_layers!r}")

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

# Checkpoint policies of `T5Config.remat` (None: no rematerialisation).
REMAT_POLICIES = {
    "none": None,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto", "fused_xla")

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


class AttentionMask(NamedTuple):
  """What one attention masks with (a pytree, so layers can be rematerialised and scanned).

  On the einsum path `bias` holds everything: relative positions, padding and the causal mask.
  On the fused paths `bias` is the relative-position bias only ([1, heads, q, k], or None) and
  padding comes as lengths [batch] int32 (the causal mask is the attention's `is_causal`).
  """

  bias: Array | None
  query_lengths: Array | None = None
  key_lengths: Array | None = None


def attention_implementation(config: T5Config, query_length: int, key_length: int) -> str:
  """"einsum", "xla" or "cudnn": the path `config.attention` takes for full-sequence attention of
  these lengths on the default backend (decided at trace time; cached decoding is always einsum)."""
  choice = config.attention
  if choice == "xla":
    return "einsum"
  if choice == "fused_xla":
    return "xla"
  backend = jax.default_backend()
  dtype = config.activation_dtype
  half = dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if choice == "cudnn":
    problems = []
    if backend != "gpu":
      problems.append(f"the backend is {backend!r}, not 'gpu'")
    if not half:
      problems.append(f"dtype is {dtype.name} (cuDNN attention takes bfloat16 or float16)")
    if config.head_dim % 8:
      problems.append(f"head_dim {config.head_dim} is not a multiple of 8")
    if problems:
      raise ValueError("T5Config.attention='cudnn' cannot run: " + "; ".join(problems) +
                       ". Use attention='auto' to fall back to 'xla' where cuDNN does not apply.")
    return "cudnn"
  # "auto": cuDNN only where it is known to apply (with a bias in training cuDNN needs even
  # lengths; T5 head dims are 64 or 128).
  if (backend == "gpu" and half and config.head_dim % 8 == 0 and config.head_dim <= 128
      and query_length % 2 == 0 and key_length % 2 == 0):
    return "cudnn"
  return "einsum"


def fused_attention(query: Array, key: Array, value: Array, mask: AttentionMask, *,
                    is_causal: bool, implementation: str) -> Array:
  """`jax.nn.dot_product_attention` with T5's conventions: scale 1, an additive relative-position
  bias, padding as lengths. query [b, q, h, d], key/value [b, k, h, d] -> [b, q, h, d]."""
  bias = mask.bias
  if bias is not None and implementation == "cudnn":
    bias = bias.astype(query.dtype)  # cuDNN takes the bias in the inputs' dtype
  return jax.nn.dot_product_attention(
      query, key, value, bias=bias, scale=1.0, is_causal=is_causal,
      query_seq_lengths=mask.query_lengths, key_value_seq_lengths=mask.key_lengths,
      implementation=implementation)


def sequence_lengths(tokens: Array) -> Array:
  """[batch] int32 count of non-padding tokens, at least 1: the fused paths' padding (right
  padding assumed). The floor keeps an all-padding example (a zero-weight filler row) from
  attending to no key at all; its outputs are finite and unused."""
  return jnp.maximum(jnp.sum(tokens > 0, axis=-1), 1).astype(jnp.int32)


class MultiHeadAttention(nn.Module):
  """Attention with t5x's 2-D kernels (embed, joined_kv) and (joined_kv, embed).

  `is_causal` is used by the fused paths only (the einsum path has the causal mask in its bias).
  """

  config: T5Config
  is_cross_attention: bool = False
  is_causal: bool = False

  def _project(self, name: str, x: Array, init_scale: float = 1.0) -> Array:
    cfg = self.config
    joined = cfg.num_heads * cfg.head_dim
    y = Dense(joined, ("embed", "joined_kv"), init_scale=init_scale,
              dtype=cfg.activation_dtype, name=name)(x)
    y = y.reshape(y.shape[:-1] + (cfg.num_heads, cfg.head_dim))
    return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: AttentionMask, *,
               decode: bool = False, max_decode_length: int | None = None,
               deterministic: bool = True, position: Array | None = None) -> Array:
    cfg = self.config
    # The 1/sqrt(head_dim) of scaled dot-product attention lives in the query initialisation.
    query = self._project("query", inputs_q, init_scale=1.0 / cfg.head_dim)
    if decode and self.is_cross_attention:
      key, value = self._cached_cross_key_value(inputs_kv)
    else:
      key = self._project("key", inputs_kv)
      value = self._project("value", inputs_kv)
      if decode:
        key, value = self._update_self_attention_cache(key, value, max_decode_length, position)
    implementation = "einsum" if decode else attention_implementation(
        cfg, query.shape[1], key.shape[1])
    if implementation == "einsum":
      out = dot_product_attention(query, key, value, mask.bias, cfg.float32_attention_logits,
                                  heads_major=decode)
    else:
      out = fused_attention(query, key, value, mask, is_causal=self.is_causal,
                            implementation=implementation)
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

  def _update_self_attention_cache(self, key: Array, value: Array, max_decode_length: int | None,
                                   position: Array | None) -> tuple[Array, Array]:
    """Writes this step's key/value at the cache index: the layer's own `cache_index`, or the
    decoder's `position` when given (scanned layers keep no per-layer scalar, so their caches
    stack on the batch-major axis 1)."""
    initialized = self.has_variable("cache", "cached_key")
    batch, _, heads, head_dim = key.shape
    if not initialized and max_decode_length is None:
      raise ValueError("creating a decoding cache needs max_decode_length")
    shape = (batch, heads, max_decode_length or 0, head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
    index = None
    if position is None:
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
    if not initialized:
      return key, value
    if key.shape[2] != 1:
      raise ValueError(f"cached decoding takes one token per step, got length {key.shape[2]}")
    if index is not None:
      position = index.value
      index.value = position + 1
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(
        cached_key.value.dtype), (0, 0, position, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(
        cached_value.value.dtype), (0, 0, position, 0))
    return cached_key.value, cached_value.value


class EncoderLayer(nn.Module):
  """Arguments are positional (deterministic is argument 3 counting self) so `nn.remat` can mark
  it static; `scanned` returns (x, None) as nn.scan's body."""

  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: AttentionMask, deterministic: bool = True):
    cfg = self.config
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="pre_attention_layer_norm")(x)
    h = MultiHeadAttention(cfg, name="attention")(h, h, mask, deterministic=deterministic)
    x = x + nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic)
    h = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="pre_mlp_layer_norm")(x)
    h = MlpBlock(cfg, name="mlp")(h, deterministic)
    x = x + nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Arguments are positional (deterministic, decode, max_decode_length are 5, 6, 7 counting
  self) so `nn.remat` can mark them static; `scanned` returns (y, None) as nn.scan's body."""

  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: AttentionMask,
               cross_mask: AttentionMask, deterministic: bool = True, decode: bool = False,
               max_decode_length: int | None = None, position: Array | None = None):
    cfg, eps, dtype = self.config, self.config.layer_norm_epsilon, self.config.activation_dtype
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    h = LayerNorm(eps, dtype, name="pre_self_attention_layer_norm")(y)
    h = MultiHeadAttention(cfg, is_causal=True, name="self_attention")(
        h, h, self_mask, decode=decode, max_decode_length=max_decode_length,
        deterministic=deterministic, position=position)
    y = y + dropout(h, deterministic)
    h = LayerNorm(eps, dtype, name="pre_cross_attention_layer_norm")(y)
    h = MultiHeadAttention(cfg, is_cross_attention=True, name="encoder_decoder_attention")(
        h, encoded, cross_mask, decode=decode, deterministic=deterministic)
    y = y + dropout(h, deterministic)
    h = LayerNorm(eps, dtype, name="pre_mlp_layer_norm")(y)
    h = MlpBlock(cfg, name="mlp")(h, deterministic)
    y = y + dropout(h, deterministic)
    y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
    return (y, None) if self.scanned else y


_ENCODER_STATIC_ARGNUMS = (3,)  # deterministic
_DECODER_STATIC_ARGNUMS = (5, 6, 7)  # deterministic, decode, max_decode_length


def layer_stack(config: T5Config, layer: type[nn.Module], num_layers: int,
                static_argnums: tuple[int, ...], num_args: int, decode: bool = False):
  """The layer class as the config runs it: rematerialised (never while decoding) and/or
  scanned over `num_layers` (parameters on a leading "layers" axis, decoding caches on axis 1,
  every argument broadcast to each layer)."""
  policy = REMAT_POLICIES[config.remat]
  if config.remat != "none" and not decode:
    # Inside scan the loop already keeps XLA from merging the recomputation away.
    layer = nn.remat(layer, policy=policy, static_argnums=static_argnums,
                     prevent_cse=not config.scan_layers)
  if config.scan_layers:
    layer = nn.scan(layer, variable_axes={"params": 0, "cache": 1},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * num_args, length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return layer


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
    relpos_bias = relpos(relpos.static_buckets(length, length))
    if attention_implementation(cfg, length, length) == "einsum":
      valid = encoder_input_tokens > 0
      mask = AttentionMask(relpos_bias + padding_bias(valid, valid))
    else:
      lengths = sequence_lengths(encoder_input_tokens)
      mask = AttentionMask(relpos_bias, lengths, lengths)
    x = self.embedder(encoder_input_tokens).astype(cfg.activation_dtype)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic)
    layer = layer_stack(cfg, EncoderLayer, cfg.num_encoder_layers, _ENCODER_STATIC_ARGNUMS, 2)
    if cfg.scan_layers:
      x, _ = layer(cfg, scanned=True, name="layers")(x, mask, deterministic)
    else:
      for index in range(cfg.num_encoder_layers):
        x = layer(cfg, name=f"layers_{index}")(x, mask, deterministic)
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
    length, source_length = decoder_input_tokens.shape[1], encoder_input_tokens.shape[1]
    position = None
    if decode:
      self_bias, position = self._decoding_self_bias(relpos, max_decode_length)
      self_mask = AttentionMask(self_bias)
      cross_mask = AttentionMask(padding_bias(None, encoder_input_tokens > 0))
    else:
      relpos_bias = relpos(relpos.static_buckets(length, length))
      if attention_implementation(cfg, length, length) == "einsum":
        causal = np.tril(np.ones((length, length), dtype=bool))
        self_mask = AttentionMask(relpos_bias + np.where(
            causal, 0.0, NEG_INF).astype(np.float32)[None, None])
      else:
        # Decoder padding is not known here; being causal, it only reaches padded positions.
        self_mask = AttentionMask(relpos_bias)
      if attention_implementation(cfg, length, source_length) == "einsum":
        cross_mask = AttentionMask(padding_bias(None, encoder_input_tokens > 0))
      else:
        cross_mask = AttentionMask(None, None, sequence_lengths(encoder_input_tokens))
    y = self.embedder(decoder_input_tokens).astype(cfg.activation_dtype)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic)
    layer = layer_stack(cfg, DecoderLayer, cfg.num_decoder_layers, _DECODER_STATIC_ARGNUMS, 7,
                        decode=decode)
    # Scanned layers index their caches with the decoder's position (see the cache update).
    args = (encoded, self_mask, cross_mask, deterministic, decode, max_decode_length,
            position if cfg.scan_layers else None)
    if cfg.scan_layers:
      y, _ = layer(cfg, scanned=True, name="layers")(y, *args)
    else:
      for index in range(cfg.num_decoder_layers):
        y = layer(cfg, name=f"layers_{index}")(y, *args)
    y = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="decoder_norm")(y)
    y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic)
    if cfg.logits_via_embedding:
      logits = self.embedder.attend(y) / jnp.sqrt(jnp.asarray(y.shape[-1], y.dtype))
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.activation_dtype,
                     name="logits_dense")(y)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _decoding_self_bias(self, relpos: RelativePositionBiases,
                          max_decode_length: int | None) -> tuple[Array, Array]:
    """(bias row of the current position: relative positions and the causal mask of the cache,
    the position itself) for one cached step; the position then advances."""
    if max_decode_length is None:
      raise ValueError("cached decoding needs max_decode_length on every step")
    initialized = self.has_variable("cache", "position")
    position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return jnp.zeros((1, 1, 1, 1), jnp.float32), position.value
    current = position.value
    buckets = jnp.asarray(relpos.static_buckets(max_decode_length, max_decode_length))
    row = jax.lax.dynamic_slice_in_dim(buckets, current, 1, axis=0)
    causal = jnp.arange(max_decode_length)[None, :] <= current
    bias = relpos(row) + jnp.where(causal, 0.0, NEG_INF)[None, None]
    position.value = current + 1
    return bias, current


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
  # The attention path does not change the parameters; the einsum one initialises anywhere.
  model = T5(config.replace(attention="xla"))
  variables = model.init(rng, jnp.ones((1, encoder_length), jnp.int32),
                         jnp.ones((1, decoder_length), jnp.int32))
  return nn.unbox(variables["params"])


def abstract_params(config: T5Config) -> dict:
  """Boxed ShapeDtypeStructs with logical axis metadata, without allocating anything."""
  model = T5(config.replace(attention="xla"))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32),
                             jnp.ones((1, 2), jnp.int32))
  return variables["params"]


def logical_axes(config: T5Config) -> dict:
  """Parameter tree of logical PartitionSpecs (e.g. P('embed', 'joined_kv'))."""
  return nn.get_partition_spec(abstract_params(config))

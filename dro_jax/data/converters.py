"""Feature converters: Task features -> the step's batch keys; fixed shapes, never packed.

Single-trajectory: encoder_input_tokens, decoder_input_tokens (targets shifted right, start id 0),
decoder_target_tokens, decoder_loss_weights (float32, 1 on target tokens), reward (float32),
label (int32, thumbs data only), example_weights (float32, 1; the pipeline's padding rows have 0),
example_id (int64, host-side only: the driver never sends it to the devices; padding rows -1),
truncated_prompt and truncated_response (int32, host-side only: 1 where truncation cut the prompt /
the response; padding rows 0).
With partners (KTO's fixed mismatched pairs, `tasks.with_partners`): kl_decoder_* from the partner's
response, as the decoder_* keys, and kl_example_id.
Pairwise: encoder_input_tokens, chosen_decoder_* and rejected_decoder_* as above, example_weights,
example_id, truncated_prompt and truncated_response (1 if either response was cut).

Examples are never packed: one example per row keeps each sequence log-prob a plain masked sum.
Task feature lengths are given as {"inputs": ..., "targets": ...} for both kinds (pairwise uses
the targets length for chosen and rejected); scalar features need no length.
"""

from __future__ import annotations

from typing import Mapping

import seqio

from dro_jax.data._tensorflow import tf
from dro_jax.data.records import TRUNCATION_FLAGS

_Spec = seqio.FeatureConverter.FeatureSpec
_TOKENS = _Spec(dtype=tf.int32)
_WEIGHTS = _Spec(dtype=tf.float32)
_FLOAT_SCALAR = _Spec(dtype=tf.float32, rank=0)
_INT_SCALAR = _Spec(dtype=tf.int32, rank=0)
_ID = _Spec(dtype=tf.int64, rank=0)
_FLAGS = {key: _INT_SCALAR for key in TRUNCATION_FLAGS}  # Set by tasks.TruncateAndAppendEos.


class _UnpackedConverter(seqio.FeatureConverter):
  """Encoder tokens, one set of decoder features per target feature, scalars passed through.

  `decoder_sources` maps a model-key prefix to its task feature ({"": "targets"} or
  {"chosen_": "chosen", "rejected_": "rejected"}); `scalars` are task features copied as they are.
  """

  PACKING_FEATURE_DTYPES: Mapping[str, tf.dtypes.DType] = {}

  def __init__(self, decoder_sources: Mapping[str, str],
               scalars: Mapping[str, seqio.FeatureConverter.FeatureSpec], *, pack: bool = False,
               bos_id: int = 0, apply_length_check: bool = True):
    if pack:
      raise ValueError("dro_jax never packs examples: sequence log-probs need one example per row")
    self._decoder_sources, self._scalars = dict(decoder_sources), dict(scalars)
    self.TASK_FEATURES = {"inputs": _TOKENS, **scalars,
                          **{source: _TOKENS for source in decoder_sources.values()}}
    self.MODEL_FEATURES = {"encoder_input_tokens": _TOKENS, **scalars,
                           "example_weights": _FLOAT_SCALAR}
    for prefix in decoder_sources:
      self.MODEL_FEATURES.update({f"{prefix}decoder_input_tokens": _TOKENS,
                                  f"{prefix}decoder_target_tokens": _TOKENS,
                                  f"{prefix}decoder_loss_weights": _WEIGHTS})
    super().__init__(pack=False, bos_id=bos_id, apply_length_check=apply_length_check)

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    return super().__call__(ds, self.complete_lengths(task_feature_lengths))

  def complete_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    """{"inputs", "targets"} -> one length per task feature (scalars get a placeholder 1)."""
    lengths = {key: 1 for key in self._scalars}
    for key in ("inputs", *self._decoder_sources.values()):
      source_key = key if key in task_feature_lengths else "targets"
      if source_key not in task_feature_lengths:
        raise ValueError(f"task_feature_lengths needs '{key}' (or 'targets'), got "
                         f"{dict(task_feature_lengths)}")
      lengths[key] = task_feature_lengths[source_key]
    return lengths

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    converted = {"encoder_input_tokens": features["inputs"],
                 "example_weights": tf.constant(1.0, tf.float32),
                 **{key: features[key] for key in self._scalars}}
    for prefix, source in self._decoder_sources.items():
      targets = features[source]
      converted[f"{prefix}decoder_target_tokens"] = targets
      converted[f"{prefix}decoder_input_tokens"] = seqio.utils.make_autoregressive_inputs(
          targets, bos_id=self.bos_id)
      converted[f"{prefix}decoder_loss_weights"] = tf.cast(targets > 0, tf.float32)
    return converted

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    text_lengths = {key: length for key, length in task_feature_lengths.items()
                    if key not in self._scalars}
    ds = seqio.utils.trim_and_pad_dataset(ds, text_lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    lengths = {key: 1 for key in self._scalars}
    lengths.update(encoder_input_tokens=task_feature_lengths["inputs"], example_weights=1)
    for prefix, source in self._decoder_sources.items():
      for name in ("input_tokens", "target_tokens", "loss_weights"):
        lengths[f"{prefix}decoder_{name}"] = task_feature_lengths[source]
    return lengths


class SingleTrajectoryFeatureConverter(_UnpackedConverter):
  """(inputs, targets, reward[, label][, kl_targets]) -> encoder/decoder tokens, loss weights,
  reward, label, ids; kl_decoder_* from the partner's response when `with_partners`."""

  def __init__(self, with_label: bool = False, with_partners: bool = False, **kwargs):
    scalars = {"reward": _FLOAT_SCALAR, **({"label": _INT_SCALAR} if with_label else {}),
               "example_id": _ID, **({"kl_example_id": _ID} if with_partners else {}),
               **_FLAGS}
    decoder_sources = {"": "targets", **({"kl_": "kl_targets"} if with_partners else {})}
    super().__init__(decoder_sources, scalars, **kwargs)


class PairwiseFeatureConverter(_UnpackedConverter):
  """(inputs, chosen, rejected) -> encoder tokens and chosen_/rejected_ decoder features."""

  def __init__(self, **kwargs):
    super().__init__({"chosen_": "chosen", "rejected_": "rejected"},
                     {"example_id": _ID, **_FLAGS}, **kwargs)


def feature_converter(kind: str, with_label: bool = False,
                      with_partners: bool = False) -> seqio.FeatureConverter:
  """The converter for a Task kind ("single_trajectory" or "pairwise")."""
  if kind == "pairwise":
    if with_partners:
      raise ValueError("partners (KTO's mismatched responses) need single-trajectory data")
    return PairwiseFeatureConverter()
  if kind == "single_trajectory":
    return SingleTrajectoryFeatureConverter(with_label=with_label, with_partners=with_partners)
  raise ValueError(f"unknown kind {kind!r}; use 'single_trajectory' or 'pairwise'")

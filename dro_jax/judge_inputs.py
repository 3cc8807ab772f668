"""What a learned judge reads: the ONE place its token layout is defined.

The `reward_model` and `preference_model` recipes train on these inputs (step.py) and the judges
built from their workdirs (judges.py) score with them, so training and judging cannot drift:

- a text becomes tokens as the training Tasks make them (`encode_texts`: the prompt keeps its
  last `max_input_length - 1` tokens, a response its first `max_target_length - 1`, EOS appended,
  right-padded with 0 to exactly that length);
- the reward model reads prompt ‖ response (`reward_model_inputs`: [B, S + T], padding kept in
  place, so positions match training);
- the preference model reads prompt ‖ response A ‖ response B (`preference_model_inputs`:
  [B, S + 2T]) and answers with one decoder step; P(A better than B) is the two-way softmax over
  the "A" and "B" label logits (`label_logps` then `first_wins`), docs/methods.md.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.data import records

Array = Any


def encode_texts(vocabulary: Any, texts: Sequence[str], feature: str, length: int, *,
                 eos_id: int = 1) -> np.ndarray:
  """int32 [N, length]: `feature` ("inputs" for prompts, "targets" for responses) tokenised,
  truncated by the training Tasks' rule (`records.kept_tokens`), EOS appended, 0-padded."""
  if length < 2:
    raise ValueError(f"{feature} length counts EOS and must be >= 2, got {length}")
  tokens = np.zeros((len(texts), length), np.int32)
  keep = records.kept_tokens(feature, length)
  for row, text in enumerate(texts):
    ids = [int(t) for t in list(vocabulary.encode(text))[keep]] + [eos_id]
    tokens[row, :len(ids)] = ids
  return tokens


def reward_model_inputs(prompt_BxS: Array, response_BxT: Array) -> Array:
  """The reward model's encoder input: prompt ‖ response, each at its padded length."""
  return jnp.concatenate([prompt_BxS, response_BxT], axis=1)


def preference_model_inputs(prompt_BxS: Array, first_BxT: Array, second_BxT: Array) -> Array:
  """The preference model's encoder input: prompt ‖ response A ‖ response B."""
  return jnp.concatenate([prompt_BxS, first_BxT, second_BxT], axis=1)


def label_logps(model: Any, params: Any, inputs_BxN: Array, a_token: int,
                b_token: int) -> Array:
  """float32 [B, 2]: log p("A"), log p("B") at the first decoder position (full-vocabulary
  softmax), for encoder inputs made by `preference_model_inputs`."""
  start = jnp.zeros((inputs_BxN.shape[0], 1), jnp.int32)
  logits = model.apply({"params": params}, inputs_BxN, start)[:, 0]
  tokens = jnp.asarray([a_token, b_token])
  return jnp.take(jax.nn.log_softmax(logits.astype(jnp.float32)), tokens, axis=-1)


def first_wins(label_logps_Bx2: Array) -> Array:
  """P(A better than B) in one presentation order: σ(log p_A − log p_B)."""
  return jax.nn.sigmoid(label_logps_Bx2[:, 0] - label_logps_Bx2[:, 1])

"""Validated examples from raw records: the text fields a Task yields, and the chat template.

A single-trajectory example is {"inputs": prompt, "targets": response, "reward": float32} plus
"label" (1 thumbs up, 0 down) for thumbs data; a pairwise example is {"inputs", "chosen",
"rejected"}. Problems raise `RecordError(field, message)`; the caller adds the file and line.

Chat template (the one rendering of message lists, at training and at evaluation alike): each
message becomes "<Role>: <content>" with the role capitalised ("User", "Assistant", "System"),
and messages are joined by a blank line ("\\n\\n"), in order. A prompt that is a message list
renders whole; a response that is a list of one message is that message's content (a longer list
renders whole).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

CONTEXT_KEY = "_context"  # An adapter's name for a sub-record ("completions[2]") in error messages.
# Per-example int32 flags, 1 where truncation cut the prompt / a response (pairwise: either one);
# set by tasks.TruncateAndAppendEos, carried to the batches as host-side keys.
TRUNCATION_FLAGS = ("truncated_prompt", "truncated_response")

SINGLE_TRAJECTORY_FIELDS = {"prompt": ("prompt",), "response": ("response", "completion"),
                            "reward": ("reward",), "label": ("label",)}
PAIRWISE_FIELDS = {"prompt": ("prompt",), "chosen": ("chosen",), "rejected": ("rejected",)}

_TRUE_STRINGS = ("true", "1", "yes")
_FALSE_STRINGS = ("false", "0", "no")


class RecordError(ValueError):
  """A problem with one field of one record; the location is added by whoever read the record."""

  def __init__(self, field: str, message: str):
    super().__init__(f"field '{field}': {message}")
    self.field, self.message = field, message


def kept_tokens(feature: str, limit: int) -> slice:
  """The tokens a feature keeps under `limit` (which counts the EOS appended after them), for
  training (tasks.TruncateAndAppendEos) and sampling (decoding.encode_prompts) alike: a prompt
  ("inputs") its last limit - 1, since the end of a prompt is what the response answers; a
  response its first."""
  keep = max(limit - 1, 0)
  if feature == "inputs":
    return slice(-keep, None) if keep else slice(0, 0)
  return slice(None, keep)


def render_messages(messages: Sequence[Any], field: str = "messages") -> str:
  """Renders a chat as "<Role>: <content>" turns joined by blank lines (the module's template)."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise RecordError(field, "expected a non-empty list of {role, content} messages")
  turns = []
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise RecordError(f"{field}[{index}]",
                        f"expected a {{role, content}} message, got {message!r:.60}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
      raise RecordError(f"{field}[{index}].role", f"expected a role string, got {role!r:.60}")
    if not isinstance(content, str):
      raise RecordError(f"{field}[{index}].content", f"expected a string, got {content!r:.60}")
    turns.append(f"{role.capitalize()}: {content}")
  return "\n\n".join(turns)


def lookup(record: Mapping[str, Any], names: Sequence[str]) -> tuple[str, Any]:
  """(name, value) of the first of `names` in the record; dotted names reach into nested dicts."""
  for name in names:
    if name in record:
      return name, record[name]
    value = _nested(record, name)
    if value is not _MISSING:
      return name, value
  raise RecordError(names[0], "missing")


_MISSING = object()


def _nested(record: Mapping[str, Any], dotted: str) -> Any:
  value: Any = record
  for part in dotted.split("."):
    if not isinstance(value, Mapping) or part not in value:
      return _MISSING
    value = value[part]
  return value


def as_text(value: Any, field: str, *, allow_empty: bool = True, is_response: bool = False) -> str:
  """A string field, or a message list rendered with the chat template."""
  if isinstance(value, (list, tuple)):
    if is_response and len(value) == 1 and isinstance(value[0], Mapping):
      value = as_text(value[0].get("content"), f"{field}[0].content")
    else:
      value = render_messages(value, field)
  if not isinstance(value, str):
    raise RecordError(field, f"expected a string or a list of messages, got {value!r:.60}")
  if not allow_empty and not value.strip():
    raise RecordError(field, "empty")
  return value


def as_finite_number(value: Any, field: str) -> float:
  """A finite float from a number or a numeric string (booleans are refused)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise RecordError(field, f"not a number ({value!r:.60})")
  try:
    number = float(value)
  except ValueError:
    raise RecordError(field, f"not a number ({value!r:.60})") from None
  if not math.isfinite(number):
    raise RecordError(field, f"not a finite number ({value!r:.60})")
  return number


def as_label(value: Any, field: str) -> int:
  """Thumbs label -> 1 (up) or 0 (down), from a bool, 0/1 or "true"/"false"."""
  if isinstance(value, bool) or value in (0, 1):
    return int(value)
  if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
    return int(value.strip().lower() in _TRUE_STRINGS)
  raise RecordError(field, f"not a thumbs label (true/false or 1/0): {value!r:.60}")


def _names(fields: Mapping[str, str] | None, defaults: Mapping[str, tuple[str, ...]],
           canonical: str) -> tuple[str, ...]:
  if fields and canonical in fields:
    return (fields[canonical],)
  return defaults[canonical]


def single_trajectory_example(record: Mapping[str, Any], fields: Mapping[str, str] | None = None,
                              *, thumbs: bool = False,
                              require_reward: bool = True) -> dict[str, Any]:
  """{"inputs", "targets", "reward"[, "label"]} from a (prompt, response, reward or label) record.

  The reward is the record's reward, or 1.0 / 0.0 from its thumbs label when it has no reward.
  With `thumbs`, the label is required and kept as the "label" feature. Without
  `require_reward` (SFT reads only the prompt and the response), a record with neither reward
  nor label gets reward 0.0.
  """
  reward_names = _names(fields, SINGLE_TRAJECTORY_FIELDS, "reward")
  label_names = _names(fields, SINGLE_TRAJECTORY_FIELDS, "label")
  prompt_name, prompt = lookup(record, _names(fields, SINGLE_TRAJECTORY_FIELDS, "prompt"))
  response_name, response = lookup(record, _names(fields, SINGLE_TRAJECTORY_FIELDS, "response"))
  example = {"inputs": as_text(prompt, prompt_name),
             "targets": as_text(response, response_name, allow_empty=False, is_response=True)}
  has_reward = _has(record, reward_names)
  label = None
  if not (thumbs or has_reward or require_reward or _has(record, label_names)):
    return {**example, "reward": 0.0}
  if thumbs or not has_reward:
    if not thumbs and not _has(record, label_names):
      raise RecordError(reward_names[0], "missing")
    label_name, label_value = lookup(record, label_names)
    label = as_label(label_value, label_name)
  if has_reward:
    reward_name, reward = lookup(record, reward_names)
    example["reward"] = as_finite_number(reward, reward_name)
  else:
    example["reward"] = float(label)
  if thumbs:
    example["label"] = label
  return example


def _has(record: Mapping[str, Any], names: Sequence[str]) -> bool:
  return any(name in record or _nested(record, name) is not _MISSING for name in names)


def pairwise_example(record: Mapping[str, Any],
                     fields: Mapping[str, str] | None = None) -> dict[str, str]:
  """{"inputs", "chosen", "rejected"} from a (prompt, chosen, rejected) record."""
  example = {}
  for canonical, feature in (("prompt", "inputs"), ("chosen", "chosen"), ("rejected", "rejected")):
    name, value = lookup(record, _names(fields, PAIRWISE_FIELDS, canonical))
    example[feature] = as_text(value, name, allow_empty=canonical == "prompt",
                               is_response=canonical != "prompt")
  return example

"""Adapters from the published feedback datasets (docs/datasets.md) to prompt/response records.

An adapter maps one raw record to the records a Task reads: single-trajectory
{"prompt", "response", "reward"[, "label"]} or pairwise {"prompt", "chosen", "rejected"}. It may
yield a `RecordError` for one invalid output (the rest of the row still counts) or raise one to
reject the whole row; either is reported with the file and line, or skipped and counted, by the
Task's `on_invalid` policy. Yielding nothing drops the row (e.g. a tie), which is counted too.

Formats that need no adapter, read with the default field names:
- TL;DR processed pairs (trl-lib/tldr-preference): `register_pairwise_task(name, path, vocabulary)`.
- Unpaired thumbs data (trl-lib/kto-mix-14k: prompt, completion, label):
  `register_single_trajectory_task(name, path, vocabulary, thumbs=True)`.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any, Callable, Iterable, Iterator, Mapping

from dro_jax.data.records import (CONTEXT_KEY, RecordError, as_finite_number, as_text, lookup,
                                  pairwise_example, render_messages)

Adapter = Callable[[Mapping[str, Any]], Iterable[Any]]

ULTRAFEEDBACK_ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
ULTRAFEEDBACK_SCORES = ("fine-grained", "overall") + ULTRAFEEDBACK_ASPECTS
HH_ASSISTANT_TURN = "\n\nAssistant:"
TLDR_REDDIT_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
TLDR_ARTICLE_TEMPLATE = "ARTICLE: {article}\n\nTL;DR:"


def _text(record: Mapping[str, Any], name: str, **kwargs) -> str:
  field, value = lookup(record, (name,))
  return as_text(value, field, **kwargs)


# ----------------------------------------------------------------------------- UltraFeedback raw


def ultrafeedback_score(completion: Mapping[str, Any], score: str, where: str) -> float:
  """One completion's score: "fine-grained" (recomputed from the aspect ratings when null or NaN),
  "overall" (1-10; note the upstream 1 -> 10 bug in early revisions), or one aspect's rating."""
  if score == "overall":
    return as_finite_number(completion.get("overall_score"), f"{where}.overall_score")
  if score == "fine-grained":
    value = completion.get("fine-grained_score")
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
      return as_finite_number(value, f"{where}.fine-grained_score")
    ratings = [_rating(completion, aspect, where) for aspect in ULTRAFEEDBACK_ASPECTS]
    ratings = [rating for rating in ratings if rating is not None]
    if not ratings:
      raise RecordError(f"{where}.fine-grained_score", "null and no aspect has a numeric rating")
    return sum(ratings) / len(ratings)
  if score in ULTRAFEEDBACK_ASPECTS:
    rating = _rating(completion, score, where)
    if rating is None:
      raise RecordError(f"{where}.annotations.{score}.Rating", "'N/A'")
    return rating
  raise ValueError(f"unknown UltraFeedback score {score!r}; use one of {ULTRAFEEDBACK_SCORES}")


def _rating(completion: Mapping[str, Any], aspect: str, where: str) -> float | None:
  """An aspect's Rating ("1"-"5" as a string upstream), None for "N/A"."""
  field = f"{where}.annotations.{aspect}.Rating"
  annotation = (completion.get("annotations") or {}).get(aspect)
  if not isinstance(annotation, Mapping) or "Rating" not in annotation:
    raise RecordError(field, "missing")
  if annotation["Rating"] in ("N/A", None):
    return None
  return as_finite_number(annotation["Rating"], field)


def _completions(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
  completions = record.get("completions")
  if not isinstance(completions, list):
    raise RecordError("completions", f"expected a list of completions, got {completions!r:.60}")
  return completions


def _ultrafeedback_triples(record: Mapping[str, Any], *, score: str) -> Iterator[Any]:
  prompt = _text(record, "instruction")
  for index, completion in enumerate(_completions(record)):
    where = f"completions[{index}]"
    try:
      reward = ultrafeedback_score(completion, score, where)
    except RecordError as error:
      yield error
      continue
    yield {"prompt": prompt, "response": completion.get("response"), "reward": reward,
           CONTEXT_KEY: where}


def ultrafeedback_triples(score: str = "fine-grained") -> Adapter:
  """Raw UltraFeedback -> one (instruction, response, score) triple per completion (DRO's data)."""
  if score not in ULTRAFEEDBACK_SCORES:
    raise ValueError(f"unknown UltraFeedback score {score!r}; use one of {ULTRAFEEDBACK_SCORES}")
  return functools.partial(_ultrafeedback_triples, score=score)


def _ultrafeedback_pairs(record: Mapping[str, Any], *, score: str, rejected: str,
                         seed: int) -> Iterator[dict[str, str]]:
  prompt = _text(record, "instruction")
  scored = []
  for index, completion in enumerate(_completions(record)):
    response = completion.get("response")
    try:
      scored.append((ultrafeedback_score(completion, score, f"completions[{index}]"), response))
    except RecordError:
      continue  # A pair needs two scored completions; unscorable ones are not candidates.
  scored = [(value, response) for value, response in scored
            if isinstance(response, str) and response.strip()]
  if len(scored) < 2:
    return
  best = max(scored, key=lambda item: item[0])
  worse = [item for item in scored if item[0] < best[0]]
  if not worse:
    return  # All tied: no preference to learn.
  if rejected == "worst":
    loser = min(worse, key=lambda item: item[0])
  else:
    loser = random.Random(f"{seed}:{prompt}").choice(worse)  # str seeds are stable across runs.
  yield {"prompt": prompt, "chosen": best[1], "rejected": loser[1]}


def ultrafeedback_pairs(score: str = "fine-grained", rejected: str = "worst",
                        seed: int = 0) -> Adapter:
  """Raw UltraFeedback -> (best, worst) or (best, random lower-scored) pairs; ties are dropped."""
  if score not in ULTRAFEEDBACK_SCORES:
    raise ValueError(f"unknown UltraFeedback score {score!r}; use one of {ULTRAFEEDBACK_SCORES}")
  if rejected not in ("worst", "random"):
    raise ValueError(f"rejected must be 'worst' or 'random', got {rejected!r}")
  return functools.partial(_ultrafeedback_pairs, score=score, rejected=rejected, seed=seed)


# ------------------------------------------------------------------------ UltraFeedback binarised


def _split_chat(record: Mapping[str, Any], name: str) -> tuple[str, str]:
  """(prompt rendered from all messages but the last, the last assistant message's content)."""
  messages = record.get(name)
  if not isinstance(messages, list) or len(messages) < 2:
    raise RecordError(name, "expected a list of at least a user and an assistant message")
  last = messages[-1]
  if not isinstance(last, Mapping) or last.get("role") != "assistant":
    raise RecordError(f"{name}[{len(messages) - 1}].role",
                      "the last message is not the assistant's")
  return render_messages(messages[:-1], name), as_text(last.get("content"),
                                                       f"{name}[{len(messages) - 1}].content")


def _ultrafeedback_binarized_pairs(record: Mapping[str, Any], *,
                                   drop_ties: bool) -> Iterator[dict[str, str]]:
  prompt, chosen = _split_chat(record, "chosen")
  rejected_prompt, rejected = _split_chat(record, "rejected")
  if rejected_prompt != prompt:
    raise RecordError("rejected", "its prompt messages differ from those of 'chosen'")
  if drop_ties and (as_finite_number(record.get("score_chosen"), "score_chosen")
                    == as_finite_number(record.get("score_rejected"), "score_rejected")):
    return
  yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def ultrafeedback_binarized_pairs(drop_ties: bool = False) -> Adapter:
  """HuggingFaceH4/ultrafeedback_binarized -> its (chosen, rejected) pairs, as published
  (`drop_ties` removes the pairs whose two scores are equal)."""
  return functools.partial(_ultrafeedback_binarized_pairs, drop_ties=drop_ties)


def _ultrafeedback_binarized_triples(record: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
  for side in ("chosen", "rejected"):
    prompt, response = _split_chat(record, side)
    yield {"prompt": prompt, "response": response, "reward": record.get(f"score_{side}"),
           CONTEXT_KEY: side}


def ultrafeedback_binarized_triples() -> Adapter:
  """HuggingFaceH4/ultrafeedback_binarized -> two triples per row, rewarded by `score_chosen` and
  `score_rejected` (the raw overall scores)."""
  return _ultrafeedback_binarized_triples


# ------------------------------------------------------------------------------- Anthropic HH


def _anthropic_hh_pairs(record: Mapping[str, Any]) -> Iterator[dict[str, str]]:
  chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
  cut = chosen.rfind(HH_ASSISTANT_TURN)
  if cut < 0:
    raise RecordError("chosen", "has no '\\n\\nAssistant:' turn")
  prompt = chosen[:cut + len(HH_ASSISTANT_TURN)]
  if not rejected.startswith(prompt):
    raise RecordError("rejected", "does not continue the prompt of 'chosen' (its transcript up to "
                      "the last '\\n\\nAssistant:')")
  yield {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def anthropic_hh_pairs() -> Adapter:
  """Anthropic/hh-rlhf -> prompt = `chosen` up to and including its LAST "\\n\\nAssistant:",
  responses = the rest of each transcript (with their leading space)."""
  return _anthropic_hh_pairs


# ------------------------------------------------------------------------------------- TL;DR


def tldr_prompt(info: Mapping[str, Any]) -> str:
  """The TL;DR prompt: the Reddit template, or "ARTICLE: ...\\n\\nTL;DR:" for CNN/DM rows."""
  if info.get("post"):
    return TLDR_REDDIT_TEMPLATE.format(subreddit=_text(info, "subreddit"),
                                       title=_text(info, "title"), post=info["post"])
  if info.get("article"):
    return TLDR_ARTICLE_TEMPLATE.format(article=_text(info, "article"))
  raise RecordError("info.post", "missing (and no info.article either)")


def _tldr_comparisons(record: Mapping[str, Any]) -> Iterator[dict[str, str]]:
  info = record.get("info")
  if not isinstance(info, Mapping):
    raise RecordError("info", f"expected an object, got {info!r:.60}")
  try:
    prompt = tldr_prompt(info)
  except RecordError as error:
    raise RecordError(f"info.{error.field.removeprefix('info.')}", error.message) from None
  summaries = record.get("summaries")
  if not isinstance(summaries, list) or len(summaries) != 2:
    raise RecordError("summaries", "expected a list of two summaries")
  choice = record.get("choice")
  if choice not in (0, 1) or isinstance(choice, bool):
    raise RecordError("choice", f"expected 0 or 1, got {choice!r:.60}")
  texts = [" " + _text(summary, "text").strip() if isinstance(summary, Mapping) else None
           for summary in summaries]
  yield {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]}


def tldr_comparisons() -> Adapter:
  """openai/summarize_from_feedback (comparisons) -> (preferred, other) summary pairs; summaries
  get one leading space, as in trl-lib/tldr-preference."""
  return _tldr_comparisons


# ------------------------------------------------------------------------------------ unpaired


def _unpair(record: Mapping[str, Any], *, adapter: Adapter | None) -> Iterator[Any]:
  for pair in (adapter(record) if adapter else [record]):
    if isinstance(pair, RecordError):
      yield pair
      continue
    example = pairwise_example(pair)
    for side, label in (("chosen", True), ("rejected", False)):
      yield {"prompt": example["inputs"], "response": example[side], "label": label,
             CONTEXT_KEY: side}


def unpair(adapter: Adapter | None = None) -> Adapter:
  """Pairs -> single-trajectory thumbs records for KTO: chosen up (label True), rejected down.

  Wraps a pairwise adapter (or reads prompt/chosen/rejected directly); register with thumbs=True.
  """
  return functools.partial(_unpair, adapter=adapter)

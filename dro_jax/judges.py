"""Judges: who decides which of two responses to a prompt is better.

Every judge answers `prefer(prompts, responses_a, responses_b)` with P(a better than b) per prompt
(1 a wins, 0 b wins, 0.5 a tie; a learned judge may answer anything in between), which is all a
win rate needs. A judge with a reward also answers `score(prompts, responses)`, so evaluation can
report the mean reward of each side. Judges are found by name in `JUDGES`; a learned judge (a
reward model or a preference model) registers itself there under the same protocol.
"""

from __future__ import annotations

import abc

from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from dro_jax.data import synthetic


@runtime_checkable
class Judge(Protocol):
  """Compares two responses per prompt."""

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    """float64 [N] in [0, 1]: P(responses_a[i] is better than responses_b[i])."""
    ...


@runtime_checkable
class RewardJudge(Judge, Protocol):
  """A judge with a scalar reward per response."""

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """float64 [N]: the reward of responses[i] as an answer to prompts[i]."""
    ...


def has_reward(judge: Judge) -> bool:
  return callable(getattr(judge, "score", None))


def _check_lengths(prompts: Sequence[str], *columns: Sequence[str]) -> None:
  for column in columns:
    if len(column) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(column)} responses")


def preference_from_rewards(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
  """1 where a's reward is higher, 0 where lower, 0.5 on equal rewards (a tie counts half)."""
  return 0.5 + 0.5 * np.sign(np.asarray(rewards_a, np.float64) - np.asarray(rewards_b, np.float64))


class ScoringJudge(abc.ABC):
  """Base of the judges that have a reward: `prefer` compares the two rewards."""

  name = "scoring"

  @abc.abstractmethod
  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """One reward per (prompt, response)."""

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    _check_lengths(prompts, responses_a, responses_b)
    return preference_from_rewards(self.score(prompts, responses_a),
                                   self.score(prompts, responses_b))


class DemoJudge(ScoringJudge):
  """The demo task's programmatic judge: `synthetic.reward`, partial credit per digit."""

  name = "demo"

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    _check_lengths(prompts, responses)
    rewards = []
    for prompt, response in zip(prompts, responses):
      try:
        rewards.append(synthetic.reward(prompt, response))
      except ValueError as error:
        raise ValueError(f"the demo judge only judges the demo task's prompts: {error}") from error
    return np.asarray(rewards, np.float64)


# name -> a factory of the judge (called with no arguments).
JUDGES: dict[str, Callable[[], Judge]] = {"demo": DemoJudge}


def register_judge(name: str, factory: Callable[[], Judge], *, overwrite: bool = False) -> None:
  if name in JUDGES and not overwrite:
    raise ValueError(f"a judge named {name!r} is already registered")
  JUDGES[name] = factory


def get_judge(name: str) -> Judge:
  if name not in JUDGES:
    raise ValueError(f"unknown judge {name!r}; registered judges: {sorted(JUDGES)}")
  return JUDGES[name]()

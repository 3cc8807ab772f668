"""Stopping a run on request (SIGTERM, Ctrl-C, a pod's preemption notice), agreed by every process.

`train.Preemption` registers here while it is active; a long phase outside the training steps
(sampling, evaluation) calls `check()` between its batches, so a stop asked for during it is acted
on there and not only at the next training step. With several processes every one of them makes
the same sequence of checks (the training steps and these), and `agreed()` numbers them with one
process-wide counter, so JAX's preemption sync point is the same check on every host.
"""

from __future__ import annotations

from typing import Any


class Preempted(Exception):
  """SIGTERM or Ctrl-C (or the pod's preemption notice): the state is saved; exit 143. `step`:
  the step just saved, or None when the stop came between checkpoints (outside training), the
  last checkpoint being intact."""

  def __init__(self, step: int | None, signal_name: str = "SIGTERM", during: str | None = None):
    if step is None:
      message = (f"preempted ({signal_name}) during {during or 'a phase'}: the last checkpoint "
                 f"and every finished phase are kept; the same command resumes from them")
    else:
      message = (f"preempted ({signal_name}): saved a checkpoint at step {step}; the same "
                 f"command resumes from it")
    super().__init__(message)
    self.step = step


_active: list[Any] = []  # the Preemptions installed, innermost last
_checks = 0  # this process's agreed checks so far (one counter for every Preemption)


def register(preemption: Any) -> None:
  _active.append(preemption)


def unregister(preemption: Any) -> None:
  if preemption in _active:
    _active.remove(preemption)


def next_check() -> int:
  """The number of this process's next agreed check (the same on every process)."""
  global _checks
  _checks += 1
  return _checks


def active() -> Any | None:
  return _active[-1] if _active else None


def check(during: str) -> None:
  """Raises Preempted(None) when a stop was asked (every process agreeing); a no-op when no run
  is being stopped on request (a plain evaluation outside a run)."""
  preemption = active()
  if preemption is not None and preemption.reached():
    raise Preempted(None, preemption.signal_name, during)

"""The project's exception for a user's mistake, at the bottom of the import graph.

A `UserError` is something the user gave that cannot work (a path that does not exist, a key the
config does not have, a data file of the wrong kind): its message names the problem and the fix.
The command-line programs print it as one line and exit 2; `--verbosity=1` or the environment
variable `DRO_JAX_TRACEBACK=1` shows the traceback instead. It is a ValueError, so code that
catches ValueError keeps doing so.
"""

from __future__ import annotations

import os
from typing import Sequence

TRACEBACK_ENV = "DRO_JAX_TRACEBACK"
EXIT_CODE = 2


class UserError(ValueError):
  """A mistake in what the user gave; the message says what is wrong and how to fix it."""


BUDGET_EXIT_CODE = 3
STOPPED_EXIT_CODE = 143


class JudgeBudgetExceeded(Exception):
  """The next batch of judge calls would pass the budget (`evaluation.judge_max_calls`,
  `online.oracle_max_calls`): nothing of it was sent, every verdict paid for is stored; exit 3."""


class JudgingStopped(Exception):
  """SIGTERM or Ctrl-C while an API judge was judging: the verdicts received are stored, the
  rest was not asked; exit 143 (the same command resumes)."""


def one_line(message: object) -> str:
  """The message on one line (a multi-line message's lines joined)."""
  return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def traceback_wanted(argv: Sequence[str] = ()) -> bool:
  """Whether the user asked for tracebacks: DRO_JAX_TRACEBACK=1, or --verbosity (-v) of 1 or more
  among `argv` (read here, as the flags may not have parsed)."""
  if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes"):
    return True
  words = list(argv)
  for index, word in enumerate(words):
    name, sep, value = word.lstrip("-").partition("=")
    if name not in ("verbosity", "v") or not word.startswith("-"):
      continue
    if not sep and index + 1 < len(words):
      value = words[index + 1]
    try:
      if int(value) >= 1:
        return True
    except ValueError:
      continue
  return False

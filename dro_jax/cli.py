"""What the command-line programs share: flags first, heavy imports after.

`python -m dro_jax.X --help` answers before JAX, TensorFlow or transformers is imported: each
program parses its flags and checks the paths they name (`check`) with nothing but the standard
library, and only then starts the backends and does its work. A user's mistake (a
`dro_jax.errors.UserError`, or a ValueError / CheckpointError raised on what the user gave) is one
line on stderr and exit status 2; `--verbosity=1` or DRO_JAX_TRACEBACK=1 shows the traceback. A
judge's budget reached is exit status 3, and judging stopped by SIGTERM / Ctrl-C 143 (both with
every paid verdict stored).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from dro_jax import errors


def run(parse: Callable[[Sequence[str]], Any], main: Callable[[], Any], *,
        check: Callable[[Any], None] | None = None, backends: bool = True) -> Any:
  """`parse(sys.argv[1:])` (argparse exits on --help), `check(args)`, the backends started
  (`console.initialize_backends`, when `backends`), then `main()`; returns what main returns."""
  argv = sys.argv
  try:
    args = parse(argv[1:])
    if check is not None:
      check(args)
    if backends:
      from dro_jax import console
      console.initialize_backends()
    return main()
  except (errors.JudgeBudgetExceeded, errors.JudgingStopped) as error:
    if errors.traceback_wanted(argv):
      raise
    budget = isinstance(error, errors.JudgeBudgetExceeded)
    print(f"{'stopped' if budget else 'preempted'}: {errors.one_line(error)}", file=sys.stderr,
          flush=True)
    sys.exit(errors.BUDGET_EXIT_CODE if budget else errors.STOPPED_EXIT_CODE)
  except Exception as error:  # noqa: BLE001 (a user's mistake is told apart below)
    if not _users_mistake(error) or errors.traceback_wanted(argv):
      raise
    print(f"error: {errors.one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_CODE)


def _users_mistake(error: Exception) -> bool:
  if isinstance(error, ValueError):  # UserError among them
    return True
  checkpoints = sys.modules.get("dro_jax.checkpoints")
  return checkpoints is not None and isinstance(error, checkpoints.CheckpointError)

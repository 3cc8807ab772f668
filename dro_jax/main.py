"""The driver: `python -m dro_jax.main --config configs/NAME.py[:k=v,...] --workdir DIR`.

Parses the locked ml_collections config (overrides as `--config.x=y`), initialises multi-host
JAX when several processes run, and hands the config to `RUNNERS[config.runner]`.
`--print_config` prints every key of the config with its value and exits (no --workdir needed).

A user's mistake (a config file or init checkpoint that does not exist, a key the config does not
have, an empty data file or one of the wrong kind, a vocabulary larger than the model's) is
found before the workdir is created where it can be, and printed as one line naming the problem
and the fix, exit status 2 (`dro_jax.errors.UserError`); `--verbosity=1` or DRO_JAX_TRACEBACK=1
shows the traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from dro_jax import own_package  # noqa: E402

own_package.repair()  # run from the clone's parent folder, dro_jax/configs.py stays itself

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dro_jax import console, distributed, errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:k=v,...]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and config.json go "
                               "(local or gs://)")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print every key of the config with "
                                  "its value (the recipe's defaults and the overrides), then exit")

# Recipes that start from scratch by design; every other loss aligns an SFT policy.
FROM_SCRATCH_LOSSES = ("sft", "reward_model", "preference_model")


def _train(config, workdir):
  from dro_jax import train
  return train.run(config, workdir)


def _demo(config, workdir):
  from dro_jax import demo
  return demo.run(config, workdir)


def _online(config, workdir):
  from dro_jax import online
  return online.run(config, workdir)


RUNNERS = {"train": _train, "demo": _demo, "online": _online}


# N processes of one run (launch/local.py, a pod): dro_jax/distributed.py.
PROCESS_ENV = distributed.PROCESS_ENV
maybe_initialize_distributed = distributed.maybe_initialize


class _QuietCheckpointing:
  """Drops orbax's INFO records (several per save and restore); its warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


# ------------------------------------------------------------------------------ the command line


def _config_argument(argv: list[str]) -> str | None:
  """The value of --config as given (`path[:args]`), read from argv."""
  for index, word in enumerate(argv):
    if word in ("--config", "-config") and index + 1 < len(argv):
      return argv[index + 1]
    if word.startswith(("--config=", "-config=")):
      return word.split("=", 1)[1]
  return None


def _recipes_hint(path: str) -> str:
  """The recipe files, as paths that exist from the working folder."""
  del path
  try:
    from dro_jax import configs
    names = configs.recipes()
    example = configs.recipe_path("sft")
  except Exception:  # noqa: BLE001 (the hint must never hide the error it comes with)
    return "give the path of a recipe file (configs/NAME.py in the dro_jax repository)"
  if not names:
    return "give the path of a recipe file"
  return f"the recipes: {', '.join(names)} (e.g. --config {example}:size=tiny)"


def _unknown_override(argv: list[str], config_argument: str) -> errors.UserError | None:
  """The first `--config.KEY=...` naming no key of the config, with the closest key."""
  from dro_jax import configs
  path, _, arg = config_argument.partition(":")
  try:
    config = configs.load(path, arg or None)
  except Exception:  # the file itself fails: flag parsing reports that
    return None
  known = {key for key, _, _ in configs.flat_items(config)}
  parents = {key.rsplit(".", 1)[0] for key in known if "." in key}
  for word in argv:
    if not word.startswith("--config."):
      continue
    key = word[len("--config."):].split("=", 1)[0]
    if key in known or key in parents:
      continue
    close = configs.closest_key(config, key)
    hint = (f"did you mean --config.{close}?" if close else
            "--print_config lists every key")
    return errors.UserError(f"--config.{key}: {path} has no key {key!r}; {hint}")
  return None


def _flag_error_line(error: Exception) -> str:
  """absl's flag error on one line; a recipe's own error (its traceback) by its last line."""
  message = str(error)
  if "Error whilst parsing config file" in message:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"--config: {lines[-1]}"
  return errors.one_line(message)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake of the command line as a UserError."""
  config_argument = _config_argument(argv)
  if config_argument is not None:
    path = config_argument.split(":", 1)[0]
    if not os.path.isfile(path) and "://" not in path:
      raise errors.UserError(f"--config {path}: no such config file; {_recipes_hint(path)}")
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    cause = error.__cause__ or error.__context__
    if isinstance(cause, (AttributeError, KeyError)) and config_argument:
      unknown = _unknown_override(argv, config_argument)
      if unknown is not None:
        raise unknown from error
    raise errors.UserError(_flag_error_line(error)) from error
  except (AttributeError, KeyError) as error:  # an override naming no key of the config
    unknown = _unknown_override(argv, config_argument) if config_argument else None
    if unknown is not None:
      raise unknown from error
    raise errors.UserError(f"an override names no key of the config: "
                           f"{errors.one_line(error)}") from error
  if config_argument is None:
    raise errors.UserError("give --config configs/NAME.py[:k=v,...]; "
                           + _recipes_hint(""))
  try:
    _CONFIG.value.runner  # pylint: disable=pointless-statement
  except OSError as error:  # the recipe could not be loaded
    raise errors.UserError(f"--config {config_argument}: {errors.one_line(error)}") from error
  if not _PRINT_CONFIG.value and not _WORKDIR.value:
    raise errors.UserError("give --workdir DIR (where checkpoints, metrics and config.json go; "
                           "a new folder or a run to resume)")
  from dro_jax import configs
  configs.mark(_CONFIG.value, "command line", configs.command_line_keys(argv))
  return rest


# --------------------------------------------------------------------------------------- checks


def preflight(config, workdir: str | None = None) -> None:
  """The mistakes that can be found before anything is written: an init checkpoint that does not
  exist or is not a checkpoint, data files that are missing, empty or of the wrong kind."""
  if config.runner not in RUNNERS:
    raise errors.UserError(f"config.runner={config.runner!r}: choose from {sorted(RUNNERS)}")
  from dro_jax import datasets
  datasets.resolve_demo(config)
  if config.get("init_checkpoint"):
    from dro_jax import initialization
    initialization.init_checkpoint_kind(config.init_checkpoint)
    initialization.resolve_init_dims(config)
  datasets.check_files(config)
  evaluation = config.get("evaluation")
  if evaluation is not None and evaluation.get("judge"):  # the periodic judge, named by its key
    from dro_jax import judge_specs
    judge_specs.check(evaluation.judge, "config.evaluation.judge")
    if re.search(r"(^|:)api:", evaluation.judge.strip()):  # its endpoint reached before any work
      from dro_jax import judges
      judges.judge_from_spec(evaluation.judge, **judges.judge_options(evaluation))


def random_init_warning(config) -> str | None:
  """The warning for an alignment recipe that starts from a randomly initialised policy."""
  if config.runner != "train" or config.get("init_checkpoint") or (
      config.loss in FROM_SCRATCH_LOSSES):
    return None
  return (f"WARNING: {config.loss} starts from random init (no --config.init_checkpoint): it "
          f"aligns a policy that has learnt nothing yet. The README's recipe needs an SFT policy "
          f"first: train configs/sft.py, then pass --config.init_checkpoint=<sft workdir>.")


def main(argv) -> None:
  del argv
  if flags.FLAGS.verbosity <= 0:  # --verbosity=1 shows everything
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    from dro_jax import configs
    if config.get("init_checkpoint"):  # the dimensions the run takes from it
      from dro_jax import initialization
      initialization.resolve_init_dims(config)
    print(configs.describe(config), flush=True)
    return
  workdir = _WORKDIR.value
  # Every log record goes to <workdir>/log.txt (once the run has claimed the workdir); the
  # console shows warnings and errors, and everything with --verbosity=1.
  log = console.route_logs(workdir, verbose=flags.FLAGS.verbosity >= 1)
  if flags.FLAGS.verbosity <= 0:
    log.addFilter(_QuietCheckpointing())
  console.import_tensorflow()
  preflight(config, workdir)
  warning = random_init_warning(config)
  if warning:
    banner = "!" * 100
    print(f"{banner}\n{warning}\n{banner}", file=sys.stderr, flush=True)
  maybe_initialize_distributed()
  console.initialize_backends()
  from dro_jax import checkpoint_manager, resume, train
  existed = _exists(workdir)
  try:
    RUNNERS[config.runner](config, workdir)
    log.claim()  # finished: its records belong in the workdir, whoever created it
  except errors.UserError:
    log.discard()  # refused: its log records go nowhere
    if not existed:
      _remove_stub(workdir)
    raise
  except (resume.ConfigChangeError, checkpoint_manager.CheckpointMismatchError) as error:
    log.discard()
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
  except train.NonFiniteError as error:
    print(f"stopped: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
  except train.Preempted as preempted:
    print(str(preempted), flush=True)
    sys.exit(143)
  except errors.JudgeBudgetExceeded as error:  # the run's state is saved; the cache holds verdicts
    print(f"stopped: {errors.one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(errors.BUDGET_EXIT_CODE)
  except errors.JudgingStopped as error:
    print(f"preempted: {errors.one_line(error)}", flush=True)
    sys.exit(errors.STOPPED_EXIT_CODE)


def _exists(workdir: str) -> bool:
  from dro_jax import files
  return bool(files.gfile().exists(workdir))


def _remove_stub(workdir: str) -> None:
  """Removes a workdir this command created when a user error stopped it before any checkpoint
  (a config.json, data statistics): the next try starts clean."""
  import jax
  from dro_jax import files
  if jax.process_index() != 0:
    return
  gfile = files.gfile()
  if not gfile.exists(workdir):
    return
  # A saved step anywhere below (the run's own, or a stage's like the online loop's sft/) stays.
  for folder, subfolders, _ in gfile.walk(workdir):
    if os.path.basename(folder.rstrip("/")) == "checkpoints" and any(
        name.rstrip("/").isdigit() for name in subfolders):
      return
  gfile.rmtree(workdir)


def run(argv: list[str] | None = None) -> None:
  """Console script `dro_jax`: a user error is one line on stderr and exit status 2."""
  argv = list(sys.argv if argv is None else argv)
  try:
    app.run(main, argv=argv, flags_parser=parse_flags)
  except errors.UserError as error:
    if errors.traceback_wanted(argv):
      raise
    print(f"error: {errors.one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_CODE)


if __name__ == "__main__":
  sys.exit(run())

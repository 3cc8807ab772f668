"""The driver: `python -m dro_jax.main --config configs/NAME.py[:k=v,...] --workdir DIR`.

Parses the locked ml_collections config (overrides as `--config.x=y`), initialises multi-host
JAX when several processes run, and hands the config to `RUNNERS[config.runner]`.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:k=v,...]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and config.json go "
                               "(local or gs://)")
flags.mark_flags_as_required(["config", "workdir"])


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


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() on TPU pods / multi-process launches (env tells us)."""
  import jax
  multi = any(os.environ.get(name) for name in (
      "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"))
  if multi or os.environ.get("DRO_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


class _QuietCheckpointing:
  """Drops orbax's INFO records (several per save and restore); its warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv) -> None:
  del argv
  if flags.FLAGS.verbosity <= 0:  # --verbosity=1 shows everything
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
  config = _CONFIG.value
  if config.runner not in RUNNERS:
    raise app.UsageError(f"config.runner={config.runner!r}: choose from {sorted(RUNNERS)}")
  maybe_initialize_distributed()
  from dro_jax import checkpoint_manager, resume, train
  try:
    RUNNERS[config.runner](config, _WORKDIR.value)
  except (resume.ConfigChangeError, checkpoint_manager.CheckpointMismatchError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
  except train.NonFiniteError as error:
    print(f"stopped: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
  except train.Preempted as preempted:
    print(str(preempted), flush=True)
    sys.exit(143)


def run() -> None:
  """Console script `dro_jax`."""
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())

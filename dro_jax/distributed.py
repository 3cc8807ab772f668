"""Several processes of one command (a TPU pod's hosts, or launch/local.py on one machine).

`maybe_initialize()` calls jax.distributed.initialize once, as the environment says:

    DRO_JAX_COORDINATOR_ADDRESS=host:port DRO_JAX_NUM_PROCESSES=N DRO_JAX_PROCESS_ID=i
                                  given explicitly (launch/local.py); on CPU the processes'
                                  collectives go through gloo
    JAX_COORDINATOR_ADDRESS, COORDINATOR_ADDRESS, MEGASCALE_COORDINATOR_ADDRESS, or
    DRO_JAX_DISTRIBUTED=1         JAX detects the rest (TPU pods, Slurm, Open MPI, Kubernetes)

Every command-line program calls it before JAX's backends start (`console.initialize_backends`),
so the driver, the demo, evaluate, sample and export all run as N processes of one mesh.
`DRO_JAX_HEARTBEAT_TIMEOUT_S` (default JAX's 100 s) is how long the others wait for a process
that died before they stop with an error instead of waiting in a collective.

`barrier(name)`: every process waits until all have come (files.write_text_once stands on it).
"""

from __future__ import annotations

import os

from dro_jax import errors

PROCESS_ENV = ("DRO_JAX_COORDINATOR_ADDRESS", "DRO_JAX_NUM_PROCESSES", "DRO_JAX_PROCESS_ID")
HEARTBEAT_ENV = "DRO_JAX_HEARTBEAT_TIMEOUT_S"
_initialized = False


def _heartbeat() -> dict[str, int]:
  value = os.environ.get(HEARTBEAT_ENV)
  if not value:
    return {}
  try:
    seconds = int(value)
  except ValueError as error:
    raise errors.UserError(f"{HEARTBEAT_ENV}={value!r} must be a whole number of seconds") \
        from error
  if seconds < 1:
    raise errors.UserError(f"{HEARTBEAT_ENV}={value!r} must be at least 1")
  return {"heartbeat_timeout_seconds": seconds}


def maybe_initialize() -> None:
  """jax.distributed.initialize() where the environment names several processes (at most once
  per process)."""
  global _initialized
  if _initialized:
    return
  explicit = [os.environ.get(name) for name in PROCESS_ENV]
  multi = any(os.environ.get(name) for name in (
      "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"))
  if not any(explicit) and not (multi or os.environ.get("DRO_JAX_DISTRIBUTED") == "1"):
    return
  import jax
  if any(explicit):
    if not all(explicit):
      raise errors.UserError(f"set all of {', '.join(PROCESS_ENV)} (or none): got "
                             + ", ".join(f"{n}={v!r}" for n, v in zip(PROCESS_ENV, explicit)))
    address, count, index = explicit
    try:
      count, index = int(count), int(index)
    except ValueError as error:
      raise errors.UserError(f"DRO_JAX_NUM_PROCESSES={explicit[1]!r} and DRO_JAX_PROCESS_ID="
                             f"{explicit[2]!r} must be integers") from error
    if not 0 <= index < count:
      raise errors.UserError(f"DRO_JAX_PROCESS_ID={index} must be in [0, {count})")
    if "cpu" in (os.environ.get("JAX_PLATFORMS") or "").split(","):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index, **_heartbeat())
  else:
    jax.distributed.initialize(**_heartbeat())
  _initialized = True


def barrier(name: str) -> None:
  """Every process waits here until all have come (nothing with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)

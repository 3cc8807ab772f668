"""One process of the two-process test: `python multihost_worker.py PORT PROCESS_ID WORKDIR STEPS`.

Trains the tiny DRO-V config on the test's fixed global batches (this process feeding its half
of the rows), saving and restoring through the run's Checkpointer like the driver: every process
calls save and restore. Process 0 writes the policy after the last step to WORKDIR/policy_<step>.npz.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
  port, process_id, workdir, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils

  sys.path.insert(0, os.path.dirname(__file__))
  from multihost_common import batches, config_for_test
  from dro_jax import checkpoint_manager, partitioning, step as step_lib, train

  config = config_for_test()
  mesh = partitioning.mesh_from_config(config)
  rules = partitioning.rules_from_config(config)
  model_config = step_lib.t5_config(config)
  abstract, shardings = train.state_layout(config, model_config, mesh, rules)
  checkpointer = checkpoint_manager.Checkpointer(workdir, keep_last=2)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
  restored = checkpointer.restore_latest_valid(like)
  if restored is None:
    state = train.build_state(config, model_config, mesh, rules, abstract, shardings)
  else:
    state, _, _ = restored
  start = int(jax.device_get(state.step))
  all_batches = batches(steps)
  half = len(all_batches[0]["reward"]) // 2
  local = lambda batch: {k: v[process_id * half:(process_id + 1) * half] for k, v in batch.items()}
  train_step, layout = train.compile_step(config, mesh, rules, shardings, all_batches[0])
  for index in range(start, steps):
    state, metrics = train_step(state, train.device_batch(local(all_batches[index]), layout))
  checkpointer.save(state, {"batches_consumed": steps})
  checkpointer.close()
  policy = multihost_utils.process_allgather(state.policy, tiled=True)
  if process_id == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(policy)[0]}
    np.savez(os.path.join(workdir, f"policy_{steps}.npz"), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

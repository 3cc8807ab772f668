"""Two JAX processes on 127.0.0.1 (gloo) train exactly as one process, and resume identically."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dro_jax import partitioning, step as step_lib, train
from multihost_common import batches, config_for_test

HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _two_processes(workdir: pathlib.Path, steps: int) -> None:
  port = _free_port()
  env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
         "PYTHONPATH": f"{HERE.parent}:{HERE}", "TF_CPP_MIN_LOG_LEVEL": "3"}
  processes = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(port),
                                 str(index), str(workdir), str(steps)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for index in range(2)]
  outputs = [process.communicate(timeout=600)[0] for process in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]


def _one_process(steps: int) -> dict[str, np.ndarray]:
  config = config_for_test()
  mesh = partitioning.mesh_from_config(config, devices=jax.devices()[:2])
  rules = partitioning.rules_from_config(config)
  model_config = step_lib.t5_config(config)
  abstract, shardings = train.state_layout(config, model_config, mesh, rules)
  state = train.build_state(config, model_config, mesh, rules, abstract, shardings)
  all_batches = batches(steps)
  train_step, layout = train.compile_step(config, mesh, rules, shardings, all_batches[0])
  for batch in all_batches:
    state, _ = train_step(state, train.device_batch(batch, layout))
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state.policy)[0]}


@pytest.mark.slow
def test_two_processes_train_and_resume_as_one(tmp_path):
  _two_processes(tmp_path, steps=3)  # fresh start, 3 steps, checkpoint
  _two_processes(tmp_path, steps=5)  # both restart, restore step 3, 2 more steps
  for steps in (3, 5):
    expected = _one_process(steps)
    got = np.load(tmp_path / f"policy_{steps}.npz")
    assert sorted(got.files) == sorted(expected)
    for name, value in expected.items():
      np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=1e-5, err_msg=name)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [3, 5]

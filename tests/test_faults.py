"""Runs that survive: non-finite steps (stop / skip) and corrupt checkpoints."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from dro_jax import checkpoint_manager, configs, partitioning, reference_cache
from dro_jax import step as step_lib, train

from run_helpers import read_metrics, shrink


def small_dro(demo_cache, steps: int, **changes):
  config = shrink(configs.load("dro", "size=tiny"), demo_cache, steps=steps)
  config.checkpoint_every, config.eval_every, config.log_every = 2, 2, 1
  config.keep_last = 3
  for key, value in changes.items():
    config[key] = value
  return config


@pytest.fixture
def nan_at_batch(monkeypatch):
  """The training stream with a NaN reward in one real row of batch `index` (1-based)."""
  def inject(index: int):
    real = train.train_iterator

    def poisoned(*args, **kwargs):
      iterator = real(*args, **kwargs)

      class Poisoned:
        def __init__(self):
          self.count = 0

        def __next__(self):
          batch = next(iterator)
          self.count += 1
          if self.count == index:
            batch = dict(batch)
            batch["reward"] = batch["reward"].copy()
            batch["reward"][0] = np.nan
          return batch

        def position(self):
          return iterator.position()
      return Poisoned()

    monkeypatch.setattr(train, "train_iterator", poisoned)
  return inject


@pytest.mark.slow
def test_nonfinite_stop_names_step_and_metric_and_keeps_the_last_checkpoint(
    demo_cache, tmp_path, nan_at_batch):
  nan_at_batch(5)
  config = small_dro(demo_cache, 8)
  with pytest.raises(train.NonFiniteError, match=r"step 5: loss is nan"):
    train.run(config, str(tmp_path))
  manager = checkpoint_manager.Checkpointer(str(tmp_path))
  assert manager.all_steps() == [2, 4]
  # The last checkpoint restores and scores as it did when it was saved.
  mesh = partitioning.mesh_from_config(config)
  rules = partitioning.rules_from_config(config)
  model_config = step_lib.t5_config(config)
  task, eval_task = train.resolve_data(config)
  # The run's frozen-reference cache, read back: its state holds no reference parameters.
  cache = reference_cache.prepare(config, task, eval_task, str(tmp_path), model_config, mesh,
                                  rules)
  abstract, shardings = train.state_layout(config, model_config, mesh, rules,
                                           with_reference=cache is None)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
  state, _ = manager.restore(4, like)
  manager.close()
  held_out = reference_cache.attach_eval(cache, train.eval_batches(config, eval_task,
                                                                   str(tmp_path)))
  layout = partitioning.batch_shardings(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in train.numeric(held_out[0]).items()},
      mesh)
  with partitioning.activate(mesh, rules):
    rescored = train.evaluate(jax.jit(step_lib.make_eval_step(config)), state, held_out, layout)
  logged = [row for row in read_metrics(tmp_path) if row["step"] == 4 and "eval/loss" in row]
  assert rescored["eval/loss"] == pytest.approx(logged[0]["eval/loss"], rel=1e-6)
  assert all(row["step"] < 5 or not row.get("finite", 1) for row in read_metrics(tmp_path))


@pytest.mark.slow
def test_nonfinite_skip_finishes_with_one_skipped_step(demo_cache, tmp_path, nan_at_batch):
  nan_at_batch(3)
  config = small_dro(demo_cache, 6, on_nonfinite="skip")
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 6
  rows = [row for row in read_metrics(tmp_path) if "loss" in row]
  assert rows[-1]["skipped_steps"] == 1
  assert [row["finite"] for row in rows] == [1, 1, 0, 1, 1, 1]
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.policy))


def test_skip_leaves_the_state_unchanged_on_a_nonfinite_step():
  old = step_lib.TrainState(step=np.int32(3), rng=np.zeros(2, np.uint32),
                            policy={"w": np.ones(2)}, policy_opt=())
  new = old.replace(step=np.int32(4), policy={"w": np.full(2, np.nan)})
  kept = step_lib.skip_nonfinite(np.bool_(False), new, old.replace(step=np.int32(4)))
  np.testing.assert_array_equal(kept.policy["w"], 1.0)
  assert int(kept.step) == 4


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_run_resumes(
    demo_cache, tmp_path, capsys):
  config = small_dro(demo_cache, 6)
  config.eval_every = 0
  train.run(config, str(tmp_path))
  newest = tmp_path / "checkpoints" / "6"
  data_files = [p for p in (newest / "policy").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert data_files
  for path in data_files:
    path.write_bytes(path.read_bytes()[:7])
  capsys.readouterr()
  config = small_dro(demo_cache, 8)
  config.eval_every = 0
  state = train.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert f"checkpoint {newest} is corrupt" in out
  assert "resumed from step 4" in out
  assert (tmp_path / "checkpoints_corrupt" / "6" / "policy").is_dir()
  assert int(state.step) == 8
  manager = checkpoint_manager.Checkpointer(str(tmp_path))
  assert 6 in manager.all_steps() and 8 in manager.all_steps()  # step 6 saved again
  manager.close()

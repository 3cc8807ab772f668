"""The frozen-reference cache: example ids and partners at the data level, the same losses as the
reference scored in the step, no reference parameters in the step, keys, and refusals."""

import json
import os

import jax
import numpy as np
import pytest

from dro_jax import configs, reference_cache, train
from dro_jax.data import pipeline, statistics, synthetic, tasks

from run_helpers import read_metrics, shrink

# ------------------------------------------------------------------------------------------ data

# File a: two runs of one prompt, so a partner is the next example with ANOTHER prompt.
FILE_A = [("p zero", "r0"), ("p zero", "r1"), ("p one", "r2"), ("p two", "r3"), ("p two", "r4")]
FILE_B = [("p three", "r5"), ("p four", "r6"), ("p five", "r7")]


def write_feedback(path, rows):
  with open(path, "w") as f:
    for prompt, response in rows:
      f.write(json.dumps({"prompt": prompt, "response": response, "reward": 1.0}) + "\n")
  return str(path)


@pytest.fixture
def two_files(tmp_path, demo_cache, new_name):
  name = new_name()
  paths = [write_feedback(tmp_path / "b.jsonl", FILE_B), write_feedback(tmp_path / "a.jsonl", FILE_A)]
  tasks.register_single_trajectory_task(name, paths, synthetic.demo_vocabulary(demo_cache),
                                        max_prompt_length=12, max_response_length=8)
  return name, paths


def rows_by_id(name, **kwargs):
  """{example_id: (prompt tokens, target tokens, kl_example_id, kl target tokens)}, real rows."""
  rows = {}
  for batch in pipeline.input_pipeline(name, global_batch_size=4, num_epochs=1, **kwargs):
    for i, example_id in enumerate(batch["example_id"]):
      if batch["example_weights"][i] == 0:
        assert example_id == -1 and batch.get("kl_example_id", np.full(4, -1))[i] == -1
        continue
      rows[int(example_id)] = (tuple(batch["encoder_input_tokens"][i]),
                               tuple(batch["decoder_target_tokens"][i]),
                               int(batch["kl_example_id"][i]) if "kl_example_id" in batch else None,
                               tuple(batch["kl_decoder_target_tokens"][i])
                               if "kl_example_id" in batch else None)
  return rows


def test_example_ids_and_partners_ignore_shuffling_and_hosts(two_files):
  name, _ = two_files
  plain = rows_by_id(name, shuffle=False, process_index=0, process_count=1)
  # Sorted file order: a.jsonl is file 0, b.jsonl file 1, whatever the order given.
  assert sorted(plain) == [0, 1, 2, 3, 4, 1 << 32, (1 << 32) + 1, (1 << 32) + 2]
  assert all(row[2] is None for row in plain.values())  # no partners unless asked for
  with_partners = rows_by_id(name, shuffle=False, process_index=0, process_count=1,
                             with_partners=True)
  shuffled = {}
  for host in range(2):
    shuffled.update(rows_by_id(name, shuffle=True, seed=7, process_index=host, process_count=2,
                               with_partners=True))
  assert shuffled == with_partners
  assert {key: row[:2] for key, row in with_partners.items()} == {
      key: row[:2] for key, row in plain.items()}
  # The next example with another prompt, cyclically within the file.
  partners = {key: row[2] for key, row in with_partners.items()}
  assert partners == {0: 2, 1: 2, 2: 3, 3: 0, 4: 0, 1 << 32: (1 << 32) + 1,
                      (1 << 32) + 1: (1 << 32) + 2, (1 << 32) + 2: 1 << 32}
  for example_id, (_, _, partner, kl_targets) in with_partners.items():
    assert kl_targets == with_partners[partner][1]  # tokenised and truncated as targets


# ------------------------------------------------------------------------------------------ runs


def small(recipe: str, demo_cache: str, mode: str, steps: int = 3, arg: str = ""):
  config = shrink(configs.load(recipe, "size=tiny" + arg), demo_cache, steps=steps)
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e-2  # the policy leaves the reference at once
  config.log_every, config.eval_every, config.checkpoint_every = 1, 3, 3
  config.reference_cache = mode
  return config


class Recorder:
  """Wraps train.compile_step to keep the paths of the state leaves and the batch keys that the
  jitted step is called with."""

  def __init__(self, monkeypatch):
    self.calls = []
    real = train.compile_step

    def compile_step(*args, **kwargs):
      step, layout = real(*args, **kwargs)

      def recorded(state, batch):
        self.calls.append(([jax.tree_util.keystr(path) for path, _ in
                            jax.tree_util.tree_flatten_with_path(state)[0]], sorted(batch)))
        return step(state, batch)
      recorded.jitted = step.jitted
      return recorded, layout

    monkeypatch.setattr(train, "compile_step", compile_step)


def with_partners_forced(monkeypatch):
  """The step-scored KTO run reads the same data-level partners as the cached one."""
  for name in ("train_iterator", "eval_batches"):
    real = getattr(train, name)
    monkeypatch.setattr(train, name, lambda *a, _real=real, **k: _real(*a, **{
        **k, "with_partners": True}))


def loss_rows(workdir):
  rows = read_metrics(workdir)
  for row in rows:
    row.pop("steps_per_second", None)
  return rows


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dro", "kto", "dpo"])
def test_the_cache_gives_the_losses_of_the_reference_scored_in_the_step(
    recipe, demo_cache, tmp_path, monkeypatch, capsys):
  with monkeypatch.context() as patch:
    recorder = Recorder(patch)
    cached = train.run(small(recipe, demo_cache, "on"), str(tmp_path / "cached"))
  assert "reference cache: train" in capsys.readouterr().out
  with monkeypatch.context() as patch:
    if recipe == "kto":
      with_partners_forced(patch)
    scored = train.run(small(recipe, demo_cache, "off"), str(tmp_path / "scored"))

  assert cached.reference is None and scored.reference is not None
  # The jitted step's arguments: no reference parameters, the cached log-probs, no ids.
  paths, batch_keys = recorder.calls[0]
  assert not [path for path in paths if "reference" in path]
  assert len(paths) == len(jax.tree.leaves(cached))
  assert len(jax.tree.leaves(scored)) - len(paths) == len(jax.tree.leaves(scored.reference))
  keys = reference_cache.VALUE_KEYS[reference_cache.KINDS[recipe]]
  assert set(keys) <= set(batch_keys) and "example_id" not in batch_keys
  assert not (tmp_path / "cached" / "checkpoints" / "3" / "reference").exists()

  rows, expected = loss_rows(tmp_path / "cached"), loss_rows(tmp_path / "scored")
  assert [sorted(row) for row in rows] == [sorted(row) for row in expected]
  assert any("eval/loss" in row for row in rows)
  for row, want in zip(rows, expected):
    for key in want:
      assert row[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (row["step"], key)
  assert rows[2]["loss"] != pytest.approx(rows[0]["loss"], rel=1e-3)  # the policy moved


@pytest.mark.slow
def test_a_resumed_run_keeps_its_cache(demo_cache, tmp_path, capsys):
  workdir = str(tmp_path)

  def config(steps: int, mode: str = "auto"):
    config = small("dro_p", demo_cache, mode, steps=steps)
    config.eval_every, config.checkpoint_every = 0, 1
    return config

  train.run(config(1), workdir)
  assert "reference cache: train" in capsys.readouterr().out
  folder = tmp_path / "reference_cache"
  stored = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.npz")}
  assert [name.split("-")[:2] for name in stored] == [["train", "single"]]
  state = train.run(config(2), workdir)
  out = capsys.readouterr().out
  assert "resumed from step 1" in out and "reference cache: train" not in out
  assert int(state.step) == 2 and state.reference is None
  assert {path.name: path.stat().st_mtime_ns for path in folder.glob("*.npz")} == stored
  # Without the cache the checkpoint would have no reference to restore: refused, by name.
  with pytest.raises(ValueError, match="holds no reference parameters.*reference_cache='auto'"):
    train.run(config(3, "off"), workdir)


def test_a_trust_region_refuses_the_cache(demo_cache, tmp_path):
  config = small("dpo", demo_cache, "on", arg=",tr=soft")
  with pytest.raises(ValueError, match=r"reference_cache='on' needs a frozen reference.*"
                                       r"reference moves \(trust region: reference.alpha=0.6"):
    train.run(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
  assert not reference_cache.enabled(small("dpo", demo_cache, "auto", arg=",tr=hard"))
  assert reference_cache.enabled(small("dpo", demo_cache, "auto"))
  assert not reference_cache.enabled(small("sft", demo_cache, "auto"))
  with pytest.raises(ValueError, match="loss 'sft' uses no reference"):
    reference_cache.enabled(small("sft", demo_cache, "on"))


# ------------------------------------------------------------------------------------------ keys


def test_a_changed_data_or_init_checkpoint_gives_a_new_key(two_files, demo_cache, tmp_path):
  name, paths = two_files
  config = small("dro", demo_cache, "auto")
  model_config = train.step_lib.t5_config(config)

  def data(lengths=None, partners=False):
    stats = statistics.dataset_statistics(name, "train")
    return reference_cache.data_fingerprint(name, "train", lengths or {"inputs": 12, "targets": 8},
                                            {name: stats}, partners)

  def key(data_part=None, init_part=None):
    return reference_cache.cache_name(
        "train", "single", data_part or data(),
        init_part or reference_cache.init_fingerprint(config, model_config))

  first = key()
  assert key() == first  # stable
  assert key(data({"inputs": 12, "targets": 6})) != first
  assert key(data(partners=True)) != first
  write_feedback(paths[1], FILE_A + [("p six", "r8")])  # one example more: count and files
  changed = key()
  assert changed != first
  os.utime(paths[1], ns=(1, 1))  # same content, another mtime: the source fingerprint
  assert key() != changed

  config.seed = 1
  assert key(data()) != changed  # "scratch:<seed>"
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  (hf / "model.safetensors").write_bytes(b"0" * 64)
  config.init_checkpoint = str(hf)
  from_hf = key()
  assert from_hf == key()
  (hf / "model.safetensors").write_bytes(b"0" * 65)  # new weights: size and mtime
  assert key() != from_hf
  workdir = tmp_path / "sft"
  (workdir / "checkpoints" / "2" / "policy").mkdir(parents=True)
  config.init_checkpoint = str(workdir)
  at_2 = key()
  (workdir / "checkpoints" / "4" / "policy").mkdir(parents=True)  # its latest step moved on
  assert key() != at_2
  config.model.emb_dim = 64  # another model config, same files
  assert key(init_part=reference_cache.init_fingerprint(
      config, train.step_lib.t5_config(config))) != key()

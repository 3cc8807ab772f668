"""load_t5x on real checkpoints written by t5x, against t5x's own logits and score_batch."""

import shutil

import jax
import numpy as np
import pytest

from dro_jax import checkpoints, partitioning, scoring
from dro_jax.models import t5 as t5_lib

FAMILIES = ["t5_1_1_tiny", "t5_1_0_tiny"]


@pytest.fixture(scope="module", params=FAMILIES)
def fixture(request, fixtures_dir):
  folder = fixtures_dir / "t5x" / request.param
  return request.param, folder / "checkpoint_1000", dict(np.load(folder /
                                                                  "reference_outputs.npz"))


def test_logits_and_scores_match_t5x(fixture):
  family, path, reference = fixture
  config, params = checkpoints.load_t5x(str(path), dtype="float32")
  assert config.logits_via_embedding == (family == "t5_1_0_tiny")
  assert (config.vocab_size, config.emb_dim, config.num_heads, config.head_dim) == (256, 32, 4, 8)
  model = t5_lib.T5(config)
  logits = np.asarray(model.apply({"params": params}, reference["encoder_input_tokens"],
                                  reference["decoder_input_tokens"]))
  valid = reference["decoder_target_tokens"] > 0
  error = np.abs(logits - reference["logits"])[valid].max()
  assert error <= 1e-5 * np.abs(reference["logits"][valid]).max()
  scores = scoring.score(model, params, reference["encoder_input_tokens"],
                         reference["decoder_input_tokens"], reference["decoder_target_tokens"])
  np.testing.assert_allclose(np.asarray(scores["logps"]), reference["sequence_log_likelihood"],
                             rtol=1e-4)


def test_sharded_read_gives_the_same_arrays(fixture, monkeypatch):
  _, path, _ = fixture
  config, params = checkpoints.load_t5x(str(path), dtype="float32")
  mesh = partitioning.make_mesh((2, 2, 2))
  shardings = partitioning.params_shardings(t5_lib.abstract_params(config), mesh)
  reads = {}
  original_init = checkpoints.Source.__init__

  def recording_init(self, shape, read, name):
    def recorded(index):
      block = read(index)
      reads.setdefault(name, set()).add(block.shape)
      return block
    original_init(self, shape, recorded, name)

  monkeypatch.setattr(checkpoints.Source, "__init__", recording_init)
  _, sharded = checkpoints.load_t5x(str(path), shardings, dtype="float32")
  # Each device's slice is read on its own, never the whole array.
  assert reads["encoder/layers_0/attention/query/kernel"] == {(16, 16)}
  for (key, a), b, sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                   jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
    assert b.sharding == sharding, key
    np.testing.assert_array_equal(np.asarray(b), a)
  # The query kernel is split over fsdp (embed) and model (joined_kv): 4 distinct shards.
  query = sharded["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert len({str(s.index) for s in query.addressable_shards}) == 4


def test_corrupted_and_truncated_checkpoints_fail_clearly(fixture, tmp_path):
  _, path, _ = fixture
  truncated = tmp_path / "truncated"
  shutil.copytree(path, truncated)
  data = (truncated / "checkpoint").read_bytes()
  (truncated / "checkpoint").write_bytes(data[: len(data) // 3])
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint: corrupt or truncated"):
    checkpoints.load_t5x(str(truncated))

  missing = tmp_path / "missing_array"
  shutil.copytree(path, missing)
  shutil.rmtree(missing / "target.decoder.layers_1.mlp.wo.kernel")
  with pytest.raises(checkpoints.CheckpointError, match=r"decoder/layers_1/mlp/wo/kernel"):
    checkpoints.load_t5x(str(missing))

  corrupt = tmp_path / "corrupt_chunk"
  shutil.copytree(path, corrupt)
  chunk = corrupt / "target.encoder.layers_0.attention.query.kernel" / "0.0"
  chunk.write_bytes(chunk.read_bytes()[:10])
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"cannot read tensor 'encoder/layers_0/attention/query/kernel'"):
    checkpoints.load_t5x(str(corrupt))

  with pytest.raises(checkpoints.CheckpointError, match="cannot read the T5X checkpoint"):
    checkpoints.load_t5x(str(tmp_path / "nowhere"))


def test_relative_paths_and_the_inspection_command(fixture, monkeypatch, capsys):
  family, path, _ = fixture
  from dro_jax import inspect_checkpoint
  monkeypatch.chdir(path.parent.parent)
  assert inspect_checkpoint.main([f"{family}/checkpoint_1000", "--reference_outputs",
                                  f"{family}/reference_outputs.npz"]) == 0
  output = capsys.readouterr().out
  assert "PASS" in output and "FAIL" not in output
  # The count of every `target.*` zarr array that t5x wrote.
  import json
  count = sum(int(np.prod(json.loads((folder / ".zarray").read_text())["shape"]))
              for folder in path.glob("target.*"))
  assert f"{count:,} parameters" in output
  difference = float(output.rsplit("max relative difference:", 1)[1].split()[0])
  assert difference < 1e-5


def test_inspection_fails_past_the_tolerance(fixtures_dir, tmp_path, capsys):
  from dro_jax import inspect_checkpoint
  folder = fixtures_dir / "t5x" / "t5_1_1_tiny"
  reference = dict(np.load(folder / "reference_outputs.npz"))
  reference["sequence_log_likelihood"] = reference["sequence_log_likelihood"] * 1.1
  np.savez(tmp_path / "off.npz", **reference)
  checkpoint = str(folder / "checkpoint_1000")
  assert inspect_checkpoint.main([checkpoint, "--reference_outputs",
                                  str(tmp_path / "off.npz")]) == 1
  assert "FAIL: sequence log-likelihoods differ" in capsys.readouterr().out
  # The same difference passes a looser tolerance.
  assert inspect_checkpoint.main([checkpoint, "--reference_outputs", str(tmp_path / "off.npz"),
                                  "--tolerance", "0.2"]) == 0
  assert "PASS" in capsys.readouterr().out
  del reference["decoder_input_tokens"]
  np.savez(tmp_path / "incomplete.npz", **reference)
  assert inspect_checkpoint.main([checkpoint, "--reference_outputs",
                                  str(tmp_path / "incomplete.npz")]) == 2
  assert "missing ['decoder_input_tokens']" in capsys.readouterr().err


def test_checkpoint_folders_are_told_apart(fixtures_dir, tmp_path, capsys):
  from dro_jax import inspect_checkpoint
  folder = fixtures_dir / "t5x" / "t5_1_1_tiny"
  assert checkpoints.checkpoint_kind(str(folder / "checkpoint_1000")) == "t5x"
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  assert checkpoints.checkpoint_kind(str(tmp_path / "hf")) == "hf"
  # The parent of checkpoint_N: name the folder to pass.
  with pytest.raises(checkpoints.CheckpointError, match=r"holds T5X checkpoints \(checkpoint_1000\)"
                     r"; pass one of them, e\.g\. .*t5_1_1_tiny/checkpoint_1000"):
    checkpoints.checkpoint_kind(str(folder))
  assert inspect_checkpoint.main([str(folder)]) == 2
  assert "pass one of them" in capsys.readouterr().err
  # Neither: say which files were expected.
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"expected .*empty/checkpoint .* or .*empty/config\.json"):
    checkpoints.checkpoint_kind(str(tmp_path / "empty"))
  with pytest.raises(checkpoints.CheckpointError, match="no such file or folder"):
    checkpoints.checkpoint_kind(str(tmp_path / "nowhere"))
  with pytest.raises(checkpoints.CheckpointError, match="is a file; pass the folder"):
    checkpoints.checkpoint_kind(str(folder / "checkpoint_1000" / "checkpoint"))


def test_inspection_help_describes_the_flags(capsys):
  from dro_jax import inspect_checkpoint
  with pytest.raises(SystemExit) as exit_info:
    inspect_checkpoint.main(["--help"])
  assert exit_info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for flag in ("--reference_outputs", "--tolerance", "--dtype"):
    assert flag in text
  assert "sequence_log_likelihood" in text and "exit status" in text
  assert "T5X checkpoint_N/ folder" in text and "Hugging Face folder" in text


def test_bfloat16_t5x_arrays_load(fixture, tmp_path):
  """Rewrite every target array as a bfloat16 zarr array, as bfloat16-trained T5X runs store them."""
  import ml_dtypes
  import tensorstore as ts
  from flax import serialization

  _, path, _ = fixture
  copy = tmp_path / "bf16"
  shutil.copytree(path, copy)
  state = serialization.msgpack_restore((copy / "checkpoint").read_bytes())

  def rewrite(tree):
    for key, value in tree.items():
      if isinstance(value, dict) and "driver" in value:
        folder = copy / value["kvstore"]["path"]
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder)}}
        data = ts.open(spec).result().read().result()
        shutil.rmtree(folder)
        metadata = {k: v for k, v in value["metadata"].items() if k != "dtype"}
        ts.open({**spec, "metadata": metadata}, create=True, dtype=ts.bfloat16).result().write(
            data.astype(ml_dtypes.bfloat16)).result()
        value["dtype"] = "bfloat16"
        value["metadata"].pop("dtype", None)
      elif isinstance(value, dict):
        rewrite(value)

  rewrite(state["optimizer"]["target"])
  (copy / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
  _, params = checkpoints.load_t5x(str(copy), dtype="float32")
  _, full = checkpoints.load_t5x(str(path), dtype="float32")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(b).astype(ml_dtypes.bfloat16).astype(np.float32))

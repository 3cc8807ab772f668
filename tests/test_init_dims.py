"""With init_checkpoint, the model's dimensions come from the checkpoint (a dro_jax workdir's
config.json, a Hugging Face folder's config.json, a T5X checkpoint's shapes), not from a size
preset or a recipe; a conflicting explicit setting, or a checkpoint whose shapes cannot fit, is
refused in one line before anything is written."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import (checkpoint_manager, configs, errors, initialization, online, partitioning,
                     train)
from dro_jax import step as step_lib
from run_helpers import read_metrics, shrink

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A user's SFT with other dimensions than any preset (one layer per stack).
OWN_DIMS = {"vocab_size": 256, "emb_dim": 48, "num_heads": 2, "head_dim": 16,
            "num_encoder_layers": 1, "num_decoder_layers": 1, "mlp_dim": 80}


@pytest.fixture(scope="module")
def own_sft(tmp_path_factory) -> str:
  """A dro_jax workdir of an SFT policy with OWN_DIMS: a saved state and its config.json (random
  parameters, placed without a compile)."""
  config = configs.load("sft", "size=tiny")
  for key, value in OWN_DIMS.items():
    config.model[key] = value
  config.mesh_shape = (1, 1, 1)
  mesh = partitioning.mesh_from_config(config)
  rules = partitioning.rules_from_config(config)
  abstract, shardings = initialization.state_layout(config, step_lib.t5_config(config), mesh,
                                                    rules)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda x, s: jax.device_put(0.05 * rng.standard_normal(x.shape).astype(x.dtype)
                                  if jnp.issubdtype(x.dtype, jnp.floating)
                                  else np.zeros(x.shape, x.dtype), s), abstract, shardings)
  workdir = str(tmp_path_factory.mktemp("own_sft"))
  checkpointer = checkpoint_manager.Checkpointer(workdir, async_save=False)
  checkpointer.save(state, {"epoch": 0})
  checkpointer.close()
  train.write_text(f"{workdir}/config.json", config.to_json_best_effort())
  return workdir


def _dims(config) -> dict:
  model = step_lib.t5_config(config)
  return {key: getattr(model, key) for key in OWN_DIMS}


def test_online_tiny_takes_the_dims_of_an_sft_workdir(own_sft):
  """configs/online.py:size=tiny,init=<SFT> used to force the demo's 128-wide model onto it."""
  config = configs.load("online", f"size=tiny,init={own_sft}")
  config.data.task = "my_registered_task"  # the user's prompts (not read here)
  assert _dims(config)["emb_dim"] == 128  # the size preset's, before the run resolves it
  online.validate(config)
  assert _dims(config) == OWN_DIMS
  assert configs.origin(config, "model.emb_dim") == "init checkpoint"
  assert json.loads(config.to_json_best_effort())["model"]["emb_dim"] == 48  # for config.json


@pytest.mark.slow
def test_a_run_initialised_from_other_dims_trains(own_sft, demo_cache, tmp_path):
  """DPO at size=tiny (a 32-wide preset) from the 48-wide SFT: one step, where orbax refused the
  shapes before."""
  config = shrink(configs.load("dpo", f"size=tiny,init={own_sft}"), demo_cache, steps=1)
  config.eval_every, config.mesh_shape = 0, (1, 1, 1)
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 1
  assert np.isfinite(read_metrics(tmp_path)[-1]["loss"])
  saved = json.loads((tmp_path / "config.json").read_text())["model"]
  assert {key: saved[key] for key in OWN_DIMS} == OWN_DIMS
  assert state.policy["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].shape == (48, 80)


def test_a_conflicting_command_line_dim_is_refused_before_anything_is_written(own_sft, tmp_path):
  workdir = tmp_path / "run"
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("make this polite\nsay it kindly\n")
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/online.py:size=tiny,"
       f"init={own_sft}", "--config.model.emb_dim=128", f"--config.online.prompts_file={prompts}",
       f"--workdir={workdir}"],
      env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)},
      capture_output=True, text=True, timeout=180, cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: --config.model.emb_dim=128 conflicts with the init "
                              f"checkpoint {own_sft}'s 48"), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_a_dim_set_in_code_conflicts_by_name_and_an_equal_one_passes(own_sft):
  config = configs.load("dpo", f"size=tiny,init={own_sft}")
  config.model.mlp_dim = 64
  with pytest.raises(errors.UserError, match=r"^config\.model\.mlp_dim=64 conflicts with the "
                     r"init checkpoint .*'s 80"):
    initialization.resolve_init_dims(config)
  config.model.mlp_dim = 80  # the checkpoint's own value: no conflict
  initialization.resolve_init_dims(config)
  assert _dims(config) == OWN_DIMS


def test_a_checkpoint_of_the_runs_own_dims_changes_nothing(own_sft):
  """Nothing is written when the preset already has the checkpoint's dimensions (a workdir made
  before this resumes with the same config.json)."""
  config = configs.load("sft", f"size=tiny,init={own_sft}")
  for key, value in OWN_DIMS.items():
    config.model[key] = value
  assert initialization.resolve_init_dims(config) == []


def _hf_folder(path, **changes) -> str:
  import transformers
  settings = dict(vocab_size=200, d_model=40, d_kv=10, num_heads=4, d_ff=72, num_layers=1,
                  num_decoder_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  decoder_start_token_id=0)
  settings.update(changes)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**settings))
  model.save_pretrained(str(path))
  return str(path)


def test_dims_from_a_hugging_face_folder(tmp_path):
  folder = _hf_folder(tmp_path / "hf")
  config = configs.load("dpo", f"size=tiny,init={folder}")
  initialization.resolve_init_dims(config)
  model = step_lib.t5_config(config)
  assert (model.vocab_size, model.emb_dim, model.num_heads, model.head_dim, model.mlp_dim,
          model.num_encoder_layers, model.num_decoder_layers) == (200, 40, 4, 10, 72, 1, 1)
  assert model.mlp_activations == ("gelu", "linear") and not model.logits_via_embedding
  # T5.1.0's shape: one ReLU, the output tied to the (scaled) embedding.
  folder = _hf_folder(tmp_path / "hf_t5_1_0", feed_forward_proj="relu", tie_word_embeddings=True)
  config = configs.load("sft", f"size=tiny,init={folder}")
  initialization.resolve_init_dims(config)
  model = step_lib.t5_config(config)
  assert model.mlp_activations == ("relu",) and model.logits_via_embedding


def test_a_checkpoint_whose_shapes_cannot_fit_is_refused_in_one_line(tmp_path):
  folder = _hf_folder(tmp_path / "hf", relative_attention_num_buckets=16)
  config = configs.load("dpo", f"size=tiny,init={folder}")
  with pytest.raises(errors.UserError, match=r"relative_attention_num_buckets is 16") as caught:
    initialization.resolve_init_dims(config)
  assert "\n" not in str(caught.value)


def test_dims_from_a_t5x_checkpoint(fixtures_dir):
  folders = sorted(path for path in fixtures_dir.rglob("checkpoint") if path.is_file())
  assert folders, fixtures_dir
  folder = str(folders[0].parent)
  from dro_jax import checkpoints
  expected, _ = checkpoints.load_t5x(folder, dtype="float32")
  config = configs.load("sft", f"size=tiny,init={folder}")
  initialization.resolve_init_dims(config)
  model = step_lib.t5_config(config)
  for key in initialization.MODEL_DIM_KEYS:
    assert getattr(model, key) == getattr(expected, key), key

"""Where a config's values come from: size presets fill only what nobody set, --print_config
names each value's origin, the demo task only when the config says so, and the config error path
from any working folder."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from dro_jax import configs, datasets, errors
from dro_jax import main as main_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(tmp_path, pythonpath: bool = True) -> dict:
  env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "3"}
  if pythonpath:
    env["PYTHONPATH"] = str(ROOT)
  return env


def _printed(stdout: str) -> dict[str, tuple[str, str]]:
  """{key: (value, origin)} of --print_config's lines `key = value  # type, origin`."""
  rows = {}
  for line in stdout.splitlines():
    match = re.match(r"(\S+)\s+= (.*?)  # \w+, ([a-z ]+)$", line)
    assert match, line
    rows[match.group(1)] = (match.group(2), match.group(3))
  return rows


# ----------------------------------------------------------------------------------- size presets


@pytest.mark.parametrize("recipe", ["reward_model", "preference_model"])
def test_size_tiny_keeps_a_recipes_own_lengths(recipe):
  config = configs.load(recipe, "size=tiny")
  assert config.max_input_length == 1024  # the recipe's, not tiny's 16
  assert config.max_target_length == 12  # at its default: tiny's
  origins = configs.origins(config)
  assert origins["max_input_length"] == "recipe"
  assert origins["max_target_length"] == origins["batch_size"] == "size preset"
  assert origins["seed"] == "default"


def test_size_tiny_still_shrinks_what_the_recipe_leaves_alone():
  for recipe in ("sft", "dro", "dro_p", "kto", "dpo", "ipo"):
    config = configs.load(recipe, "size=tiny")
    assert (config.max_input_length, config.max_target_length) == (16, 12), recipe
    assert (config.total_steps, config.batch_size) == (200, 16), recipe
  config = configs.load("sft", "size=tiny,steps=7,batch=32")  # the args win, even at a default
  assert (config.total_steps, config.batch_size) == (7, 32)
  assert configs.origin(config, "batch_size") == "recipe arg"
  assert configs.load("kto", "size=large").total_steps == 40_000


def test_online_tiny_preset_fills_only_keys_at_their_default():
  config = configs.load("online", "size=tiny,init=/some/sft,batch=8")
  assert config.batch_size == 8 and configs.origin(config, "batch_size") == "recipe arg"
  assert config.model.emb_dim == 128 and configs.origin(config, "model.emb_dim") == "size preset"
  assert (config.max_input_length, config.max_target_length) == (16, 12)
  assert not config.data.demo  # an SFT of the user's own: not the demo task
  assert configs.load("online", "size=tiny").data.demo
  assert configs.load("demo_online").data.demo and configs.load("demo").data.demo
  assert not configs.load("online", "size=tiny,task=my_task").data.demo


def test_values_set_after_loading_are_marked():
  config = configs.load("reward_model", "size=tiny")
  config.max_target_length = 40
  assert configs.origin(config, "max_target_length") == configs.CHANGED
  configs.mark(config, "command line", ["max_target_length"])
  line = next(line for line in configs.describe(config).splitlines()
              if line.startswith("max_target_length "))
  assert line.endswith("= 40  # int, command line"), line


def test_print_config_names_each_values_origin(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/reward_model.py:"
       f"size=tiny,steps=7", "--print_config", "--config.max_target_length=20",
       "--config.log_every", "10"],
      env=_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  rows = _printed(result.stdout)
  assert rows["max_input_length"] == ("1024", "recipe")
  assert rows["max_target_length"] == ("20", "command line")
  assert rows["log_every"] == ("10", "command line")  # the preset's value, given on purpose
  assert rows["batch_size"] == ("16", "size preset")
  assert rows["total_steps"] == ("7", "recipe arg")
  assert rows["seed"] == ("0", "default")
  assert rows["model.preset"] == ("'t5_1_1_tiny'", "size preset")
  assert rows["data.demo"] == ("False", "default")


# ------------------------------------------------------------------------------------ the demo flag


def test_is_demo_reads_the_config_flag_only(tmp_path):
  config = configs.load("online", "size=tiny,init=/some/sft")
  config.data.vocabulary = str(tmp_path / "spiece.model")
  assert not datasets.is_demo(config)  # no train_files, but the user's own vocabulary
  config = configs.load("online", "size=tiny")
  assert datasets.is_demo(config)
  # A config.json written before the key: the old rule (no data given: the demo task).
  legacy = configs.load("sft", "size=tiny").to_dict()
  del legacy["data"]["demo"]
  import ml_collections
  assert datasets.is_demo(ml_collections.ConfigDict(legacy))


@pytest.mark.parametrize("key, value", [
    ("data.vocabulary", "my_data/spiece.model"), ("data.train_files", "my_data/train.jsonl"),
    ("data.task", "my_registered_task"), ("online.prompts_file", "my_data/prompts.jsonl")])
def test_the_demo_flag_with_data_of_ones_own_is_refused_by_name(key, value):
  config = configs.load("demo_online")
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(errors.UserError, match=rf"but --config\.{re.escape(key)} is your own: "
                     r"pass --config\.data\.demo=False"):
    main_lib.preflight(config)
  assert config[section][leaf] == value  # nothing replaced


def test_the_demo_flag_with_an_sft_of_ones_own_data_is_refused(tmp_path):
  """`configs/online.py:size=tiny --config.init_checkpoint=<SFT on your data>` would sample the
  demo's prompts with it: refused; the demo's own SFT (a run on the demo task) is fine."""
  import json
  sft = tmp_path / "sft"
  (sft / "checkpoints").mkdir(parents=True)
  own = configs.load("sft", "size=tiny")
  own.data.train_files, own.data.vocabulary = "my_data/sft.jsonl", "my_data/spiece.model"
  (sft / "config.json").write_text(own.to_json_best_effort())
  config = configs.load("online", "size=tiny")
  config.init_checkpoint = str(sft)
  with pytest.raises(errors.UserError, match=r"--config\.init_checkpoint \(a run on data of your "
                     r"own\) is your own: pass --config\.data\.demo=False"):
    datasets.resolve_demo(config)
  demo_sft = configs.load("sft", "size=tiny")
  datasets.resolve_demo(demo_sft)  # no data: the demo task, recorded
  (sft / "config.json").write_text(demo_sft.to_json_best_effort())
  datasets.resolve_demo(config)
  assert datasets.is_demo(config)
  # A recipe aligning that SFT with no data given would train it on the demo task: refused.
  (sft / "config.json").write_text(own.to_json_best_effort())
  dpo = configs.load("dpo", f"size=tiny,init={sft}")
  with pytest.raises(errors.UserError, match=r"config\.init_checkpoint \(a run on data of your "
                     r"own\) is set but the run has no data"):
    datasets.resolve_demo(dpo)


def test_the_demo_runner_refuses_a_vocabulary_of_ones_own():
  config = configs.load("demo")
  config.data.vocabulary = "my_data/spiece.model"
  with pytest.raises(errors.UserError, match=r"--config\.data\.vocabulary.*data\.demo=False"):
    datasets.resolve_demo(config)


def test_a_training_recipe_without_data_records_the_demo_task():
  config = configs.load("sft", "size=tiny")
  assert not config.data.demo
  datasets.resolve_demo(config)
  assert config.data.demo and datasets.is_demo(config)
  # A vocabulary with no data would be replaced by the demo's: refused, naming it.
  config = configs.load("sft", "size=tiny")
  config.data.vocabulary = "my_data/spiece.model"
  with pytest.raises(errors.UserError, match=r"config\.data\.vocabulary is set but the run has "
                     r"no data"):
    datasets.resolve_demo(config)


def test_the_online_loop_off_the_demo_needs_prompts_of_its_own():
  config = configs.load("online", "size=tiny,init=/some/sft")
  with pytest.raises(errors.UserError, match=r"online\.prompts_file"):
    datasets.resolve_demo(config)
  config.online.prompts_file = "my_data/prompts.jsonl"
  datasets.resolve_demo(config)
  assert not datasets.is_demo(config)


# ------------------------------------------------------------------------- the config error path


def test_recipe_paths_exist_from_where_the_user_stands(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert "configs/sft.py" in configs.recipes()
  monkeypatch.chdir(tmp_path)
  listed = configs.recipes()
  assert str(ROOT / "configs" / "sft.py") in listed
  assert all(os.path.isfile(path) for path in listed)
  monkeypatch.chdir(ROOT.parent)
  assert all(os.path.isfile(path) for path in configs.recipes())


def _installed_outside_the_path(tmp_path) -> bool:
  """Whether `dro_jax` imports without PYTHONPATH (an install, as the README's pip install -e)."""
  probe = subprocess.run([sys.executable, "-c", "import dro_jax.main"], env=_env(tmp_path, False),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
  return probe.returncode == 0


def test_config_errors_from_a_folder_that_holds_a_dro_jax_folder(tmp_path):
  """The clone's parent folder holds `dro_jax/` (the clone: its configs/ and dro_jax/): `dro_jax`
  becomes a namespace package there, whose configs/ used to shadow dro_jax.configs."""
  here = tmp_path / "parent"
  (here / "dro_jax" / "dro_jax").mkdir(parents=True)
  (here / "dro_jax" / "configs").mkdir()
  shutil.copy(ROOT / "configs" / "sft.py", here / "dro_jax" / "configs" / "sft.py")
  # The shadowing needs the package installed (pip install -e ., as the README and CI do).
  assert _installed_outside_the_path(here), "dro_jax is not installed: pip install -e ."
  command = [sys.executable, "-m", "dro_jax.main"]
  result = subprocess.run(command + ["--config", "configs/nope.py"], env=_env(tmp_path, False),
                          cwd=here, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --config configs/nope.py: no such config "
                                                 "file; the recipes: "), result.stderr
  listed = re.findall(r"(\S+\.py)[,( ]", lines[0].split("the recipes: ", 1)[1])
  assert listed and all(os.path.isfile(here / path) for path in listed), listed
  result = subprocess.run(command + ["--config", "dro_jax/configs/sft.py:size=tiny",
                                     "--print_config"],
                          env=_env(tmp_path, False), cwd=here, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert _printed(result.stdout)["optimizer.name"] == ("'adamw'", "recipe")

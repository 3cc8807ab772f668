"""A newcomer's mistakes get one line, not a traceback; the CPU console stays quiet.

Each mistake runs through `python -m dro_jax.main` as a user would type it: a non-zero exit, one
line naming the problem and the fix, at most 8 lines printed in all (start-up notices included),
and no workdir left behind. Also here: the random-init warning of alignment recipes,
`--print_config`, `python -m dro_jax.sample`, and the filter of native start-up notices.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from dro_jax import configs, console, errors
from dro_jax import main as main_lib

from run_helpers import cli_env, write_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 8
NOISE = re.compile(r"libtpu|TPU_|InitializeLog|InitGoogle|oneDNN|cuda|CUDA|Unable to initialize "
                   r"backend|Source Location Trace")


@pytest.fixture(scope="module")
def vocabulary(demo_cache):
  """The demo's sentencepiece model (96 pieces), trained once into the session's cache."""
  from dro_jax.data import synthetic
  return synthetic.demo_vocabulary(demo_cache)


def driver(tmp_path, demo_cache, recipe: str, *overrides: str, env=None):
  """(the finished process, its stdout + stderr, the workdir it was given)."""
  workdir = tmp_path / "run"
  config = recipe if "/" in recipe else f"{ROOT}/configs/{recipe}"
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={config}", f"--workdir={workdir}",
       *overrides], env=env or cli_env(tmp_path, demo_cache, "user_errors_cache"),
      capture_output=True, text=True, timeout=300, cwd=tmp_path)
  return result, result.stdout + result.stderr, workdir


def assert_one_line_error(result, output: str, workdir, *phrases: str) -> str:
  assert result.returncode != 0, output
  lines = output.strip().splitlines()
  assert len(lines) <= MAX_LINES, output
  errors_printed = [line for line in lines if line.startswith("error: ")]
  assert len(errors_printed) == 1, output
  for phrase in phrases:
    assert phrase in errors_printed[0], (phrase, output)
  assert "Traceback" not in output
  assert not workdir.exists(), "a stub workdir was left behind"
  return errors_printed[0]


def test_a_config_file_that_does_not_exist_lists_the_recipes(tmp_path, demo_cache):
  result, output, workdir = driver(tmp_path, demo_cache, "configs/sfft.py:size=tiny")
  line = assert_one_line_error(result, output, workdir, "configs/sfft.py", "no such config file")
  for recipe in ("configs/sft.py", "configs/dro.py", "configs/dpo.py"):
    assert recipe in line


def test_an_init_checkpoint_that_does_not_exist(tmp_path, demo_cache):
  missing = tmp_path / "sft_run_typo"
  result, output, workdir = driver(tmp_path, demo_cache, "dro.py:size=tiny",
                                   f"--config.init_checkpoint={missing}")
  assert_one_line_error(result, output, workdir, str(missing), "does not exist")


def test_an_empty_data_file_is_named_by_its_path(tmp_path, demo_cache, vocabulary):
  empty = tmp_path / "train.jsonl"
  empty.write_text("\n")
  result, output, workdir = driver(tmp_path, demo_cache, "sft.py:size=tiny",
                                   f"--config.data.train_files={empty}",
                                   f"--config.data.vocabulary={vocabulary}")
  line = assert_one_line_error(result, output, workdir, str(empty), "empty")
  assert "dro_jax_files_" not in line  # no hashed Task name


def test_pairs_given_to_a_single_trajectory_recipe(tmp_path, demo_cache, vocabulary):
  pairs = write_jsonl(tmp_path / "pairs.jsonl",
                      [{"prompt": "a b", "chosen": "c", "rejected": "d"}] * 3)
  result, output, workdir = driver(tmp_path, demo_cache, "kto.py:size=tiny",
                                   f"--config.data.train_files={pairs}",
                                   f"--config.data.vocabulary={vocabulary}")
  assert_one_line_error(result, output, workdir, pairs, "preference pair", "single responses",
                        "configs/dpo.py", "configs/ipo.py")


@pytest.mark.slow
def test_an_oversized_vocabulary_gets_the_fix(tmp_path, demo_cache, vocabulary):
  rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a b", "response": "c d"}] * 4)
  result, output, workdir = driver(tmp_path, demo_cache, "sft.py:size=tiny",
                                   f"--config.data.train_files={rows}",
                                   f"--config.data.vocabulary={vocabulary}",
                                   "--config.model.vocab_size=64")
  assert_one_line_error(result, output, workdir, "vocabulary of 96 pieces", "vocab_size 64",
                        "--config.model.vocab_size=128")


def test_an_unknown_override_names_the_closest_key(tmp_path, demo_cache):
  result, output, workdir = driver(tmp_path, demo_cache, "dpo.py:size=tiny",
                                   "--config.optimizer.learnig_rate=0.1")
  assert_one_line_error(result, output, workdir, "learnig_rate",
                        "did you mean --config.optimizer.learning_rate?")


@pytest.mark.slow
def test_the_traceback_on_request(tmp_path, demo_cache):
  env = {**cli_env(tmp_path, demo_cache, "user_errors_cache"), errors.TRACEBACK_ENV: "1"}
  result, output, _ = driver(tmp_path, demo_cache, "dro.py:size=tiny",
                             f"--config.init_checkpoint={tmp_path / 'missing'}", env=env)
  assert result.returncode != 0 and "Traceback" in output and "does not exist" in output
  result, output, _ = driver(tmp_path, demo_cache, "configs/sfft.py", "--verbosity=1")
  assert result.returncode != 0 and "Traceback" in output


def test_traceback_wanted_reads_the_env_and_verbosity(monkeypatch):
  monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
  assert not errors.traceback_wanted(["main", "--config=x"])
  assert not errors.traceback_wanted(["main", "--verbosity=0"])
  assert errors.traceback_wanted(["main", "--verbosity=1"])
  assert errors.traceback_wanted(["main", "-v", "2"])
  monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
  assert errors.traceback_wanted([])


def test_closest_key():
  config = configs.load("dro", "size=tiny")
  assert configs.closest_key(config, "optimizer.learnig_rate") == "optimizer.learning_rate"
  assert configs.closest_key(config, "totl_steps") == "total_steps"
  assert configs.closest_key(config, "dpo.bta") == "dpo.beta"


# ------------------------------------------------------------------- random init, quiet console


def test_random_init_warning_only_for_alignment_recipes():
  for recipe in ("dro", "kto", "dpo", "ipo", "dro_p"):
    warning = main_lib.random_init_warning(configs.load(recipe, "size=tiny"))
    assert "from random init" in warning and "init_checkpoint=<sft workdir>" in warning, recipe
    assert "README" in warning
  for recipe in ("sft", "reward_model", "preference_model"):
    assert main_lib.random_init_warning(configs.load(recipe, "size=tiny")) is None, recipe
  assert main_lib.random_init_warning(configs.load("dpo", "size=tiny,init=/some/sft")) is None


@pytest.mark.slow
def test_an_alignment_run_from_random_init_warns_once_and_prints_no_start_up_noise(
    tmp_path, demo_cache):
  """JAX_PLATFORMS unset: JAX starts every backend it has (libtpu's too, where installed)."""
  env = cli_env(tmp_path, demo_cache, "user_errors_cache")
  for key in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"):
    env.pop(key)
  result, output, workdir = driver(
      tmp_path, demo_cache, "dro.py:size=tiny", "--config.total_steps=1",
      "--config.batch_size=8", "--config.eval_every=0", "--config.reference_cache=off",
      "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1", env=env)
  assert result.returncode == 0, output[-3000:]
  assert output.count("from random init") == 1
  assert "init_checkpoint=<sft workdir>" in output
  assert (workdir / "checkpoints" / "1").is_dir()
  noise = [line for line in output.splitlines() if NOISE.search(line)]
  assert not noise, noise


def test_the_noise_filter_keeps_everything_else():
  text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
          "I0000 00:00:1.2 4297 port.cc:153] oneDNN custom operations are on. You may see ...\n"
          "a genuine error: something broke\n"
          "=== Source Location Trace: ===\n"
          "learning/a/b.cc:12\n")
  patterns = [re.compile(p) for p in console.STARTUP_NOISE]
  assert console.without_noise(text, patterns) == (
      "a genuine error: something broke\n=== Source Location Trace: ===\nlearning/a/b.cc:12\n")
  tpu = ("Failed to find host bounds for accelerator type: WARNING: could not determine TPU "
         "accelerator type\nE0000 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker "
         "hostname 'x'\n=== Source Location Trace: ===\nlearning/45eac/libtpu_init_utils.cc:327\n"
         "next\n")
  patterns = [re.compile(p) for p in console.NO_TPU_NOISE]
  assert console.without_noise(tpu, patterns) == "next\n"


def test_filtered_stderr_drops_only_the_noise(capfd):
  patterns = [re.compile(p) for p in console.STARTUP_NOISE]
  with console.filtered_stderr(patterns):
    os.write(2, b"WARNING: Logging before InitGoogle() is written to STDERR\nkept line\n")
  assert capfd.readouterr().err == "kept line\n"


# --------------------------------------------------------------------- print_config and sample


def test_print_config_lists_every_key_without_a_workdir(tmp_path, demo_cache):
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/kto.py:size=tiny",
       "--print_config", "--config.kto.beta=0.25"],
      env=cli_env(tmp_path, demo_cache, "user_errors_cache"), capture_output=True, text=True,
      timeout=120, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  printed = dict(re.match(r"(\S+)\s+= (.*?)  # \w+, [a-z ]+$", line).groups()
                 for line in result.stdout.splitlines())
  keys = [key for key, _, _ in configs.flat_items(configs.load("kto", "size=tiny"))]
  assert sorted(printed) == sorted(keys)
  assert printed["kto.beta"] == "0.25" and printed["loss"] == "'kto'"
  assert printed["init_checkpoint"] == "None"


@pytest.mark.slow
def test_sample_writes_responses_as_jsonl(tmp_path, demo_cache, one_step_sft):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("what is two plus two\n\nname a colour\n")
  out = tmp_path / "out" / "responses.jsonl"
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.sample", f"--policy={one_step_sft}",
       f"--prompts={prompts}", f"--out={out}", "--num_samples=2", "--max_decode_length=4",
       "--temperature=0.7", "--seed=3"],
      env=cli_env(tmp_path, demo_cache, "user_errors_cache"), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr
  assert "wrote 4 responses (2 prompts x 2 samples)" in result.stdout
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(row["prompt"], row["prompt_index"], row["sample"]) for row in rows] == [
      ("what is two plus two", 0, 0), ("what is two plus two", 0, 1),
      ("name a colour", 1, 0), ("name a colour", 1, 1)]
  assert all(isinstance(row["response"], str) for row in rows)
  assert not [line for line in (result.stdout + result.stderr).splitlines() if NOISE.search(line)]
  # JSONL prompts, in process: the same seed gives the same responses.
  from dro_jax import sample
  jsonl = write_jsonl(tmp_path / "prompts.jsonl",
                      [{"prompt": "what is two plus two"}, {"prompt": "name a colour"}])
  again = sample.main([f"--policy={one_step_sft}", f"--prompts={jsonl}",
                       f"--out={tmp_path / 'again.jsonl'}", "--num_samples=2",
                       "--max_decode_length=4", "--temperature=0.7", "--seed=3"])
  assert [row["response"] for row in again] == [row["response"] for row in rows]


def test_sample_names_a_missing_policy_in_one_line(tmp_path, demo_cache):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("hello\n")
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.sample", f"--policy={tmp_path / 'nope'}",
       f"--prompts={prompts}", f"--out={tmp_path / 'o.jsonl'}"],
      env=cli_env(tmp_path, demo_cache, "user_errors_cache"), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == errors.EXIT_CODE
  lines = (result.stdout + result.stderr).strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --policy {tmp_path / 'nope'}: no such "
                                                 f"folder; give a workdir"), lines

"""Errors before work: every command line answers --help before its heavy imports, and
`evaluate` / `export` refuse a mistake (a missing judge, a judge spec naming nothing, a path that
does not exist) in one line before any policy is loaded; a refused run leaves no workdir."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from dro_jax import configs, errors, evaluate, judge_specs
from dro_jax import main as main_lib

from run_helpers import cli_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "tensorflow", "torch", "transformers", "seqio", "flax", "orbax")
# What loading a policy needs: a command that imports neither has loaded none.
LOADERS = ("dro_jax.policies", "dro_jax.checkpoints")

# Runs one command line in this interpreter (as `python -m` / `python FILE` would) and reports
# the modules it imported, its exit status and what it printed.
PROBE = r"""
import contextlib, io, json, os, runpy, sys, time
target, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
sys.argv = [target, *argv]
out, err, code = io.StringIO(), io.StringIO(), None
try:
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    if target.endswith(".py"):
      sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
      runpy.run_path(target, run_name="__main__")
    else:
      runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as error:
  code = error.code
print(json.dumps({"modules": sorted(sys.modules), "code": code, "stdout": out.getvalue(),
                  "stderr": err.getvalue(), "seconds": time.perf_counter() - start}))
"""

ENTRY_POINTS = ("dro_jax.main", "dro_jax.evaluate", "dro_jax.export", "dro_jax.sample",
                "dro_jax.vocabulary", "dro_jax.inspect_checkpoint", "dro_jax.sizing",
                "launch/gpu.py", "launch/tpu.py", "benchmarks/demo_seeds.py",
                "benchmarks/gpu_suite.py", "benchmarks/judge_accuracy.py",
                "benchmarks/sizing_table.py", "benchmarks/step_compare.py",
                "benchmarks/model_step.py", "benchmarks/decode_throughput.py",
                "benchmarks/reference_cache.py", "benchmarks/loss_steps.py",
                "benchmarks/online_vs_offline.py")


def probe(target: str, *argv: str, env: dict | None = None, cwd=ROOT) -> dict:
  environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
  result = subprocess.run([sys.executable, "-c", PROBE, target, *argv], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", ENTRY_POINTS)
def test_help_answers_before_the_heavy_imports(target):
  began = time.perf_counter()
  report = probe(target, "--help")
  wall = time.perf_counter() - began
  heavy = [name for name in HEAVY if name in report["modules"]]
  assert not heavy, f"{target} --help imported {heavy}"
  # absl's --help exits 1 (dro_jax.main); argparse's and the others' 0.
  assert report["code"] in ((0, 1) if target == "dro_jax.main" else (0, None)), report["code"]
  assert "--" in report["stdout"], report["stdout"][:500]  # the flags are listed
  assert report["seconds"] < 3.0, report["seconds"]  # in the command itself
  assert wall < 30.0  # the interpreter's start too, on a loaded machine


# ------------------------------------------------------------------------------------- evaluate


def fake_workdir(folder: pathlib.Path, recipe: str = "sft", **changes) -> pathlib.Path:
  """A workdir as far as its config.json and an (empty) checkpoints/ go: enough to tell its task
  and its recipe, with no policy in it to load."""
  config = configs.load(recipe, "size=tiny")
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  (folder / "checkpoints").mkdir(parents=True)
  (folder / "config.json").write_text(config.to_json_best_effort(indent=2))
  return folder


@pytest.fixture
def own_task(tmp_path):
  """A workdir of a user's own task (its own data files): no default judge."""
  data = tmp_path / "train.jsonl"
  data.write_text('{"inputs": "be polite: give it", "targets": "please give it"}\n')
  return fake_workdir(tmp_path / "own", **{"data.train_files": str(data)})


@pytest.fixture
def no_loading(monkeypatch):
  """Loading a policy fails the test: the command must have refused before."""
  from dro_jax import policies

  def refuse(*args, **kwargs):
    raise AssertionError("a policy was loaded before the command line was checked")

  monkeypatch.setattr(policies, "load_policy", refuse)


def test_evaluate_without_a_judge_on_an_own_task_refuses_before_loading(own_task):
  report = probe("dro_jax.evaluate", "--policy", str(own_task), "--baseline", str(own_task))
  assert report["code"] == errors.EXIT_CODE
  lines = report["stderr"].strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: no default judge"), lines
  assert "pass --judge SPEC" in lines[0] and "reward_model:DIR" in lines[0]
  assert not [name for name in LOADERS if name in report["modules"]]


@pytest.mark.parametrize("judge, message", [
    ("nosuch_judge_module_29:make", "cannot import module 'nosuch_judge_module_29'"),
    ("os:no_such_factory", "module 'os' has no callable 'no_such_factory'"),
    ("noisy:1.5:demo", "expected noisy:P:SPEC with P in [0, 1]"),
    ("noisy:0.1:nosuch", "nosuch: unknown judge"),
    ("reward_model:{missing}", "does not exist"),
    ("preference_model:{sft}", "is a sft workdir, not a preference_model one"),
    ("reward_model:{plain}", "is not a dro_jax workdir"),
    ("politeness", "unknown judge; one of demo, reward_model:DIR"),
])
def test_evaluate_refuses_a_judge_naming_nothing_before_loading(judge, message, own_task,
                                                                tmp_path, no_loading):
  (tmp_path / "plain").mkdir()
  spec = judge.format(missing=tmp_path / "missing", sft=own_task, plain=tmp_path / "plain")
  with pytest.raises(errors.UserError) as raised:
    evaluate.main(["--policy", str(own_task), "--baseline", str(own_task), "--judge", spec])
  assert str(raised.value).startswith(f"--judge {spec}: ")
  assert message in str(raised.value)


@pytest.mark.parametrize("flag, value, message", [
    ("--policy", "missing", "--policy {path}: no such folder"),
    ("--prompts", "missing.jsonl", "--prompts {path}: no such file"),
    ("--vocabulary", "missing.model", "--vocabulary {path}: no such file"),
    ("--num_samples", "0", "--num_samples must be at least 1"),
])
def test_evaluate_checks_every_path_and_number_before_loading(flag, value, message, own_task,
                                                              tmp_path, no_loading):
  path = str(tmp_path / value)
  argv = {"--policy": str(own_task), "--baseline": str(own_task), "--judge": "demo"}
  argv[flag] = value if flag == "--num_samples" else path
  with pytest.raises(errors.UserError, match=message.format(path=path).replace("[", r"\[")):
    evaluate.main([word for pair in argv.items() for word in pair])


def test_evaluate_of_two_checkpoint_folders_needs_prompts(tmp_path, no_loading):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  with pytest.raises(errors.UserError, match="pass --prompts FILE"):
    evaluate.main(["--policy", str(folder), "--baseline", str(folder), "--judge", "demo"])


def test_a_judge_spec_of_the_demo_passes():
  for spec in ("demo", "noisy:0.2:demo", "os:getcwd"):
    judge_specs.check(spec)


# --------------------------------------------------------------------------------------- export


def test_export_names_a_missing_workdir_before_importing_jax(tmp_path):
  report = probe("dro_jax.export", "--workdir", str(tmp_path / "nope"), "--output",
                 str(tmp_path / "hf"))
  assert report["code"] == errors.EXIT_CODE
  assert report["stderr"].strip().splitlines() == [
      f"error: --workdir {tmp_path / 'nope'}: no such folder; give a dro_jax training workdir "
      f"(the --workdir of python -m dro_jax.main)"]
  assert not [name for name in HEAVY + LOADERS if name in report["modules"]]
  assert not (tmp_path / "hf").exists()


def test_export_names_a_folder_that_is_not_a_workdir_and_a_missing_step(tmp_path):
  from dro_jax import export
  with pytest.raises(errors.UserError, match="not a dro_jax training workdir"):
    export.main(["--workdir", str(tmp_path), "--output", str(tmp_path / "hf")])
  workdir = fake_workdir(tmp_path / "run")
  with pytest.raises(errors.UserError, match="--step 7: .* has no step 7"):
    export.main(["--workdir", str(workdir), "--output", str(tmp_path / "hf"), "--step", "7"])


# ------------------------------------------------------------------------------ refused runs


def test_a_refusal_removes_the_stub_but_never_a_saved_step(tmp_path):
  """What a refused start wrote (config.json, data statistics, an empty checkpoints/) goes; a
  workdir holding a saved step anywhere below (the online loop's own sft/) stays."""
  stub = fake_workdir(tmp_path / "stub")
  (stub / "data_statistics").mkdir()
  main_lib._remove_stub(str(stub))
  assert not stub.exists()
  kept = fake_workdir(tmp_path / "kept")
  (kept / "sft" / "checkpoints" / "5").mkdir(parents=True)
  main_lib._remove_stub(str(kept))
  assert (kept / "sft" / "checkpoints" / "5").is_dir() and (kept / "config.json").exists()


def online_cli(tmp_path, demo_cache, workdir, *overrides):
  env = cli_env(tmp_path, demo_cache, "entry_points_cache")
  env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{tmp_path}"
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/online.py:size=tiny",
       f"--workdir={workdir}", *overrides], env=env, capture_output=True, text=True,
      timeout=600, cwd=tmp_path)
  return result, result.stdout + result.stderr


@pytest.mark.parametrize("oracle, message", [
    ("nosuch_oracle_module_29:make", "cannot import module 'nosuch_oracle_module_29'"),
    ("own_judges_29:not_a_judge", "own_judges_29.not_a_judge() returned int"),
])
def test_the_online_runner_refuses_an_oracle_in_one_line(oracle, message, tmp_path, demo_cache):
  (tmp_path / "own_judges_29.py").write_text("def not_a_judge():\n  return 42\n")
  workdir = tmp_path / "online"
  result, output = online_cli(tmp_path, demo_cache, workdir, f"--config.online.oracle={oracle}")
  assert result.returncode == errors.EXIT_CODE, output[-3000:]
  lines = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and lines[0].startswith(f"error: config.online.oracle {oracle}: "), output
  assert message in lines[0]
  assert "Traceback" not in output
  assert not workdir.exists()


@pytest.mark.slow
def test_an_online_refusal_after_the_workdir_is_claimed_leaves_no_workdir(
    tmp_path, demo_cache, one_step_sft):
  """The evaluation judge is built once the run has claimed its workdir (config.json written):
  a factory that returns no judge is refused there, and the workdir goes with the refusal."""
  (tmp_path / "own_judges_29.py").write_text("def not_a_judge():\n  return 42\n")
  workdir = tmp_path / "online"
  result, output = online_cli(
      tmp_path, demo_cache, workdir, f"--config.init_checkpoint={one_step_sft}",
      "--config.evaluation.judge=own_judges_29:not_a_judge")
  assert result.returncode == errors.EXIT_CODE, output[-3000:]
  lines = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "own_judges_29.not_a_judge() returned int" in lines[0], output
  assert "Traceback" not in output
  assert not workdir.exists()


def refused_driver(tmp_path, demo_cache, workdir, recipe, *flags):
  """The driver on `configs/RECIPE.py:size=tiny` with `flags`, which must refuse it (exit 2):
  its `error: ` lines and its whole output."""
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/{recipe}.py:size=tiny",
       f"--workdir={workdir}", *flags],
      env=cli_env(tmp_path, demo_cache, "entry_points_cache"), capture_output=True, text=True,
      timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == errors.EXIT_CODE, output[-3000:]
  return [line for line in output.splitlines() if line.startswith("error: ")], output


def test_a_batch_the_mesh_cannot_split_is_one_line_and_leaves_no_workdir(tmp_path, demo_cache):
  """The mesh's checks run once the run has claimed its workdir (config.json written): refused
  there, the workdir goes with the refusal."""
  workdir = tmp_path / "run"
  lines, output = refused_driver(tmp_path, demo_cache, workdir, "sft", "--config.batch_size=8",
                                 "--config.num_microbatches=3",
                                 "--config.model.num_encoder_layers=1",
                                 "--config.model.num_decoder_layers=1")
  assert lines == ["error: batch_size 8 does not split over data x fsdp x num_microbatches = "
                   "1 x 1 x 3 = 3"], output[-3000:]
  assert "Traceback" not in output
  assert not workdir.exists()


def test_a_periodic_judge_naming_nothing_is_refused_before_the_workdir(tmp_path, demo_cache):
  workdir = tmp_path / "run"
  lines, output = refused_driver(tmp_path, demo_cache, workdir, "dpo",
                                 "--config.evaluation.judge=reward_model:/nonexistent_rm_29")
  assert lines == ["error: config.evaluation.judge reward_model:/nonexistent_rm_29: "
                   "/nonexistent_rm_29 does not exist; give the workdir of a "
                   "configs/reward_model.py run (or one step folder of it)"], output[-3000:]
  assert not workdir.exists()


# ------------------------------------------------------------------- loading an export with HF


def test_an_untied_export_loads_in_transformers_without_the_tied_weights_notice(tmp_path, caplog):
  """transformers 5 forces tie_word_embeddings in every T5Config and warns, for an untied T5,
  that lm_head.weight and shared.weight differ; `export.load_transformers` loads such a folder
  without that notice, both kept apart, with the same logits as a plain from_pretrained."""
  import logging

  import jax
  import numpy as np
  import torch
  import transformers

  from dro_jax import export
  from dro_jax.models import t5 as t5_lib
  config = t5_lib.get_config("t5_1_1_tiny", vocab_size=96)
  params = jax.jit(t5_lib.init_params, static_argnums=0)(config, jax.random.key(0))
  export.save_hf_t5(params, config, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
  notice = "both are present in the checkpoints with different values"
  with caplog.at_level(logging.WARNING):
    transformers.logging.enable_propagation()
    try:
      plain = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path))
      assert notice in caplog.text  # transformers' own behaviour, which the loader answers
      caplog.clear()
      model = export.load_transformers(str(tmp_path))
    finally:
      transformers.logging.disable_propagation()
  assert notice not in caplog.text
  assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  ids = torch.tensor([[5, 6, 7, 1]])
  with torch.no_grad():
    np.testing.assert_array_equal(
        model(input_ids=ids, decoder_input_ids=ids).logits.numpy(),
        plain(input_ids=ids, decoder_input_ids=ids).logits.numpy())

"""Sizing: the real train step compiled for a TPU topology on the CPU, per-chip memory and advice.

They need libtpu (the `tpu` extra, for TPU VMs and sizing). Without it they skip, saying so,
unless DRO_JAX_REQUIRE_LIBTPU=1 (set by .ci/run, which installs the extra): then they fail.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

try:
  import libtpu  # noqa: F401
except ImportError:
  if os.environ.get("DRO_JAX_REQUIRE_LIBTPU") == "1":
    raise
  pytest.skip("libtpu is not installed: pip install -e '.[tpu]' to run the sizing tests",
              allow_module_level=True)

from dro_jax import configs, sizing  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30


ONE_LAYER = ("model.num_encoder_layers", "model.num_decoder_layers")  # compile time


@pytest.fixture(scope="module")
def tiny_dro():
  """The tiny DRO-V recipe (one layer per stack, two microbatches) compiled for v5e:2x2 through
  the sizing module, with 1 MiB of HBM: the compiler refuses it and the step is measured by a
  compile without the limit, the executable returned."""
  config = configs.load("dro", "size=tiny")
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.num_microbatches = 2
  compiled, report = sizing.compile_step(sizing.prepare_config(config), "v5e:2x2",
                                         hbm_bytes=2 ** 20)
  return config, compiled, report


def test_libtpu_is_installed():
  import libtpu  # noqa: F401  (the tpu extra: .ci/run installs it)
  assert len(sizing.topology_devices("v5e:2x2")) == 4
  # One device per chip, as JAX sees a real slice: v4 and v5p chips run as megacore.
  for topology in ("v4:2x2x2", "v5p:2x2x2"):
    devices = sizing.topology_devices(topology)
    assert len(devices) == 8, topology
    assert len({tuple(device.coords) for device in devices}) == 8, topology


@pytest.mark.slow
def test_report_is_the_compiles_memory_analysis(tiny_dro):
  config, compiled, report = tiny_dro
  stats = compiled.memory_analysis()
  assert report.arguments == stats.argument_size_in_bytes
  assert report.outputs == stats.output_size_in_bytes
  assert report.aliased == stats.alias_size_in_bytes
  assert report.temporaries == stats.temp_size_in_bytes
  assert report.code == stats.generated_code_size_in_bytes
  assert report.total == (stats.argument_size_in_bytes + stats.output_size_in_bytes
                          - stats.alias_size_in_bytes + stats.temp_size_in_bytes
                          + stats.generated_code_size_in_bytes)
  # The state is donated: the aliased bytes are the state's, counted once.
  assert report.aliased > 0
  assert report.aliased >= report.parameters + report.optimizer_state
  assert report.arguments >= report.parameters + report.optimizer_state + report.batch
  assert report.devices == 4 and report.mesh == {"data": 4, "fsdp": 1, "model": 1}
  # Tiny keeps its own short lengths; the frozen reference's log-probs come with the batch.
  assert (report.input_length, report.target_length) == (16, 12)
  assert report.reference_cached and report.reference == 0 and report.reference_dtype is None
  assert report.hbm_bytes == 0  # compile_step leaves the chip to `size`
  assert report.batch_size == config.batch_size and report.num_microbatches == 2
  # The compiler refused the step at 1 MiB; the numbers are of the compile without the limit.
  assert "RESOURCE_EXHAUSTED" in report.compiler_error
  assert report.total > 2 ** 20
  # The state's share, from the shardings alone, agrees without a compile.
  assert sizing.state_bytes(config, "v5e:2x2") == {
      "parameters": report.parameters, "optimizer_state": report.optimizer_state, "reference": 0}


def test_batch_spec_has_the_keys_each_loss_reads():
  dpo = configs.load("dpo", "size=tiny")
  keys = sizing.batch_spec(dpo, reference_cached=True)
  assert {"encoder_input_tokens", "chosen_decoder_target_tokens", "rejected_decoder_input_tokens",
          "example_weights", "ref_chosen_logps", "ref_rejected_logps"} <= set(keys)
  assert "example_id" not in keys
  assert keys["chosen_decoder_target_tokens"].shape == (dpo.batch_size, dpo.max_target_length)
  kto = sizing.batch_spec(configs.load("kto", "size=tiny"), reference_cached=True)
  assert {"kl_decoder_target_tokens", "ref_kl_logps", "reward"} <= set(kto)
  assert "ref_logps" not in sizing.batch_spec(configs.load("dro", "size=tiny"),
                                              reference_cached=False)


def test_a_preference_model_is_sized_without_its_vocabulary():
  config = configs.load("preference_model", "size=tiny")
  assert config.preference.a_token is None  # resolved from the task's vocabulary at run time
  prepared = sizing.prepare_config(config)
  assert isinstance(prepared.preference.a_token, int)
  assert prepared.preference.a_token != prepared.preference.b_token
  config.preference.a_token, config.preference.b_token = 71, 205
  prepared = sizing.prepare_config(config)
  assert (prepared.preference.a_token, prepared.preference.b_token) == (71, 205)
  assert configs.load("preference_model", "size=tiny").preference.a_token is None  # a copy


def test_lengths_default_to_512_256_except_for_tiny():
  large = configs.load("dro", "size=large")
  tiny = configs.load("dro", "size=tiny")
  assert sizing.lengths_for(large, [], None, None) == (512, 256)
  assert sizing.lengths_for(tiny, [], None, None) == (None, None)
  assert sizing.lengths_for(large, ["--config.max_input_length=64"], None, 32) == (None, 32)


def test_suggestions_when_it_does_not_fit(tiny_dro):
  config, _, report = tiny_dro
  fits = dataclasses.replace(report, hbm_bytes=16 * GIB, compiler_error=None)
  assert sizing.suggest(fits, config) == ([], {})
  # A fake chip too small for the compiled step: each remedy says by how much.
  small = dataclasses.replace(report, hbm_bytes=int(report.total * 0.5), compiler_error=None)
  lines, plan = sizing.suggest(small, config)
  text = "\n".join(lines)
  assert "does not fit" in text and "estimate" in text
  assert "--config.mesh_shape='(1,4,1)'" in text  # fsdp over the 4 data-parallel chips
  assert plan["flags"]["mesh_shape"] == (1, 4, 1)
  assert plan["estimate_bytes"] < report.total


def test_suggestions_scale_state_with_fsdp_and_activations_with_microbatches():
  config = configs.load("dpo", "size=base,tr=hard")
  report = sizing.Report(
      config="", topology="v5e:2x2", chip="v5e", devices=4, hbm_bytes=10 * GIB, loss="dpo",
      preset="t5_1_1_base", mesh={"data": 4, "fsdp": 1, "model": 1}, batch_size=32,
      num_microbatches=1, input_length=512, target_length=256, compute_dtype="bfloat16",
      reference_dtype="float32", reference_cached=False, model_options={},
      arguments=10 * GIB, outputs=8 * GIB, aliased=8 * GIB, temporaries=8 * GIB, code=0,
      parameters=4 * GIB, optimizer_state=0, reference=4 * GIB, batch=0)
  assert not report.fits
  lines, plan = sizing.suggest(report, config)
  # 8 GiB of state + 4 of gradients over fsdp 4 -> 3 GiB; the reference halves in bfloat16;
  # activations (8 - 4 = 4 GiB) halve per doubling of the microbatches.
  assert plan["flags"]["mesh_shape"] == (1, 4, 1)
  assert plan["flags"]["reference.dtype"] == "bfloat16"
  assert any("bfloat16" in line for line in lines)
  estimate = 2 * GIB + 0.5 * GIB + 4 * GIB / plan["flags"].get("num_microbatches", 1)
  assert plan["estimate_bytes"] == pytest.approx(estimate + 2 * GIB, rel=1e-6)  # + batch, code
  assert plan["estimate_fits"]
  # A soft trust region keeps its float32 master copy: no bfloat16 advice.
  soft = configs.load("dpo", "size=base,tr=soft")
  _, soft_plan = sizing.suggest(report, soft)
  assert "reference.dtype" not in soft_plan["flags"]


def test_the_printed_report_of_a_refused_step(tiny_dro):
  config, _, report = tiny_dro
  report = dataclasses.replace(report, hbm_bytes=2 ** 20)
  report.suggestions, report.plan = sizing.suggest(report, config)
  assert report.suggestions and not report.fits
  text = sizing.format_report(report)
  assert "DOES NOT FIT" in text and "per chip" in text and "2 microbatch(es)" in text
  assert "compiler refused" in text and "RESOURCE_EXHAUSTED" in text
  data = report.to_dict()
  assert data["total"] == report.total and data["fits"] is False
  assert json.loads(json.dumps(data, default=str))["compiler_error"] == report.compiler_error


def test_cli_prints_and_writes_the_report(tmp_path, capsys):
  """The command line, run in this process (`python -m dro_jax.sizing` calls the same `cli`)."""
  report_path = tmp_path / "report.json"
  returned = sizing.cli(
      ["sizing", f"--config={ROOT}/configs/sft.py:size=tiny", "--topology=v5e:2x2",
       "--config.num_microbatches=2", *(f"--config.{key}=1" for key in ONE_LAYER),
       f"--json={report_path}"])
  text = capsys.readouterr().out
  assert "fits:" in text and "per chip" in text and "2 microbatch(es)" in text
  assert "configs/sft.py:size=tiny" in text  # the report names the config it sized
  report = json.loads(report_path.read_text())
  assert report == json.loads(json.dumps(returned.to_dict(), default=str))
  assert report["num_microbatches"] == 2 and report["topology"] == "v5e:2x2"
  assert report["loss"] == "sft" and report["reference_dtype"] is None
  assert report["hbm_bytes"] == 16 * GIB  # v5e's HBM
  assert report["total"] == (report["arguments"] + report["outputs"] - report["aliased"]
                             + report["temporaries"] + report["code"])
  assert report["fits"] and not report["suggestions"] and report["compiler_error"] is None
  # The roofline comes with it (two microbatches: from the step compiled with one).
  roof = report["roofline"]
  assert roof["chip"] == "v5e" and roof["devices"] == 4 and roof["flops"] > 0
  assert roof["lower_bound_s"] == max(roof["compute_s"], roof["memory_s"], roof["network_s"])
  assert "roofline per chip" in text and "not a measurement" in text and "MFU ceiling" in text


@pytest.mark.slow
def test_the_module_entry_point_and_its_errors(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}

  def run(*args):
    return subprocess.run([sys.executable, "-m", "dro_jax.sizing", *args], env=env,
                          capture_output=True, text=True, timeout=300)

  helped = run("--help")
  assert helped.returncode == 0 and "--topology" in helped.stdout and "per chip" in helped.stdout
  missing = run(f"--config={ROOT}/configs/sft.py:size=tiny")
  assert missing.returncode != 0 and "--topology" in missing.stderr
  mistyped = run(f"--config={ROOT}/configs/sft.py:size=tiny", "--topology=v5e:2x2",
                 "--config.optimizer.learnig_rate=0.1")
  assert mistyped.returncode != 0 and "learnig_rate" in mistyped.stderr
  assert "Traceback" not in mistyped.stderr
  unknown = run(f"--config={ROOT}/configs/sft.py:size=tiny", "--topology=v9:2x2")
  assert unknown.returncode != 0 and "unknown chip 'v9'" in unknown.stderr
  assert "Traceback" not in unknown.stderr


def test_a_slice_or_mesh_that_cannot_be_is_named():
  with pytest.raises(ValueError, match=r"topology 'v5e:3x3': libtpu cannot describe it"):
    sizing.topology_devices("v5e:3x3")
  config = configs.load("dro", "size=tiny")
  config.num_microbatches = 3
  with pytest.raises(ValueError, match=rf"batch_size {config.batch_size} does not split.*4 x 1 x 3"):
    sizing.compile_step(sizing.prepare_config(config), "v5e:2x2")


def test_progress_while_compiling_and_one_line_when_nothing_compiles(monkeypatch, capsys):
  """A step refused at the chip's HBM and again without the limit: one line naming the smallest
  slice that holds the state, no traceback; progress lines on stderr meanwhile."""
  import jax

  def refuse(lowered, options, message):
    sizing.progress(message)
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space "
                                     "hbm.\nthe compiler's details")

  monkeypatch.setattr(sizing, "_compile_with", refuse)
  with pytest.raises(SystemExit) as stopped:
    sizing.cli(["sizing", f"--config={ROOT}/configs/sft.py:size=tiny", "--topology=v5e:2x2",
                *(f"--config.{key}=1" for key in ONE_LAYER)])
  message = str(stopped.value.code)
  assert len(message.splitlines()) == 1
  assert "does not compile for v5e:2x2 even without the HBM limit" in message
  assert "--topology=v5e:2x4" in message and "mesh_shape='(1,8,1)'" in message
  err = capsys.readouterr().err
  assert "compiling the train step" in err and "compiling again without the HBM limit" in err


def test_compiling_reports_its_progress(capsys):
  config = configs.load("sft", "size=tiny")
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  sizing.compile_step(sizing.prepare_config(config), "v5e:2x2")
  err = capsys.readouterr().err
  assert "[sizing] compiling the train step" in err and "compiled in" in err


# ------------------------------------------------------------------------------------- roofline


@pytest.fixture(scope="module")
def small_dpo_roofline():
  """The roofline of T5.1.1-small DPO (one layer per stack, scanned, two microbatches, fsdp over
  v5e:2x2, 8 pairs of 64 -> 32 tokens): one compile, the step unrolled with one microbatch."""
  config = configs.load("dpo", "size=small")
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.model.scan_layers = True
  config.num_microbatches = 2
  config.batch_size = 8
  config.mesh_shape = (1, 4, 1)
  config = sizing.prepare_config(config, input_length=64, target_length=32)
  return config, sizing.roofline(config, "v5e:2x2")


def test_roofline_flops_agree_with_the_suites_formula(small_dpo_roofline):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import suite_common

  from dro_jax import reference_cache
  from dro_jax import step as step_lib
  config, roof = small_dpo_roofline
  model = step_lib.t5_config(config)
  shape = suite_common.ModelShape(
      emb_dim=model.emb_dim, num_heads=model.num_heads, head_dim=model.head_dim,
      mlp_dim=model.mlp_dim, num_mlp_inputs=len(model.mlp_activations),
      num_encoder_layers=model.num_encoder_layers, num_decoder_layers=model.num_decoder_layers,
      vocab_size=model.vocab_size)
  formula = suite_common.step_flops(shape, "dpo", 8, 64, 32, encoder_per_response=False,
                                    reference_forward=not reference_cache.enabled(config))
  assert roof["flops"] == pytest.approx(formula, rel=0.05)
  assert roof["compiled_flops_per_chip"] == pytest.approx(roof["flops_per_chip"], rel=0.05)
  assert roof["flops"] == pytest.approx(4 * roof["flops_per_chip"])
  assert roof["model_flops"] == roof["flops"]  # no remat: every executed FLOP is the model's
  # fsdp gathers the parameters: collectives, all-gathers among them
  assert roof["collective_bytes_by_kind"].get("all-gather", 0) > 0
  assert roof["collective_bytes_per_chip"] == pytest.approx(
      sum(roof["collective_bytes_by_kind"].values()))
  peak, hbm, ici = sizing.CHIP_PEAKS["v5e"]
  assert roof["compute_s"] == pytest.approx(roof["flops_per_chip"] / peak)
  assert roof["memory_s"] == pytest.approx(roof["hbm_bytes_per_chip"] / hbm)
  assert roof["network_s"] == pytest.approx(2 * roof["collective_bytes_per_chip"] / ici)
  assert 0 < roof["mfu_ceiling"] <= 1
  assert roof["mfu_ceiling"] == pytest.approx(
      roof["model_flops_per_chip"] / (peak * roof["lower_bound_s"]))
  text = "\n".join(sizing.format_roofline(roof))
  assert "estimate from the compiled program, not a measurement" in text


def test_step_costs_count_loops_as_often_as_they_run(monkeypatch):
  """Scanned layers and microbatch loops: the costs come from the step unrolled with one
  microbatch at 1 and 2 layers, linear in depth (XLA's analysis counts a loop body once)."""
  compiled_configs = []

  def compile_step(config, topology, hbm_bytes=None):
    compiled_configs.append(config)
    return (config.model.num_encoder_layers, config.model.num_decoder_layers), None

  def program_costs(layers, devices):
    encoder, decoder = layers
    return {"flops": 10.0 + 3 * encoder + 5 * decoder, "hbm_bytes": 7.0 + encoder,
            "collective_bytes": 2.0 * decoder}

  monkeypatch.setattr(sizing, "compile_step", compile_step)
  monkeypatch.setattr(sizing, "program_costs", program_costs)
  config = configs.load("dro", "size=large")
  config.model.scan_layers = True
  config.num_microbatches = 4
  costs = sizing.step_costs(config, "v5e:2x2")
  assert costs == {"flops": 10 + 3 * 24 + 5 * 24, "hbm_bytes": 7 + 24, "collective_bytes": 48}
  assert [(c.model.num_encoder_layers, c.model.num_decoder_layers) for c in compiled_configs] == [
      (1, 1), (2, 2)]
  assert all(not c.model.scan_layers and c.num_microbatches == 1 for c in compiled_configs)
  compiled_configs.clear()
  config.model.num_decoder_layers = 6
  costs = sizing.step_costs(config, "v5e:2x2")
  assert costs["flops"] == 10 + 3 * 24 + 5 * 6 and len(compiled_configs) == 3
  # FLOPs from the lowered step; remat's recomputation is executed, not model, work
  config.model.num_decoder_layers = 24
  config.model.remat = "full"
  compiled_configs.clear()
  lowered = []
  monkeypatch.setattr(sizing, "lowered_flops",
                      lambda c, topology: lowered.append(c.model.remat) or 1e12 * len(lowered))
  roof = sizing.roofline(config, "v5e:2x2")
  assert lowered == ["full", "none"] and len(compiled_configs) == 2
  assert roof["flops_per_chip"] == 1e12 and roof["model_flops_per_chip"] == 2e12
  assert roof["compiled_flops_per_chip"] == 10 + 3 * 24 + 5 * 24


def test_collective_bytes_of_a_compiled_module():
  """Bytes each chip sends, ring algorithm, group sizes in each of XLA's three notations."""
  hlo = "\n".join([
      "%all-gather.1 = bf16[4,256]{1,0:T(8,128)} all-gather(%p), channel_id=1, "
      "replica_groups=[1,4]<=[4], dimensions={0}",
      "  %all-reduce.2 = (f32[32]{0}, f32[32]{0}) all-reduce(%a, %b), channel_id=2, "
      "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, "
      "to_apply=%add",
      "  ROOT %all-to-all.3 = f32[8]{0} all-to-all(%c), replica_groups={{0,1,2,3}}",
      "%all-gather.59.reduce_sub_computation (lhs: s32[], rhs: s32[]) -> s32[] {",
  ])
  sent = sizing.collective_bytes(hlo, devices=4)
  assert sent == {"all-gather": 0.75 * 4 * 256 * 2, "all-reduce": 2 * 0.5 * 2 * 32 * 4,
                  "all-to-all": 0.75 * 8 * 4}

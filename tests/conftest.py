"""Test session setup: 8 fake CPU devices and a persistent compilation cache, before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("DRO_JAX_TEST_CACHE", "/tmp/dro_jax_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


# The reduced demo of the tests: SFT 450 steps, 300 feedback prompts x 4 samples, 120 DRO-V steps.
DEMO_TEST_ARG = "scale=0.3,methods=dro"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """Real T5X checkpoints written by t5x, with t5x's outputs on them (tests/fixtures/README.md)."""
  assert FIXTURES.is_dir(), f"the test fixtures are expected at {FIXTURES}"
  return FIXTURES


@pytest.fixture
def new_name():
  """Unique seqio Task / Mixture names, removed from the global registries afterwards."""
  import uuid

  import seqio
  created = []

  def make(prefix: str = "task") -> str:
    created.append(f"test_data_{prefix}_{uuid.uuid4().hex[:10]}")
    return created[-1]

  yield make
  for name in created:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
  """One demo-data cache for every training run of the session (the data is generated once)."""
  return str(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture(scope="session")
def demo_sft(tmp_path_factory, demo_cache):
  """One SFT policy of the reduced demo (its `sft` stage: 450 steps), shared by the demo's and
  the online loop's tests."""
  from dro_jax import configs, demo
  workdir = tmp_path_factory.mktemp("demo_sft")
  config = configs.load("demo", DEMO_TEST_ARG)
  config.data.cache_dir = demo_cache
  names = demo.synthetic_tasks(config)
  demo.run_stage("sft", demo.stage_config(config, "sft", names["sft"], init=None,
                                          baseline=None), str(workdir / "sft"))
  return workdir / "sft"


@pytest.fixture(scope="session")
def one_step_sft(tmp_path_factory, demo_cache):
  """A tiny SFT workdir (one layer per stack, one step) on the demo data, for the tests that need
  some trained policy on disk: sampling, refusals after the workdir is claimed."""
  from dro_jax import configs, train
  from run_helpers import shrink
  workdir = tmp_path_factory.mktemp("one_step_sft")
  config = shrink(configs.load("sft", "size=tiny"), demo_cache, steps=1)
  config.eval_every = 0
  train.run(config, str(workdir))
  return workdir


@pytest.fixture(params=["memory", "tf.data"])
def order(request, monkeypatch):
  """Both ways the input pipeline makes an epoch: kept arrays permuted in numpy, or tf.data."""
  from dro_jax.data import pipeline
  if request.param == "tf.data":
    monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", -1)
  return request.param

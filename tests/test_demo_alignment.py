"""The demo task's promise, end to end: DRO-V from an SFT policy beats it on held-out prompts.

A reduced run of benchmarks/demo_alignment.py, every stage trained by the engine's `train.run`
(a 0.3M-parameter T5.1.1, 600 SFT steps at a learning rate of 3e-3, 200 DRO-V steps at τ = 1;
about a minute and a half on two CPU cores). With fixed seeds the temperature-1 judge reward goes
from 0.61 (SFT, which imitates the careless demonstrator) to 0.74 and the exact-match rate from
0.23 to 0.39, at a KL of 0.18 from SFT; seed 1 gives +0.13 and +0.19. The margins asserted here
are about two thirds of that.
"""

import importlib.util
import pathlib

import pytest
import seqio

from dro_jax.data import synthetic

BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "demo_alignment.py"
# Fewer SFT steps at a higher learning rate than the benchmark's keep the run short; the SFT
# policy still imitates the demonstrator (held-out greedy reward 0.90, 0.61 at temperature 1).
REDUCED = ["--emb_dim", "64", "--mlp_dim", "256", "--sft_steps", "600", "--sft_lr", "3e-3",
           "--align_steps", "200", "--taus", "1", "--kto_betas", "", "--eval_prompts", "200",
           "--optimum_samples", "0", "--log_every", "500"]


def load_benchmark():
  spec = importlib.util.spec_from_file_location("demo_alignment", BENCHMARK)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  cache_dir = str(tmp_path_factory.mktemp("demo_alignment"))
  yield load_benchmark().main(REDUCED + ["--cache_dir", cache_dir])
  for name in synthetic.TASK_NAMES.values():
    seqio.TaskRegistry.remove(name)


@pytest.mark.slow
def test_dro_v_judge_reward_beats_sft_on_held_out_prompts(results):
  sft, dro = results["sft"]["T=1"], results["dro-v τ=1"]["T=1"]
  assert dro.rewards.mean() > sft.rewards.mean() + 0.08, (dro.rewards.mean(), sft.rewards.mean())
  assert dro.exact.mean() > sft.exact.mean() + 0.1, (dro.exact.mean(), sft.exact.mean())


@pytest.mark.slow
def test_dro_v_wins_against_sft_and_stays_near_it(results):
  benchmark = load_benchmark()
  sft, dro = results["sft"]["T=1"], results["dro-v τ=1"]["T=1"]
  _, low, _ = benchmark.win_rate(dro.rewards, sft.rewards, seed=0)
  assert low > 0.55, low
  # KL(π‖π_sft) from the policy's own samples: positive, and small at τ = 1 (about 0.2).
  assert 0.0 < dro.logratios.mean() < 1.0, dro.logratios.mean()
  # The SFT policy imitates the demonstrator (whose mean reward is about 0.72) and greedy
  # decoding does not get worse after alignment.
  assert 0.55 < sft.rewards.mean() < 0.8, sft.rewards.mean()
  greedy_sft, greedy_dro = results["sft"]["greedy"], results["dro-v τ=1"]["greedy"]
  assert greedy_dro.rewards.mean() >= greedy_sft.rewards.mean() - 0.02

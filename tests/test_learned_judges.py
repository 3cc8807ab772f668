"""Learned judges from the workdirs the reward_model and preference_model recipes write: their
held-out pairwise accuracy through the judge equals what the training run logged on that split,
and they plug into evaluate by spec string."""

import json

import numpy as np
import pytest

from dro_jax import configs, evaluate, judges, train
from dro_jax.data import synthetic
from run_helpers import read_metrics, shrink

EVAL_PAIRS = 200  # the demo pairs task's validation split (write_demo_data's eval_examples)


def _train(recipe: str, tmp_path_factory, demo_cache: str, steps: int = 12) -> str:
  config = shrink(configs.load(recipe, "size=tiny"), demo_cache, steps=steps)
  config.max_input_length, config.max_target_length = 16, 12  # the recipes' own: 1024
  config.eval_every = config.checkpoint_every = steps
  config.eval_batches = EVAL_PAIRS // config.batch_size  # the whole validation split
  config.optimizer.learning_rate = 3e-3
  workdir = str(tmp_path_factory.mktemp(recipe))
  train.run(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def reward_model_workdir(tmp_path_factory, demo_cache):
  return _train("reward_model", tmp_path_factory, demo_cache)


@pytest.fixture(scope="module")
def preference_model_workdir(tmp_path_factory, demo_cache):
  return _train("preference_model", tmp_path_factory, demo_cache)


def _held_out():
  pairs = synthetic.preference_pairs(EVAL_PAIRS, 0, evaluation=True)
  return ([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
          [p["rejected"] for p in pairs])


def _logged_accuracy(workdir: str) -> float:
  rows = [row for row in read_metrics(workdir) if "eval/rewards/accuracies" in row]
  return rows[-1]["eval/rewards/accuracies"]


def test_reward_model_judge_matches_the_logged_accuracy(reward_model_workdir):
  judge = judges.judge_from_spec(f"reward_model:{reward_model_workdir}")
  assert isinstance(judge, judges.RewardModelJudge) and judge.symmetric
  prompts, chosen, rejected = _held_out()
  probability = judge.prefer(prompts, chosen, rejected)
  rewards_chosen, rewards_rejected = judge.score(prompts, chosen), judge.score(prompts, rejected)
  np.testing.assert_allclose(probability, 1 / (1 + np.exp(rewards_rejected - rewards_chosen)),
                             rtol=1e-6)
  accuracy = float(np.mean(probability > 0.5))
  assert accuracy == pytest.approx(_logged_accuracy(reward_model_workdir), abs=1e-6)
  # Batched in any size: the same rewards.
  small = judges.RewardModelJudge(reward_model_workdir, batch_size=7)
  np.testing.assert_allclose(small.score(prompts[:20], chosen[:20]), rewards_chosen[:20],
                             rtol=1e-5, atol=1e-6)


def test_preference_model_judge_matches_the_logged_accuracy(preference_model_workdir):
  step_dir = f"{preference_model_workdir}/checkpoints/12"
  judge = judges.judge_from_spec(f"preference_model:{step_dir}")
  assert isinstance(judge, judges.PreferenceModelJudge) and not judge.symmetric
  prompts, chosen, rejected = _held_out()
  probability, calls, debiased = judges.compare(judge, prompts, chosen, rejected)
  assert debiased and calls == 2 * EVAL_PAIRS
  accuracy = float(np.mean(probability > 0.5))
  assert accuracy == pytest.approx(_logged_accuracy(preference_model_workdir), abs=1e-6)
  # One order is a different (position-biased) number; both orders average it away.
  forward = judge.prefer(prompts, chosen, rejected)
  backward = judge.prefer(prompts, rejected, chosen)
  np.testing.assert_allclose(probability, 0.5 * (forward + 1 - backward), rtol=1e-6)


def test_learned_judges_refuse_the_wrong_workdir(reward_model_workdir, preference_model_workdir):
  with pytest.raises(ValueError, match="a reward_model workdir, not a preference_model one"):
    judges.judge_from_spec(f"preference_model:{reward_model_workdir}")
  with pytest.raises(ValueError, match="a preference_model workdir, not a reward_model one"):
    judges.judge_from_spec(f"reward_model:{preference_model_workdir}")


def test_evaluate_takes_a_learned_judge_by_spec(preference_model_workdir, tmp_path, capsys,
                                               tmp_path_factory, request):
  from test_evaluation import tiny_sft_workdir
  policy = tiny_sft_workdir(tmp_path_factory, request)
  report = evaluate.main(["--policy", policy, "--baseline", policy, "--num_prompts", "16",
                          "--max_decode_length", "8", "--batch_size", "16",
                          "--judge", f"noisy:0.1:preference_model:{preference_model_workdir}",
                          "--output", str(tmp_path)])
  first = capsys.readouterr().out.splitlines()[0]
  assert first.startswith("win_rate ") and "both orders" in first
  saved = json.loads((tmp_path / "evaluation.json").read_text())
  assert saved["judge"].startswith("noisy:0.1:preference_model:") and saved["debiased"]
  assert saved["judge_calls"] == 32 and 0.0 <= report["win_rate"] <= 1.0

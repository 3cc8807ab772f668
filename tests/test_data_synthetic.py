"""The demo task: its judge, its mixed-quality data, its vocabulary and its Tasks."""

import os
import random
import time

import numpy as np
import pytest
import sentencepiece
import seqio

from dro_jax.data import pipeline, synthetic, tasks

SMALL = {"sft_examples": 40, "feedback_prompts": 10, "responses_per_prompt": 4, "pairs": 12,
         "eval_examples": 8}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture(scope="module")
def demo_tasks(cache_dir):
  names = synthetic.register_demo_tasks(cache_dir, **SMALL)
  yield names
  for name in names.values():
    seqio.TaskRegistry.remove(name)


def test_judge_gives_partial_credit_per_token():
  assert synthetic.reward("sort: 3 1 2", "1 2 3") == 1.0
  assert synthetic.reward("sort: 3 1 2", "1 3 2") == pytest.approx(1 / 3)
  assert synthetic.reward("sort: 3 1 2", "1 2") == pytest.approx(2 / 3)
  assert synthetic.reward("sort: 3 1 2", "1 2 3 3") == 0.75  # Extra tokens cost too.
  assert synthetic.reward("reverse: 1 2 3 4", "4 3 2 1") == 1.0
  assert synthetic.reward("increment: 9 0 5", "0 1 6") == 1.0
  assert synthetic.reward("increment: 9 0 5", "") == 0.0
  assert synthetic.thumbs("sort: 2 1 3", "1 2 3") and not synthetic.thumbs("sort: 2 1 3", "1 2")
  with pytest.raises(ValueError, match="not a demo prompt"):
    synthetic.reward("add: 1 2", "3")


def test_demonstrations_are_mixed_quality_and_deterministic():
  demos = synthetic.demonstrations(2000, seed=0)
  assert demos == synthetic.demonstrations(2000, seed=0)
  assert demos != synthetic.demonstrations(2000, seed=1)
  rewards = np.array([demo["reward"] for demo in demos])
  assert 0.36 < np.mean(rewards == 1.0) < 0.48  # Mostly the demonstrator's 40% correct.
  assert 0.6 < rewards.mean() < 0.8 and len(np.unique(rewards)) > 10  # Smoothly graded.
  for demo in demos[:50]:
    assert demo["reward"] == synthetic.reward(demo["prompt"], demo["response"])
  lazy = synthetic.demonstrate(synthetic.parse_prompt("reverse: 1 2 3"), random.Random(0), "copy")
  assert lazy == "1 2 3" and synthetic.reward("reverse: 1 2 3", lazy) == pytest.approx(1 / 3)


def test_evaluation_prompts_are_held_out():
  training = {demo["prompt"] for demo in synthetic.demonstrations(3000)}
  training |= {row["prompt"] for row in synthetic.feedback(500)}
  evaluation = synthetic.eval_prompts(300)
  assert len(set(evaluation)) == 300 and not training & set(evaluation)


def test_preference_pairs_prefer_the_better_response():
  for pair in synthetic.preference_pairs(200):
    assert (synthetic.reward(pair["prompt"], pair["chosen"])
            > synthetic.reward(pair["prompt"], pair["rejected"]))


def test_default_data_is_generated_quickly_and_cached(tmp_path):
  start = time.perf_counter()
  paths = synthetic.write_demo_data(str(tmp_path))
  assert time.perf_counter() - start < 10
  modified = os.path.getmtime(paths["sft"]["train"])
  assert synthetic.write_demo_data(str(tmp_path)) == paths
  assert os.path.getmtime(paths["sft"]["train"]) == modified
  with open(paths["feedback"]["train"]) as stream:
    assert sum(1 for _ in stream) == 4000


def test_vocabulary_is_t5_style_cached_and_covers_the_demo(cache_dir):
  path = synthetic.demo_vocabulary(cache_dir)
  assert path == os.path.join(cache_dir, "demo_v1", "spiece.model")
  modified = os.path.getmtime(path)
  assert synthetic.demo_vocabulary(cache_dir) == path and os.path.getmtime(path) == modified
  processor = sentencepiece.SentencePieceProcessor(model_file=path)
  assert [processor.id_to_piece(i) for i in range(5)] == ["<pad>", "</s>", "<unk>", "A", "B"]
  assert processor.bos_id() == -1
  texts = [text for demo in synthetic.demonstrations(500) for text in demo.values()
           if isinstance(text, str)]
  texts += [f"[CONTEXT] {texts[0]} [RESPONSE A] {texts[1]} [RESPONSE B] {texts[1]}"]
  encoded = [processor.encode(text) for text in texts]
  assert not any(processor.unk_id() in ids for ids in encoded)
  assert max(len(ids) for ids in encoded[:-1]) + 1 <= synthetic.MAX_RESPONSE_LENGTH


def test_demo_tasks_give_batches_the_judge_agrees_with(demo_tasks, cache_dir):
  vocabulary = tasks.load_vocabulary(os.path.join(cache_dir, "demo_v1"))
  decode = lambda ids: vocabulary.decode([int(i) for i in ids])
  batch = next(pipeline.input_pipeline(demo_tasks["feedback"], global_batch_size=8,
                                       process_index=0, process_count=1))
  for prompt, response, reward in zip(batch["encoder_input_tokens"],
                                      batch["decoder_target_tokens"], batch["reward"]):
    assert reward == pytest.approx(synthetic.reward(decode(prompt), decode(response)))
  thumbs = next(pipeline.input_pipeline(demo_tasks["thumbs"], global_batch_size=8,
                                        process_index=0, process_count=1))
  np.testing.assert_array_equal(thumbs["reward"], thumbs["label"])
  pairs = next(pipeline.input_pipeline(demo_tasks["pairs"], global_batch_size=4,
                                       process_index=0, process_count=1, split="validation"))
  assert pairs["chosen_decoder_target_tokens"].shape == (4, synthetic.MAX_RESPONSE_LENGTH)
  sft = pipeline.input_pipeline(demo_tasks["sft"], global_batch_size=8, process_index=0,
                                process_count=1, num_epochs=1)
  assert sft.statistics[demo_tasks["sft"]].count == SMALL["sft_examples"]
  assert next(sft)["encoder_input_tokens"].shape == (8, synthetic.MAX_PROMPT_LENGTH)

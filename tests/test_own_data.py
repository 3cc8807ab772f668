"""Own data: a vocabulary with T5's ids from a folder of JSONL and text (and the refusal of one
with other ids), SFT files without rewards, KTO labels named from the config and used as given,
and eval_files that the evaluation reads."""

import io
import json
import pathlib
import random
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import configs, datasets, errors, step, train, vocabulary
from dro_jax import main as main_lib
from dro_jax.data import tasks
import readme_commands
from run_helpers import cli_env, read_metrics, shrink, write_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "red green blue cat dog sun moon tree river stone one two three four five six".split()


def words(rng, count):
  return " ".join(rng.choice(WORDS) for _ in range(count))


def single_rows(count, seed=0, **extra):
  rng = random.Random(seed)
  return [{"prompt": f"{words(rng, 3)} {i}", "response": words(rng, 3), **extra}
          for i in range(count)]


def pair_rows(count, seed=0):
  rng = random.Random(seed)
  return [{"prompt": f"{words(rng, 3)} {i}", "chosen": words(rng, 2), "rejected": words(rng, 3)}
          for i in range(count)]


def write_corpus(folder: pathlib.Path) -> None:
  """A folder as a user has it: JSONL of each kind, a text file in a subfolder, other files."""
  folder.mkdir(parents=True, exist_ok=True)
  write_jsonl(folder / "sft.jsonl", single_rows(30, seed=1))
  write_jsonl(folder / "pairs.jsonl", pair_rows(30, seed=2))
  write_jsonl(folder / "thumbs.jsonl", [{"prompt": [{"role": "user", "content": "hi there"}],
                                         "completion": "zebra quartz", "label": True}] * 5)
  (folder / "notes").mkdir(exist_ok=True)
  (folder / "notes" / "text.txt").write_text(
      "\n".join(words(random.Random(i), 6) for i in range(20)) + "\n")
  (folder / "image.png").write_bytes(b"\x89PNG\x00\xff\xfe")  # not text: left out


@pytest.fixture(scope="module")
def own_vocabulary(tmp_path_factory):
  """The vocabulary the command trains on a folder (fewer than the tiny model's 256 pieces)."""
  folder = tmp_path_factory.mktemp("own") / "my_data"
  write_corpus(folder)
  path = str(folder / "spiece.model")
  size = vocabulary.main(["--input", str(folder), "--output", path, "--vocab_size", "200"])
  assert 0 < size <= 200
  return path


def default_ids_vocabulary(path: pathlib.Path) -> str:
  """A sentencepiece model with sentencepiece's default ids (unk 0, bos 1, eos 2, no pad)."""
  import sentencepiece
  model = io.BytesIO()
  lines = [words(random.Random(i), 6) for i in range(50)]
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                           vocab_size=40, hard_vocab_limit=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return str(path)


# ------------------------------------------------------------------------- 5: the vocabulary


def test_the_vocabulary_has_t5_ids_and_covers_every_text_field(own_vocabulary):
  import sentencepiece
  processor = sentencepiece.SentencePieceProcessor(model_file=own_vocabulary)
  assert vocabulary.ids_of(processor) == {"pad": 0, "eos": 1, "unk": 2}
  assert processor.bos_id() == -1
  loaded = tasks.load_vocabulary(own_vocabulary)
  assert loaded.eos_id == 1 and loaded.pad_id == 0
  # Words of every kind of file, and a chat prompt rendered as training renders it: no unk.
  for text in ("red cat sun", "zebra quartz", "User: hi there", "river stone six"):
    assert 2 not in loaded.encode(text), text


def test_the_corpus_reads_jsonl_fields_and_text_lines(tmp_path):
  write_corpus(tmp_path)
  files = vocabulary.input_files([str(tmp_path)])
  assert [pathlib.Path(path).name for path in files] == [
      "pairs.jsonl", "sft.jsonl", "thumbs.jsonl", "text.txt"]
  lines = list(vocabulary.corpus_lines(files))
  assert len(lines) == 30 * 3 + 30 * 2 + 5 * 2 + 20
  assert "User: hi there" in lines and "zebra quartz" in lines
  with pytest.raises(errors.UserError, match="no such file or folder"):
    vocabulary.input_files([str(tmp_path / "missing")])


def test_the_readme_command_trains_a_vocabulary(tmp_path):
  """The command as docs/own_data.md shows it, run in a folder that has `my_data/`."""
  write_corpus(tmp_path / "my_data")
  env = {"PATH": "", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
  argv = shlex.split(readme_commands.command("python -m dro_jax.vocabulary"))
  result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  output = argv[argv.index("--output") + 1]
  assert (tmp_path / output).is_file()
  assert "pad 0, eos 1, unk 2" in result.stdout
  assert f"--config.data.vocabulary={output}" in result.stdout
  assert tasks.load_vocabulary(str(tmp_path / output)).eos_id == 1
  # A mistake is one line and exit status 2.
  result = subprocess.run([sys.executable, "-m", "dro_jax.vocabulary", "--input", "nothing_here",
                           "--output", "x.model"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --input nothing_here: no such file or folder"]


@pytest.mark.slow
def test_the_readme_own_data_commands_run_as_written(tmp_path, demo_cache):
  """The three commands of docs/own_data.md in a folder with `my_data/` (prompt/response files
  for SFT and its held-out split, thumbs-labelled records for KTO): a vocabulary, SFT on the files with the
  held-out metrics from eval_files, KTO from that SFT with the labels read from `thumbs`."""
  write_corpus(tmp_path / "my_data")
  write_jsonl(tmp_path / "my_data" / "sft_eval.jsonl", single_rows(12, seed=5))
  rng = random.Random(6)
  write_jsonl(tmp_path / "my_data" / "thumbs.jsonl",
              [{"prompt": f"{words(rng, 3)} {i}", "response": words(rng, 3), "thumbs": i % 3 != 0}
               for i in range(40)])
  env = cli_env(tmp_path, demo_cache, "own_data_cli_cache")
  for prefix in ("python -m dro_jax.vocabulary",
                 "python -m dro_jax.main --config configs/sft.py:size=tiny --workdir /tmp/own_sft",
                 "python -m dro_jax.main --config configs/kto.py:size=tiny,init=/tmp/own_sft"):
    words_ = readme_commands.argv(readme_commands.command(prefix), tmp_path)
    result = subprocess.run([sys.executable, *words_[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (prefix, (result.stdout + result.stderr)[-3000:])
  sft = read_metrics(tmp_path / "own_sft")
  assert sft[-1]["step"] == 200
  assert [row for row in sft if any(key.startswith("eval/") for key in row)]
  kto = read_metrics(tmp_path / "own_kto")
  assert kto[-1]["step"] == 200
  config = json.loads((tmp_path / "own_kto" / "config.json").read_text())
  assert config["init_checkpoint"] == str(tmp_path / "own_sft")
  assert config["data"]["fields"] == "label:thumbs"


def test_a_vocabulary_with_other_ids_is_refused_with_the_fix(tmp_path, own_vocabulary):
  bad = default_ids_vocabulary(tmp_path / "default.model")
  with pytest.raises(errors.UserError) as raised:
    tasks.load_vocabulary(bad)
  message = str(raised.value)
  assert "\n" not in message and message.startswith(bad)
  assert "pad -1, eos 2, unk 0" in message
  assert "python -m dro_jax.vocabulary" in message
  assert "pad_id=0 eos_id=1 unk_id=2 bos_id=-1" in message
  # Before anything is written: the driver's checks refuse it for training on files.
  config = configs.load("sft", "size=tiny")
  config.data.train_files = write_jsonl(tmp_path / "sft.jsonl", single_rows(4))
  config.data.vocabulary = bad
  with pytest.raises(errors.UserError, match="T5 needs pad 0, eos 1, unk 2"):
    main_lib.preflight(config)
  config.data.vocabulary = own_vocabulary
  main_lib.preflight(config)


# ------------------------------------------------------------------------- 6: the data fields


def files_config(recipe, tmp_path, vocabulary_path, train_rows, eval_rows=None, **data):
  config = configs.load(recipe, "size=tiny")
  config.batch_size = 4
  config.max_input_length = 16  # reward_model / preference_model's own 1024 stays at size=tiny
  config.data.train_files = write_jsonl(tmp_path / "train.jsonl", train_rows)
  if eval_rows is not None:
    config.data.eval_files = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
  config.data.vocabulary = vocabulary_path
  for key, value in data.items():
    config.data[key] = value
  return config


def test_sft_files_need_no_reward(tmp_path, own_vocabulary):
  rows = single_rows(6)  # prompt and response only
  config = files_config("sft", tmp_path, own_vocabulary, rows)
  main_lib.preflight(config)
  task, _ = datasets.resolve_data(config)
  batch = next(datasets.train_iterator(config, task, str(tmp_path / "workdir"), None))
  assert batch["decoder_target_tokens"].shape == (4, config.max_target_length)
  assert (batch["decoder_loss_weights"].sum(1) > 0).all()
  # The losses that need a reward still ask for one, naming the file and line.
  config = files_config("dro", tmp_path, own_vocabulary, rows)
  task, _ = datasets.resolve_data(config)
  with pytest.raises(errors.UserError, match=r"train.jsonl:1: field 'reward': missing"):
    next(datasets.train_iterator(config, task, str(tmp_path / "workdir_dro"), None))


def kto_desirable(config, tmp_path):
  """Labels of the batches and KTO's desirability of them, over one epoch in file order."""
  config.data.shuffle = False
  task, _ = datasets.resolve_data(config)
  iterator = datasets.train_iterator(config, task, str(tmp_path / "workdir"), None)
  objective = step.KTO(config, None)
  labels, desirable = [], []
  for _ in range(iterator.batches_per_epoch):
    batch = next(iterator)
    prepared = objective.prepare({key: jnp.asarray(value)
                                  for key, value in datasets.numeric(batch).items()})
    labels += batch["label"].tolist()
    desirable += np.asarray(prepared["desirable"]).astype(int).tolist()
  return labels, desirable


def test_kto_labels_named_from_the_config_are_used_as_given(tmp_path, own_vocabulary):
  # Rewards that disagree with the labels: the labels win, not the rewards above the batch mean.
  thumbs = [i % 3 == 0 for i in range(8)]
  rows = [{"prompt": row["prompt"], "completion": row["response"], "score": float(-i),
           "thumbs": up} for i, (row, up) in enumerate(zip(single_rows(8), thumbs))]
  config = files_config("kto", tmp_path, own_vocabulary, rows,
                        fields="label:thumbs,reward:score")
  main_lib.preflight(config)
  labels, desirable = kto_desirable(config, tmp_path)
  assert labels == desirable == [int(up) for up in thumbs]


def test_kto_thumbs_up_batches_stay_desirable(tmp_path, own_vocabulary):
  # "label" records without reward: a batch of only thumbs-up would be all undesirable if its
  # rewards (1.0) were compared with their mean (1.0).
  rows = [{"prompt": row["prompt"], "completion": row["response"], "label": i < 4}
          for i, row in enumerate(single_rows(8))]
  config = files_config("kto", tmp_path, own_vocabulary, rows)
  labels, desirable = kto_desirable(config, tmp_path)
  assert labels == desirable == [1, 1, 1, 1, 0, 0, 0, 0]
  # Relabelling them by reward is refused before anything is written.
  config = files_config("kto", tmp_path, own_vocabulary, rows, reward_mode="thumbs")
  with pytest.raises(errors.UserError, match="carry labels, which KTO takes as given"):
    main_lib.preflight(config)


def test_data_fields_are_checked(tmp_path, own_vocabulary):
  rows = single_rows(4, reward=1.0)
  for fields, phrase in (("label", "is not canonical:field"),
                         ("chosen:better", "records have no field 'chosen'")):
    config = files_config("kto", tmp_path, own_vocabulary, rows, fields=fields)
    with pytest.raises(errors.UserError, match=phrase):
      main_lib.preflight(config)


def test_the_cli_names_the_label_field(tmp_path, demo_cache, own_vocabulary):
  result = subprocess.run(
      [sys.executable, "-m", "dro_jax.main", f"--config={ROOT}/configs/kto.py:size=tiny",
       "--print_config", "--config.data.fields=label:ok"],
      env=cli_env(tmp_path, demo_cache, "own_data_cache"), capture_output=True, text=True,
      timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  assert re.search(r"^data\.fields += 'label:ok'", result.stdout, flags=re.M), result.stdout
  rows = [{"prompt": row["prompt"], "completion": row["response"], "ok": i % 2 == 0}
          for i, row in enumerate(single_rows(4))]
  config = files_config("kto", tmp_path, own_vocabulary, rows, fields="label:ok")
  labels, desirable = kto_desirable(config, tmp_path)
  assert labels == desirable == [1, 0, 1, 0]


def test_eval_files_are_the_eval_task_and_the_held_out_prompts(tmp_path, own_vocabulary):
  train_rows, eval_rows = pair_rows(8, seed=3), pair_rows(6, seed=4)
  config = files_config("reward_model", tmp_path, own_vocabulary, train_rows, eval_rows)
  task, eval_task = datasets.resolve_data(config)
  assert eval_task == task
  batches = datasets.eval_batches(config, eval_task, str(tmp_path / "workdir"))
  assert len(batches) == config.eval_batches
  assert datasets.held_out_prompts(config, 4) == [row["prompt"] for row in eval_rows[:4]]
  # An eval_task set by hand still wins; without eval_files there is none.
  config.data.eval_task = "my_eval_task"
  assert datasets.resolve_data(config)[1] == "my_eval_task"
  config = files_config("reward_model", tmp_path, own_vocabulary, train_rows)
  assert datasets.resolve_data(config)[1] is None


def test_a_reward_model_on_files_logs_its_held_out_accuracy(tmp_path, demo_cache,
                                                            own_vocabulary):
  config = files_config("reward_model", tmp_path, own_vocabulary, pair_rows(16, seed=5),
                        pair_rows(8, seed=6))
  config = shrink(config, demo_cache, steps=2)
  config.eval_every = config.checkpoint_every = 2
  train.run(config, str(tmp_path / "run"))
  rows = [row for row in read_metrics(tmp_path / "run") if "eval/rewards/accuracies" in row]
  assert [row["step"] for row in rows] == [2]
  assert 0.0 <= rows[0]["eval/rewards/accuracies"] <= 1.0

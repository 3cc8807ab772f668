"""The online loop on a task of the user's own (docs/online.md, "Your own task"): a lowercase
vocabulary trained by the vocabulary command, other lengths than the demo's, an SFT policy trained
by the CLI on the task's JSONL, the task's own prompts and held-out prompts, and a Python oracle
plugged as `module:factory`; then the same loop from a Hugging Face T5 folder written by
transformers. The commands are docs/online.md's, run as written. And the KL guard: each
iteration's KL(π‖SFT) and length change, a warning above `online.max_kl`."""

import json
import pathlib
import random
import shutil
import subprocess
import sys

import pytest

from dro_jax import configs, errors, online
import readme_commands
from run_helpers import cli_env, read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "online.md"
JUDGE = ROOT / "tests" / "polite_judge.py"
VERBS = "pass open close bring send fix clean move find show".split()
OBJECTS = ["the salt", "the door", "the window", "my bag", "the report", "the lamp", "your plan",
           "the map", "the keys", "this letter"]
LENGTHS = {"max_input_length": 24, "max_target_length": 16}  # the demo's: 16 / 12

SFT = "python -m dro_jax.main --config configs/sft.py:size=tiny,steps=300,batch=32"
ONLINE = "python -m dro_jax.main --config configs/online.py:size=tiny,init=/tmp/polite_sft"
ONLINE_T5 = "python -m dro_jax.main --config configs/online.py:size=tiny,init=/tmp/my_t5"


def write_task(folder: pathlib.Path) -> None:
  """my_data/ as the page has it: SFT demonstrations of polite (and less polite) rewrites, the
  loop's training prompts and its held-out prompts. All lowercase."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = random.Random(0)
  requests = [f"{verb} {thing}" for verb in VERBS for thing in OBJECTS]

  def answer(request):
    draw = rng.random()
    return (f"please {request}" if draw < 0.4 else f"{request} now" if draw < 0.7
            else request if draw < 0.85 else f"could you {request}")
  rows = [{"prompt": f"say politely: {request}", "response": answer(request)}
          for request in requests for _ in range(3)]
  rng.shuffle(rows)
  (folder / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  order = list(requests)
  random.Random(1).shuffle(order)
  (folder / "prompts.txt").write_text("".join(f"say politely: {r}\n" for r in order[:80]))
  (folder / "eval_prompts.txt").write_text("".join(f"say politely: {r}\n" for r in order[80:]))


def run_page_command(prefix: str, cwd: pathlib.Path, tmp: pathlib.Path):
  """docs/online.md's command that starts with `prefix`, as written (its /tmp/ folders under
  `tmp`), from `cwd` (which holds my_data/ and the judge module)."""
  words = readme_commands.argv(readme_commands.command(prefix), tmp)
  env = cli_env(tmp, str(tmp / "demo_cache"), "own_task_compile_cache")
  result = subprocess.run([sys.executable, *words[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, (prefix, (result.stdout + result.stderr)[-4000:])
  return result


@pytest.fixture(scope="session")
def own_task(tmp_path_factory):
  """The folder the page's commands run from: my_data/ and polite_judge.py; then the vocabulary
  and the SFT policy, trained by the page's commands (once per session)."""
  tmp = tmp_path_factory.mktemp("own_task")
  cwd = tmp / "work"
  write_task(cwd / "my_data")
  shutil.copy(JUDGE, cwd / "polite_judge.py")
  run_page_command("python -m dro_jax.vocabulary", cwd, tmp)
  run_page_command(SFT, cwd, tmp)
  return tmp, cwd


@pytest.fixture(scope="session")
def own_online(own_task):
  tmp, cwd = own_task
  result = run_page_command(ONLINE, cwd, tmp)
  return tmp / "polite_online", result.stdout


def vocabulary_pieces(path) -> set[str]:
  import sentencepiece
  processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
  return {processor.id_to_piece(i).lstrip("▁") for i in range(processor.get_piece_size())}


def test_the_page_shows_the_judge_module_the_test_plugs_in():
  """The oracle on the page is tests/polite_judge.py's `make_judge`, shown in full."""
  text = PAGE.read_text()
  assert JUDGE.read_text().strip() in text
  assert "oracle=polite_judge:make_judge" in readme_commands.command(ONLINE)


@pytest.mark.slow
def test_the_online_loop_runs_on_your_own_task(own_task, own_online):
  tmp, cwd = own_task
  workdir, stdout = own_online
  recorded = json.loads((workdir / "config.json").read_text())
  sft = json.loads((tmp / "polite_sft" / "config.json").read_text())
  # The user's vocabulary (taken from the SFT workdir), lengths and the SFT's dimensions.
  assert recorded["data"]["vocabulary"] == sft["data"]["vocabulary"] == "my_data/spiece.model"
  assert recorded["data"]["demo"] is False
  assert (recorded["max_input_length"], recorded["max_target_length"]) == (24, 16)
  for key in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim"):
    assert recorded["model"][key] is not None, key
  assert (recorded["model"]["emb_dim"], recorded["model"]["mlp_dim"]) == (32, 64)  # not 128/384
  assert recorded["init_checkpoint"] == str(tmp / "polite_sft")

  # Samples in the user's words, decoded with the user's vocabulary.
  pieces = vocabulary_pieces(cwd / "my_data" / "spiece.model")
  samples = online.read_jsonl(str(workdir / "iterations" / "1" / "samples.jsonl"))
  prompts = (cwd / "my_data" / "prompts.txt").read_text().splitlines()
  assert {row["prompt"] for row in samples} <= set(prompts)
  answers = [answer for row in samples for answer in row["responses"]]
  words = [word for answer in answers for word in answer.split()]
  known = set(" ".join(prompts + ["please now could you"]).split())
  assert sum(word in known for word in words) > 0.7 * len(words), answers[:20]
  assert not {"reverse", "increment", "sort"} & set(words)  # the demo's words
  assert {"salt", "letter"} <= pieces
  letters = set("".join(pieces))
  assert set("".join(answers)) <= letters | {" ", "⁇"}, set("".join(answers)) - letters

  # Labelled pairs, each iteration evaluated on the held-out prompts, the KL guard reported.
  iterations = int(recorded["online"]["iterations"])
  max_kl = float(recorded["online"]["max_kl"])
  rows = [row for row in read_metrics(workdir) if "online/iteration" in row]
  assert [row["online/iteration"] for row in rows] == list(range(1, iterations + 1))
  held_out = set((cwd / "my_data" / "eval_prompts.txt").read_text().splitlines())
  for k, row in enumerate(rows, 1):
    assert row["online/pairs"] > 0
    pairs = online.read_jsonl(str(workdir / "iterations" / str(k) / "pairs.jsonl"))
    assert pairs and all(pair["chosen"] != pair["rejected"] for pair in pairs)
    assert row["online/kl"] < max_kl, f"iteration {k}: KL {row['online/kl']} (max_kl {max_kl})"
    assert row["online/kl_above_max"] == 0.0
    assert abs(row["online/length_change"]) < 4, row  # tokens
    assert f"[online] iteration {k}: against SFT" in stdout
    evaluated = json.loads((workdir / "iterations" / str(k) / "evaluation.json").read_text())
    assert evaluated["vs_sft"]["prompts"] == len(held_out)
  assert "KL(π‖SFT)" in stdout and "[online] WARNING" not in stdout
  report = (workdir / "online.md").read_text()
  assert f"`online.max_kl` = {max_kl:g} nats per answer" in report
  assert "No iteration is above it." in report
  assert f"on {len(held_out)} held-out prompts" in report
  assert "polite_judge:make_judge" in report


def write_hf_t5(folder: pathlib.Path, spiece: pathlib.Path) -> dict:
  """A T5 v1.1-shaped Hugging Face folder as transformers writes it, with its spiece.model."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=128, d_model=48, d_kv=12, num_heads=4, d_ff=96,
                                 num_layers=1, num_decoder_layers=1,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  transformers.T5ForConditionalGeneration(config).save_pretrained(str(folder))
  shutil.copy(spiece, folder / "spiece.model")
  return config.to_dict()


@pytest.mark.slow
def test_the_online_loop_starts_from_a_hugging_face_folder(own_task):
  """init_checkpoint a transformers folder: the dimensions come from its config.json, the
  vocabulary from its spiece.model (no data.vocabulary given), and the loop runs."""
  tmp, cwd = own_task
  hf = write_hf_t5(tmp / "my_t5", cwd / "my_data" / "spiece.model")
  command = readme_commands.command(ONLINE_T5)
  assert "data.vocabulary" not in command
  result = run_page_command(ONLINE_T5, cwd, tmp)
  workdir = tmp / "polite_online_t5"
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["data"]["vocabulary"] == str(tmp / "my_t5" / "spiece.model")
  model = recorded["model"]
  assert (model["vocab_size"], model["emb_dim"], model["num_heads"], model["head_dim"],
          model["mlp_dim"], model["num_encoder_layers"]) == (
              hf["vocab_size"], hf["d_model"], hf["num_heads"], hf["d_kv"], hf["d_ff"], 1)
  # An untrained model's answers, in the characters of the folder's (the user's) vocabulary.
  samples = online.read_jsonl(str(workdir / "iterations" / "1" / "samples.jsonl"))
  letters = set("".join(vocabulary_pieces(cwd / "my_data" / "spiece.model")))
  answers = "".join(answer for row in samples for answer in row["responses"])
  assert answers and set(answers) <= letters | {" ", "⁇"}, set(answers) - letters
  assert read_metrics(workdir)[-1]["online/pairs"] > 0
  assert "KL(π‖SFT)" in result.stdout


# ----------------------------------------------------------------------------------- the guard


def evaluated(k, kl, length, sft_length):
  return {"iteration": k, "vs_sft": {"kl": kl, "policy_length": length,
                                     "baseline_length": sft_length}}


def test_the_kl_guard_warns_above_max_kl_and_writes_it_into_the_report(tmp_path):
  calm = online.kl_guard(evaluated(1, 3.0, 5.2, 5.0), 10.0)
  assert not calm["above"] and calm["warning"] is None
  assert calm["length_change"] == pytest.approx(0.2)
  far = online.kl_guard(evaluated(2, 98.3, 27.0, 17.0), 10.0)
  assert far["above"] and "98.30" in far["warning"] and "online.max_kl = 10" in far["warning"]
  assert "17.0 -> 27.0" in far["warning"]
  assert online.kl_guard(evaluated(2, float("nan"), 5.0, 5.0), 10.0)["above"]
  assert not online.kl_guard(evaluated(2, 98.3, 27.0, 17.0), None)["above"]

  config = configs.load("online", "size=tiny")
  assert config.online.max_kl == online.DEFAULT_MAX_KL == 10.0
  results = []
  for k, (kl, length) in enumerate([(3.0, 5.2), (98.3, 27.0)], 1):
    record = evaluated(k, kl, length, 17.0 if k == 2 else 5.0)
    record["vs_sft"].update(win_rate=0.6, win_rate_low=0.5, win_rate_high=0.7)
    record["vs_previous"] = None
    results.append({"iteration": k, "judged": {"pairs": 10}, "evaluation": record,
                    "kl_guard": online.kl_guard(record, config.online.max_kl),
                    "judge_calls": {"total": 100 * k}})
  online.write_report(str(tmp_path), config, results, "demo")
  report = (tmp_path / "online.md").read_text()
  assert "| 2 | 10 |" in report and "98.300 (above max_kl)" in report and "27.00 (+10.00)" in report
  assert "3.000 |" in report and "5.20 (+0.20)" in report
  warnings = [line for line in report.splitlines() if line.startswith("- **Warning**")]
  assert len(warnings) == 1 and "iteration 2" in warnings[0]
  assert (tmp_path / "online.png").stat().st_size > 10_000  # max_kl drawn beside the curve


# ----------------------------------------------------------------------------- refusals


def own_config(tmp_path, **changes):
  """The online recipe from an SFT workdir of the user's own: its config.json (the tiny SFT's,
  on files, with no vocabulary recorded) and checkpoints/."""
  sft = configs.load("sft", "size=tiny")
  sft.data.train_files = str(tmp_path / "sft.jsonl")
  (tmp_path / "sft" / "checkpoints").mkdir(parents=True, exist_ok=True)
  (tmp_path / "sft" / "config.json").write_text(sft.to_json_best_effort())
  config = configs.load("online", f"size=tiny,init={tmp_path / 'sft'}")
  for key, value in changes.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


@pytest.mark.parametrize("changes, message", [
    ({}, "config.online.eval_prompts_file"),
    ({"online.eval_prompts_file": "missing.txt"}, "config.online.eval_prompts_file=missing.txt"),
    ({"online.eval_prompts_file": "EMPTY"}, "no prompts in it"),
    ({"online.eval_prompts_file": "EVAL", "online.max_kl": 0.0}, "config.online.max_kl=0.0"),
])
def test_the_loop_on_your_task_refuses_what_is_missing_before_writing(tmp_path, changes,
                                                                      message):
  (tmp_path / "prompts.txt").write_text("say politely: pass the salt\n")
  (tmp_path / "empty.txt").write_text("\n")
  names = {"EMPTY": str(tmp_path / "empty.txt"), "EVAL": str(tmp_path / "prompts.txt")}
  changes = {key: names.get(value, value) for key, value in changes.items()}
  config = own_config(tmp_path, **{"online.prompts_file": str(tmp_path / "prompts.txt"),
                                   **changes})
  config.data.vocabulary = str(tmp_path / "spiece.model")
  with pytest.raises(errors.UserError, match=message.replace(".", r"\.")):
    online.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_the_vocabulary_comes_from_the_sft_or_is_asked_for(tmp_path):
  """Not given, the vocabulary is the SFT workdir's (recorded in the config); an SFT that names
  none is refused, naming the key, before anything is written."""
  (tmp_path / "prompts.txt").write_text("say politely: pass the salt\n")
  prompts = str(tmp_path / "prompts.txt")
  config = own_config(tmp_path, **{"online.prompts_file": prompts,
                                   "online.eval_prompts_file": prompts})
  with pytest.raises(errors.UserError, match=r"config\.data\.vocabulary: .*names none"):
    online.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  (tmp_path / "spiece.model").write_bytes(b"")
  recorded = json.loads((tmp_path / "sft" / "config.json").read_text())
  recorded["data"]["vocabulary"] = str(tmp_path / "spiece.model")
  (tmp_path / "sft" / "config.json").write_text(json.dumps(recorded))
  online.resolve_vocabulary(config)
  assert config.data.vocabulary == str(tmp_path / "spiece.model")
  config.data.vocabulary = "mine.model"  # given: kept
  online.resolve_vocabulary(config)
  assert config.data.vocabulary == "mine.model"


def test_the_tiny_learning_rate_follows_the_task_however_init_is_given(tmp_path):
  """size=tiny's rate is the own-task one (1e-4) whether the SFT is given as init= or as
  --config.init_checkpoint, the demo's (1e-3) on the demo, and a rate the user set stays."""
  (tmp_path / "prompts.txt").write_text("say politely: pass the salt\n")
  prompts = str(tmp_path / "prompts.txt")
  by_arg = own_config(tmp_path, **{"online.prompts_file": prompts,
                                   "online.eval_prompts_file": prompts})
  by_key = configs.load("online", "size=tiny")
  assert by_key.optimizer.learning_rate == online.TINY_LEARNING_RATES["demo"]
  for key, value in by_arg.items():  # the same run, its init given as a config key
    if key not in ("optimizer",):
      by_key[key] = value
  for config in (by_arg, by_key):
    config.data.vocabulary = str(tmp_path / "spiece.model")
    online.validate(config)
    assert config.optimizer.learning_rate == online.TINY_LEARNING_RATES["own task"]
  demo = configs.load("online", "size=tiny")
  online.validate(demo)
  assert demo.optimizer.learning_rate == online.TINY_LEARNING_RATES["demo"]
  chosen = configs.load("online", "size=tiny,lr=0.003")
  chosen.init_checkpoint, chosen.data.demo = str(tmp_path / "sft"), False
  chosen.online.prompts_file = chosen.online.eval_prompts_file = prompts
  chosen.data.vocabulary = str(tmp_path / "spiece.model")
  online.validate(chosen)
  assert chosen.optimizer.learning_rate == 0.003


def test_a_refit_preference_model_without_labels_is_refused_before_writing(tmp_path):
  """preference_model=fit on a vocabulary with no two label pieces is refused before the run
  writes anything, not when the first refit starts an iteration later."""
  from dro_jax import vocabulary
  lines = [f"please {verb} {thing}" for verb in VERBS for thing in OBJECTS]
  path = str(tmp_path / "plain.model")
  vocabulary.train_sentencepiece(lines, path, vocab_size=60, model_type="unigram")
  (tmp_path / "prompts.txt").write_text("say politely: pass the salt\n")
  prompts = str(tmp_path / "prompts.txt")
  config = own_config(tmp_path, **{"online.prompts_file": prompts,
                                   "online.eval_prompts_file": prompts,
                                   "online.preference_model": "fit"})
  config.data.vocabulary = path
  with pytest.raises(errors.UserError, match=r"no two preference labels"):
    online.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config.online.preference_model = "oracle"  # the same run ranking with the oracle: no labels
  online.check_fit_labels(config)

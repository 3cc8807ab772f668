"""The `online` runner: online iterative RLHF with a general preference oracle (docs/methods.md).

    python -m dro_jax.main --config configs/online.py:size=tiny --workdir /tmp/online

The start policy is `init_checkpoint` (on the demo task without one: SFT on the demo's
demonstrations, trained first in <workdir>/sft); off the demo, the vocabulary is
`data.vocabulary`, or the one the init checkpoint names (docs/online.md, "Your own task").
Then, per iteration k = 1..K (`config.online`):

  sample    n answers per prompt from the current policy (the decoding module, over the mesh)
  rank      the enhancer: the best of the n by a knock-out tournament under the preference
            model (`preference_model`: "oracle" ranks with the oracle itself; "fit" with a
            pairwise preference model refit on every oracle-labelled pair so far, warm-started;
            before any pair is labelled, the ranking is random)
  pair      "enhancer": the main agent's own sample against the enhancer's best (the paper;
            `online.enhancer="independent"`: the enhancer ranks n fresh samples of its own,
            "shared": the n answers, the main agent's, the first, among them); "best_worst":
            tournament winner against tournament loser (iterative DPO). Identical answers are
            dropped
  label     the oracle (a judge spec: demo, noisy:0.2:demo, preference_model:DIR, ...), each
            pair shown in a random order: the first answer is chosen with probability P
            (`online.labels="bernoulli"`, the paper) or when P > 0.5 ("threshold"); P = 0.5
            is dropped. The tournament and the labels ask a non-symmetric judge in both orders
            when `online.debias` (fixed on resume)
  train     IPO (default, τ = 0.1) or DPO on this iteration's pairs or all so far (`accumulate`),
            from iterate k−1, against the SFT policy (`reference="sft"`), iterate k−1
            ("previous") or a trust-region reference moved towards the policy ("ema"): the
            project's one training loop (`train.loop`), called with the iteration's data
  evaluate  on held-out prompts (`online.eval_prompts_file`, else the task's): win rate against
            SFT and against iterate k−1 under `evaluation.judge` (default: the oracle; both
            orders for a non-symmetric judge; prompt-clustered 95% interval), KL to SFT from the
            policy's own samples, mean length and its change from SFT's. The KL guard: above
            `online.max_kl` nats per answer, a warning on the console and in online.md

On disk (<workdir>):
  checkpoints/              one checkpoint manager; its step is the optimizer step counted over
                            all iterations, each iterate's last step is kept, and a JSON item
                            `online` beside the state holds the iteration, its phase and the
                            judge calls so far
  iterations/<k>/samples.jsonl, judged.json, pairs.jsonl, evaluation.json
                            each written atomically once: a restarted run resumes at the
                            iteration and phase where it stopped and never samples or judges
                            again what is on disk
  metrics.jsonl, tensorboard/   the training metrics, and per iteration `online/*` and the
                            cumulative `judge_calls/{tournament,labelling,evaluation,total}`
  online.md, online.png     the table and the curves, rewritten after each iteration

Every random draw (the samples, the tournament's bracket, the order a pair is shown in, the data
order) is a function of (seed, iteration, row), and a `noisy:P:SPEC` oracle's flips of (seed,
query index), its query counter set from the calls on disk before each judged phase
(`restore_queries`): a run stopped by SIGTERM or Ctrl-C in any phase (exit 143) and restarted
ends bitwise equal to an uninterrupted one, with the same judge calls.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dro_jax import (checkpoint_manager, datasets, decoding, errors, evaluation, files,
                     initialization, judges, partitioning, policies, train)
from dro_jax import configs
from dro_jax import reference as reference_lib
from dro_jax import step as step_lib

PyTree = Any
PHASES = ("sampled", "judged", "trained", "evaluated")
# The KL guard (`online.max_kl`): above this KL(π‖SFT), in nats per answer from the policy's own
# samples, an iteration is warned about on the console and in online.md. Healthy runs stay well
# below it: the online demo's iterates measured 1.1-4.9 nats over every pairing, loss and seed,
# and an earlier sweep of the reward-KL frontier's most over-optimised point (IPO at τ = 0.01)
# 6.2; a policy that runs away from SFT passes it within an iteration (tens of nats).
DEFAULT_MAX_KL = 10.0
# size=tiny's IPO learning rate (configs/online.py): the demo's, with fresh prompts every
# iteration, and a task of one's own, where 1e-3 over a small prompt pool drove KL(π‖SFT) from 10
# to 20 nats in two iterations and 1e-4 stayed near 1-2 (docs/online.md).
TINY_LEARNING_RATES = {"demo": 1e-3, "own task": 1e-4}
CALL_KINDS = ("tournament", "labelling", "evaluation")
ENHANCERS = ("independent", "shared")
LABELS = ("bernoulli", "threshold")


def _seed(seed: int, iteration: int, salt: str) -> int:
  digest = hashlib.sha256(f"dro_jax_online:{seed}:{iteration}:{salt}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _row_bits(seed: int, iteration: int, salt: str, rows: int) -> np.ndarray:
  """One uniform draw in [0, 1) per row, a function of (seed, iteration, row) only."""
  return np.random.default_rng([_seed(seed, iteration, salt)]).random(rows)


def _row_rng(seed: int, iteration: int, salt: str, row: int) -> np.random.Generator:
  return np.random.default_rng([_seed(seed, iteration, salt), row])


read_jsonl = files.read_jsonl


def write_text(path: str, text: str) -> None:
  """Process 0 writes a phase file; every process waits until it is written (one copy)."""
  files.write_text_once(path, text)


def write_jsonl(path: str, rows) -> None:
  files.write_jsonl_once(path, rows)


def params_digest(tree: PyTree) -> str:
  """sha256 over every leaf's bytes, in tree order (bitwise equality of parameters)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(str(array.dtype).encode() + str(array.shape).encode() + array.tobytes())
  return digest.hexdigest()


# ------------------------------------------------------------------------------------- setup


def validate(config: ml_collections.ConfigDict) -> None:
  """A misconfigured run fails here, naming the key, before anything is written."""
  datasets.resolve_demo(config)  # the demo task only when data.demo says so
  initialization.resolve_init_dims(config)  # the model's dimensions from init_checkpoint
  settings = config.online
  if config.loss not in ("ipo", "dpo"):
    raise errors.UserError(f"config.loss={config.loss!r}: the online loop trains ipo or dpo")
  checks = {"pairing": ("enhancer", "best_worst"), "reference": ("sft", "previous", "ema"),
            "preference_model": ("oracle", "fit"), "enhancer": ENHANCERS, "labels": LABELS}
  for key, choices in checks.items():
    if settings.get(key, choices[0]) not in choices:
      raise errors.UserError(f"config.online.{key}={settings[key]!r}: choose from {choices}")
  for key in ("iterations", "samples", "prompts", "steps"):
    if int(settings[key]) < 1:
      raise errors.UserError(f"config.online.{key}={settings[key]}: must be at least 1")
  for key in ("max_pairs", "max_oracle_calls", "oracle_max_calls"):
    if int(settings.get(key) or 0) < 0:
      raise errors.UserError(f"config.online.{key}={settings[key]}: must be 0 (no cap) or more")
  if settings.samples < 2:
    raise errors.UserError(f"config.online.samples={settings.samples}: pairs need at least 2 answers")
  if settings.reference == "ema" and reference_lib.is_frozen(config.reference.alpha):
    raise errors.UserError("config.online.reference='ema' needs config.reference.alpha > 0")
  if settings.reference != "ema" and not reference_lib.is_frozen(config.reference.alpha):
    raise errors.UserError(f"config.online.reference={settings.reference!r} keeps the reference "
                     f"fixed within an iteration; config.reference.alpha must be 0 (or use "
                     f"reference='ema')")
  from dro_jax import judge_specs  # the specs named by their keys, before anything is built
  judge_specs.check(settings.oracle, "config.online.oracle")
  if config.evaluation.get("judge"):
    judge_specs.check(config.evaluation.judge, "config.evaluation.judge")
  try:
    # a factory that fails, or builds no judge, fails now (an api judge: its endpoint reached)
    judges.judge_from_spec(settings.oracle, **judges.judge_options(config.evaluation))
  except ValueError as error:
    raise errors.UserError(f"config.online.oracle {settings.oracle}: "
                           f"{errors.one_line(error)}") from error
  demo = datasets.is_demo(config)
  if configs.origin(config, "optimizer.learning_rate") == "size preset":
    # The recipe guesses the task from its args (init=, task=); an init given as
    # --config.init_checkpoint, or a demo SFT given as init=, is known only here.
    config.optimizer.learning_rate = TINY_LEARNING_RATES["demo" if demo else "own task"]
    configs.mark(config, "size preset", ["optimizer.learning_rate"])
  if not config.init_checkpoint and not demo:
    raise errors.UserError("the online loop needs config.init_checkpoint (an SFT policy) unless it "
                     "runs on the demo task")
  for key in ("prompts_file", "eval_prompts_file"):
    path = settings.get(key)
    if path:
      try:
        prompts = datasets.read_prompts(path)
      except (OSError, ValueError) as error:
        raise errors.UserError(f"config.online.{key}={path}: {errors.one_line(error)}") from error
      if not prompts:
        raise errors.UserError(f"config.online.{key}={path}: no prompts in it (JSON lines with a "
                               f"\"prompt\" field, or one prompt per line)")
  if not demo and not settings.get("eval_prompts_file") and not (
      config.data.get("task") or config.data.get("eval_files")):
    raise errors.UserError("config.online.eval_prompts_file: the online loop evaluates each "
                           "iterate on held-out prompts of your task; give a file of them "
                           "(JSON lines with a \"prompt\" field, or one prompt per line), or "
                           "config.data.eval_files / config.data.task")
  max_kl = settings.get("max_kl", DEFAULT_MAX_KL)
  if max_kl is not None and not float(max_kl) > 0:
    raise errors.UserError(f"config.online.max_kl={max_kl}: give a KL in nats per answer above 0 "
                           f"(a large one, e.g. 1e9, never warns)")


def init_vocabulary(path: str) -> str | None:
  """The sentencepiece model an SFT policy was trained with: a dro_jax workdir's (its
  config.json's data, when that file exists), or the `spiece.model` in an HF or T5X folder."""
  from etils import epath
  found = policies.workdir_and_step(path)
  if found:
    run_config = policies.read_run_config(found[0])
    vocabulary = datasets.run_vocabulary(run_config)
    return vocabulary if vocabulary and epath.Path(vocabulary).exists() else None
  spiece = epath.Path(path) / "spiece.model"
  return str(spiece) if spiece.exists() else None


def resolve_vocabulary(config: ml_collections.ConfigDict) -> None:
  """Off the demo task, the run's vocabulary is `data.vocabulary` as given; unset (and no
  `data.task` to take it from), the init checkpoint's, recorded into the config (config.json
  then names it). None to be found is refused, naming the key."""
  data = config.data
  if datasets.is_demo(config) or data.get("vocabulary") or data.get("task"):
    return
  if not config.init_checkpoint:
    return  # validate() names the missing init_checkpoint
  found = init_vocabulary(config.init_checkpoint)
  if not found:
    raise errors.UserError(
        f"config.data.vocabulary: the online loop samples and trains with the SFT policy's "
        f"sentencepiece model, and init_checkpoint {config.init_checkpoint} names none (no "
        f"existing data.vocabulary in its config.json, no spiece.model beside it); give "
        f"--config.data.vocabulary=<the SFT's spiece.model>")
  data.vocabulary = found


def check_fit_labels(config: ml_collections.ConfigDict) -> None:
  """With `online.preference_model='fit'`, the refit preference model's two label ids must exist
  in the run's vocabulary: refused here, before anything is written, rather than when the first
  refit starts (dro_jax.vocabulary.preference_labels)."""
  if config.online.preference_model != "fit" or datasets.is_demo(config):
    return
  path = config.data.get("vocabulary")
  if not path:
    raise errors.UserError("online.preference_model='fit' needs a sentencepiece file "
                           "(config.data.vocabulary) for the preference model's labels")
  import seqio
  from dro_jax import vocabulary as vocabulary_lib
  preference = config.preference
  vocabulary_lib.preference_labels(
      seqio.SentencePieceVocabulary(path), a_token=preference.a_token,
      b_token=preference.b_token, a_piece=preference.get("a_piece"),
      b_piece=preference.get("b_piece"), name=f"the vocabulary {path}")


def internal_config(config: ml_collections.ConfigDict, sft: str) -> ml_collections.ConfigDict:
  """The run's config with what the loop derives: the start policy, the schedule's length."""
  inner = copy.deepcopy(config)
  settings = inner.online
  inner.init_checkpoint = sft
  inner.total_steps = int(settings.steps) * int(settings.iterations)
  inner.checkpoint_every = max(min(int(inner.checkpoint_every), int(settings.steps)), 1)
  inner.eval_every = 0  # the loop evaluates once per iteration
  inner.reference_cache = "off"
  return inner


def sft_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SFT on the demo's demonstrations with the run's model (the demo's `sft` stage)."""
  from dro_jax import configs
  from dro_jax.data import synthetic
  settings = config.online
  sft = configs.load("sft", "size=tiny")
  for key, value in config.model.items():
    sft.model[key] = value
  sft.seed, sft.compute_dtype = config.seed, config.compute_dtype
  sft.max_input_length, sft.max_target_length = config.max_input_length, config.max_target_length
  sft.data.task = synthetic.TASK_NAMES["sft"]
  sft.data.cache_dir = config.data.cache_dir
  sft.mesh_shape = config.mesh_shape
  sft.total_steps, sft.batch_size = int(settings.sft_steps), int(settings.sft_batch)
  sft.optimizer.learning_rate = float(settings.sft_lr)
  sft.eval_every, sft.keep_last, sft.keep_best = 0, 1, 0
  sft.checkpoint_every = sft.total_steps
  sft.log_every = max(sft.total_steps // 20, 1)
  return sft


def train_sft(config: ml_collections.ConfigDict, workdir: str) -> str:
  """<workdir>/sft, trained (or finished) by train.run on the demo's demonstrations."""
  from dro_jax import demo
  from dro_jax.data import synthetic
  path = os.path.join(workdir, "sft")
  sft = sft_config(config)
  synthetic.register_demo_tasks(config.data.cache_dir, sft_examples=config.online.sft_examples)
  if demo.finished(path, sft.total_steps):
    return path
  print(f"[online] sft: {sft.total_steps} steps on the demo's demonstrations in {path}",
        flush=True)
  start = time.perf_counter()
  train.run(sft, path)
  print(f"[online] sft: trained in {time.perf_counter() - start:.0f} s", flush=True)
  return path


class Prompts:
  """Each iteration's training prompts, a function of (seed, iteration)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.count = int(config.online.prompts)
    self.pool: list[str] | None = None
    settings = config.online
    if settings.prompts_file:
      self.pool = datasets.read_prompts(settings.prompts_file)
      if not self.pool:
        raise ValueError(f"config.online.prompts_file={settings.prompts_file}: no prompts")
    elif not datasets.is_demo(config):
      self.pool = _train_prompts(config)

  def __call__(self, iteration: int) -> list[str]:
    if self.pool is None:  # the demo task: fresh training prompts every iteration
      from dro_jax.data import synthetic
      problems = synthetic.sample_problems(self.count, _seed(self.config.seed, iteration,
                                                             "prompts"))
      return [problem.prompt for problem in problems]
    start = (iteration - 1) * self.count
    return [self.pool[(start + i) % len(self.pool)] for i in range(self.count)]


def _train_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """The distinct prompts of the train split of `data.task` (or data.train_files), in order."""
  from dro_jax.data import tasks
  task, _ = datasets.resolve_data(config)
  seen: dict[str, None] = {}
  for component, _ in tasks.component_tasks(task):
    for example in tasks.feedback_source(component).examples("train"):
      seen.setdefault(example["inputs"])
  if not seen:
    raise ValueError(f"Task {task} has no train prompts; set config.online.prompts_file")
  return list(seen)


# --------------------------------------------------------------------------------- the phases


def sample(policy: evaluation.Policy, prompts: list[str], vocabulary, config, iteration: int,
           mesh) -> list[dict[str, Any]]:
  """n answers per prompt: rows {"prompt", "responses": [n], "truncated": [n]}."""
  settings = config.online
  sampling = decoding.SamplingParams(
      max_decode_length=settings.max_decode_length or config.max_target_length,
      temperature=float(settings.temperature), num_samples=answers_per_prompt(config))
  encoder_tokens = decoding.encode_prompts(vocabulary, prompts,
                                           max_input_length=config.max_input_length)
  samples = evaluation.sample_policy(policy, encoder_tokens, vocabulary, sampling,
                                     _seed(config.seed, iteration, "sample"), mesh=mesh)
  n = sampling.num_samples
  return [{"prompt": prompt, "responses": samples.responses[i * n:(i + 1) * n],
           "truncated": [bool(t) for t in samples.truncated[i * n:(i + 1) * n]]}
          for i, prompt in enumerate(prompts)]


def independent_enhancer(config) -> bool:
  """Whether the enhancer draws its own `online.samples` answers, apart from the main agent's."""
  settings = config.online
  return settings.pairing == "enhancer" and settings.get("enhancer", ENHANCERS[0]) == "independent"


def answers_per_prompt(config) -> int:
  """Answers sampled per prompt: n, and the main agent's own one more under an independent
  enhancer (answer 0 is the main agent's; the enhancer ranks answers 1..n)."""
  return int(config.online.samples) + (1 if independent_enhancer(config) else 0)


def candidate_indices(config) -> np.ndarray:
  """The answers (indices into a row's responses) the tournament ranks."""
  start = 1 if independent_enhancer(config) else 0
  return np.arange(start, start + int(config.online.samples))


def online_debias(config) -> bool:
  """Whether the tournament and the labels ask a non-symmetric judge in both orders."""
  return bool(config.online.get("debias", config.evaluation.debias))


def _bracket_orders(config, iteration: int, rows: int) -> list[np.ndarray]:
  """The tournament's bracket per row: a permutation of the candidates (seed, iteration, row)."""
  candidates = candidate_indices(config)
  return [candidates[_row_rng(config.seed, iteration, "bracket", row).permutation(len(candidates))]
          for row in range(rows)]


def rank(samples: list[dict[str, Any]], ranker: judges.Judge | None, config, iteration: int,
         *, worst: bool) -> tuple[list[int], list[int] | None, int]:
  """(best index per row, worst index per row or None, comparisons spent). `ranker` None: no
  preference model yet, a random pick (a function of seed, iteration, row)."""
  indices = candidate_indices(config)
  rows = len(samples)
  if ranker is None:
    picks = [indices[_row_rng(config.seed, iteration, "random_rank", row).permutation(
        len(indices))] for row in range(rows)]
    return ([int(p[0]) for p in picks], [int(p[1]) for p in picks] if worst else None, 0)
  orders = _bracket_orders(config, iteration, rows)
  prompts = [row["prompt"] for row in samples]
  candidates = [[row["responses"][i] for i in order] for row, order in zip(samples, orders)]
  debias = online_debias(config)
  best, calls = judges.tournament(prompts, candidates, ranker, debias=debias)
  best = [int(order[i]) for order, i in zip(orders, best)]
  lowest = None
  if worst:
    lowest, more = judges.tournament(prompts, candidates, ranker, debias=debias, worst=True)
    lowest = [int(order[i]) for order, i in zip(orders, lowest)]
    calls += more
  return best, lowest, calls


def make_pairs(samples: list[dict[str, Any]], best: list[int], worst: list[int] | None,
               pairing: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Unlabelled pairs {"prompt", "row", "first", "second", indices}; identical ones dropped."""
  pairs, dropped = [], 0
  for row, item in enumerate(samples):
    a = 0 if pairing == "enhancer" else worst[row]
    b = best[row]
    if a == b or item["responses"][a] == item["responses"][b]:
      dropped += 1
      continue
    pairs.append({"prompt": item["prompt"], "row": row, "first_index": a, "second_index": b,
                  "first": item["responses"][a], "second": item["responses"][b]})
  return pairs, {"dropped_identical": dropped}


def label(pairs: list[dict[str, Any]], oracle: judges.Judge, config,
          iteration: int) -> tuple[list[dict[str, Any]], dict[str, int], int]:
  """(labelled pairs {"prompt", "chosen", "rejected", "p_chosen", "labels", ...}, counts,
  calls): each pair is shown to the oracle in a random order (seed, iteration, row); its first
  answer is chosen with probability P (`online.labels="bernoulli"`, drawn from seed, iteration,
  row) or when P > 0.5 ("threshold"); P = 0.5 is dropped."""
  if not pairs:
    return [], {"dropped_tie": 0}, 0
  mode = config.online.get("labels", LABELS[0])
  swap = _row_bits(config.seed, iteration, "order", max(p["row"] for p in pairs) + 1) < 0.5
  shown_a = [p["second"] if swap[p["row"]] else p["first"] for p in pairs]
  shown_b = [p["first"] if swap[p["row"]] else p["second"] for p in pairs]
  p_shown, calls, _ = judges.compare(oracle, [p["prompt"] for p in pairs], shown_a, shown_b,
                                     debias=online_debias(config))
  labelled, ties = [], 0
  for pair, p, swapped in zip(pairs, p_shown, (swap[p["row"]] for p in pairs)):
    p_first = 1.0 - float(p) if swapped else float(p)
    if p_first == 0.5 or np.isnan(p_first):  # NaN: the oracle gave no verdict (api_judge)
      ties += 1
      continue
    if mode == "bernoulli":
      first_wins = bool(_row_rng(config.seed, iteration, "label", pair["row"]).random() < p_first)
    else:
      first_wins = p_first > 0.5
    labelled.append({
        "prompt": pair["prompt"], "row": pair["row"],
        "chosen": pair["first"] if first_wins else pair["second"],
        "rejected": pair["second"] if first_wins else pair["first"],
        "chosen_index": pair["first_index"] if first_wins else pair["second_index"],
        "rejected_index": pair["second_index"] if first_wins else pair["first_index"],
        "p_chosen": p_first if first_wins else 1.0 - p_first, "labels": mode})
  return labelled, {"dropped_tie": ties}, calls


def label_within(pairs: list[dict[str, Any]], oracle: judges.Judge, config, iteration: int, *,
                 max_pairs: int = 0, max_calls: int = 0
                 ) -> tuple[list[dict[str, Any]], dict[str, int], int]:
  """`label` under the caps (`online.max_pairs`, `online.max_oracle_calls`; 0: none): the pairs
  are asked in order, a batch at a time, until `max_pairs` labelled pairs are kept (ties, being
  dropped, do not count: the next pairs are asked in their place), the next pair would take the
  labelling calls past `max_calls`, or none is left. Counts: `dropped_tie`, and
  `dropped_over_cap`, the pairs never shown to the oracle."""
  per_pair = 1 if not online_debias(config) or judges.is_symmetric(oracle) else 2
  labelled: list[dict[str, Any]] = []
  ties = calls = asked = 0
  while asked < len(pairs):
    room = len(pairs) - asked
    if max_pairs:
      room = min(room, max_pairs - len(labelled))
    if max_calls:
      room = min(room, (max_calls - calls) // per_pair)
    if room <= 0:
      break
    more, counted, spent = label(pairs[asked:asked + room], oracle, config, iteration)
    labelled += more
    ties += counted["dropped_tie"]
    calls += spent
    asked += room
  return labelled, {"dropped_tie": ties, "dropped_over_cap": len(pairs) - asked}, calls


# ------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Calls:
  """Judge calls (one comparison = one call), cumulative over the run."""

  tournament: int = 0
  labelling: int = 0
  evaluation: int = 0

  @property
  def total(self) -> int:
    return self.tournament + self.labelling + self.evaluation

  def as_dict(self) -> dict[str, int]:
    return {**{kind: getattr(self, kind) for kind in CALL_KINDS}, "total": self.total}

  def add(self, **calls: int) -> None:
    for kind, value in calls.items():
      setattr(self, kind, getattr(self, kind) + int(value))


class OnlineRun:
  """One run's state between phases; `run()` below drives it."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    import seqio
    from dro_jax.data import synthetic
    self.user_config, self.workdir = config, workdir
    self.settings = config.online
    if datasets.is_demo(config):
      synthetic.register_demo_tasks(config.data.cache_dir,
                                    sft_examples=config.online.sft_examples)
    self.vocabulary_path = datasets.run_vocabulary(config)
    self.vocabulary = (seqio.SentencePieceVocabulary(self.vocabulary_path)
                       if self.vocabulary_path else datasets.task_vocabulary(config))
    self.sft_dir = config.init_checkpoint or train_sft(config, workdir)
    self.config = internal_config(config, self.sft_dir)
    self.model_config = step_lib.t5_config(self.config)
    if self.vocabulary.vocab_size > self.model_config.vocab_size:
      raise ValueError(f"the vocabulary has {self.vocabulary.vocab_size} pieces but the model's "
                       f"embedding {self.model_config.vocab_size}: set config.model.vocab_size")
    cache = os.path.join(workdir, "judge_cache.sqlite")  # api:MODEL@BASE_URL judges' verdicts
    self.oracle = judges.judge_from_spec(self.settings.oracle, **judges.judge_options(
        config.evaluation, cache=cache, max_calls=self.settings.get("oracle_max_calls") or 0,
        budget_key="online.oracle_max_calls"))
    if isinstance(self.oracle, judges.NoisyJudge):  # its flips drawn from the run's seed
      self.oracle = type(self.oracle)(self.oracle.judge, self.oracle.flip, seed=config.seed,
                                      spec=self.oracle.spec)
    # With several processes, process 0 alone asks the oracle and sends every process its
    # verdicts: one cost, and the same pairs everywhere.
    self.oracle = judges.on_process_zero(self.oracle)
    self.eval_spec = config.evaluation.judge or self.settings.oracle
    self.eval_judge = (self.oracle if self.eval_spec == self.settings.oracle
                       else judges.on_process_zero(judges.judge_from_spec(
                           self.eval_spec, **judges.judge_options(
                               config.evaluation, cache=cache,
                               max_calls=config.evaluation.get("judge_max_calls") or 0))))
    self.prompts = Prompts(config)
    self.max_kl = self.settings.get("max_kl", DEFAULT_MAX_KL)
    self.steps = int(self.settings.steps)
    self.iterations = int(self.settings.iterations)
    self._compiled: dict[Any, Any] = {}
    self._sft_policy: evaluation.Policy | None = None
    self._sft_samples = None

  # -------------------------------------------------------------------- files of an iteration

  def iteration_dir(self, k: int) -> str:
    return os.path.join(self.workdir, "iterations", str(k))

  def path(self, k: int, name: str) -> str:
    return os.path.join(self.iteration_dir(k), name)

  def calls_on_disk(self, through: int) -> Calls:
    """The judge calls recorded by the finished phases of iterations 1..`through`."""
    calls = Calls()
    for k in range(1, through + 1):
      judged = files.read_json(self.path(k, "judged.json"))
      if judged:
        calls.add(**judged["judge_calls"])
      evaluated = files.read_json(self.path(k, "evaluation.json"))
      if evaluated:
        calls.add(evaluation=evaluated["judge_calls"])
    return calls

  def restore_queries(self, k: int, phase: str) -> None:
    """Sets the query counters of the oracle and the evaluation judge (where they have one: a
    `noisy:P:SPEC` judge draws its flip from the query's index) to the comparisons they had been
    asked before iteration k's `phase` ("judged" or "evaluated"), counted from the phases on
    disk. An uninterrupted run and a restarted one, which never asks again what is on disk, so
    draw the same noise for the same queries."""
    oracle = evaluator = 0
    for j in range(1, k + 1):
      judged = (files.read_json(self.path(j, "judged.json"))
                if j < k or phase == "evaluated" else None)
      if judged:
        oracle += judged["judge_calls"]["labelling"]
        if judged["ranker"] == self.settings.oracle:  # the oracle ranked too
          oracle += judged["judge_calls"]["tournament"]
      evaluated = files.read_json(self.path(j, "evaluation.json")) if j < k else None
      if evaluated:
        evaluator += evaluated["judge_calls"]
    if self.eval_judge is self.oracle:
      oracle += evaluator
    elif hasattr(self.eval_judge, "queries"):
      self.eval_judge.queries = evaluator
    if hasattr(self.oracle, "queries"):
      self.oracle.queries = oracle

  # ------------------------------------------------------------------------------ the phases

  def sampled(self, k: int, policy_params: PyTree) -> list[dict[str, Any]]:
    path = self.path(k, "samples.jsonl")
    if files.read_text(path) is not None:
      return read_jsonl(path)
    prompts = self.prompts(k)
    start = time.perf_counter()
    rows = sample(evaluation.Policy(policy_params, self.model_config), prompts, self.vocabulary,
                  self.config, k, self.mesh)
    write_jsonl(path, rows)
    print(f"[online] iteration {k}: sampled {self.settings.samples} answers to each of "
          f"{len(prompts)} prompts in {time.perf_counter() - start:.1f} s", flush=True)
    return rows

  def ranker(self, k: int) -> judges.Judge | None:
    if self.settings.preference_model == "oracle":
      return self.oracle
    return judges.on_process_zero(self.fitted_preference_model(k))

  def judged(self, k: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    record_path = self.path(k, "judged.json")
    record = files.read_json(record_path)
    if record is not None:
      return record
    self.restore_queries(k, "judged")
    start = time.perf_counter()
    ranker = self.ranker(k)
    best, worst, tournament_calls = rank(samples, ranker, self.config, k,
                                         worst=self.settings.pairing == "best_worst")
    pairs, counts = make_pairs(samples, best, worst, self.settings.pairing)
    labelled, ties, labelling_calls = label_within(
        pairs, self.oracle, self.config, k, max_pairs=int(self.settings.get("max_pairs") or 0),
        max_calls=int(self.settings.get("max_oracle_calls") or 0))
    asked = len(pairs) - ties["dropped_over_cap"]
    seconds = time.perf_counter() - start
    write_jsonl(self.path(k, "pairs.jsonl"), labelled)
    record = {"pairs": len(labelled), "prompts": len(samples), **counts, **ties,
              "best": best, "worst": worst, "seconds": seconds,
              "judged_pairs_per_second": asked / seconds if seconds > 0 else 0.0,
              "judge_calls": {"tournament": tournament_calls, "labelling": labelling_calls},
              "enhancer": ("independent" if independent_enhancer(self.config) else "shared"),
              "labels": self.settings.get("labels", LABELS[0]),
              "debias": online_debias(self.config),
              "ranker": ("random" if ranker is None else
                         self.settings.oracle if ranker is self.oracle else "fit")}
    write_text(record_path, json.dumps(record, indent=1))  # the phase's marker, last
    print(f"[online] iteration {k}: {len(labelled)} pairs labelled by {self.settings.oracle} "
          f"({counts['dropped_identical']} identical and {ties['dropped_tie']} ties dropped; "
          f"{tournament_calls} + {labelling_calls} judge calls)", flush=True)
    return record

  def pair_files(self, k: int) -> list[str]:
    first = 1 if self.settings.accumulate else k
    return [self.path(j, "pairs.jsonl") for j in range(first, k + 1)
            if read_jsonl(self.path(j, "pairs.jsonl"))]

  def pairs_task(self, k: int, paths: list[str]) -> str:
    """A seqio Task over the pairs files, named by their content (the data position names
    it)."""
    from dro_jax.data import tasks
    digest = hashlib.sha256()
    for path in paths:
      digest.update(files.read_text(path).encode())
    name = f"dro_jax_online_pairs_{digest.hexdigest()[:16]}"
    tasks.register_pairwise_task(
        name, {"train": paths}, self.vocabulary_path or self.vocabulary,
        max_prompt_length=self.config.max_input_length,
        max_response_length=self.config.max_target_length, on_invalid="skip", overwrite=True)
    return name

  def fitted_preference_model(self, k: int) -> judges.Judge | None:
    """A pairwise preference model trained (train.run, in iterations/<k>/preference_model) on
    every pair labelled before iteration k, warm-started from iteration k−1's (the first from
    the SFT policy); None before any pair is labelled."""
    # Its training pairs: every labelled pair so far whose two answers are not empty (a policy
    # may answer with EOS at once; the policy's own training skips such pairs too), written once.
    fit_pairs = self.path(k, "fit_pairs.jsonl")
    if not os.path.exists(fit_pairs):
      rows = [row for j in range(1, k) for row in read_jsonl(self.path(j, "pairs.jsonl"))]
      kept = [row for row in rows if row["chosen"].strip() and row["rejected"].strip()]
      if len(kept) < len(rows):
        print(f"[online] iteration {k}: the preference model skips {len(rows) - len(kept)} "
              f"labelled pairs with an empty answer", flush=True)
      write_jsonl(fit_pairs, kept)
    if not read_jsonl(fit_pairs):
      return None
    paths = [fit_pairs]
    if not self.vocabulary_path:
      raise ValueError("online.preference_model='fit' needs a sentencepiece file "
                       "(config.data.vocabulary)")
    from dro_jax import configs
    workdir = self.path(k, "preference_model")
    previous = [j for j in range(k - 1, 0, -1)
                if os.path.isdir(os.path.join(self.path(j, "preference_model"), "checkpoints"))]
    pm = configs.load("preference_model", "size=tiny")
    for key, value in self.user_config.model.items():
      pm.model[key] = value
    pm.seed, pm.compute_dtype, pm.mesh_shape = (self.config.seed + k, self.config.compute_dtype,
                                                self.config.mesh_shape)
    # It reads prompt ‖ answer A ‖ answer B (judge_inputs): the policy's prompt length (at most
    # `fit_max_input_length`) and its answer length, so it sees every token of both answers.
    pm.max_input_length = min(int(self.settings.fit_max_input_length),
                              int(self.config.max_input_length))
    pm.max_target_length = int(self.config.max_target_length)
    pm.data.train_files = ",".join(paths)
    pm.data.vocabulary = self.vocabulary_path
    pm.data.cache_dir = self.config.data.cache_dir
    pm.init_checkpoint = (self.path(previous[0], "preference_model") if previous
                          else self.sft_dir)
    pm.total_steps = int(self.settings.fit_steps)
    pm.batch_size = self.config.batch_size
    pm.optimizer.learning_rate = self.config.optimizer.learning_rate
    pm.eval_every, pm.keep_last, pm.keep_best = 0, 1, 0
    pm.checkpoint_every = pm.total_steps
    pm.log_every = max(pm.total_steps // 10, 1)
    from dro_jax import demo
    if not demo.finished(workdir, pm.total_steps):
      print(f"[online] iteration {k}: fitting the preference model on "
            f"{len(read_jsonl(fit_pairs))} pairs of {k - 1} iterations ({pm.total_steps} steps)",
            flush=True)
      train.run(pm, workdir)
    return judges.PreferenceModelJudge(workdir)

  # ------------------------------------------------------------------------------- training

  def compiled(self, batch: dict[str, np.ndarray]):
    key = tuple(sorted((name, np.shape(value)) for name, value in batch.items()))
    if key not in self._compiled:
      self._compiled[key] = initialization.compile_step(self.config, self.mesh, self.rules,
                                                         self.shardings, batch)
    return self._compiled[key]

  def progress_item(self, k: int, phase: str, calls: Calls) -> dict[str, Any]:
    return {"iteration": k, "phase": phase, "judge_calls": calls.as_dict(),
            "steps_per_iteration": self.steps}

  def train_iteration(self, k: int, state, position: Mapping[str, Any] | None, calls: Calls,
                      log: train.MetricsLog, preemption: train.Preemption):
    paths = self.pair_files(k)
    if not paths:
      raise ValueError(f"iteration {k}: no labelled pairs to train on (every pair was identical "
                       f"or a tie); raise config.online.prompts or config.online.samples, or "
                       f"the temperature")
    task = self.pairs_task(k, paths)
    data_config = copy.deepcopy(self.config)
    data_config.seed = _seed(self.config.seed, k, "data")
    batches = datasets.train_iterator(data_config, task, self.iteration_dir(k), position)
    first = datasets.numeric(next(batches))
    train_step, batch_layout = self.compiled(first)
    start_step = int(jax.device_get(state.step))
    if start_step != (k - 1) * self.steps and not position:
      raise ValueError(f"iteration {k} resumes at step {start_step} without the data position "
                       f"its checkpoint should hold")
    print(f"[online] iteration {k}: {self.steps} steps of {self.config.loss} on "
          f"{sum(len(read_jsonl(p)) for p in paths)} pairs"
          + (f", resumed at step {start_step}" if position else ""), flush=True)
    extra = lambda step, final: {"online": self.progress_item(
        k, "trained" if final else "training", calls)}
    try:
      return train.loop(self.config, state, batches, train_step=train_step,
                        batch_layout=batch_layout, checkpointer=self.checkpointer, log=log,
                        mesh=self.mesh, rules=self.rules, end_step=k * self.steps, first=first,
                        extra_items=extra, preemption=preemption)
    finally:
      batches.close()

  def start_of_iteration(self, k: int, state):
    """The reference for iteration k: iterate k−1 for "previous" (the others carry on)."""
    if self.settings.reference != "previous" or k == 1:
      return state
    dtype = reference_lib.dtype_from_config(self.config)
    with partitioning.activate(self.mesh, self.rules):
      reference = jax.device_put(reference_lib.init(state.policy, dtype),
                                 self.shardings.reference)
    return state.replace(reference=reference)

  # ----------------------------------------------------------------------------- evaluation

  def sft_policy(self) -> evaluation.Policy:
    if self._sft_policy is None:
      self._sft_policy = policies.load_policy(self.sft_dir).policy
    return self._sft_policy

  def iterate_policy(self, k: int) -> evaluation.Policy:
    """Iterate k's parameters (its last step is kept by the checkpoint manager); 0: SFT."""
    if k == 0:
      return self.sft_policy()
    params = self.checkpointer.restore_item(k * self.steps, "policy")
    return evaluation.Policy(jax.tree.map(jnp.asarray, params), self.model_config)

  def evaluated(self, k: int, policy_params: PyTree) -> dict[str, Any]:
    path = self.path(k, "evaluation.json")
    record = files.read_json(path)
    if record is not None:
      return record
    self.restore_queries(k, "evaluated")
    settings = self.config.evaluation
    sampling = decoding.SamplingParams(
        max_decode_length=settings.max_decode_length or self.config.max_target_length,
        temperature=float(settings.temperature), num_samples=int(settings.samples))
    prompts = self.eval_prompts()
    seeds = {"policy_seed": 1000 * self.config.seed + 1,
             "baseline_seed": 1000 * self.config.seed + 2}
    common = dict(sampling=sampling, max_input_length=self.config.max_input_length,
                  debias=bool(settings.debias), mesh=self.mesh, **seeds)
    if self._sft_samples is None:
      self._sft_samples = evaluation.sample_baseline(
          self.sft_policy(), self.vocabulary, prompts, sampling=sampling,
          baseline_seed=seeds["baseline_seed"], max_input_length=self.config.max_input_length,
          mesh=self.mesh)
    policy = evaluation.Policy(policy_params, self.model_config)
    start = time.perf_counter()
    vs_sft = evaluation.evaluate_policies(policy, self.sft_policy(), self.vocabulary, prompts,
                                          self.eval_judge, baseline_samples=self._sft_samples,
                                          **common)
    vs_previous = None
    if k > 1:
      vs_previous = evaluation.evaluate_policies(policy, self.iterate_policy(k - 1),
                                                 self.vocabulary, prompts, self.eval_judge,
                                                 **common)
    calls = vs_sft["judge_calls"] + (vs_previous["judge_calls"] if vs_previous else 0)
    record = {"iteration": k, "judge": self.eval_spec, "vs_sft": vs_sft,
              "vs_previous": vs_previous, "judge_calls": calls,
              "settings": evaluation_settings(self.config, self.eval_spec, len(prompts)),
              "seconds": time.perf_counter() - start}
    write_text(path, json.dumps(record, indent=1))
    guard = kl_guard(record, self.max_kl)
    print(f"[online] iteration {k}: against SFT {evaluation.win_rate_line(vs_sft)}; "
          f"KL(π‖SFT) {guard['kl']:.3f} nats per answer, length {guard['length']:.2f} tokens "
          f"(SFT {guard['sft_length']:.2f}, {guard['length_change']:+.2f})", flush=True)
    return record

  def eval_prompts(self) -> list[str]:
    """The held-out prompts: `online.eval_prompts_file`'s first `evaluation.prompts`, else the
    task's (the demo's evaluation prompts, or the eval split of the run's data)."""
    count = int(self.config.evaluation.prompts)
    path = self.settings.get("eval_prompts_file")
    if path:
      return datasets.read_prompts(path)[:count]
    return datasets.held_out_prompts(self.config, count, seed=self.config.seed)

  # ------------------------------------------------------------------------------------ run

  def run(self) -> dict[str, Any]:
    config = self.config
    self.mesh = partitioning.mesh_from_config(config)
    self.rules = partitioning.rules_from_config(config)
    partitioning.validate(self.mesh, batch_size=config.batch_size,
                          num_microbatches=config.num_microbatches,
                          num_heads=self.model_config.num_heads,
                          process_count=jax.process_count())
    abstract, self.shardings = initialization.state_layout(config, self.model_config, self.mesh,
                                                           self.rules, with_reference=True)
    self.checkpointer = checkpoint_manager.Checkpointer(
        self.workdir, keep_last=config.keep_last, keep_best=0, keep_every=self.steps)
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, self.shardings)
    restored = self.checkpointer.restore_latest_valid(like)
    position, progress = None, {"iteration": 0, "phase": "trained"}
    if restored is not None:
      state, position, latest = restored
      progress = self.checkpointer.restore_json(latest, "online") or progress
      print(f"[online] resumed at step {latest} (iteration {progress['iteration']}, "
            f"{progress['phase']})", flush=True)
    else:
      latest = None
      state = initialization.build_state(config, self.model_config, self.mesh, self.rules,
                                         abstract, self.shardings)
      self.checkpointer.save(state, None, extra={"online": self.progress_item(
          0, "trained", Calls())})
    log = train.MetricsLog(self.workdir, latest)
    preemption = train.Preemption()
    results = []
    try:
      for k in range(1, self.iterations + 1):
        results.append(self.iteration(k, state, progress, position, log, preemption))
        state = results[-1].pop("state")
        if k >= progress["iteration"]:  # the restored data position was this iteration's
          position = None
        self.report(results)
    finally:
      preemption.close()
      self.checkpointer.close()
      log.close()
    return {"iterations": results, "final_policy_digest": params_digest(state.policy),
            "judge_calls": self.calls_on_disk(self.iterations).as_dict()}

  def _stop_if_asked(self, preemption: train.Preemption, state, k: int, phase: str) -> None:
    after_phase(k, phase)
    if preemption.reached():  # agreed by every process
      step = int(jax.device_get(state.step))
      raise train.Preempted(step, preemption.signal_name)

  def iteration(self, k: int, state, progress: Mapping[str, Any], position, log,
                preemption: train.Preemption) -> dict[str, Any]:
    if progress["iteration"] > k:  # finished before the restart: all of it is on disk
      return self.finished_iteration(k, state)
    trained = progress["iteration"] == k and progress["phase"] == "trained"
    in_training = progress["iteration"] == k and progress["phase"] == "training"
    start_digest = None
    if not trained:
      if not in_training:  # the state is iterate k−1's
        start_digest = params_digest(state.policy)
      samples = self.sampled(k, state.policy)
      self._stop_if_asked(preemption, state, k, "sampled")
      judged = self.judged(k, samples)
      self._stop_if_asked(preemption, state, k, "judged")
      if not in_training:
        state = self.start_of_iteration(k, state)
        write_text(self.path(k, "start.json"), json.dumps({
            "step": int(jax.device_get(state.step)), "policy_digest": start_digest,
            "reference_digest": (params_digest(state.reference)
                                 if state.reference is not None else None)}, indent=1))
      calls = self.calls_on_disk(k - 1)
      calls.add(**judged["judge_calls"])
      state = self.train_iteration(k, state, position if in_training else None, calls, log,
                                   preemption)
      self._stop_if_asked(preemption, state, k, "trained")
    else:
      judged = files.read_json(self.path(k, "judged.json"))
    end_digest = params_digest(state.policy)
    evaluated = self.evaluated(k, state.policy)
    warning = kl_guard(evaluated, self.max_kl)["warning"]
    if warning and jax.process_index() == 0:
      print(f"[online] WARNING: {warning}", flush=True)
    calls = self.calls_on_disk(k)
    row = self.metrics_row(k, judged, evaluated, calls)
    log.write(k * self.steps, row)
    self._stop_if_asked(preemption, state, k, "evaluated")
    write_text(self.path(k, "end.json"), json.dumps(
        {"step": k * self.steps, "policy_digest": end_digest}, indent=1))
    return _summary(state, k, judged, evaluated, calls, end_digest, self.max_kl)

  def finished_iteration(self, k: int, state) -> dict[str, Any]:
    judged = files.read_json(self.path(k, "judged.json"))
    evaluated = files.read_json(self.path(k, "evaluation.json"))
    end = files.read_json(self.path(k, "end.json"))
    if judged is None or evaluated is None or end is None:
      raise ValueError(f"{self.iteration_dir(k)}: iteration {k} is finished in the checkpoint "
                       f"but its judged.json, evaluation.json or end.json is missing")
    return _summary(state, k, judged, evaluated, self.calls_on_disk(k), end["policy_digest"],
                    self.max_kl)

  def metrics_row(self, k: int, judged, evaluated, calls: Calls) -> dict[str, float]:
    vs_sft, vs_previous = evaluated["vs_sft"], evaluated["vs_previous"]
    row = {"online/iteration": k, "online/pairs": judged["pairs"],
           "online/dropped_identical": judged["dropped_identical"],
           "online/dropped_tie": judged["dropped_tie"],
           "online/judged_pairs_per_second": judged["judged_pairs_per_second"],
           "online/win_rate_vs_sft": vs_sft["win_rate"],
           "online/win_rate_vs_sft_low": vs_sft["win_rate_low"],
           "online/win_rate_vs_sft_high": vs_sft["win_rate_high"],
           "online/kl": vs_sft["kl"], "online/length": vs_sft["policy_length"]}
    guard = kl_guard(evaluated, self.max_kl)
    row.update({"online/sft_length": guard["sft_length"],
                "online/length_change": guard["length_change"],
                "online/kl_above_max": float(guard["above"])})
    if "policy_reward" in vs_sft:
      row["online/reward"] = vs_sft["policy_reward"]
    if vs_previous:
      row.update({"online/win_rate_vs_previous": vs_previous["win_rate"],
                  "online/win_rate_vs_previous_low": vs_previous["win_rate_low"],
                  "online/win_rate_vs_previous_high": vs_previous["win_rate_high"]})
    row.update({f"judge_calls/{kind}": value for kind, value in calls.as_dict().items()})
    row.update(judges.call_counts(self.oracle, self.eval_judge))  # paid and cached (api judges)
    return row

  def report(self, results: list[dict[str, Any]]) -> None:
    if jax.process_index() != 0:
      return
    write_report(self.workdir, self.user_config, results, self.eval_spec)


def _summary(state, k: int, judged: Mapping[str, Any], evaluated: Mapping[str, Any],
             calls: Calls, digest: str, max_kl: float | None = DEFAULT_MAX_KL) -> dict[str, Any]:
  """An iteration's result: its state, pair counts, evaluation, KL guard, judge calls and end
  digest."""
  keys = ("pairs", "prompts", "dropped_identical", "dropped_tie", "judged_pairs_per_second",
          "ranker")
  return {"state": state, "iteration": k, "judged": {key: judged[key] for key in keys},
          "evaluation": evaluated, "kl_guard": kl_guard(evaluated, max_kl),
          "judge_calls": calls.as_dict(), "policy_digest": digest}


def kl_guard(evaluated: Mapping[str, Any], max_kl: float | None) -> dict[str, Any]:
  """An iteration's distance from SFT, from its evaluation against SFT: KL(π‖SFT) in nats per
  answer (the policy's own samples scored by both), the mean answer length and its change from
  SFT's (tokens), and a warning when the KL is above `max_kl` (None: never)."""
  vs_sft = evaluated["vs_sft"]
  kl, length, sft_length = (float(vs_sft["kl"]), float(vs_sft["policy_length"]),
                            float(vs_sft["baseline_length"]))
  above = max_kl is not None and not kl <= float(max_kl)  # a NaN KL is above too
  warning = None
  if above:
    warning = (f"iteration {evaluated['iteration']}: KL(π‖SFT) = {kl:.2f} nats per answer is "
               f"above online.max_kl = {float(max_kl):g} (answer length {sft_length:.1f} -> "
               f"{length:.1f} tokens): the policy is moving far from SFT; lower "
               f"optimizer.learning_rate or online.steps, or raise ipo.tau / dpo.beta")
  return {"kl": kl, "length": length, "sft_length": sft_length,
          "length_change": length - sft_length, "max_kl": max_kl, "above": above,
          "warning": warning}


def evaluation_settings(config, judge_spec: str, prompts: int) -> dict[str, Any]:
  """What an iteration's evaluation was run with (free to change on resume; online.md says
  where it did)."""
  settings = config.evaluation
  return {"judge": judge_spec, "debias": bool(settings.debias), "prompts": int(prompts),
          "samples": int(settings.samples), "temperature": float(settings.temperature),
          "max_decode_length": settings.get("max_decode_length") or config.max_target_length}


def evaluation_changes(results: Sequence[Mapping[str, Any]]) -> list[str]:
  """One line per iteration whose evaluation settings differ from the iteration before's."""
  lines, before = [], None
  for result in results:
    now = result["evaluation"].get("settings")
    if now is not None and before is not None and now != before:
      changed = ", ".join(f"`{key}` {json.dumps(before.get(key))} -> {json.dumps(now.get(key))}"
                          for key in sorted(set(now) | set(before))
                          if now.get(key) != before.get(key))
      lines.append(f"- From iteration {result['iteration']}, the evaluation changed (a resumed "
                   f"run's evaluation settings): {changed}. Its win rates are not comparable "
                   f"with the iterations before.")
    before = now if now is not None else before
  return lines


def after_phase(iteration: int, phase: str) -> None:
  """Called after each phase of each iteration (a hook for fault-injection tests)."""
  del iteration, phase


# ------------------------------------------------------------------------------------ report


def report_table(results: Sequence[Mapping[str, Any]]) -> str:
  lines = ["| iteration | pairs | win rate vs SFT [95% CI] | vs previous [95% CI] | KL(π‖SFT) | "
           "length (vs SFT) | judge calls (total) |", "|---|---|---|---|---|---|---|"]
  for result in results:
    vs_sft = result["evaluation"]["vs_sft"]
    vs_previous = result["evaluation"]["vs_previous"]
    guard = result.get("kl_guard") or kl_guard(result["evaluation"], None)
    previous = ("(SFT)" if vs_previous is None else
                f"{vs_previous['win_rate']:.1%} [{vs_previous['win_rate_low']:.1%}, "
                f"{vs_previous['win_rate_high']:.1%}]")
    lines.append(
        f"| {result['iteration']} | {result['judged']['pairs']} | {vs_sft['win_rate']:.1%} "
        f"[{vs_sft['win_rate_low']:.1%}, {vs_sft['win_rate_high']:.1%}] | {previous} | "
        f"{vs_sft['kl']:.3f}{' (above max_kl)' if guard['above'] else ''} | "
        f"{guard['length']:.2f} ({guard['length_change']:+.2f}) | "
        f"{result['judge_calls']['total']} |")
  return "\n".join(lines)


def plot(results: Sequence[Mapping[str, Any]], path: str, max_kl: float | None = None) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(10, 4))
  FigureCanvasAgg(figure)
  left, right = figure.subplots(1, 2)
  iterations = [0] + [r["iteration"] for r in results]
  rates = [0.5] + [r["evaluation"]["vs_sft"]["win_rate"] for r in results]
  low = [0.5] + [r["evaluation"]["vs_sft"]["win_rate_low"] for r in results]
  high = [0.5] + [r["evaluation"]["vs_sft"]["win_rate_high"] for r in results]
  left.plot(iterations, rates, marker="o", label="against SFT")
  left.fill_between(iterations, low, high, alpha=0.2)
  previous = [(r["iteration"], r["evaluation"]["vs_previous"]["win_rate"]) for r in results
              if r["evaluation"]["vs_previous"]]
  if previous:
    left.plot(*zip(*previous), marker="s", linestyle="--", label="against the previous iterate")
  left.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
  left.set(xlabel="iteration", ylabel="win rate (95% interval)", ylim=(0, 1),
           title="online iterative RLHF: win rate")
  left.legend(loc="lower right")
  kls = [r["evaluation"]["vs_sft"]["kl"] for r in results]
  right.plot(iterations, [0.0] + kls, marker="o")
  if max_kl is not None and any(not kl <= 0.5 * max_kl for kl in kls):  # the guard, when near
    right.axhline(max_kl, color="red", linewidth=0.8, linestyle="--", label="online.max_kl")
    right.legend(loc="upper left")
  right.set(xlabel="iteration", ylabel="KL(π‖SFT) (nats per answer)", title="distance from SFT")
  for axis in (left, right):
    axis.set_xticks(iterations)
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def guard_text(results: Sequence[Mapping[str, Any]], settings) -> str:
  """online.md's KL guard paragraph: the threshold, then each iteration above it."""
  max_kl = settings.get("max_kl", DEFAULT_MAX_KL)
  if max_kl is None:
    return "KL guard: off (`online.max_kl` is None)."
  warnings = [r["kl_guard"]["warning"] for r in results
              if r.get("kl_guard") and r["kl_guard"]["warning"]]
  head = (f"KL guard: `online.max_kl` = {float(max_kl):g} nats per answer (KL(π‖SFT) from the "
          f"policy's own samples; length in tokens, its change from SFT's in brackets).")
  if not warnings:
    return head + " No iteration is above it."
  return head + "\n\n" + "\n".join(f"- **Warning**: {warning}" for warning in warnings)


def write_report(workdir: str, config: ml_collections.ConfigDict,
                 results: Sequence[Mapping[str, Any]], judge_spec: str) -> str:
  settings = config.online
  table = report_table(results)
  prompts = (results[-1]["evaluation"]["vs_sft"].get("prompts", config.evaluation.prompts)
             if results else config.evaluation.prompts)
  changes = "".join(line + "\n" for line in evaluation_changes(results))
  pairing = settings.pairing
  if pairing == "enhancer":
    pairing += f" ({settings.get('enhancer', ENHANCERS[0])})"
  text = (f"# dro_jax online iterative RLHF (seed {config.seed})\n\n"
          f"{config.loss.upper()} with pairing `{pairing}`, oracle `{settings.oracle}` "
          f"({settings.get('labels', LABELS[0])} labels), ranking by "
          f"`{settings.preference_model}`, reference `{settings.reference}`; "
          f"{settings.prompts} prompts x {settings.samples} samples and {settings.steps} steps per "
          f"iteration; evaluated by `{judge_spec}` on {prompts} held-out "
          f"prompts x {config.evaluation.samples} samples per side (ties half; 95% intervals "
          f"clustered by prompt).\n\n{table}\n\n{guard_text(results, settings)}\n\n"
          f"{changes + chr(10) if changes else ''}"
          f"![win rate and KL per iteration](online.png)\n")
  files.write_text(os.path.join(workdir, "online.md"), text)
  plot(results, os.path.join(workdir, "online.png"), settings.get("max_kl", DEFAULT_MAX_KL))
  return table


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the online loop in `workdir`; returns its per-iteration results."""
  validate(config)
  resolve_vocabulary(config)
  check_fit_labels(config)
  train.claim_workdir(config, workdir)
  try:
    online_run = OnlineRun(config, workdir)
  except ValueError as error:  # a refusal of what it was given: main removes the new workdir
    raise errors.UserError(errors.one_line(error)) from error
  result = online_run.run()
  print(report_table(result["iterations"]), flush=True)
  print(f"[online] results in {os.path.join(workdir, 'online.md')}", flush=True)
  return result



"""The embedded demo task: digit-list puzzles with a programmatic judge.

Prompts are "sort: 7 2 9 4", "reverse: 7 2 9 4" or "increment: 7 2 9 4" (3 to 6 digits; increment
adds one to each digit, modulo 10). The judge gives partial credit per token:

    reward(prompt, response) = (answer positions the response gets right) / max(len(answer),
                                                                               len(response))

so it moves smoothly from 0 to 1 as a response improves, and thumbs(prompt, response) is True for
an exactly right response. Demonstrations (for SFT) come from a careless demonstrator that is right
40% of the time and otherwise copies the input (20%), changes a digit, swaps two neighbours, drops
the last digit or repeats one (`DEMONSTRATOR_MIX`): an SFT model imitates those mistakes, and an
aligned one can measurably beat it. Everything is generated deterministically from a seed in well
under a second; sequences are at most 8 prompt and 7 response tokens (plus EOS) under the demo
vocabulary, a BPE sentencepiece model trained on the demo text (pad 0, eos 1, unk 2, no bos; "A"
and "B" as user-defined symbols 3 and 4 for the preference-model judge), cached as
`<cache_dir>/demo_v1/spiece.model`.

Evaluation prompts come from a fixed tenth of all prompts (by hash) that training data never uses.

Intransitive preferences (`intransitive_pairs`, `register_intransitive_tasks`): each prompt gets
three responses of three types, each named by its first word and made from the prompt's digits:
A = "sort" and the digits sorted, B = "reverse" and the digits reversed, C = "increment" and the
digits incremented (`typed_response`). Every prompt contributes all three type pairs (A-B, B-C,
A-C, in a random order), so the three are equally frequent. In the cyclic task A ≻ B ≻ C ≻ A: no
scalar reward orders more than 2 of a prompt's 3 pairs right, so a Bradley-Terry reward model's
accuracy is at most 2/3, while a pairwise preference model can learn the cycle. The transitive
control has the same prompts and pairs with A ≻ B ≻ C and A ≻ C, which a scalar reward fits
exactly. Both are pairwise Tasks (`INTRANSITIVE_TASK_NAMES`) with train and validation splits
(held-out prompts) under the demo vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import uuid
from typing import Any, Callable, Sequence

OPERATIONS = ("sort", "reverse", "increment")
MIN_ITEMS, MAX_ITEMS = 3, 6
MAX_PROMPT_LENGTH, MAX_RESPONSE_LENGTH = 16, 12  # Tokens with EOS; the longest need 9 and 8.
DEMONSTRATOR_MIX = {"correct": 0.4, "copy": 0.2, "substitute": 0.15, "swap": 0.1, "drop": 0.1,
                    "repeat": 0.05}
DATA_VERSION = "demo_v1"  # Bump when generation changes, so cached files are not reused.
INTRANSITIVE_VERSION = "intransitive_v1"  # The same, for the intransitive tasks' files.
DEFAULT_CACHE_DIR = os.environ.get("DRO_JAX_CACHE",
                                   os.path.join(os.path.expanduser("~"), ".cache", "dro_jax"))
TASK_NAMES = {"sft": "dro_jax_demo_sft", "feedback": "dro_jax_demo_feedback",
              "thumbs": "dro_jax_demo_thumbs", "pairs": "dro_jax_demo_pairs"}
INTRANSITIVE_TASK_NAMES = {"cyclic": "dro_jax_cyclic_pairs",
                           "transitive": "dro_jax_transitive_pairs"}
RESPONSE_TYPES = ("sorted", "reversed", "incremented")  # A, B, C of the intransitive tasks
VOCABULARY_SIZE = 96
PREFERENCE_SYMBOLS = ("A", "B")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One puzzle: an operation and its digits."""
  operation: str
  items: tuple[int, ...]

  @property
  def prompt(self) -> str:
    return f"{self.operation}: {' '.join(map(str, self.items))}"

  @property
  def answer(self) -> tuple[int, ...]:
    if self.operation == "sort":
      return tuple(sorted(self.items))
    if self.operation == "reverse":
      return self.items[::-1]
    return tuple((item + 1) % 10 for item in self.items)


def parse_prompt(prompt: str) -> Problem:
  """The Problem of a demo prompt; ValueError for anything else."""
  operation, _, rest = prompt.strip().partition(":")
  items = rest.split()
  if operation not in OPERATIONS or not items or not all(item in "0123456789" for item in items):
    raise ValueError(f"not a demo prompt: {prompt!r}")
  return Problem(operation, tuple(int(item) for item in items))


def format_items(items: Sequence[int]) -> str:
  return " ".join(map(str, items))


def reward(prompt: str, response: str) -> float:
  """Partial credit in [0, 1]: right answer positions over the longer of answer and response."""
  expected = [str(item) for item in parse_prompt(prompt).answer]
  given = response.split()
  right = sum(1 for want, got in zip(expected, given) if want == got)
  return right / max(len(expected), len(given))


def thumbs(prompt: str, response: str) -> bool:
  """Thumbs up iff the response is exactly right."""
  return reward(prompt, response) == 1.0


def is_eval_prompt(prompt: str) -> bool:
  """A fixed tenth of the prompt space, held out from all training data."""
  return hashlib.sha256(prompt.encode()).digest()[0] % 10 == 0


def sample_problems(count: int, seed: int, *, evaluation: bool = False) -> list[Problem]:
  """`count` distinct problems, from the training or the held-out evaluation prompts."""
  rng = random.Random(f"problems:{seed}:{evaluation}")
  problems, seen = [], set()
  while len(problems) < count:
    size = rng.randint(MIN_ITEMS, MAX_ITEMS)
    problem = Problem(rng.choice(OPERATIONS), tuple(rng.randrange(10) for _ in range(size)))
    if problem.prompt not in seen and is_eval_prompt(problem.prompt) == evaluation:
      seen.add(problem.prompt)
      problems.append(problem)
  return problems


def _substitute(answer: list[int], rng: random.Random) -> list[int]:
  position = rng.randrange(len(answer))
  answer[position] = (answer[position] + rng.randint(1, 9)) % 10
  return answer


def _swap(answer: list[int], rng: random.Random) -> list[int]:
  position = rng.randrange(len(answer) - 1)
  answer[position], answer[position + 1] = answer[position + 1], answer[position]
  return answer


def _repeat(answer: list[int], rng: random.Random) -> list[int]:
  position = rng.randrange(len(answer))
  return answer[:position + 1] + answer[position:]


_BEHAVIOURS: dict[str, Callable[[Problem, random.Random], list[int]]] = {
    "correct": lambda problem, rng: list(problem.answer),
    "copy": lambda problem, rng: list(problem.items),  # The lazy, systematic mistake.
    "substitute": lambda problem, rng: _substitute(list(problem.answer), rng),
    "swap": lambda problem, rng: _swap(list(problem.answer), rng),
    "drop": lambda problem, rng: list(problem.answer)[:-1],
    "repeat": lambda problem, rng: _repeat(list(problem.answer), rng),
}


def demonstrate(problem: Problem, rng: random.Random, behaviour: str | None = None) -> str:
  """A response of the careless demonstrator (behaviour drawn from DEMONSTRATOR_MIX by default)."""
  if behaviour is None:
    behaviour = rng.choices(list(DEMONSTRATOR_MIX), weights=list(DEMONSTRATOR_MIX.values()))[0]
  return format_items(_BEHAVIOURS[behaviour](problem, rng))


def _triple(problem: Problem, response: str) -> dict[str, Any]:
  return {"prompt": problem.prompt, "response": response,
          "reward": reward(problem.prompt, response),
          "label": thumbs(problem.prompt, response)}


def demonstrations(count: int, seed: int = 0, *, evaluation: bool = False) -> list[dict[str, Any]]:
  """SFT data: one mixed-quality demonstration per prompt, with its reward and thumbs label."""
  rng = random.Random(f"demonstrations:{seed}")
  return [_triple(problem, demonstrate(problem, rng))
          for problem in sample_problems(count, seed, evaluation=evaluation)]


def feedback(prompt_count: int, responses_per_prompt: int = 4, seed: int = 0, *,
             evaluation: bool = False) -> list[dict[str, Any]]:
  """Single-trajectory feedback: several demonstrator responses per prompt, judged."""
  rng = random.Random(f"feedback:{seed}")
  return [_triple(problem, demonstrate(problem, rng))
          for problem in sample_problems(prompt_count, seed + 1, evaluation=evaluation)
          for _ in range(responses_per_prompt)]


def preference_pairs(count: int, seed: int = 0, *,
                     evaluation: bool = False) -> list[dict[str, str]]:
  """Pairwise feedback: two demonstrator responses per prompt, the better chosen; ties redrawn."""
  rng = random.Random(f"pairs:{seed}")
  pairs = []
  for problem in sample_problems(count, seed + 2, evaluation=evaluation):
    while True:
      first, second = demonstrate(problem, rng), demonstrate(problem, rng)
      first_reward, second_reward = reward(problem.prompt, first), reward(problem.prompt, second)
      if first_reward != second_reward:
        break
    chosen, rejected = (first, second) if first_reward > second_reward else (second, first)
    pairs.append({"prompt": problem.prompt, "chosen": chosen, "rejected": rejected})
  return pairs


def typed_response(problem: Problem, kind: str) -> str:
  """A response of one of RESPONSE_TYPES made from the problem's digits."""
  if kind == "sorted":
    return "sort " + format_items(sorted(problem.items))
  if kind == "reversed":
    return "reverse " + format_items(problem.items[::-1])
  if kind == "incremented":
    return "increment " + format_items([(item + 1) % 10 for item in problem.items])
  raise ValueError(f"unknown response type {kind!r}; choose from {RESPONSE_TYPES}")


def type_preferred(first: int, second: int, *, cyclic: bool = True) -> bool:
  """Whether RESPONSE_TYPES[first] ≻ RESPONSE_TYPES[second]: A ≻ B ≻ C, then C ≻ A or A ≻ C."""
  if first == second:
    raise ValueError("a pair needs two different response types")
  if cyclic:
    return (second - first) % 3 == 1
  return first < second


def intransitive_pairs(count: int, seed: int = 0, *, cyclic: bool = True,
                       evaluation: bool = False) -> list[dict[str, str]]:
  """`count` pairs, three per prompt (one of each type pair, in a random order within it).

  cyclic: A ≻ B ≻ C ≻ A (RESPONSE_TYPES = A, B, C); otherwise the transitive control A ≻ B ≻ C,
  A ≻ C, with the same prompts and rows. When `count` is not a multiple of 3 the last prompt has
  fewer pairs. Held-out pairs (`evaluation`) use the demo's held-out prompts.
  """
  rng = random.Random(f"intransitive:{seed}:{evaluation}")
  pairs: list[dict[str, str]] = []
  for problem in sample_problems(-(-count // 3), seed + 3, evaluation=evaluation):
    type_pairs = [(0, 1), (1, 2), (0, 2)]
    rng.shuffle(type_pairs)
    for first, second in type_pairs:
      if not type_preferred(first, second, cyclic=cyclic):
        first, second = second, first
      pairs.append({"prompt": problem.prompt,
                    "chosen": typed_response(problem, RESPONSE_TYPES[first]),
                    "rejected": typed_response(problem, RESPONSE_TYPES[second])})
  return pairs[:count]


def eval_prompts(count: int = 200, seed: int = 0) -> list[str]:
  """Held-out prompts for win rates and rewards of sampled responses."""
  return [problem.prompt for problem in sample_problems(count, seed, evaluation=True)]


# ---------------------------------------------------------------------------- files and vocabulary


def _write_atomically(path: str, data: bytes) -> None:
  """Temporary file + rename: concurrent writers of the same deterministic content are safe."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(temporary, "wb") as stream:
    stream.write(data)
  os.replace(temporary, path)


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
  return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _vocabulary_corpus() -> list[str]:
  """Demo text plus the preference-model template, so the judge's inputs tokenise without unk."""
  lines = []
  for row in demonstrations(4000, seed=12345):
    lines += [row["prompt"], row["response"]]
  problem = Problem("sort", (3, 1, 2))
  lines += [f"[CONTEXT] {problem.prompt} [RESPONSE A] 1 2 3 [RESPONSE B] 3 1 2"] * 100
  return lines


def train_sentencepiece(lines: Sequence[str], path: str, *, vocab_size: int,
                        model_type: str = "bpe",
                        user_defined_symbols: Sequence[str] = PREFERENCE_SYMBOLS) -> None:
  """Trains a T5-style sentencepiece model on `lines` (pad 0, eos 1, unk 2, no bos) to `path`:
  `dro_jax.vocabulary.train_sentencepiece`, with the demo's "A" / "B" symbols by default.

  Deterministic (one thread); `vocab_size` is a ceiling for small corpora (hard_vocab_limit off).
  """
  from dro_jax import vocabulary
  vocabulary.train_sentencepiece(lines, path, vocab_size=vocab_size, model_type=model_type,
                                 user_defined_symbols=user_defined_symbols)


def demo_dir(cache_dir: str | None = None) -> str:
  return os.path.join(cache_dir or DEFAULT_CACHE_DIR, DATA_VERSION)


def demo_vocabulary(cache_dir: str | None = None) -> str:
  """Path of the demo vocabulary, trained on first use and cached under `cache_dir`."""
  path = os.path.join(demo_dir(cache_dir), "spiece.model")
  if not os.path.exists(path):
    train_sentencepiece(_vocabulary_corpus(), path, vocab_size=VOCABULARY_SIZE)
  return path


def write_demo_data(cache_dir: str | None = None, *, sft_examples: int = 40_000,
                    feedback_prompts: int = 1000, responses_per_prompt: int = 4,
                    pairs: int = 2000, eval_examples: int = 200,
                    seed: int = 0) -> dict[str, dict[str, str]]:
  """Writes the demo's JSONL files (once per size and seed); returns {kind: {split: path}}.

  40,000 demonstrations: with 4,000 a 1M-parameter T5 memorises them and generalises worse than
  the demonstrator it imitates; with 40,000 its held-out greedy reward is about 0.99.
  """
  folder = os.path.join(demo_dir(cache_dir), f"data_{sft_examples}_{feedback_prompts}x"
                        f"{responses_per_prompt}_{pairs}_{eval_examples}_seed{seed}")
  contents = {
      "sft": {"train": lambda: demonstrations(sft_examples, seed),
              "validation": lambda: demonstrations(eval_examples, seed, evaluation=True)},
      "feedback": {"train": lambda: feedback(feedback_prompts, responses_per_prompt, seed),
                   "validation": lambda: feedback(eval_examples, responses_per_prompt, seed,
                                                  evaluation=True)},
      "thumbs": {"train": lambda: _unpaired(feedback(feedback_prompts, responses_per_prompt, seed)),
                 "validation": lambda: _unpaired(feedback(eval_examples, responses_per_prompt,
                                                          seed, evaluation=True))},
      "pairs": {"train": lambda: preference_pairs(pairs, seed),
                "validation": lambda: preference_pairs(eval_examples, seed, evaluation=True)},
  }
  paths: dict[str, dict[str, str]] = {}
  for kind, splits in contents.items():
    for split, rows in splits.items():
      path = os.path.join(folder, f"{kind}_{split}.jsonl")
      if not os.path.exists(path):
        _write_atomically(path, _jsonl(rows()))
      paths.setdefault(kind, {})[split] = path
  return paths


def _unpaired(triples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The published unpaired format (prompt, completion, label), as in trl-lib/kto-mix-14k."""
  return [{"prompt": row["prompt"], "completion": row["response"], "label": row["label"]}
          for row in triples]


def register_demo_tasks(cache_dir: str | None = None, **sizes: int) -> dict[str, str]:
  """Registers the demo's seqio Tasks (again, if already registered); {role: task name}.

  sft and feedback: single-trajectory with rewards; thumbs: the same feedback as thumbs labels
  only (reward 1.0 / 0.0, the unpaired prompt/completion/label format); pairs: pairwise.
  Each has "train" and "validation" (held-out prompts) splits.
  """
  from dro_jax.data import tasks

  paths = write_demo_data(cache_dir, **sizes)
  vocabulary = demo_vocabulary(cache_dir)
  lengths = {"max_prompt_length": MAX_PROMPT_LENGTH, "max_response_length": MAX_RESPONSE_LENGTH,
             "overwrite": True}
  tasks.register_single_trajectory_task(TASK_NAMES["sft"], paths["sft"], vocabulary, **lengths)
  tasks.register_single_trajectory_task(TASK_NAMES["feedback"], paths["feedback"], vocabulary,
                                        **lengths)
  tasks.register_single_trajectory_task(TASK_NAMES["thumbs"], paths["thumbs"], vocabulary,
                                        thumbs=True, **lengths)
  tasks.register_pairwise_task(TASK_NAMES["pairs"], paths["pairs"], vocabulary, **lengths)
  return dict(TASK_NAMES)


def write_intransitive_data(cache_dir: str | None = None, *, pairs: int = 2000,
                            eval_examples: int = 200, seed: int = 0) -> dict[str, dict[str, str]]:
  """Writes the intransitive tasks' JSONL files (once per size and seed); {kind: {split: path}}."""
  folder = os.path.join(demo_dir(cache_dir),
                        f"{INTRANSITIVE_VERSION}_{pairs}_{eval_examples}_seed{seed}")
  paths: dict[str, dict[str, str]] = {}
  for kind in INTRANSITIVE_TASK_NAMES:
    for split, count, evaluation in (("train", pairs, False),
                                     ("validation", eval_examples, True)):
      path = os.path.join(folder, f"{kind}_{split}.jsonl")
      if not os.path.exists(path):
        rows = intransitive_pairs(count, seed, cyclic=kind == "cyclic", evaluation=evaluation)
        _write_atomically(path, _jsonl(rows))
      paths.setdefault(kind, {})[split] = path
  return paths


def register_intransitive_tasks(cache_dir: str | None = None, *, pairs: int = 2000,
                                eval_examples: int = 200, seed: int = 0) -> dict[str, str]:
  """Registers the cyclic and transitive pairwise Tasks (again, if registered); {kind: name}."""
  from dro_jax.data import tasks

  paths = write_intransitive_data(cache_dir, pairs=pairs, eval_examples=eval_examples, seed=seed)
  vocabulary = demo_vocabulary(cache_dir)
  for kind, name in INTRANSITIVE_TASK_NAMES.items():
    tasks.register_pairwise_task(name, paths[kind], vocabulary,
                                 max_prompt_length=MAX_PROMPT_LENGTH,
                                 max_response_length=MAX_RESPONSE_LENGTH, overwrite=True)
  return dict(INTRANSITIVE_TASK_NAMES)

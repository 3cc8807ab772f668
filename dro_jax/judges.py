"""Judges: who decides which of two responses to a prompt is better.

Every judge answers `prefer(prompts, responses_a, responses_b)` with P(a better than b) per row
(1 a wins, 0 b wins, 0.5 a tie; a learned judge answers anything in between). A judge with a
reward also answers `score(prompts, responses)`, so evaluation can report each side's mean reward.

A judge whose verdict cannot depend on which response is shown first declares `symmetric = True`
(the reward-based ones: the demo judge and `RewardModelJudge`). Any other judge is asked in both
orders and the verdicts are averaged (`compare`): p(a, b) = (q(a, b) + 1 − q(b, a)) / 2, which
removes a position bias. One *call* is one comparison of one pair in one order.

Judges are chosen everywhere by one spec string (`judge_from_spec`; the evaluate command's
`--judge`, `config.evaluation.judge`, the online loop's oracle). Reserved forms first:

    demo                      the demo task's programmatic judge (`DemoJudge`)
    reward_model:DIR          a `reward_model` workdir (or step folder): σ(r_a − r_b), and score
    preference_model:DIR      a `preference_model` workdir (or step folder): P(A ≻ B)
    noisy:P:SPEC              SPEC's verdict flipped with probability P, a fresh draw per query:
                              query i of the judge flipped iff a hash of (seed, i) < P
    noisy_persistent:P:SPEC   SPEC's verdict flipped with probability P, the same flip for the
                              same (prompt, unordered pair) every time it is asked
    api:MODEL@BASE_URL        a model behind an OpenAI-compatible chat endpoint, cached,
                              concurrent, retried and budgeted (`api_judge`, docs/llm_judges.md)
    NAME                      a judge added with `register_judge(NAME, factory)`
    module:factory            anything else: `module` imported from the Python path, `factory()`

A judge that declares `abstains = True` (the API judge) may answer NaN for a row it could not
judge (a reply unparseable twice): `compare` then keeps the other order's verdict, or NaN when
both orders have none; the callers drop such rows rather than take them as verdicts.

`tournament(prompts, candidates, judge)` runs a knock-out per prompt (the online enhancer's
best-of-n, and the worst-of-n), counting the calls it spends.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import importlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from dro_jax.data import synthetic


@runtime_checkable
class Judge(Protocol):
  """Compares two responses per prompt."""

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    """float64 [N] in [0, 1]: P(responses_a[i] is better than responses_b[i])."""
    ...


@runtime_checkable
class RewardJudge(Judge, Protocol):
  """A judge with a scalar reward per response."""

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """float64 [N]: the reward of responses[i] as an answer to prompts[i]."""
    ...


def has_reward(judge: Judge) -> bool:
  return callable(getattr(judge, "score", None))


def is_symmetric(judge: Judge) -> bool:
  """Whether the judge declares that swapping A and B swaps its verdict (asked once)."""
  return bool(getattr(judge, "symmetric", False))


def describe(judge: Judge) -> str:
  """The judge in words: its `description` (e.g. a preference model's label ids), else its spec
  or name."""
  return (getattr(judge, "description", None) or getattr(judge, "spec", None)
          or getattr(judge, "name", None) or type(judge).__name__)


def _check_lengths(prompts: Sequence[str], *columns: Sequence[str]) -> None:
  for column in columns:
    if len(column) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(column)} responses")


def preference_from_rewards(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
  """1 where a's reward is higher, 0 where lower, 0.5 on equal rewards (a tie counts half)."""
  return 0.5 + 0.5 * np.sign(np.asarray(rewards_a, np.float64) - np.asarray(rewards_b, np.float64))


def abstains(judge: Judge) -> bool:
  """Whether the judge may answer NaN (no verdict) for a row."""
  return bool(getattr(judge, "abstains", False))


def _verdicts(judge: Judge, prompts, responses_a, responses_b) -> np.ndarray:
  values = np.asarray(judge.prefer(list(prompts), list(responses_a), list(responses_b)),
                      np.float64).reshape(-1)
  if values.shape[0] != len(prompts):
    raise ValueError(f"judge {describe(judge)} answered {values.shape[0]} verdicts for "
                     f"{len(prompts)} comparisons")
  checked = values[~np.isnan(values)] if abstains(judge) else values
  if not np.all(np.isfinite(checked)) or np.any((checked < 0) | (checked > 1)):
    raise ValueError(f"judge {describe(judge)} answered values outside [0, 1]")
  return values


def compare(judge: Judge, prompts: Sequence[str], responses_a: Sequence[str],
            responses_b: Sequence[str], *, debias: bool = True) -> tuple[np.ndarray, int, bool]:
  """(P(a better than b) [N], judge calls spent, whether both orders were asked).

  With `debias` a judge that is not `symmetric` is asked in both orders, in one batched call,
  and the verdicts averaged: p = (q(a, b) + 1 − q(b, a)) / 2.
  """
  _check_lengths(prompts, responses_a, responses_b)
  count = len(prompts)
  if count == 0:
    return np.zeros((0,), np.float64), 0, False
  if not debias or is_symmetric(judge):
    return _verdicts(judge, prompts, responses_a, responses_b), count, False
  both = _verdicts(judge, list(prompts) * 2, list(responses_a) + list(responses_b),
                   list(responses_b) + list(responses_a))
  forward, backward = both[:count], 1.0 - both[count:]
  averaged = 0.5 * (forward + backward)
  # An order without a verdict (an abstaining judge's NaN): the other order's alone.
  averaged = np.where(np.isnan(forward), backward, np.where(np.isnan(backward), forward,
                                                            averaged))
  return averaged, 2 * count, True


class ScoringJudge(abc.ABC):
  """Base of the judges that have a reward: `prefer` compares the two rewards."""

  name = "scoring"
  symmetric = True

  @abc.abstractmethod
  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """One reward per (prompt, response)."""

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    _check_lengths(prompts, responses_a, responses_b)
    return preference_from_rewards(self.score(prompts, responses_a),
                                   self.score(prompts, responses_b))


class DemoJudge(ScoringJudge):
  """The demo task's programmatic judge: `synthetic.reward`, partial credit per digit."""

  name = "demo"

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    _check_lengths(prompts, responses)
    rewards = []
    for prompt, response in zip(prompts, responses):
      try:
        rewards.append(synthetic.reward(prompt, response))
      except ValueError as error:
        raise ValueError(f"the demo judge only judges the demo task's prompts: {error}") from error
    return np.asarray(rewards, np.float64)


# ------------------------------------------------------------------------------------- noise


def _unit_interval(seed: int, *parts: str) -> float:
  """A uniform number in [0, 1) from a hash of the seed and the texts (no state, no order)."""
  digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0 ** 64


_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser over uint64 values (wrapping arithmetic): a bijective hash whose
  outputs for consecutive inputs pass as independent uniform 64-bit words."""
  z = values + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def query_uniforms(key: int, start: int, count: int) -> np.ndarray:
  """float64 [count] in [0, 1): the uniforms of queries start .. start+count−1 under `key`, a
  hash of (key, query index) each: no state, so any query's draw can be recomputed alone."""
  indices = np.arange(start, start + count, dtype=np.uint64)
  words = _splitmix64(indices ^ np.uint64(int(key) & _MASK64))
  return (words >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


class NoisyJudge:
  """`judge`'s verdict flipped (p -> 1 − p) with probability `flip`, a fresh draw per query
  (`noisy:P:SPEC`).

  Comparison number i this judge is asked (`queries` counts them: one row of one `prefer` call
  is one query, in row order) is flipped iff u(seed, i) < P, u a hash of the seed and i
  (`query_uniforms`; the key also holds the wrapped judge's spec, so nested noisy judges draw
  apart). So the same pair asked twice is flipped independently, and a tournament and a labelling
  by one oracle get independent noise; a fresh judge built with the same seed draws the same
  flips for the same sequence of queries. (a, b) and (b, a) are two queries: a symmetric wrapped
  judge (the demo judge, a reward model) is asked once per comparison and keeps `symmetric`
  (swapping the sides changes no distribution); a judge that is not symmetric is asked both
  orders by `compare`, and the two orders are flipped independently (one flip of a 0/1 verdict
  averages to a tie, ½). Resuming a run that used the judge means restoring `queries` to the
  queries it had made (the online loop reads them from its phases on disk).
  """

  persistent = False
  head = "noisy"

  def __init__(self, judge: Judge, flip: float, seed: int = 0, spec: str | None = None):
    if not 0.0 <= flip <= 1.0:
      raise ValueError(f"{self.head} judge: the flip probability must be in [0, 1], got {flip}")
    self.judge, self.flip, self.seed = judge, float(flip), int(seed)
    self.symmetric = is_symmetric(judge)
    self.abstains = abstains(judge)
    inner = getattr(judge, "spec", None) or describe(judge)
    self.spec = spec or f"{self.head}:{flip}:{inner}"
    digest = hashlib.sha256(repr((self.seed, self.head, inner)).encode()).digest()
    self.key = int.from_bytes(digest[:8], "little")
    self._queries = 0
    if has_reward(judge):
      self.score = judge.score  # The clean reward: what the evaluation reports as reward.

  @property
  def queries(self) -> int:
    """Comparisons asked so far (the next one's index). Setting it sets the wrapped judge's
    counter too, when it has one (it is asked the same rows)."""
    return self._queries

  @queries.setter
  def queries(self, value: int) -> None:
    value = int(value)
    if value < 0:
      raise ValueError(f"{self.spec}: the query counter must be >= 0, got {value}")
    self._queries = value
    if hasattr(self.judge, "queries"):
      self.judge.queries = value

  def flipped(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], start: int = 0) -> np.ndarray:
    """Which rows are flipped, the first row being query number `start`."""
    return query_uniforms(self.key, start, len(prompts)) < self.flip

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    start = self._queries
    values = _verdicts(self.judge, prompts, responses_a, responses_b)
    flips = self.flipped(prompts, responses_a, responses_b, start)
    self._queries = start + len(prompts)
    return np.where(flips, 1.0 - values, values)


class PersistentNoisyJudge(NoisyJudge):
  """`judge`'s verdict flipped with probability `flip`, the same flip for the same comparison
  every time it is asked (`noisy_persistent:P:SPEC`): an annotator with fixed opinions.

  Whether a comparison is flipped is a pure function of (seed, prompt, the unordered pair of
  responses): a rerun, a resumed run or another batching flips the same rows, (b, a) is flipped
  exactly when (a, b) is (so the wrapped judge's symmetry is kept), and asking again draws
  nothing new. When one oracle both ranks candidates and labels the winners, the pairs that
  survive a ranking are those whose flips did not hide them, so this noise depends on the
  pairing; `noisy:P:SPEC` (`NoisyJudge`) does not. `queries` counts, as for `NoisyJudge`, but
  draws nothing.
  """

  persistent = True
  head = "noisy_persistent"

  def flipped(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], start: int = 0) -> np.ndarray:
    return np.asarray([_unit_interval(self.seed, p, *sorted((a, b))) < self.flip
                       for p, a, b in zip(prompts, responses_a, responses_b)], bool)


# --------------------------------------------------------------------------- learned judges


class _LearnedJudge(abc.ABC):
  """A network trained by this library's `reward_model` / `preference_model` recipe, read from
  its workdir (latest checkpoint) or one step folder of it, judging in jit-compiled batches."""

  loss = ""  # the recipe it must come from

  def __init__(self, path: str, *, batch_size: int = 64):
    from dro_jax import datasets, policies
    from dro_jax import step as step_lib
    found = policies.workdir_and_step(path)
    if found is None:
      raise ValueError(f"{path}: not a dro_jax {self.loss} workdir (no checkpoints/ beside "
                       f"config.json) or a step folder of one")
    self.workdir, step = found
    self.run_config = policies.read_run_config(self.workdir)
    if self.run_config.loss != self.loss:
      raise ValueError(f"{path}: a {self.run_config.loss} workdir, not a {self.loss} one "
                       f"(train it with configs/{self.loss}.py)")
    self.model_config = step_lib.t5_config(self.run_config)
    self.params, self.step = policies.restore_network(self.workdir, step, self._abstract())
    self.vocabulary = datasets.task_vocabulary(self.run_config)
    self.max_input_length = int(self.run_config.max_input_length)
    self.max_target_length = int(self.run_config.max_target_length)
    self.batch_size = int(batch_size)
    self.path = path

  @abc.abstractmethod
  def _abstract(self) -> Any:
    """The network's abstract parameters, the structure its checkpoint is restored into."""

  def _encode(self, prompts: Sequence[str], *responses: Sequence[str]) -> list[np.ndarray]:
    from dro_jax import judge_inputs
    arrays = [judge_inputs.encode_texts(self.vocabulary, prompts, "inputs",
                                        self.max_input_length)]
    arrays += [judge_inputs.encode_texts(self.vocabulary, column, "targets",
                                         self.max_target_length) for column in responses]
    return arrays

  def _batched(self, function: Callable[..., Any], arrays: list[np.ndarray]) -> np.ndarray:
    """`function(params, *arrays)` over rows in fixed-size batches (one compiled shape)."""
    rows = arrays[0].shape[0]
    if rows == 0:
      return np.zeros((0,), np.float64)
    size = min(self.batch_size, rows)
    outputs = []
    for start in range(0, rows, size):
      chunk = [array[start:start + size] for array in arrays]
      count = chunk[0].shape[0]
      if count < size:  # padded with copies of the first row, dropped below
        chunk = [np.concatenate([c, np.repeat(c[:1], size - count, axis=0)]) for c in chunk]
      outputs.append(np.asarray(function(self.params, *chunk), np.float64)[:count])
    return np.concatenate(outputs)


class RewardModelJudge(_LearnedJudge):
  """A Bradley-Terry reward model: `score` is r(x, y); `prefer` is σ(r_a − r_b). Symmetric."""

  loss = "reward_model"
  symmetric = True

  def __init__(self, path: str, *, batch_size: int = 64):
    super().__init__(path, batch_size=batch_size)
    self.spec = f"reward_model:{path}"
    self._rewards = _reward_function(self.model_config)

  def _abstract(self) -> Any:
    from dro_jax.models import value as value_lib
    return value_lib.DoubleNetMultipleValues(self.model_config).abstract_params()

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    _check_lengths(prompts, responses)
    return self._batched(self._rewards, self._encode(prompts, responses))

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    _check_lengths(prompts, responses_a, responses_b)
    count = len(prompts)
    rewards = self.score(list(prompts) * 2, list(responses_a) + list(responses_b))
    return 1.0 / (1.0 + np.exp(-(rewards[:count] - rewards[count:])))


class PreferenceModelJudge(_LearnedJudge):
  """A pairwise preference model: P(A better than B) from its two label logits (the ids its
  run recorded in config.json, `labels`), in the order asked (not symmetric: `compare` asks
  both orders and averages). `description` names the workdir, step and label ids and pieces."""

  loss = "preference_model"
  symmetric = False

  def __init__(self, path: str, *, batch_size: int = 64):
    super().__init__(path, batch_size=batch_size)
    self.spec = f"preference_model:{path}"
    tokens = self.run_config.preference
    if tokens.get("a_token") is None or tokens.get("b_token") is None:
      raise ValueError(f"{path}: config.json has no preference.a_token / b_token")
    a, b = int(tokens.a_token), int(tokens.b_token)
    if a == b:
      raise ValueError(f"{path}: config.json's preference.a_token and b_token are both {a}, so "
                       f"this model cannot tell A from B; retrain it with two distinct labels "
                       f"(configs/preference_model.py picks them from the vocabulary)")
    from dro_jax import vocabulary as vocabulary_lib
    pieces = [tokens.get(key) or vocabulary_lib.piece_of(self.vocabulary, token)
              for key, token in (("a_piece", a), ("b_piece", b))]
    self.labels = {"a_token": a, "b_token": b, "a_piece": pieces[0], "b_piece": pieces[1]}
    self.description = (f"{self.spec} (step {self.step}; labels A = id {a} {pieces[0]!r}, "
                        f"B = id {b} {pieces[1]!r})")
    self._probability = _preference_function(self.model_config, a, b)

  def _abstract(self) -> Any:
    from dro_jax.models import t5 as t5_lib
    return t5_lib.abstract_params(self.model_config)

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    _check_lengths(prompts, responses_a, responses_b)
    return self._batched(self._probability, self._encode(prompts, responses_a, responses_b))


@functools.lru_cache(maxsize=8)
def _reward_function(model_config: Any) -> Callable[..., Any]:
  import jax
  from dro_jax import judge_inputs
  from dro_jax.models import value as value_lib
  network = value_lib.EncoderValueNetwork(model_config)

  @jax.jit
  def rewards(params, prompt_BxS, response_BxT):
    return network.apply({"params": params},
                         judge_inputs.reward_model_inputs(prompt_BxS, response_BxT))

  return rewards


@functools.lru_cache(maxsize=8)
def _preference_function(model_config: Any, a_token: int, b_token: int) -> Callable[..., Any]:
  import jax
  from dro_jax import judge_inputs
  from dro_jax.models import t5 as t5_lib
  model = t5_lib.T5(model_config)

  @jax.jit
  def probability(params, prompt_BxS, first_BxT, second_BxT):
    inputs = judge_inputs.preference_model_inputs(prompt_BxS, first_BxT, second_BxT)
    return judge_inputs.first_wins(judge_inputs.label_logps(model, params, inputs, a_token,
                                                            b_token))

  return probability


# ----------------------------------------------------------------------------------- by spec


# name -> a factory of the judge (called with no arguments).
JUDGES: dict[str, Callable[[], Judge]] = {"demo": DemoJudge}
SPEC_FORMS = ("demo", "reward_model:DIR", "preference_model:DIR", "noisy:P:SPEC",
              "noisy_persistent:P:SPEC", "api:MODEL@BASE_URL", "module:factory")
# the head of a noisy spec -> its judge: a fresh flip per query, or the same flip per pair
NOISY_JUDGES: dict[str, type[NoisyJudge]] = {"noisy": NoisyJudge,
                                             "noisy_persistent": PersistentNoisyJudge}


def register_judge(name: str, factory: Callable[[], Judge], *, overwrite: bool = False) -> None:
  if name in JUDGES and not overwrite:
    raise ValueError(f"a judge named {name!r} is already registered")
  JUDGES[name] = factory


def noisy_form(head: str = "noisy") -> str:
  """What a `noisy:P:SPEC` (or `noisy_persistent:P:SPEC`) spec must look like, for messages."""
  return f"expected {head}:P:SPEC with P in [0, 1], e.g. {head}:0.2:demo"


NOISY_FORM = noisy_form("noisy")


def noisy_parts(rest: str) -> tuple[float, str] | None:
  """`P:SPEC` of a `noisy:P:SPEC` (or `noisy_persistent:P:SPEC`) spec as (P, SPEC); None when P
  is not in [0, 1] or SPEC is missing."""
  probability, _, inner = rest.partition(":")
  try:
    flip = float(probability)
  except ValueError:
    return None
  if not inner or not 0.0 <= flip <= 1.0:
    return None
  return flip, inner


def judge_options(settings: Any, *, cache: str | None = None, max_calls: int = 0,
                  budget_key: str = "evaluation.judge_max_calls",
                  template_flag: str = "evaluation.judge_template") -> dict[str, Any]:
  """What an `api:MODEL@BASE_URL` judge takes from a config's `evaluation` block (its
  judge_template, judge_max_concurrency and judge_cache; `cache` is the default store),
  for `judge_from_spec(spec, **options)`. Other judges ignore them."""
  get = settings.get if hasattr(settings, "get") else (lambda key, default=None: default)
  return {"template": get("judge_template") or None,
          "max_concurrency": int(get("judge_max_concurrency") or 8),
          "cache": get("judge_cache") or cache, "max_calls": int(max_calls or 0),
          "budget_key": budget_key, "template_flag": template_flag}


def call_counts(*judges: Judge) -> dict[str, int]:
  """`judge_calls/paid` and `judge_calls/cached` summed over the distinct judges that count
  them (API judges: requests paid and comparisons answered from the cache, over the cache's
  life); empty when none does."""
  totals: dict[str, int] = {}
  seen = set()
  for judge in judges:
    while judge is not None and not callable(getattr(judge, "counts", None)):
      judge = getattr(judge, "judge", None)  # a noisy judge's wrapped one
    if judge is None or id(judge) in seen:
      continue
    seen.add(id(judge))
    for name, value in judge.counts().items():
      totals[f"judge_calls/{name}"] = totals.get(f"judge_calls/{name}", 0) + value
  return totals


def judge_from_spec(spec: str, **options: Any) -> Judge:
  """The judge a spec string names (the module docstring lists the forms). `options` go to an
  `api:MODEL@BASE_URL` judge (`judge_options`; also inside a noisy spec); the rest ignore them."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"judge spec must be a non-empty string, one of {', '.join(SPEC_FORMS)}")
  spec = spec.strip()
  head, _, rest = spec.partition(":")
  if head == "api":
    from dro_jax import api_judge
    return api_judge.ApiJudge(spec, **options)
  if head == "reward_model" and rest:
    return RewardModelJudge(rest)
  if head == "preference_model" and rest:
    return PreferenceModelJudge(rest)
  if head in NOISY_JUDGES and rest:
    parsed = noisy_parts(rest)
    if parsed is None:
      raise ValueError(f"judge spec {spec!r}: {noisy_form(head)}")
    flip, inner = parsed
    return NOISY_JUDGES[head](judge_from_spec(inner, **options), flip, spec=spec)
  if spec in JUDGES:
    return JUDGES[spec]()
  if rest:
    try:
      module = importlib.import_module(head)
    except ImportError as error:
      raise ValueError(f"judge spec {spec!r}: cannot import module {head!r} ({error}); the "
                       f"forms are {', '.join(SPEC_FORMS)}") from error
    factory = getattr(module, rest, None)
    if not callable(factory):
      raise ValueError(f"judge spec {spec!r}: module {head!r} has no callable {rest!r}")
    judge = factory()
    if not callable(getattr(judge, "prefer", None)):
      raise ValueError(f"judge spec {spec!r}: {head}.{rest}() returned {type(judge).__name__}, "
                       f"which has no prefer(prompts, responses_a, responses_b)")
    return judge
  raise ValueError(f"unknown judge {spec!r}; registered judges: {sorted(JUDGES)}; other forms: "
                   f"{', '.join(SPEC_FORMS[1:])}")


get_judge = judge_from_spec


# ------------------------------------------------------------------------------------ tournament


def tournament(prompts: Sequence[str], candidates: Sequence[Sequence[str]], judge: Judge, *,
               debias: bool = True, worst: bool = False) -> tuple[list[int], int]:
  """A knock-out per prompt: ([index of the winner among candidates[i]], judge calls spent).

  Each round pairs the survivors in order (an odd one out goes through), all prompts' matches
  of a round in one batched call; the one preferred (P > 0.5; on a tie the earlier) survives.
  `worst=True` keeps the loser of each match instead: the worst-of-n. n candidates take n − 1
  comparisons per prompt (2(n − 1) calls when a non-symmetric judge is asked both orders).
  Whenever a candidate beats every other (a Condorcet winner) it wins the knock-out.
  """
  if len(candidates) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
  alive = [list(range(len(row))) for row in candidates]
  for index, row in enumerate(candidates):
    if not row:
      raise ValueError(f"prompt {index} has no candidates")
  calls = 0
  while any(len(row) > 1 for row in alive):
    matches = [(i, row[k], row[k + 1]) for i, row in enumerate(alive)
               for k in range(0, len(row) - 1, 2)]
    p, spent, _ = compare(judge, [prompts[i] for i, _, _ in matches],
                          [candidates[i][a] for i, a, _ in matches],
                          [candidates[i][b] for i, _, b in matches], debias=debias)
    calls += spent
    winners: dict[int, list[int]] = {}
    for (i, a, b), value in zip(matches, p):
      # No verdict (NaN from an abstaining judge): the earlier goes through.
      a_wins = (value >= 0.5 if not worst else value < 0.5) or bool(np.isnan(value))
      winners.setdefault(i, []).append(a if a_wins else b)
    alive = [winners.get(i, []) + (row[-1:] if len(row) % 2 else []) if len(row) > 1 else row
             for i, row in enumerate(alive)]
  return [row[0] for row in alive], calls


class ProcessZeroJudge:
  """A judge asked by process 0 alone, its verdicts sent to every process (a run of several
  processes: the oracle's cost is paid once, and every process trains on the same verdicts even
  from a judge that answers differently on every call). Every process must call `prefer` with
  the same comparisons, as the processes of one run do. Its other attributes (symmetric, spec,
  a noisy judge's query counter) are the judge's."""

  def __init__(self, judge: Judge):
    object.__setattr__(self, "judge", judge)

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    import jax
    from jax.experimental import multihost_utils
    count = len(prompts)
    if jax.process_index() == 0:
      values = np.asarray(self.judge.prefer(prompts, responses_a, responses_b),
                          np.float64).reshape(-1)
      if values.shape[0] != count:  # said on process 0 only: the others wait at the broadcast
        values = np.full((count,), np.nan)
    else:
      values = np.zeros((count,), np.float64)
    # float64 travels as its 32-bit halves: every process gets process 0's values to the bit.
    halves = np.ascontiguousarray(values).view(np.uint32)
    return np.asarray(multihost_utils.broadcast_one_to_all(halves)).astype(np.uint32).view(
        np.float64).copy()

  def __getattr__(self, name: str) -> Any:
    return getattr(self.judge, name)

  def __setattr__(self, name: str, value: Any) -> None:
    setattr(self.judge, name, value)


def on_process_zero(judge: Judge | None) -> Judge | None:
  """`judge` asked on process 0 only when the run has several processes (else itself)."""
  import jax
  if judge is None or jax.process_count() == 1 or isinstance(judge, ProcessZeroJudge):
    return judge
  return ProcessZeroJudge(judge)

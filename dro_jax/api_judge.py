"""A judge behind any OpenAI-compatible chat endpoint: `api:MODEL@BASE_URL` (docs/llm_judges.md).

    api:gpt-4o-mini@https://api.openai.com/v1
    api:Qwen/Qwen2.5-7B-Instruct@http://localhost:8000/v1      (a vLLM server)

Each comparison is one chat-completions request through the official `openai` client (its
`base_url`): the judging prompt is a template file with `{prompt}`, `{response_a}` and
`{response_b}` (the default, `templates/pairwise_judge.txt`, ships in the package;
`evaluation.judge_template` / `--judge_template` name another). The key is read from the
environment variable DRO_JAX_JUDGE_API_KEY (else OPENAI_API_KEY; neither: a placeholder, as a
local server without `--api-key` expects); it is never written or printed.

- The verdict is the reply's first word: A, B or tie (1, 0, ½). Where the endpoint returns the
  log-probabilities of the verdict token, P(A) = (p_A + p_tie / 2) / (p_A + p_B + p_tie) over the
  top tokens there. An unparseable reply is asked once more; a second one is counted, reported,
  and answered as NaN: no verdict (`judges.compare` keeps the other order's, the evaluation drops
  the prompt, the online labels drop the pair), and it is not cached, so a rerun asks again.
- Requests run concurrently, up to `max_concurrency` at a time, inside one batched `prefer`.
  429 and 5xx replies, timeouts and dropped connections are retried with exponential backoff
  and jitter (tenacity), up to `max_attempts` tries; a `Retry-After` header is waited out.
- Every verdict is stored as it arrives in a SQLite file (`cache`; one transaction per row),
  keyed by (spec, template hash, prompt, response A, response B): A is the response shown first,
  so the key holds the order. A rerun asks only for what is not stored; SIGTERM or Ctrl-C during
  `prefer` stops sending, waits for the requests in flight, stores their verdicts and raises
  `errors.JudgingStopped` (exit 143 from the command lines).
- `paid` (requests answered, retries of an unparseable reply included) and `cached` (comparisons
  answered from the store) are counted in the store, for the whole workdir. `max_calls`: a batch
  whose comparisons missing from the store would take `paid` past it raises
  `errors.JudgeBudgetExceeded` before any of them is sent (exit 3).
- An endpoint that cannot be reached fails when the judge is built, in one line naming the URL.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import sqlite3
import threading
import time
from typing import Any, Sequence

import numpy as np

from dro_jax import errors

HEAD = "api"
FORM = "api:MODEL@BASE_URL"
KEY_ENV = "DRO_JAX_JUDGE_API_KEY"
FALLBACK_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "EMPTY"  # what a local server started without --api-key accepts
DEFAULT_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates",
                                "pairwise_judge.txt")
FIELDS = ("prompt", "response_a", "response_b")
DEFAULT_MAX_CONCURRENCY = 8
CACHE_NAME = "judge_cache.sqlite"
_FIELD = re.compile(r"\{(prompt|response_a|response_b)\}")
_VERDICT = re.compile(r"^[\s\[\(\*\"'`]*(?:Response\s+)?(A|B|tie|Tie|TIE)(?![\w])")
_TOKEN_STRIP = " \t\n[(*\"'`])]:.,"


def parse_spec(spec: str) -> tuple[str, str] | None:
  """(MODEL, BASE_URL) of `api:MODEL@BASE_URL`; None when it is not of that form."""
  head, _, rest = spec.strip().partition(":")
  if head != HEAD:
    return None
  match = re.fullmatch(r"(.+?)@(https?://\S+)", rest)
  if not match:
    return None
  return match.group(1), match.group(2).rstrip("/")


def is_api_spec(spec: str) -> bool:
  return isinstance(spec, str) and spec.strip().startswith(HEAD + ":")


def api_key() -> str:
  return os.environ.get(KEY_ENV) or os.environ.get(FALLBACK_KEY_ENV) or NO_KEY


def read_template(path: str | None, flag: str = "evaluation.judge_template") -> str:
  """The template's text, checked: it must hold {prompt}, {response_a} and {response_b}."""
  path = path or DEFAULT_TEMPLATE
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as error:
    raise errors.UserError(
        f"{flag} {path}: cannot be read ({errors.one_line(error)}); give a text file with "
        f"{{prompt}}, {{response_a}} and {{response_b}}") from error
  missing = [name for name in FIELDS if "{" + name + "}" not in text]
  if missing:
    raise errors.UserError(f"{flag} {path}: has no {', '.join('{' + m + '}' for m in missing)}; "
                           f"the judging prompt needs {{prompt}}, {{response_a}} and "
                           f"{{response_b}}")
  return text


def fill(template: str, prompt: str, response_a: str, response_b: str) -> str:
  """The template with its three fields filled in one pass (braces in the texts stay)."""
  values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}
  return _FIELD.sub(lambda match: values[match.group(1)], template)


def _normal(token: str) -> str:
  word = token.strip(_TOKEN_STRIP)
  return "tie" if word.lower() == "tie" else word


def parse_verdict(text: str | None) -> float | None:
  """1 (A), 0 (B), ½ (tie) from the reply's first word; None when it is none of them."""
  match = _VERDICT.match(text or "")
  if not match:
    return None
  word = match.group(1)
  return {"A": 1.0, "B": 0.0}.get(word, 0.5)


def probability_from_logprobs(content: Any) -> float | None:
  """P(A) from the top log-probabilities at the reply's first verdict token (A, B or tie):
  (p_A + p_tie / 2) / (p_A + p_B + p_tie); None without log-probabilities or without A and B
  among the top tokens."""
  for position in content or ():
    if _normal(_get(position, "token") or "") not in ("A", "B", "tie"):
      continue
    mass = {"A": 0.0, "B": 0.0, "tie": 0.0}
    for top in _get(position, "top_logprobs") or ():
      word = _normal(_get(top, "token") or "")
      if word in mass:
        mass[word] += math.exp(float(_get(top, "logprob")))
    total = sum(mass.values())
    if total <= 0 or mass["A"] + mass["B"] <= 0:
      return None
    return (mass["A"] + 0.5 * mass["tie"]) / total
  return None


def _get(item: Any, name: str) -> Any:
  return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


# ------------------------------------------------------------------------------------ the store


class VerdictCache:
  """Verdicts in SQLite, one committed transaction per row, and the workdir's call counters.
  `path` None: kept in memory for this process only. Write-ahead log with synchronous=NORMAL:
  a committed row survives the process being stopped or killed (it is in the log file), and
  only a crash of the machine itself may lose the last rows, never corrupt the file."""

  def __init__(self, path: str | None):
    self.path = path
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._db = sqlite3.connect(path or ":memory:", timeout=60, check_same_thread=False)
    self._lock = threading.Lock()
    if path:  # each row's transaction is in the file when committed; no fsync per row
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("PRAGMA synchronous=NORMAL")
    with self._lock, self._db:
      self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, spec TEXT, "
                       "template TEXT, value REAL, reply TEXT, created REAL)")
      self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, "
                       "value INTEGER)")

  def get(self, keys: Sequence[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    unique = list(dict.fromkeys(keys))
    with self._lock:
      for start in range(0, len(unique), 500):
        chunk = unique[start:start + 500]
        rows = self._db.execute(f"SELECT key, value FROM verdicts WHERE key IN "
                                f"({','.join('?' * len(chunk))})", chunk)
        found.update((key, float(value)) for key, value in rows)
    return found

  def counter(self, name: str) -> int:
    with self._lock:
      row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0

  def _bump(self, name: str, by: int) -> None:
    self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO "
                     "UPDATE SET value = value + excluded.value", (name, int(by)))

  def add(self, counters: dict[str, int]) -> None:
    with self._lock, self._db:
      for name, by in counters.items():
        if by:
          self._bump(name, by)

  def put(self, key: str, spec: str, template: str, value: float | None, reply: str,
          counters: dict[str, int]) -> None:
    """The verdict (None: none, only the counters) and the counters, in one transaction."""
    with self._lock, self._db:
      if value is not None:
        self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?)",
                         (key, spec, template, float(value), reply, time.time()))
      for name, by in counters.items():
        if by:
          self._bump(name, by)

  def close(self) -> None:
    with self._lock:
      self._db.close()


# ------------------------------------------------------------------------------------ the judge


class _Retryable(Exception):
  """A reply worth asking again (429, 5xx, timeout, dropped connection)."""

  def __init__(self, error: Exception, wait: float | None):
    super().__init__(str(error))
    self.error, self.wait = error, wait


@dataclasses.dataclass
class _Answer:
  key: str
  value: float | None  # None: unparseable twice
  reply: str
  requests: int


def retry_after(error: Exception) -> float | None:
  """Seconds from a reply's Retry-After (or retry-after-ms) header; None without one."""
  response = getattr(error, "response", None)
  headers = getattr(response, "headers", None) or {}
  try:
    if headers.get("retry-after-ms") is not None:
      return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
    if headers.get("retry-after") is not None:
      return max(0.0, float(headers["retry-after"]))
  except (TypeError, ValueError):
    return None
  return None


class ApiJudge:
  """`api:MODEL@BASE_URL` (the module docstring). Not symmetric: asked in both orders."""

  symmetric = False
  abstains = True  # may answer NaN: no verdict for that row

  def __init__(self, spec: str, *, template: str | None = None, cache: str | None = None,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY, max_calls: int = 0,
               budget_key: str = "evaluation.judge_max_calls", timeout: float = 60.0,
               max_attempts: int = 6, backoff: float = 0.5, max_backoff: float = 30.0,
               max_tokens: int = 8, probe: bool = True, template_flag: str | None = None):
    parsed = parse_spec(spec)
    if parsed is None:
      raise errors.UserError(f"judge spec {spec!r}: expected {FORM}, e.g. "
                             f"api:gpt-4o-mini@https://api.openai.com/v1")
    if int(max_concurrency) < 1:
      raise errors.UserError(f"evaluation.judge_max_concurrency={max_concurrency}: must be at "
                             f"least 1")
    import openai
    # httpx logs a line per request at INFO (the workdir's log.txt takes INFO): warnings only.
    logging.getLogger("httpx").setLevel(max(logging.getLogger("httpx").level, logging.WARNING))
    self.spec = spec.strip()
    self.model, self.base_url = parsed
    self.template_path = template or DEFAULT_TEMPLATE
    self.template = read_template(template, template_flag or "evaluation.judge_template")
    self.template_hash = hashlib.sha256(self.template.encode()).hexdigest()[:16]
    self.max_concurrency = int(max_concurrency)
    self.max_calls, self.budget_key = int(max_calls or 0), budget_key
    self.max_attempts, self.backoff, self.max_backoff = int(max_attempts), backoff, max_backoff
    self.max_tokens = int(max_tokens)
    self.logprobs = True  # off once the endpoint refuses them
    self._key = api_key()
    self._openai = openai
    self.client = openai.OpenAI(api_key=self._key, base_url=self.base_url, timeout=timeout,
                                max_retries=0)
    self.store = VerdictCache(cache)
    self.cache_path = cache
    self.session = {"paid": 0, "cached": 0, "unparseable": 0}  # this process's counts
    if probe:
      self.probe()

  # -------------------------------------------------------------------------------- helpers

  def _counter(self, name: str) -> str:
    return f"{self.spec}|{self.template_hash}|{name}"

  def counts(self) -> dict[str, int]:
    """Over the store's life (the workdir's): requests paid, comparisons answered from the
    store, and replies unparseable twice."""
    return {name: self.store.counter(self._counter(name))
            for name in ("paid", "cached", "unparseable")}

  @property
  def paid(self) -> int:
    return self.store.counter(self._counter("paid"))

  def redact(self, text: str) -> str:
    text = errors.one_line(text)
    return text.replace(self._key, "***") if self._key and self._key != NO_KEY else text

  def key(self, prompt: str, response_a: str, response_b: str) -> str:
    return hashlib.sha256(json.dumps([self.spec, self.template_hash, prompt, response_a,
                                      response_b]).encode()).hexdigest()

  def probe(self) -> None:
    """Fails in one line naming the URL when the endpoint cannot be reached, or refuses the key."""
    openai = self._openai
    try:
      self.client.with_options(timeout=10.0).models.list()
    except (openai.APIConnectionError, openai.APITimeoutError) as error:
      raise errors.UserError(
          f"judge {self.spec}: cannot reach {self.base_url} ({self.redact(error)}); start the "
          f"server or fix the URL") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
      raise errors.UserError(
          f"judge {self.spec}: {self.base_url} refused the key (HTTP {error.status_code}); set "
          f"{KEY_ENV} (or {FALLBACK_KEY_ENV}) to a key it accepts") from None
    except openai.APIStatusError:
      pass  # reachable: an endpoint need not list its models

  # ----------------------------------------------------------------------- one comparison

  def _request(self, content: str) -> Any:
    openai = self._openai
    options: dict[str, Any] = dict(model=self.model, temperature=0.0,
                                   max_tokens=self.max_tokens,
                                   messages=[{"role": "user", "content": content}])
    if self.logprobs:
      options.update(logprobs=True, top_logprobs=5)
    try:
      return self.client.chat.completions.create(**options)
    except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
            openai.APIConnectionError) as error:
      raise _Retryable(error, retry_after(error)) from error
    except openai.APIStatusError as error:
      if error.status_code >= 500 or error.status_code in (408, 409, 429):
        raise _Retryable(error, retry_after(error)) from error
      if error.status_code == 400 and self.logprobs and "logprob" in str(error).lower():
        self.logprobs = False  # an endpoint without log-probabilities: parse the text only
        return self._request(content)
      if error.status_code in (401, 403):
        raise errors.UserError(f"judge {self.spec}: {self.base_url} refused the key (HTTP "
                               f"{error.status_code}); set {KEY_ENV} (or {FALLBACK_KEY_ENV}) "
                               f"to a key it accepts") from None
      raise errors.UserError(f"judge {self.spec}: {self.base_url} answered HTTP "
                             f"{error.status_code}: {self.redact(error)}") from None
    except ValueError as error:  # a reply that is not a chat completion (malformed JSON)
      raise _Retryable(error, None) from error

  def _wait(self, retry_state: Any) -> float:
    import tenacity
    exponential = tenacity.wait_exponential_jitter(initial=self.backoff, max=self.max_backoff,
                                                   jitter=self.backoff)
    wait = exponential(retry_state)
    error = retry_state.outcome.exception() if retry_state.outcome else None
    asked = getattr(error, "wait", None)
    return max(wait, asked) if asked is not None else wait

  def _retrying(self, content: str) -> Any:
    import tenacity
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Retryable), wait=self._wait,
        stop=tenacity.stop_after_attempt(self.max_attempts), reraise=True)
    try:
      return retrying(self._request, content)
    except _Retryable as error:
      raise errors.UserError(
          f"judge {self.spec}: {self.base_url} still failing after {self.max_attempts} tries "
          f"({type(error.error).__name__}: {self.redact(error)})") from None

  def _ask(self, key: str, prompt: str, response_a: str, response_b: str) -> _Answer:
    """One comparison: asked, and asked once more when the reply cannot be parsed."""
    content = fill(self.template, prompt, response_a, response_b)
    reply, requests = "", 0
    for _ in range(2):
      completion = self._retrying(content)
      requests += 1
      choices = getattr(completion, "choices", None) or []
      message = getattr(choices[0], "message", None) if choices else None
      reply = (getattr(message, "content", None) or "") if message is not None else ""
      value = parse_verdict(reply)
      if value is not None:
        logprobs = getattr(choices[0], "logprobs", None)
        soft = probability_from_logprobs(_get(logprobs, "content")) if logprobs else None
        return _Answer(key, value if soft is None else soft, reply, requests)
    return _Answer(key, None, reply, requests)

  # --------------------------------------------------------------------------------- prefer

  def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str]) -> np.ndarray:
    if not len(prompts) == len(responses_a) == len(responses_b):
      raise ValueError(f"{len(prompts)} prompts but {len(responses_a)} and {len(responses_b)} "
                       f"responses")
    keys = [self.key(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)]
    known = self.store.get(keys)
    missing: dict[str, tuple[str, str, str]] = {}
    for key, row in zip(keys, zip(prompts, responses_a, responses_b)):
      if key not in known:
        missing.setdefault(key, row)
    hits = len(keys) - sum(1 for key in keys if key in missing)
    self.store.add({self._counter("cached"): hits})
    self.session["cached"] += hits
    if self.max_calls and missing:
      paid = self.paid
      if paid + len(missing) > self.max_calls:
        raise errors.JudgeBudgetExceeded(
            f"judge budget {self.budget_key}={self.max_calls} reached: {paid} calls paid so "
            f"far, {len(missing)} more not in the cache remain for this batch "
            f"({max(self.max_calls - paid, 0)} left in the budget); every verdict paid for is "
            f"in {self.cache_path or 'memory'}: raise {self.budget_key} and run the same "
            f"command again to go on")
    answers = self._ask_all(missing) if missing else {}
    values = np.empty(len(keys), np.float64)
    for row, key in enumerate(keys):
      values[row] = known[key] if key in known else answers.get(key, math.nan)
    return values

  def _ask_all(self, missing: dict[str, tuple[str, str, str]]) -> dict[str, float]:
    """Asks every missing comparison, `max_concurrency` at a time, storing each verdict as it
    arrives; a SIGTERM / SIGINT stops sending, stores what is in flight, and raises."""
    answers: dict[str, float] = {}
    unparseable: list[str] = []
    stop = {"signal": None}
    work = list(missing.items())
    failure: BaseException | None = None
    with _stop_handlers(stop), concurrent.futures.ThreadPoolExecutor(
        self.max_concurrency, thread_name_prefix="api_judge") as pool:
      pending: set[concurrent.futures.Future] = set()
      position = 0
      while position < len(work) or pending:
        while (position < len(work) and len(pending) < self.max_concurrency
               and stop["signal"] is None and failure is None):
          key, row = work[position]
          pending.add(pool.submit(self._ask, key, *row))
          position += 1
        if not pending:
          break
        done, pending = concurrent.futures.wait(
            pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          try:
            answer = future.result()
          except BaseException as error:  # noqa: BLE001 (raised once the rest is stored)
            failure = failure or error
            continue
          counters = {self._counter("paid"): answer.requests,
                      self._counter("unparseable"): int(answer.value is None)}
          self.store.put(answer.key, self.spec, self.template_hash, answer.value, answer.reply,
                         counters)
          self.session["paid"] += answer.requests
          if answer.value is None:
            self.session["unparseable"] += 1
            unparseable.append(answer.reply)
          else:
            answers[answer.key] = answer.value
        if stop["signal"] is not None or failure is not None:
          position = len(work)  # send nothing more; the loop drains what is in flight
    if unparseable:
      print(f"[judge] {self.spec}: {len(unparseable)} of {len(work)} replies could not be read "
            f"as A, B or tie after a retry (not taken as verdicts, not cached), e.g. "
            f"{unparseable[0][:80]!r}", flush=True)
    if failure is not None:
      raise failure
    if stop["signal"] is not None:
      raise errors.JudgingStopped(
          f"stopped by {stop['signal']} while judging: {len(answers)} verdicts of this batch "
          f"received and stored in {self.cache_path or 'memory'}, {len(work) - len(answers)} "
          f"not asked; the same command resumes and asks only for those")
    return answers

  def close(self) -> None:
    self.store.close()
    self.client.close()


@contextlib.contextmanager
def _stop_handlers(stop: dict[str, Any]):
  """SIGTERM and SIGINT set `stop["signal"]` (and reach the handler there before, when it is a
  function of the program's, such as the training loop's preemption flag). Main thread only."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {}

  def handler(signum, frame):
    stop["signal"] = signal.Signals(signum).name
    before = previous.get(signum)
    if callable(before) and before is not signal.default_int_handler:
      before(signum, frame)

  for number in (signal.SIGTERM, signal.SIGINT):
    previous[number] = signal.signal(number, handler)
  try:
    yield
  finally:
    for number, before in previous.items():
      signal.signal(number, before)

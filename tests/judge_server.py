"""A local chat-completions server that plays a judge, for the API judge's tests and benchmark.

A real HTTP server on 127.0.0.1 (the standard library's ThreadingHTTPServer) speaking the
OpenAI chat-completions protocol: `GET /v1/models` and `POST /v1/chat/completions`. It reads the
prompt and the two responses out of the judging prompt (the package's default template), and
answers as the demo's judge would: the response with the higher demo reward
(`synthetic.reward`) wins, equal rewards tie. Then, each a deterministic function of the request
and of how many times that request was seen before:

- a first-position bias: a share `bias` of the requests answer A whatever the rewards say;
- latency: every request sleeps `latency` seconds (with `slow_first`, each request's first
  try sleeps that long instead: a timeout for a client that waits less);
- failures: a share `fail_429` answers HTTP 429 (with `Retry-After: retry_after`; with
  `first_429`, every request's first try does), `fail_500`
  HTTP 500, `malformed_json` a 200 whose body is not JSON, `unparseable` a reply that is no
  verdict ("I would rather not say.");
- log-probabilities, when asked for and `logprobs` is on: the verdict token at `confidence`.

It counts the requests in flight (`max_in_flight`), every request and the verdicts answered per
key (the sha256 of the judging prompt: one (pair, order)), and the keys it was sent. With
`api_key` set it answers 401 to any other bearer key.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import math
import re
import socket
import threading
import time
from typing import Any

from dro_jax.data import synthetic

_PARTS = re.compile(r"\[Prompt\]\n(.*)\n\n\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\n"
                    r"Reply with", re.DOTALL)


def rule(prompt: str, response_a: str, response_b: str) -> str:
  """The judge the server plays, in Python: "A", "B" or "tie" by the demo reward."""
  a, b = synthetic.reward(prompt, response_a), synthetic.reward(prompt, response_b)
  return "A" if a > b else "B" if b > a else "tie"


def _share(*parts: Any) -> float:
  digest = hashlib.sha256(repr(parts).encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0 ** 64


class JudgeServer:
  """Start with `start()` (or as a context manager); `url` is the BASE_URL (…/v1)."""

  def __init__(self, *, bias: float = 0.0, latency: float = 0.0, fail_429: float = 0.0,
               fail_500: float = 0.0, malformed_json: float = 0.0, unparseable: float = 0.0,
               retry_after: float | None = 0.0, logprobs: bool = False,
               confidence: float = 0.9, api_key: str | None = None, seed: int = 0,
               first_429: bool = False, slow_first: float = 0.0):
    self.bias, self.latency = bias, latency
    self.fail_429, self.fail_500 = fail_429, fail_500
    self.malformed_json, self.unparseable = malformed_json, unparseable
    self.retry_after, self.logprobs, self.confidence = retry_after, logprobs, confidence
    self.api_key, self.seed, self.first_429 = api_key, seed, first_429
    self.slow_first = slow_first
    self.lock = threading.Lock()
    self.in_flight = self.max_in_flight = 0
    self.requests = 0
    self.per_key: collections.Counter = collections.Counter()  # requests per (pair, order)
    self.verdicts: collections.Counter = collections.Counter()  # verdicts answered per key
    self.times: dict[str, list[float]] = collections.defaultdict(list)
    self.statuses: collections.Counter = collections.Counter()
    self.bearers: set[str] = set()
    self.on_request = None  # called with the request count, outside the lock
    self._server: http.server.ThreadingHTTPServer | None = None

  # --------------------------------------------------------------------------------- control

  def start(self) -> "JudgeServer":
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        del args

      def setup(self):
        super().setup()
        # Headers and body go out as two writes: without this, Nagle's algorithm and the
        # client's delayed ACK hold the body back ~40 ms, which would count as latency.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

      def do_GET(self):
        if self.path.endswith("/stats"):  # the counts, for a server in another process
          with server.lock:
            self._json(200, {"requests": server.requests, "max_in_flight": server.max_in_flight,
                             "verdicts": sum(server.verdicts.values())})
          return
        if not self._authorised():
          return
        self._json(200, {"object": "list", "data": [{"id": "judge", "object": "model",
                                                     "created": 0, "owned_by": "test"}]})

      def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self._authorised():
          return
        server._enter()
        try:
          status, payload, headers = server.answer(body)
        finally:
          server._leave()
        if isinstance(payload, bytes):
          self._raw(status, payload, headers)
        else:
          self._json(status, payload, headers)

      def _authorised(self) -> bool:
        bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        with server.lock:
          server.bearers.add(bearer)
        if server.api_key is not None and bearer != server.api_key:
          self._json(401, {"error": {"message": "invalid key", "type": "invalid_request_error",
                                     "code": "invalid_api_key"}})
          return False
        return True

      def _json(self, status, payload, headers=None):
        self._raw(status, json.dumps(payload).encode(), headers)

      def _raw(self, status, data, headers=None):
        try:
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          for name, value in (headers or {}).items():
            self.send_header(name, value)
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
          self.close_connection = True

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

  def stop(self) -> None:
    if self._server is not None:
      self._server.shutdown()
      self._server.server_close()

  def __enter__(self) -> "JudgeServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def _enter(self) -> None:
    with self.lock:
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)

  def _leave(self) -> None:
    with self.lock:
      self.in_flight -= 1

  # -------------------------------------------------------------------------------- a reply

  def answer(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    content = body["messages"][-1]["content"]
    key = hashlib.sha256(content.encode()).hexdigest()
    with self.lock:
      self.requests += 1
      count = self.requests
      seen = self.per_key[key]
      self.per_key[key] += 1
      self.times[key].append(time.monotonic())
    if self.on_request is not None:
      self.on_request(count)
    if self.latency or (self.slow_first and seen == 0):
      time.sleep(self.slow_first if self.slow_first and seen == 0 else self.latency)
    draw = _share(self.seed, key, seen)
    edges = [self.fail_429, self.fail_500, self.malformed_json, self.unparseable]
    kind, low = None, 0.0
    for name, share in zip(("429", "500", "malformed", "unparseable"), edges):
      if low <= draw < low + share:
        kind = name
      low += share
    if self.first_429 and seen == 0:
      kind = "429"
    with self.lock:
      self.statuses[kind or "verdict"] += 1
    if kind == "429":
      headers = {} if self.retry_after is None else {"Retry-After": f"{self.retry_after:g}"}
      return 429, {"error": {"message": "rate limited", "type": "rate_limit_error"}}, headers
    if kind == "500":
      return 500, {"error": {"message": "server error", "type": "server_error"}}, {}
    if kind == "malformed":
      return 200, b'{"id": "x", "choices": [', {}
    parts = _PARTS.search(content)
    if parts is None:
      return 400, {"error": {"message": "not a judging prompt", "type": "invalid_request"}}, {}
    if kind == "unparseable":
      return 200, self._completion("I would rather not say.", None, body), {}
    verdict = rule(*parts.groups())
    if _share(self.seed, "bias", key) < self.bias:
      verdict = "A"
    with self.lock:
      self.verdicts[key] += 1
    return 200, self._completion(verdict, verdict, body), {}

  def _completion(self, text: str, verdict: str | None, body: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None,
                              "message": {"role": "assistant", "content": text}}
    if self.logprobs and body.get("logprobs") and verdict is not None:
      others = [word for word in ("A", "B", "tie") if word != verdict]
      rest = (1.0 - self.confidence) / len(others)
      top = [{"token": verdict, "logprob": math.log(self.confidence), "bytes": None}]
      top += [{"token": word, "logprob": math.log(rest), "bytes": None} for word in others]
      choice["logprobs"] = {"content": [{"token": verdict, "logprob": math.log(self.confidence),
                                         "bytes": None, "top_logprobs": top}]}
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "judge"), "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


if __name__ == "__main__":  # a server of its own: python tests/judge_server.py --latency 0.05
  import argparse
  import sys
  parser = argparse.ArgumentParser(description="the test judge server, until stdin closes")
  parser.add_argument("--latency", type=float, default=0.0)
  parser.add_argument("--bias", type=float, default=0.0)
  options = parser.parse_args()
  running = JudgeServer(latency=options.latency, bias=options.bias).start()
  print(running.url, flush=True)
  sys.stdin.read()
  running.stop()

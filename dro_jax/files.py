"""Small file helpers every runner shares: local paths and gs:// alike, written atomically.

The lowest layer of the package: it imports only `dro_jax.console` and `dro_jax.distributed`, so
anything may stand on it.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any


def gfile():
  """tf.io.gfile (local paths and gs:// alike), imported on first use."""
  from dro_jax import console
  return console.import_tensorflow().io.gfile


def temporary_path(path: str) -> str:
  """A temporary name beside `path` that no other writer (process, host or thread) shares."""
  return f"{path}.tmp-{uuid.uuid4().hex}"


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file of this writer's own and a rename: never
  half a file, and two writers of one path (hosts on a shared filesystem) never share a temporary
  file."""
  files = gfile()
  files.makedirs(os.path.dirname(path) or ".")
  temporary = temporary_path(path)
  try:
    with files.GFile(temporary, "w") as f:
      f.write(text)
    files.rename(temporary, path, overwrite=True)
  finally:
    if files.exists(temporary):
      files.remove(temporary)


def write_jsonl(path: str, rows) -> None:
  """One JSON object per line (keys sorted), written atomically."""
  write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: str) -> list[Any]:
  """The JSON values of a JSONL file's non-empty lines ([] when it does not exist)."""
  return [json.loads(line) for line in (read_text(path) or "").splitlines() if line.strip()]


def read_text(path: str) -> str | None:
  """The file's text, or None when it does not exist."""
  files = gfile()
  if not files.exists(path):
    return None
  with files.GFile(path) as f:
    return f.read()


def read_json(path: str) -> Any:
  """The JSON value of `path` (None when it does not exist); a clear error naming the file."""
  text = read_text(path)
  if text is None:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error})") from error


def metrics_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a `metrics.jsonl`, one per step in step order, each the merge of every row written
  for that step in file order: a later row's value wins (a step replayed after a resume
  supersedes the first run's), and rows of one step with different keys (training and eval)
  combine. A partly written last line (a killed run) is skipped."""
  text = read_text(path) or ""
  merged: dict[int, dict[str, Any]] = {}
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not isinstance(row, dict) or "step" not in row:
      continue
    merged.setdefault(int(row["step"]), {}).update(row)
  return [merged[step] for step in sorted(merged)]


def _once(write, path: str, *args) -> None:
  import jax
  from dro_jax import distributed
  if jax.process_index() == 0:
    write(path, *args)
  distributed.barrier(f"wrote {path}")


def write_text_once(path: str, text: str) -> None:
  """`write_text` for a file that every process of a pod reaches the same point to write:
  process 0 alone writes it, and every process returns once it is written (one copy)."""
  _once(write_text, path, text)


def write_jsonl_once(path: str, rows) -> None:
  """`write_jsonl` by process 0 alone, every process returning once it is written."""
  _once(write_jsonl, path, rows)

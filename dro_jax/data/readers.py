"""Raw records from JSONL, parquet and TFRecord files, each with its file and line (or row).

Every reader goes through `tf.io.gfile`, so local paths and gs:// (any filesystem TensorFlow reads)
work the same. Records are plain Python dicts; nothing here knows what the fields mean.
A `.gz` suffix means gzip compression, for every format.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import struct
from typing import Any, BinaryIO, Iterator, Sequence

from dro_jax.data._tensorflow import tf
from dro_jax.errors import UserError

FORMATS = ("jsonl", "parquet", "tfrecord")


class DataError(UserError):
  """Bad input data; the message names the file, the line (or row) and the field."""


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a record came from: `path:line` (1-based line of JSONL; row or record number else)."""
  path: str
  line: int

  def __str__(self) -> str:
    return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One record as read, or the reason it could not be read (a malformed JSON line)."""
  location: Location
  fields: dict[str, Any] | None
  problem: str | None = None


def resolve_files(patterns: str | Sequence[str]) -> list[str]:
  """Expands paths and glob patterns in order; a pattern matching nothing is a DataError."""
  if isinstance(patterns, str):
    patterns = [patterns]
  files = []
  for pattern in patterns:
    matches = sorted(tf.io.gfile.glob(pattern))
    if not matches:
      raise DataError(f"{pattern}: no such file (nothing matches this path or pattern)")
    files.extend(matches)
  return files


def infer_format(path: str) -> str:
  """The file format from the name: *.jsonl / *.json, *.parquet, *.tfrecord* (optionally .gz)."""
  name = path.rsplit("/", 1)[-1].lower().removesuffix(".gz")
  if name.endswith((".jsonl", ".json")):
    return "jsonl"
  if name.endswith(".parquet"):
    return "parquet"
  if ".tfrecord" in name:
    return "tfrecord"
  raise DataError(f"{path}: cannot tell the file format from the name; pass file_format= "
                  f"(one of {', '.join(FORMATS)})")


def read_records(path: str, file_format: str | None = None) -> Iterator[RawRecord]:
  """Raw records of one file, in file order."""
  file_format = file_format or infer_format(path)
  readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "tfrecord": _read_tfrecord}
  if file_format not in readers:
    raise DataError(f"{path}: unknown file_format {file_format!r}; use one of {', '.join(FORMATS)}")
  if not tf.io.gfile.exists(path):
    raise DataError(f"{path}: no such file")
  with tf.io.gfile.GFile(path, "rb") as stream:
    if path.endswith(".gz"):
      with gzip.GzipFile(fileobj=stream, mode="rb") as unzipped:
        yield from readers[file_format](path, unzipped)
    else:
      yield from readers[file_format](path, stream)


def _read_jsonl(path: str, stream: BinaryIO) -> Iterator[RawRecord]:
  for line_number, line in enumerate(stream, start=1):
    if not line.strip():
      continue
    location = Location(path, line_number)
    try:
      fields = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      yield RawRecord(location, None, f"malformed JSON ({error})")
      continue
    if not isinstance(fields, dict):
      yield RawRecord(location, None, "expected one JSON object per line (JSON Lines), got a "
                      f"{type(fields).__name__}")
      continue
    yield RawRecord(location, fields)


def _read_parquet(path: str, stream: BinaryIO) -> Iterator[RawRecord]:
  import pyarrow.parquet as pq  # Imported here: only parquet users pay for pyarrow.
  try:
    parquet_file = pq.ParquetFile(io.BufferedReader(_RawStream(stream)))
  except Exception as error:  # pyarrow raises several unrelated types for a bad file.
    raise DataError(f"{path}: not a readable parquet file ({error})") from error
  row = 0
  for batch in parquet_file.iter_batches(batch_size=1024):
    for fields in batch.to_pylist():
      row += 1
      yield RawRecord(Location(path, row), fields)


class _RawStream(io.RawIOBase):
  """A seekable file object pyarrow accepts, over a GFile (which lacks `closed` and `readinto`)."""

  def __init__(self, stream: BinaryIO):
    super().__init__()
    self._stream = stream

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    self._stream.seek(offset, whence)
    return self._stream.tell()

  def tell(self) -> int:
    return self._stream.tell()

  def readinto(self, buffer) -> int:
    data = self._stream.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)


def _read_tfrecord(path: str, stream: BinaryIO) -> Iterator[RawRecord]:
  for number, payload in enumerate(_tfrecord_payloads(path, stream), start=1):
    location = Location(path, number)
    try:
      fields = _example_to_dict(tf.train.Example.FromString(payload))
    except UnicodeDecodeError as error:
      yield RawRecord(location, None, f"a bytes feature is not UTF-8 text ({error})")
      continue
    except Exception as error:  # protobuf's DecodeError is not exported under a stable name.
      yield RawRecord(location, None, f"not a tf.train.Example ({error})")
      continue
    yield RawRecord(location, fields)


def _tfrecord_payloads(path: str, stream: BinaryIO) -> Iterator[bytes]:
  """TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc (checksums not verified)."""
  while True:
    header = stream.read(12)
    if not header:
      return
    if len(header) < 12:
      raise DataError(f"{path}: truncated TFRecord header")
    (length,) = struct.unpack("<Q", header[:8])
    payload = stream.read(length)
    if len(payload) < length or len(stream.read(4)) < 4:
      raise DataError(f"{path}: truncated TFRecord payload")
    yield payload


def _example_to_dict(example: tf.train.Example) -> dict[str, Any]:
  """tf.train.Example -> dict; one-element lists become scalars, bytes become str."""
  fields = {}
  for key, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    if kind == "bytes_list":
      values = [value.decode("utf-8") for value in values]
    fields[key] = values[0] if len(values) == 1 else values
  return fields

"""A sentencepiece vocabulary for your own data, with the ids T5 needs; and the check of those ids.

    python -m dro_jax.vocabulary --input my_data/ --output my_data/spiece.model --vocab_size 8000

`--input` takes folders, files and glob patterns. Under a folder, the files named `*.jsonl`,
`*.json`, `*.parquet`, `*.txt`, `*.text` or `*.md` (optionally `.gz`; not parquet) are read, hidden
ones left out; a file named on the command line is read whatever its name. JSON Lines and parquet
files give the text of their `prompt`, `response`, `completion`, `chosen` and `rejected` fields (a
list of chat messages is rendered with the chat template of `dro_jax.data.records`, as training
renders it); any other file gives its non-empty lines. The model is written with T5's special ids: pad 0, eos 1, unk 2 and no bos.
It also reserves the preference model's two label pieces, `<preference_a>` = 3 and
`<preference_b>` = 4, as control symbols: pieces that text never tokenises into (a literal
"<preference_a>" in the data is ordinary text), so the labels cannot collide with the data.

Those ids are not sentencepiece's defaults (unk 0, bos 1, eos 2, no pad). The model pads with 0
and stops at 1: under a vocabulary with other ids the policy is trained towards a token that is
not the end of sequence and never learns to stop. `check_t5_ids` refuses such a vocabulary, and
`dro_jax.data.tasks.load_vocabulary` (every vocabulary a run reads) calls it.

The preference model (configs/preference_model.py) answers "x ‖ y1 ‖ y2" with one of two label
ids. `preference_labels` picks them from the run's vocabulary, in this order:

1. the ids (`preference.a_token` / `b_token`) or pieces (`preference.a_piece` / `b_piece`) the
   config gives;
2. the reserved pieces `<preference_a>` / `<preference_b>` (vocabularies this command trains);
3. the letters "A" / "B", when each tokenises to one known piece that decodes to the letter: T5's
   own vocabulary ("▁A", "▁B": the ids every earlier T5 preference model was trained with, and
   pieces a pretrained T5 already knows) and the demo's (user-defined "A" 3, "B" 4);
4. T5's sentinels `<extra_id_0>` / `<extra_id_1>`, where the vocabulary has them (loaded with
   extra ids) but no letters.

Two ids that are equal, the pad, eos or unk id, or outside the vocabulary are refused with a
one-line UserError naming the fix, before the run writes anything; so is a vocabulary where none
of 1-4 applies (e.g. a lowercase-only one trained elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import os
import sys
import uuid
from typing import Any, Iterable, Iterator, Sequence

from dro_jax import errors

T5_IDS = {"pad": 0, "eos": 1, "unk": 2}
TEXT_FIELDS = ("prompt", "response", "completion", "chosen", "rejected")
COMMAND = "python -m dro_jax.vocabulary --input DIR_OR_FILES --output PATH.model --vocab_size N"
SENTENCEPIECE_FLAGS = "pad_id=0 eos_id=1 unk_id=2 bos_id=-1"
DEFAULT_VOCAB_SIZE = 8000
DEFAULT_MAX_LINES = 2_000_000
FOLDER_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".text", ".md")
# The preference model's label pieces, reserved (ids 3 and 4) by the vocabulary this command trains.
PREFERENCE_PIECES = ("<preference_a>", "<preference_b>")
LETTER_LABELS = ("A", "B")
T5_SENTINEL_LABELS = ("<extra_id_0>", "<extra_id_1>")
LABELS_FIX = (f"fix: train the vocabulary with `{COMMAND}` (it reserves {PREFERENCE_PIECES[0]} "
              f"= 3 and {PREFERENCE_PIECES[1]} = 4), or name two distinct ordinary pieces with "
              f"--config.preference.a_token=ID --config.preference.b_token=ID")


# ---------------------------------------------------------------------------------- the ids


def ids_of(processor: Any) -> dict[str, int]:
  """{"pad", "eos", "unk"} ids of a sentencepiece processor (-1 where it has none)."""
  return {"pad": processor.pad_id(), "eos": processor.eos_id(), "unk": processor.unk_id()}


def check_t5_ids(processor: Any, path: str) -> None:
  """Refuses (UserError) a sentencepiece model whose pad, eos or unk id is not T5's 0, 1, 2."""
  ids = ids_of(processor)
  if ids == T5_IDS:
    return
  found = ", ".join(f"{name} {value}" for name, value in ids.items())
  raise errors.UserError(
      f"{path}: this sentencepiece vocabulary has {found}, but T5 needs pad 0, eos 1, unk 2 "
      f"(with other ids the policy never learns to stop); fix: train one with `{COMMAND}`, or "
      f"train it with the sentencepiece flags {SENTENCEPIECE_FLAGS}")


# ------------------------------------------------------------------ preference-model labels


@dataclasses.dataclass(frozen=True)
class PreferenceLabels:
  """The preference model's two label ids, their pieces, and which rule chose them."""
  a_token: int
  b_token: int
  a_piece: str
  b_piece: str
  source: str  # "config", "reserved pieces", "letters" or "T5 sentinels"

  def describe(self) -> str:
    return (f"A = id {self.a_token} {self.a_piece!r}, B = id {self.b_token} {self.b_piece!r} "
            f"({self.source})")


def _processor(vocabulary: Any) -> Any:
  """The sentencepiece processor of a seqio vocabulary (or the processor itself); else None."""
  for candidate in (vocabulary, getattr(vocabulary, "tokenizer", None)):
    if candidate is not None and hasattr(candidate, "piece_to_id"):
      return candidate
  return None


def vocabulary_size(vocabulary: Any) -> int:
  size = getattr(vocabulary, "vocab_size", None)
  if size is None:
    size = vocabulary.get_piece_size()
  return int(size() if callable(size) else size)


def special_ids(vocabulary: Any) -> dict[str, int]:
  """{"pad", "eos", "unk"}: the vocabulary's own ids (T5's where it does not say)."""
  found = {}
  for name, default in T5_IDS.items():
    value = getattr(vocabulary, f"{name}_id", default)
    value = value() if callable(value) else value
    found[name] = default if value is None else int(value)
  return found


def piece_of(vocabulary: Any, token: int) -> str:
  """The piece of id `token` (its decoded text where the vocabulary has no pieces)."""
  processor = _processor(vocabulary)
  if processor is not None and 0 <= token < processor.get_piece_size():
    return str(processor.id_to_piece(int(token)))
  try:
    return str(vocabulary.decode([int(token)]))
  except Exception:  # noqa: BLE001 (no text for it: the id speaks for itself)
    return f"#{token}"


def id_of_piece(vocabulary: Any, piece: str) -> int | None:
  """The id of `piece`, or None where the vocabulary has no such piece."""
  processor = _processor(vocabulary)
  if processor is None:
    return None
  token = int(processor.piece_to_id(piece))
  if token == special_ids(vocabulary)["unk"] and piece != processor.id_to_piece(token):
    return None
  return token


def _text_id(vocabulary: Any, text: str) -> int | None:
  """The id `text` tokenises to when it is one known piece that decodes to `text` (a lone
  word-start piece before it aside): "A" -> "▁A" in T5's vocabulary, "<extra_id_0>" -> its
  sentinel id where the vocabulary has extra ids."""
  ids = [int(token) for token in vocabulary.encode(text)]
  ids = [token for token in ids if piece_of(vocabulary, token) != "▁"]
  if len(ids) != 1 or ids[0] in special_ids(vocabulary).values():
    return None
  try:
    decoded = str(vocabulary.decode(ids)).strip()
  except Exception:  # noqa: BLE001
    return None
  return ids[0] if decoded == text else None


def default_preference_labels(vocabulary: Any) -> tuple[int, int, str] | None:
  """(a id, b id, rule): the first of the reserved pieces, the letters, T5's sentinels that the
  vocabulary has as two distinct known ids; None where it has none of them."""
  rules = (("reserved pieces", lambda piece: id_of_piece(vocabulary, piece), PREFERENCE_PIECES),
           ("letters", lambda letter: _text_id(vocabulary, letter), LETTER_LABELS),
           ("T5 sentinels", lambda sentinel: _text_id(vocabulary, sentinel), T5_SENTINEL_LABELS))
  for source, find, (first, second) in rules:
    a, b = find(first), find(second)
    if a is not None and b is not None and a != b:
      return a, b, source
  return None


def preference_labels(vocabulary: Any, *, a_token: int | None = None,
                      b_token: int | None = None, a_piece: str | None = None,
                      b_piece: str | None = None,
                      name: str = "the vocabulary") -> PreferenceLabels:
  """The preference model's two label ids in `vocabulary` (the module's docstring gives the
  order of the rules); refuses (UserError, one line) ids that are equal, the pad, eos or unk id,
  or outside the vocabulary, and a vocabulary that offers no two labels. `name` names the
  vocabulary in the messages."""
  size = vocabulary_size(vocabulary)
  chosen: dict[str, int | None] = {"a": a_token, "b": b_token}
  for side, piece in (("a", a_piece), ("b", b_piece)):
    if piece is None:
      continue
    token = id_of_piece(vocabulary, piece)
    if token is None:
      raise errors.UserError(
          f"config.preference.{side}_piece={piece!r}: {name} has no such piece; {LABELS_FIX}")
    if chosen[side] is not None and int(chosen[side]) != token:
      raise errors.UserError(
          f"config.preference.{side}_token={chosen[side]} and {side}_piece={piece!r} (id "
          f"{token}) name different labels; give one of the two")
    chosen[side] = token
  source = "config"
  if chosen["a"] is None or chosen["b"] is None:
    found = default_preference_labels(vocabulary)
    if found is None:
      raise errors.UserError(
          f"config.preference.a_token / b_token: {name} ({size} pieces) has no two preference "
          f"labels (no {PREFERENCE_PIECES[0]} / {PREFERENCE_PIECES[1]} pieces, no \"A\" / \"B\" "
          f"pieces, no T5 sentinels); {LABELS_FIX}")
    given = [side for side in "ab" if chosen[side] is not None]
    chosen = {"a": chosen["a"] if "a" in given else found[0],
              "b": chosen["b"] if "b" in given else found[1]}
    source = found[2] if not given else f"config and {found[2]}"
  a, b = int(chosen["a"]), int(chosen["b"])
  specials = {token: kind for kind, token in special_ids(vocabulary).items()}
  for side, token in (("a", a), ("b", b)):
    if not 0 <= token < size:
      raise errors.UserError(
          f"config.preference.{side}_token={token}: not an id of {name} (ids 0..{size - 1}); "
          f"{LABELS_FIX}")
    if token in specials:
      raise errors.UserError(
          f"config.preference.{side}_token={token}: the {specials[token]} id of {name}, not a "
          f"label the model can answer with; {LABELS_FIX}")
  if a == b:
    raise errors.UserError(
        f"config.preference.a_token and b_token are both {a} ({piece_of(vocabulary, a)!r} of "
        f"{name}): the model could never tell A from B; {LABELS_FIX}")
  return PreferenceLabels(a, b, piece_of(vocabulary, a), piece_of(vocabulary, b), source)


# ------------------------------------------------------------------------------- training


def train_sentencepiece(lines: Iterable[str], path: str, *, vocab_size: int,
                        model_type: str = "bpe", user_defined_symbols: Sequence[str] = (),
                        control_symbols: Sequence[str] = (),
                        character_coverage: float = 1.0) -> int:
  """Trains a sentencepiece model with T5's ids (pad 0, eos 1, unk 2, no bos) on `lines`, writes
  it to `path` (atomically; a local path or any path tf.io.gfile writes) and returns its size.
  `control_symbols` take the ids from 3 on, in order (the command passes PREFERENCE_PIECES).

  Deterministic (one thread); `vocab_size` is a ceiling for small corpora (hard_vocab_limit off).
  """
  import sentencepiece  # Imported here: the demo's judge alone needs no sentencepiece.
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type=model_type,
      vocab_size=vocab_size, pad_id=T5_IDS["pad"], eos_id=T5_IDS["eos"], unk_id=T5_IDS["unk"],
      bos_id=-1, hard_vocab_limit=False, user_defined_symbols=list(user_defined_symbols),
      control_symbols=list(control_symbols),
      character_coverage=character_coverage, num_threads=1, minloglevel=2)
  _write_atomically(path, model.getvalue())
  return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def _write_atomically(path: str, data: bytes) -> None:
  """Temporary file + rename: concurrent writers of the same deterministic content are safe."""
  if "://" in path:
    from dro_jax.data._tensorflow import tf
    with tf.io.gfile.GFile(path, "wb") as stream:
      stream.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(temporary, "wb") as stream:
    stream.write(data)
  os.replace(temporary, path)


# --------------------------------------------------------------------------------- corpus


def input_files(inputs: Sequence[str]) -> list[str]:
  """Files of folders (recursively, hidden ones left out), paths and glob patterns, in order."""
  import glob
  files = []
  for item in inputs:
    if os.path.isdir(item):
      for root, folders, names in os.walk(item):
        folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
        files += [os.path.join(root, name) for name in sorted(names)
                  if not name.startswith(".") and _read_in_folders(name)]
      continue
    matches = sorted(glob.glob(item)) if any(char in item for char in "*?[") else (
        [item] if os.path.isfile(item) else [])
    if not matches:
      raise errors.UserError(f"--input {item}: no such file or folder")
    files += matches
  return files


def _read_in_folders(name: str) -> bool:
  name = name.lower()
  return name.endswith(FOLDER_SUFFIXES) or (name.endswith(".gz") and not name.endswith(
      ".parquet.gz") and name.removesuffix(".gz").endswith(FOLDER_SUFFIXES))


def is_jsonl(path: str) -> bool:
  return path.lower().removesuffix(".gz").endswith((".jsonl", ".json"))


def _open_text(path: str):
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
  return open(path, encoding="utf-8", errors="replace")


def jsonl_texts(row: Any) -> list[str]:
  """The texts of one JSON record: its text fields, chat messages rendered as training does."""
  from dro_jax.data import records
  if not isinstance(row, dict):
    return []
  texts = []
  for name in TEXT_FIELDS:
    value = row.get(name)
    if value is None:
      continue
    try:
      text = records.as_text(value, name, is_response=name != "prompt")
    except records.RecordError:
      continue
    texts.append(text)
  return texts


def corpus_lines(files: Sequence[str], max_lines: int | None = None) -> Iterator[str]:
  """The training text of `files`: JSONL text fields, or the non-empty lines of other files."""
  count = 0
  for path in files:
    if path.lower().endswith(".parquet"):
      import pyarrow.parquet as pq  # Imported here: only parquet users pay for pyarrow.
      rows = (jsonl_texts(row) for row in pq.read_table(path).to_pylist())
      for piece in _lines(rows):
        yield piece
        count += 1
        if max_lines and count >= max_lines:
          return
      continue
    with _open_text(path) as stream:
      for piece in _lines(_file_texts(path, stream)):
        yield piece
        count += 1
        if max_lines and count >= max_lines:
          return


def _file_texts(path: str, stream) -> Iterator[list[str]]:
  """The texts of each non-empty line of a text or JSONL file."""
  for number, line in enumerate(stream, 1):
    if not line.strip():
      continue
    if not is_jsonl(path):
      yield [line.rstrip("\n")]
      continue
    try:
      yield jsonl_texts(json.loads(line))
    except json.JSONDecodeError as error:
      raise errors.UserError(f"{path}:{number}: malformed JSON ({error.msg}); a .jsonl file "
                             "holds one JSON object per line") from None


def _lines(texts: Iterable[list[str]]) -> Iterator[str]:
  """sentencepiece reads a sentence per line: each text's non-empty lines."""
  for group in texts:
    for text in group:
      for piece in text.splitlines():
        if piece.strip():
          yield piece


# ---------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m dro_jax.vocabulary", description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--input", nargs="+", required=True, help="folders, files or glob patterns: JSONL (their "
      f"{'/'.join(TEXT_FIELDS)} fields) or text (their lines)")
  add("--output", required=True, help="the sentencepiece model to write, e.g. spiece.model")
  add("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE,
      help=f"pieces at most (a small corpus may give fewer; default {DEFAULT_VOCAB_SIZE})")
  add("--model_type", default="unigram", choices=("unigram", "bpe", "char", "word"),
      help="sentencepiece's algorithm (T5's is unigram)")
  add("--character_coverage", type=float, default=1.0,
      help="share of characters covered; 0.9995 for scripts with many rare characters")
  add("--max_lines", type=int, default=DEFAULT_MAX_LINES,
      help="train on at most this many lines, the first ones")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Trains the vocabulary; returns its number of pieces."""
  args = parse_args(argv)
  if args.vocab_size < 8:
    raise errors.UserError(f"--vocab_size {args.vocab_size}: give at least 8 pieces")
  output = os.path.abspath(args.output)
  files = [path for path in input_files(args.input) if os.path.abspath(path) != output]
  if not files:
    raise errors.UserError(f"--input {' '.join(args.input)}: no files there")
  lines = list(corpus_lines(files, args.max_lines))
  if not lines:
    raise errors.UserError(f"--input {' '.join(args.input)}: no text in {len(files)} file(s) "
                           f"(JSONL needs one of the fields {', '.join(TEXT_FIELDS)})")
  try:
    size = train_sentencepiece(lines, args.output, vocab_size=args.vocab_size,
                               model_type=args.model_type,
                               control_symbols=PREFERENCE_PIECES,
                               character_coverage=args.character_coverage)
  except RuntimeError as error:  # sentencepiece's own refusals (e.g. too few characters)
    raise errors.UserError(f"sentencepiece could not train on {len(lines)} lines: "
                           f"{errors.one_line(error)}") from error
  rounded = -(-size // 128) * 128  # T5's embeddings are a multiple of 128 rows
  labels = " and ".join(f"{piece} {token}" for token, piece in enumerate(PREFERENCE_PIECES, 3))
  print(f"wrote {args.output}: {size} pieces (pad 0, eos 1, unk 2; preference-model labels "
        f"{labels}) from {len(lines)} lines of "
        f"{len(files)} file(s); train with --config.data.vocabulary={args.output} (a model "
        f"trained from scratch needs --config.model.vocab_size of at least {size}, e.g. "
        f"{rounded})", flush=True)
  return size


def run() -> None:
  """The command line: a user's mistake is one line on stderr and exit status 2."""
  try:
    main()
  except errors.UserError as error:
    if errors.traceback_wanted(sys.argv):
      raise
    print(f"error: {errors.one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_CODE)


if __name__ == "__main__":
  run()

"""The shared base of the recipes in `configs/`: every key a run reads, with its default.

A recipe is `get_config(arg)` where `arg` is comma-separated `key=value` pairs (big_vision's
convention), e.g. `configs/dro.py:size=large,value=double_single,tau=0.5`. `parse_arg` fails on
an arg the recipe does not know, naming it. The returned ConfigDict is locked: a mistyped
`--config.x=...` override fails naming the key. Fields without a default are
`placeholder(type)`, so they can still be set from the command line.

Where each value came from (`origins`, shown by --print_config): "default" (base_config),
"recipe" (the recipe file), "recipe arg" (its `:k=v` args), "size preset" (what `size=` fills in,
only into keys still at their default), "command line" (`--config.x=...`), "init checkpoint" (the
model's dimensions, read from `init_checkpoint`), or "set after loading" (changed in code).
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Iterable, Mapping

import ml_collections
from ml_collections import config_dict

from dro_jax import optim, reference

SIZES = ("tiny", "small", "base", "large", "xl", "xxl")
FAMILIES = ("t5_1_1", "flan_t5", "t5_1_0")
TRUST_REGIONS = {"none": "frozen", "soft": "soft", "hard": "hard", "hybrid": "trl"}
COMMON_ARGS = {"size": "tiny", "family": "t5_1_1", "tr": "none", "task": "", "steps": "",
               "batch": "", "lr": "", "init": "", "alpha": "", "sync_every": ""}


# ---------------------------------------------------------------------------------- provenance

ORIGINS = ("default", "recipe", "recipe arg", "size preset", "command line", "init checkpoint")
CHANGED = "set after loading"  # a value that differs from the one its origin recorded
# id(config) -> (a weak reference to it, {dotted key: (origin, value it was given)}).
_PROVENANCE: dict[int, tuple[Any, dict[str, tuple[str, Any]]]] = {}


def _records(config: ml_collections.ConfigDict, create: bool = False
             ) -> dict[str, tuple[str, Any]] | None:
  entry = _PROVENANCE.get(id(config))
  if entry is not None and entry[0]() is config:
    return entry[1]
  if not create:
    return None
  key = id(config)
  records: dict[str, tuple[str, Any]] = {}
  _PROVENANCE[key] = (weakref.ref(config, lambda _: _PROVENANCE.pop(key, None)), records)
  return records


def _values(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {key: value for key, value, _ in flat_items(config)}


def mark(config: ml_collections.ConfigDict, origin: str,
         keys: Iterable[str] | None = None) -> None:
  """Records `origin` for `keys` (dotted) at their current values; None: every key whose value
  differs from the one recorded (or that has no record yet)."""
  records = _records(config, create=True)
  values = _values(config)
  if keys is None:
    keys = [key for key, value in values.items()
            if key not in records or records[key][1] != value]
  for key in keys:
    if key in values:
      records[key] = (origin, values[key])


def origins(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{dotted key: where its value came from} (ORIGINS, or CHANGED); {} for a config that was not
  made by a recipe here (a copy, a config.json)."""
  records = _records(config)
  if records is None:
    return {}
  result = {}
  for key, value in _values(config).items():
    origin, recorded = records.get(key, (CHANGED, None))
    result[key] = origin if recorded == value else CHANGED
  return result


def origin(config: ml_collections.ConfigDict, key: str) -> str | None:
  """Where `config`'s dotted `key` got its value; None when the config has no record."""
  return origins(config).get(key)


def _set(config: ml_collections.ConfigDict, key: str, value: Any, origin_name: str) -> None:
  target = config
  *parents, leaf = key.split(".")
  for parent in parents:
    target = target[parent]
  target[leaf] = value
  mark(config, origin_name, [key])


def apply_size_preset(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> list[str]:
  """Sets each dotted key of `values` where the key still holds its default (what base_config
  gave it), and marks it "size preset"; a value the recipe, its args or anyone else set stays.
  Returns the keys it set."""
  mark(config, "recipe")  # what the recipe changed so far is the recipe's
  current = origins(config)
  applied = []
  for key, value in values.items():
    if current.get(key) == "default":
      _set(config, key, value, "size preset")
      applied.append(key)
  return applied


def command_line_keys(argv: Iterable[str], flag: str = "config") -> list[str]:
  """The dotted keys that `--config.KEY=...` / `--config.KEY VALUE` overrides in `argv` name."""
  keys = []
  for word in argv:
    for prefix in (f"--{flag}.", f"-{flag}."):
      if word.startswith(prefix):
        keys.append(word[len(prefix):].split("=", 1)[0])
        break
  return keys


# ------------------------------------------------------------------------- recipes and paths


def display_path(path: str) -> str:
  """`path` as the user can type it from the working folder: relative when under it, else
  absolute."""
  absolute = os.path.abspath(path)
  try:
    relative = os.path.relpath(absolute)
  except ValueError:  # another drive
    return absolute
  return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def recipe_path(name: str) -> str:
  """The repository's `configs/NAME.py`, as display_path shows it."""
  import pathlib
  return display_path(str(pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"))


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/NAME.py`'s get_config(arg), for notebooks, benchmarks and tests."""
  import importlib.util
  import pathlib
  path = pathlib.Path(name)
  if not path.suffix:
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"dro_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def recipes(directory: str | None = None) -> list[str]:
  """The recipe files of `configs/` (the repository's, or `directory`), as paths that exist from
  the working folder (display_path)."""
  import pathlib
  folder = pathlib.Path(directory) if directory else (
      pathlib.Path(__file__).resolve().parents[1] / "configs")
  return sorted(display_path(str(path)) for path in folder.glob("*.py")
                if not path.name.startswith("_"))


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any, str]]:
  """(dotted key, value, type name) of every leaf of `config`, placeholders (None) included."""
  rows = []
  for key in sorted(config.keys()):
    field = config._fields[key]  # pylint: disable=protected-access
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      rows += flat_items(value, f"{prefix}{key}.")
      continue
    kind = field.get_type() if isinstance(field, config_dict.FieldReference) else type(value)
    rows.append((f"{prefix}{key}", value, getattr(kind, "__name__", str(kind))))
  return rows


def describe(config: ml_collections.ConfigDict) -> str:
  """Every key with its value, one per line, as --print_config shows: `key = value  # type,
  origin` (origins(); the type alone for a config without a record)."""
  rows = flat_items(config)
  sources = origins(config)
  width = max(len(key) for key, _, _ in rows)
  return "\n".join(f"{key:<{width}} = {value!r}  # {kind}"
                   + (f", {sources[key]}" if key in sources else "")
                   for key, value, kind in rows)


def closest_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """The dotted key of `config` nearest to `key` (difflib), or None when nothing is close."""
  import difflib
  keys = [name for name, _, _ in flat_items(config)]
  keys += sorted({name.rsplit(".", 1)[0] for name in keys if "." in name})
  leaf = key.rsplit(".", 1)[-1]
  matches = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  if not matches:  # the right leaf under the wrong parent, e.g. optimizer.beta for dpo.beta
    matches = [name for name in keys if name.rsplit(".", 1)[-1] == leaf][:1]
  if not matches:
    by_leaf = {name.rsplit(".", 1)[-1]: name for name in keys}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    matches = [by_leaf[close[0]]] if close else []
  return matches[0] if matches else None


def parse_arg(arg: str | None, recipe: str, **defaults: Any) -> ml_collections.ConfigDict:
  """`k=v,k=v` -> ConfigDict of the recipe's args (common ones included); unknown keys fail."""
  known = {**COMMON_ARGS, **defaults}
  values = dict(known)
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"{recipe_path(recipe)}: arg {item!r} is not key=value")
    key, value = (part.strip() for part in item.split("=", 1))
    if key not in known:
      raise ValueError(f"{recipe_path(recipe)}: unknown arg {key!r}; known args: {sorted(known)}")
    values[key] = type(known[key])(value) if known[key] != "" else value
  if values["size"] not in SIZES:
    raise ValueError(f"arg size={values['size']!r}: choose from {SIZES}")
  if values["family"] not in FAMILIES:
    raise ValueError(f"arg family={values['family']!r}: choose from {FAMILIES}")
  if values["tr"] not in TRUST_REGIONS:
    raise ValueError(f"arg tr={values['tr']!r}: choose from {sorted(TRUST_REGIONS)}")
  return ml_collections.ConfigDict(values)


def preset_name(family: str, size: str) -> str:
  if size == "tiny":
    return "t5_1_0_tiny" if family == "t5_1_0" else "t5_1_1_tiny"
  return f"{family}_{size}"


def base_config(loss: str, args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every key of a run; recipes change the defaults they need, then `finalize`."""
  placeholder = config_dict.placeholder
  config = ml_collections.ConfigDict()
  config.loss = loss
  config.runner = "train"
  config.seed = 0
  config.total_steps = 20_000
  config.batch_size = 32
  config.num_microbatches = 1
  config.checkpoint_every = 1000
  config.eval_every = 1000
  config.eval_batches = 4
  config.log_every = 50
  config.keep_last = 3
  config.keep_best = 1
  config.best_metric = "eval/loss"
  config.best_mode = "min"
  config.mesh_shape = (-1, 1, 1)  # (data, fsdp, model); -1 takes the remaining devices
  config.logical_axis_rules = placeholder(tuple)
  config.compute_dtype = placeholder(str)  # default: the preset's (bfloat16; float32 for tiny)
  config.max_input_length = 512
  config.max_target_length = 256
  # An HF folder, a T5X checkpoint_N folder, or a dro_jax workdir (its latest policy).
  config.init_checkpoint = placeholder(str)
  config.on_nonfinite = "stop"  # or "skip"
  config.max_consecutive_skips = 5
  # A frozen reference's log-probs computed once, looked up by example_id (reference_cache.py):
  # "auto" whenever valid, "on" (refused when the reference moves), or "off" (in the step).
  config.reference_cache = "auto"
  # Resuming a workdir with a config that changes what is trained is refused (dro_jax/resume.py);
  # True accepts the change on purpose (the old config is kept as config.<n>.json).
  config.accept_config_change = False

  config.model = ml_collections.ConfigDict({
      "preset": preset_name(args.family, args.size),
      "vocab_size": placeholder(int), "emb_dim": placeholder(int),
      "num_heads": placeholder(int), "head_dim": placeholder(int),
      "num_encoder_layers": placeholder(int), "num_decoder_layers": placeholder(int),
      "mlp_dim": placeholder(int), "mlp_activations": placeholder(tuple),
      "logits_via_embedding": placeholder(bool), "dropout_rate": 0.0,
      # Memory / speed levers (T5Config's docs): "none" | "minimal" | "full"; scanned layer
      # stacks; "xla" | "cudnn" | "auto" attention.
      "remat": "none", "scan_layers": False, "attention": "xla",
  })
  config.optimizer = optim.default_config()
  config.optimizer.value_learning_rate = placeholder(float)
  # A "cosine" / "linear" schedule decays over decay_steps; unset: total_steps − warmup_steps.
  config.optimizer.decay_steps = placeholder(int)
  preset = reference.PRESETS[TRUST_REGIONS[args.tr]]
  # dtype: of the reference copy in the state; "bfloat16" halves it, frozen or hard sync only.
  config.reference = ml_collections.ConfigDict(
      {"alpha": float(preset["alpha"]), "sync_every": int(preset["sync_every"]),
       "dtype": "float32"})
  # value_optimizer: the chain of a single-net variant's value parameters (optim.py).
  # "value": the value chain (its own learning rate, absolute steps for the zero-initialised
  # head / scalar, no 1/τ); single_single then trains exactly as double_single (both one scalar
  # on the value chain; they differ only if value_loss_weight != 1). "policy": the POLICY's chain
  # (policy learning rate, DRO's 1/τ, Adafactor's parameter-scaled step, one clip over both), as
  # the DRO paper's single-net ablation. Double-net variants keep their own value network and
  # value chain under either setting.
  config.dro = ml_collections.ConfigDict(
      {"tau": 1.0, "value_function": "double_multiple", "value_loss_weight": 1.0,
       "value_optimizer": "value"})
  config.kto = ml_collections.ConfigDict(
      {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0})
  config.dpo = ml_collections.ConfigDict({"beta": 0.1, "label_smoothing": 0.0})
  config.ipo = ml_collections.ConfigDict({"tau": 0.1})
  # The preference model's two label ids, or pieces; unset: chosen from the run's vocabulary
  # (dro_jax.vocabulary.preference_labels), and config.json records both ids and pieces.
  config.preference = ml_collections.ConfigDict(
      {"a_token": placeholder(int), "b_token": placeholder(int),
       "a_piece": placeholder(str), "b_piece": placeholder(str)})
  # Judged evaluation every eval_every steps (periodic_evaluation.py); off without a judge.
  config.evaluation = ml_collections.ConfigDict({
      # A judge spec (dro_jax.judges): demo, reward_model:DIR, preference_model:DIR,
      # noisy:P:SPEC, noisy_persistent:P:SPEC, api:MODEL@BASE_URL, a registered name, or
      # module:factory.
      "judge": placeholder(str),
      # api:MODEL@BASE_URL judges (the online oracle's too; docs/llm_judges.md): the judging
      # prompt (a file with {prompt}, {response_a}, {response_b}; default: the package's),
      # requests in flight at most, the most requests the evaluation's judge may pay for over
      # the cache's life (0: no cap; reached: exit 3), and the verdict cache (SQLite; default
      # <workdir>/judge_cache.sqlite where the run has a workdir, else in memory).
      "judge_template": placeholder(str),
      "judge_max_concurrency": 8,
      "judge_max_calls": 0,
      "judge_cache": placeholder(str),
      "debias": True,  # ask a non-symmetric judge in both orders and average
      "baseline": placeholder(str),  # workdir / HF / T5X folder; default: init_checkpoint
      "prompts": 200, "samples": 1, "temperature": 1.0,
      "max_decode_length": placeholder(int),  # default: max_target_length
  })
  config.data = ml_collections.ConfigDict({
      # True: the run is on the embedded demo task (configs/demo.py, demo_online.py, online.py at
      # size=tiny without init or task); data of the user's own beside it is refused. A training
      # recipe given no data at all trains on the demo task and records True in config.json.
      "demo": False,
      "task": placeholder(str),  # a registered seqio Task or Mixture; None: the demo task
      # default: data.task; with data.eval_files, the Task made from the files (their split
      # data.eval_split: eval/ metrics and held-out prompts of judged evaluation)
      "eval_task": placeholder(str),
      "eval_split": "validation",
      "train_files": placeholder(str),  # files (comma-separated) read with data.adapter
      "eval_files": placeholder(str),  # held-out files, read as data.train_files
      "adapter": placeholder(str),  # a function name in dro_jax.data.adapters, e.g. ultrafeedback_triples
      # The sentencepiece model of data.train_files, with T5's ids (pad 0, eos 1, unk 2; others
      # are refused): `python -m dro_jax.vocabulary --input DIR --output PATH.model` trains one.
      "vocabulary": placeholder(str),
      # Record fields under other names than the defaults (data.train_files / eval_files), as
      # comma-separated canonical:field pairs, e.g. "label:thumbs,response:answer" (dotted fields
      # reach into nested objects; with data.adapter, names in its output). Canonical names:
      # prompt, response, reward, label (single responses); prompt, chosen, rejected (pairs).
      # For KTO, records that carry a label (this field, or "label") are thumbs data: the label
      # is each example's desirability as given, not a reward compared with the batch mean.
      "fields": placeholder(str),
      "register_module": placeholder(str),  # a module imported first; it registers the Tasks
      "reward_mode": "raw",
      "shuffle": True,
      # Prompts / responses over max_input_length / max_target_length (train_files data): True
      # cuts them (a prompt keeps its end, a response its start) and warns with the share cut;
      # False refuses the first one (its file, line and length).
      "truncate": True,
      "cache_dir": placeholder(str),  # demo data cache (default: dro_jax's)
  })
  mark(config, "default")
  mark(config, "size preset", ["model.preset"])  # from the recipe's size and family args
  return config


# What size=tiny fills in (keys still at their default only): a model that trains on a laptop
# CPU in seconds, short sequences, frequent logs.
TINY_PRESET = {"max_input_length": 16, "max_target_length": 12, "batch_size": 16,
               "total_steps": 200, "checkpoint_every": 100, "eval_every": 100, "log_every": 10,
               "eval_batches": 2}


def finalize(config: ml_collections.ConfigDict,
             args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies the common args (task, steps, batch, lr, init, alpha, sync_every) and the size
  preset (into the keys still at their default); locks it."""
  mark(config, "recipe")
  for arg, key, kind in (("task", "data.task", str), ("steps", "total_steps", int),
                         ("batch", "batch_size", int), ("lr", "optimizer.learning_rate", float),
                         ("init", "init_checkpoint", str), ("alpha", "reference.alpha", float),
                         ("sync_every", "reference.sync_every", int)):
    if args[arg]:
      _set(config, key, kind(args[arg]), "recipe arg")
  if args.size == "tiny":
    apply_size_preset(config, TINY_PRESET)
  config.lock()
  return config

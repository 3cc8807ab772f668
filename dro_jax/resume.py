"""Resuming a workdir safely: the new command must be the run the workdir holds.

Before a run writes anything, its resolved config is compared with the workdir's `config.json`
(both as JSON). A different recipe (`loss`, `runner`) is refused, naming both. Other changes are
refused too, naming each key with its old and new value, unless every changed key is one that
does not change what is trained (`ALLOWED`: the run's length, logging, checkpointing and
evaluation settings) or the command says `--config.accept_config_change=True`, which keeps the
previous file as `config.<n>.json`. Nothing in the workdir is touched by a refusal.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from dro_jax import files

# Keys (or key prefixes, ending in ".") a resumed run may change freely.
ALLOWED = ("total_steps", "eval_every", "eval_batches", "checkpoint_every", "log_every",
           "keep_last", "keep_best", "best_metric", "best_mode", "on_nonfinite",
           "max_consecutive_skips", "evaluation.", "data.cache_dir", "accept_config_change",
           # auto / on / off: a state that then lacks its reference is refused by name when it
           # is restored (reference_cache.py), switching between auto and on is harmless.
           "reference_cache",
           # what the label ids are, for the record (the ids themselves are compared)
           "preference.a_piece", "preference.b_piece",
           # whether the run is on the demo task follows from its data, which is compared
           # (datasets.resolve_demo records it; a config.json from before has none)
           "data.demo",
           # the oracle's budget of paid calls: raised to go on after it stopped a run
           "online.oracle_max_calls")
RECIPE_KEYS = ("loss", "runner")
# Keys added with a default that changed the behaviour: a config.json without one was trained
# with this value (a function of that config), so a resume at today's default is refused by name.
LEGACY = {"online.enhancer": lambda old: "shared", "online.labels": lambda old: "threshold",
          "online.debias": lambda old: flatten(old).get("evaluation.debias", True)}
MISSING = object()


class ConfigChangeError(ValueError):
  """The command's config differs from the workdir's in a way that would change the run."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"optimizer.learning_rate": 0.001, ...} from nested dicts (lists kept as values)."""
  if isinstance(tree, dict):
    flat: dict[str, Any] = {}
    for key, value in tree.items():
      flat.update(flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def _allowed(key: str) -> bool:
  return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in ALLOWED)


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """(key, old, new) for every leaf that differs (MISSING where a side lacks it), sorted."""
  old_flat, new_flat = flatten(old), flatten(new)
  return [(key, old_flat.get(key, MISSING), new_flat.get(key, MISSING))
          for key in sorted(set(old_flat) | set(new_flat))
          if old_flat.get(key, MISSING) != new_flat.get(key, MISSING)]


def _show(value: Any) -> str:
  return "(absent)" if value is MISSING else json.dumps(value)


def _recipe(config: dict[str, Any]) -> str:
  loss, runner = config.get("loss"), config.get("runner", "train")
  return f"{loss} (configs/{loss}.py)" if runner == "train" else f"{runner} runner ({loss})"


def check(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, Any, Any]]:
  """Raises ConfigChangeError when `config` may not resume `workdir`; else the accepted changes
  (empty for a new workdir or an unchanged config). Reads only."""
  path = os.path.join(workdir, "config.json")
  old = files.read_json(path)
  if old is None:
    return []
  if not isinstance(old, dict):
    raise ConfigChangeError(f"{path} is not a config (a JSON object); is {workdir} a dro_jax "
                            f"workdir?")
  new = config_json(config)
  for key in RECIPE_KEYS:
    if old.get(key, "train" if key == "runner" else None) != new.get(
        key, "train" if key == "runner" else None):
      raise ConfigChangeError(
          f"{workdir} holds a {_recipe(old)} run, and this command trains {_recipe(new)}: "
          f"refusing to mix them; give this run its own --workdir")
  defaults = _defaults(new)
  if old.get("runner") == "online":
    flat_old = flatten(old)
    for key, legacy in LEGACY.items():
      if key not in flat_old:
        defaults.pop(key, None)  # absent: it was trained with the legacy behaviour
        node, (*parents, leaf) = old, key.split(".")
        for parent in parents:
          node = node.setdefault(parent, {})
        node[leaf] = legacy(old)
  differing = [(key, before, after) for key, before, after in changes(old, new)
               if not _allowed(key)
               # A key the workdir's config predates, at its default: the behaviour it had.
               and not (before is MISSING and key in defaults and defaults[key] == after)]
  if differing and not config.get("accept_config_change", False):
    listed = "; ".join(f"{key}: {_show(before)} -> {_show(after)}"
                       for key, before, after in differing)
    raise ConfigChangeError(
        f"{workdir} was trained with another config ({path}); changed: {listed}. Resume with "
        f"the same settings, start a fresh run with another --workdir, or accept the change on "
        f"purpose with --config.accept_config_change=True (the old config is kept as "
        f"config.<n>.json)")
  return differing


def _defaults(new: dict[str, Any]) -> dict[str, Any]:
  """The flattened default config of the new run's loss (for keys an older config lacks)."""
  from dro_jax import configs
  try:
    loss = new.get("loss")
    return flatten(config_json(configs.base_config(loss, configs.parse_arg(None, loss))))
  except Exception:  # noqa: BLE001 (no defaults known: every absent key counts as changed)
    return {}


def keep_previous(workdir: str) -> str | None:
  """Copies config.json to the first free config.<n>.json (before an accepted change)."""
  text = files.read_text(os.path.join(workdir, "config.json"))
  if text is None:
    return None
  number = 1
  while files.gfile().exists(os.path.join(workdir, f"config.{number}.json")):
    number += 1
  path = os.path.join(workdir, f"config.{number}.json")
  files.write_text(path, text)
  return path

"""A judge spec checked before anything is loaded: its form, and that what it names exists.

`check(spec, flag)` raises a one-line `UserError` naming the flag (or config key) for a spec that
cannot work: an empty one, an unknown name, a `reward_model:DIR` / `preference_model:DIR` whose
DIR is not a workdir of that recipe (or a step folder of one), `noisy:P:SPEC` or
`noisy_persistent:P:SPEC` with P outside [0, 1] (or an inner SPEC that cannot work), an
`api:MODEL@BASE_URL` not of that form (the endpoint is reached when the judge is built), a
`module:factory` whose module does not import or has no such callable. Nothing is
built: no network is restored and no factory is called (`judges.judge_from_spec` does that), so
the command lines check their judge first and load their policies after.
"""

from __future__ import annotations

import importlib
import json
import os

from dro_jax import errors

LEARNED = ("reward_model", "preference_model")


def forms() -> str:
  """The spec forms and the registered names, for messages."""
  from dro_jax import judges
  return (f"one of {', '.join(judges.SPEC_FORMS)}; registered: "
          f"{', '.join(sorted(judges.JUDGES)) or 'none'}")


def _learned_workdir(path: str) -> str | None:
  """The workdir of `path` (a workdir, or `<workdir>/checkpoints/<step>`), read without JAX."""
  path = path.rstrip("/")
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints":
    workdir = os.path.dirname(parent)
    return workdir if os.path.exists(os.path.join(workdir, "config.json")) else None
  if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(
      os.path.join(path, "config.json")):
    return path
  return None


def check(spec: str, flag: str = "--judge") -> None:
  """Raises UserError naming `flag` when `spec` cannot name a judge (see the module docstring)."""
  if not isinstance(spec, str) or not spec.strip():
    raise errors.UserError(f"{flag}: give a judge spec, {forms()}")
  spec = spec.strip()
  head, _, rest = spec.partition(":")
  if head in LEARNED and rest:
    if "://" in rest:  # a bucket: its files are read when the judge is built
      return
    if not os.path.exists(rest):
      raise errors.UserError(f"{flag} {spec}: {rest} does not exist; give the workdir of a "
                             f"configs/{head}.py run (or one step folder of it)")
    workdir = _learned_workdir(rest)
    if workdir is None:
      raise errors.UserError(f"{flag} {spec}: {rest} is not a dro_jax workdir (no checkpoints/ "
                             f"beside config.json) or a step folder of one; train it with "
                             f"configs/{head}.py")
    try:
      with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        loss = json.load(f).get("loss")
    except (OSError, ValueError) as error:
      raise errors.UserError(f"{flag} {spec}: {workdir}/config.json cannot be read "
                             f"({errors.one_line(error)})") from error
    if loss != head:
      raise errors.UserError(f"{flag} {spec}: {workdir} is a {loss} workdir, not a {head} one; "
                             f"train it with configs/{head}.py")
    return
  if head == "api":
    from dro_jax import api_judge
    if api_judge.parse_spec(spec) is None:
      raise errors.UserError(f"{flag} {spec}: expected {api_judge.FORM}, e.g. "
                             f"api:gpt-4o-mini@https://api.openai.com/v1 (the key from "
                             f"${api_judge.KEY_ENV})")
    return
  if head in ("noisy", "noisy_persistent") and rest:
    from dro_jax import judges
    parsed = judges.noisy_parts(rest)
    if parsed is None:
      raise errors.UserError(f"{flag} {spec}: {judges.noisy_form(head)}")
    check(parsed[1], f"{flag} {spec}:")  # the inner spec's problem, named inside the whole
    return
  from dro_jax import judges
  if spec in judges.JUDGES:
    return
  if rest:
    try:
      module = importlib.import_module(head)
    except ImportError as error:
      raise errors.UserError(f"{flag} {spec}: cannot import module {head!r} "
                             f"({errors.one_line(error)}); put it on PYTHONPATH, or give "
                             f"{forms()}") from error
    if not callable(getattr(module, rest, None)):
      raise errors.UserError(f"{flag} {spec}: module {head!r} has no callable {rest!r}")
    return
  raise errors.UserError(f"{flag} {spec}: unknown judge; {forms()}")

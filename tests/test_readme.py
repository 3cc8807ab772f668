"""Every Python snippet of the README runs as written (those marked `# not run` excepted)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_runnable_snippets():
  runnable = [code for code in snippets() if not code.startswith("# not run")]
  assert len(runnable) >= 2
  assert all(code.startswith("# not run here: ") for code in snippets() if code.startswith("# not"))


def test_readme_snippets_run_in_order(demo_cache, monkeypatch):
  from dro_jax.data import synthetic
  monkeypatch.setattr(synthetic, "DEFAULT_CACHE_DIR", demo_cache)  # the session's demo data
  namespace: dict = {}
  for code in snippets():
    if code.startswith("# not run"):
      continue
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
  assert float(namespace["loss"]) >= 0.0
  assert len(namespace["texts"]) == 4 and all(isinstance(t, str) for t in namespace["texts"])
  assert namespace["out"].tokens.shape[0] == 8 * 4

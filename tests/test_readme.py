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


def test_each_readme_snippet_runs_on_its_own(demo_cache, monkeypatch):
  """Each snippet in a fresh namespace, as a reader pastes it: none leans on an earlier one."""
  from dro_jax.data import synthetic
  monkeypatch.setattr(synthetic, "DEFAULT_CACHE_DIR", demo_cache)  # the session's demo data
  results = []
  for code in snippets():
    if code.startswith("# not run"):
      continue
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    results.append(namespace)
  losses = [namespace["loss"] for namespace in results if "loss" in namespace]
  assert losses and float(losses[0]) >= 0.0
  sampled = [namespace for namespace in results if "texts" in namespace]
  assert len(sampled) == 1
  assert len(sampled[0]["texts"]) == 4 and all(isinstance(t, str) for t in sampled[0]["texts"])
  assert sampled[0]["out"].tokens.shape[0] == 8 * 4


def test_the_readme_names_only_files_the_repository_holds():
  """Links and backticked paths in the README point at files here (no SPEC.md, DATASETS.md)."""
  root = README.parent
  text = README.read_text()
  for name in re.findall(r"\]\(([\w./-]+\.(?:md|py|png|ipynb))\)", text):
    assert (root / name).exists(), name
  for name in re.findall(r"`((?:docs|configs|benchmarks|notebooks|dro_jax|tests|launch)/[\w./-]+)`",
                         text):
    if "<" in name or "*" in name or name.endswith("/"):
      continue
    assert (root / name).exists(), name
  assert "SPEC.md" not in text and "DATASETS.md" not in text

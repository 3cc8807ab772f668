"""Every Python snippet of the README and the docs pages runs as written (those marked `# not run`
excepted), every shell command is run by a named test or says why not, and the pages name only
files here."""

import re

import pytest

import readme_commands

README = readme_commands.README


def snippets() -> list[str]:
  return [code for page in readme_commands.pages()
          for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_the_readme_has_runnable_snippets():
  runnable = [code for code in snippets() if not code.startswith("# not run")]
  assert len(runnable) >= 2
  assert all(code.startswith("# not run here: ") for code in snippets() if code.startswith("# not"))


@pytest.mark.slow
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


@pytest.mark.parametrize("page", readme_commands.pages(), ids=lambda page: page.name)
def test_the_pages_name_only_files_the_repository_holds(page):
  """Links (relative to the page) and backticked paths (relative to the root) in the README and
  the docs pages point at files here (no SPEC.md, DATASETS.md)."""
  root = readme_commands.ROOT
  text = page.read_text()
  for name in re.findall(r"\]\(([\w./-]+\.(?:md|py|png|ipynb|json))(?:#[\w-]*)?\)", text):
    assert (page.parent / name).exists(), (page.name, name)
  for name in re.findall(r"`((?:docs|configs|benchmarks|notebooks|dro_jax|tests|launch)/[\w./-]+)`",
                         text):
    if "<" in name or "*" in name or name.endswith("/"):
      continue
    assert (root / name).exists(), (page.name, name)
  assert "SPEC.md" not in text and "DATASETS.md" not in text



def test_the_readme_is_a_short_front_door_that_links_every_docs_page():
  """The README stays under 250 lines, starts with the two commands, and links every docs page
  (the rest of the documentation lives there), each of which exists."""
  text = README.read_text()
  assert len(text.splitlines()) < 250, len(text.splitlines())
  first = [command for command, _ in readme_commands.page_commands(README)[:2]]
  assert first[0].startswith("python3 -m venv") and first[1].startswith("python -m pytest tests")
  linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", text))
  docs = {f"docs/{page.name}" for page in (readme_commands.ROOT / "docs").glob("*.md")}
  assert docs <= linked, f"docs pages the README does not link: {sorted(docs - linked)}"
  assert linked <= docs, f"README links to docs pages that do not exist: {sorted(linked - docs)}"


# Each README command not marked "# not run here: ..." and the test file that runs it, found there
# by the same prefix (tests/readme_commands.py).
RUN_BY = {
    "python3 -m venv": "tests/test_demo.py",  # the install is .ci/run's (checked below)
    "python -m pytest": ".ci/run",
    "pip install -e": ".ci/run",
    "python -m dro_jax.evaluate": "tests/test_demo.py",
    "python -m dro_jax.export": "tests/test_demo.py",
    "python -m dro_jax.sample": "tests/test_demo.py",
    "python -m dro_jax.main --config configs/dro.py:size=tiny,value=": "tests/test_readme_recipes.py",
    "python -m dro_jax.main --config configs/sft.py:size=tiny --workdir /tmp/sft":
        "tests/test_readme_recipes.py",
    "python -m dro_jax.main --config configs/dro.py:size=tiny,init=": "tests/test_readme_recipes.py",
    "python -m dro_jax.main --config configs/dpo.py:size=tiny,tr=soft":
        "tests/test_readme_recipes.py",
    "python -m dro_jax.vocabulary": "tests/test_own_data.py",
    "python -m dro_jax.main --config configs/sft.py:size=tiny --workdir /tmp/own_sft":
        "tests/test_own_data.py",
    "python -m dro_jax.main --config configs/kto.py:size=tiny,init=/tmp/own_sft":
        "tests/test_own_data.py",
    "python -m dro_jax.main --config configs/sft.py:size=tiny,steps=300,batch=32":
        "tests/test_online_own_task.py",
    "python -m dro_jax.main --config configs/online.py:size=tiny,init=/tmp/polite_sft":
        "tests/test_online_own_task.py",
    "python -m dro_jax.main --config configs/online.py:size=tiny,init=/tmp/my_t5":
        "tests/test_online_own_task.py",
}


def test_every_readme_command_is_run_by_a_test_or_says_why_not():
  root = README.parent
  for command, comments in readme_commands.commands():
    if readme_commands.exempt(comments):
      reason = next(c for c in comments if c.startswith(readme_commands.NOT_RUN))
      assert len(reason) > len(readme_commands.NOT_RUN) + 10, command
      continue
    owners = [prefix for prefix in RUN_BY if command.startswith(prefix)]
    assert len(owners) == 1, f"no test runs this command of the README or docs: {command}"
  for prefix, owner in RUN_BY.items():
    if owner == ".ci/run":  # checked by the next test
      continue
    readme_commands.command(prefix)  # exactly one unmarked command
    text = (root / owner).read_text()
    assert f'"{prefix}' in text or f"'{prefix}" in text, (prefix, owner)


def test_ci_installs_what_the_readme_installs_and_runs_its_test_command():
  ci = (README.parent / ".ci" / "run").read_text().splitlines()
  extras = set(re.search(r'-e "\.\[([\w,]+)\]"', next(line for line in ci if "pip install" in line and " -e " in line))
               .group(1).split(","))
  for command, _ in readme_commands.commands():
    for wanted in re.findall(r'pip install -e "\.\[([\w,]+)\]"', command):
      assert set(wanted.split(",")) <= extras, command
  assert ci[-1] == readme_commands.command("python -m pytest")

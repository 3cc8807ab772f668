"""The shell commands of the README and of the docs pages, as the tests that run them read them.

A command is a line of a ```bash block (with its `\\` continuations) in README.md or docs/*.md.
The comment lines right above it (up to the previous command or a blank line) belong to it: one
that reads "# not run here: <reason>" exempts it from the tests, and every other command is run by
a test named in tests/test_readme.py (RUN_BY), with only its `/tmp/...` folders put under pytest's
own and its recipe paths made absolute. A command is found by how it starts, on whichever page it
stands, so a command keeps its test when it moves from one page to another.
"""

import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = "# not run here: "


def pages() -> list[pathlib.Path]:
  """The README, then every docs page."""
  return [README, *sorted((ROOT / "docs").glob("*.md"))]


def page_commands(page: pathlib.Path) -> list[tuple[str, list[str]]]:
  """(command, the comment lines above it) for every command of every bash block of `page`."""
  found = []
  for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
    comments: list[str] = []
    lines = iter(block.splitlines())
    for line in lines:
      line = line.strip()
      if not line:
        comments = []
      elif line.startswith("#"):
        comments.append(line)
      else:
        while line.endswith("\\"):
          line = line[:-1].rstrip() + " " + next(lines).strip()
        found.append((line, comments))
        comments = []
  return found


def commands() -> list[tuple[str, list[str]]]:
  """(command, its comments) of every page, the README first."""
  return [item for page in pages() for item in page_commands(page)]


def exempt(comments: list[str]) -> bool:
  return any(c.startswith(NOT_RUN) for c in comments)


def command(prefix: str) -> str:
  """The one command that a test runs, found by how it starts (a command shown verbatim on two
  pages is one command)."""
  matches = sorted({c for c, comments in commands() if c.startswith(prefix) and not exempt(comments)})
  assert len(matches) == 1, f"README / docs commands starting with {prefix!r}: {matches}"
  return matches[0]


def argv(text: str, tmp) -> list[str]:
  """A README command's words, its /tmp/ folders put under `tmp` and its `configs/...` recipes
  under the repository's root (so that it runs from any folder)."""
  words = [word.replace("/tmp/", f"{tmp}/") for word in shlex.split(text)]
  return [f"{ROOT}/{word}" if word.startswith("configs/") else word for word in words]

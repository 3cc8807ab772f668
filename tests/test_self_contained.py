"""Everything the tests, the tools and CI read lives in the repository: a fresh clone with nothing
beside it passes the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A path out of the repository into the reference folder beside it (".." + "/" + SIBLING,
# parent / SIBLING, parents[2] / SIBLING, ...).
SIBLING = "sha" + "red"
OUTSIDE = re.compile(r"\.\./" + SIBLING + r"|parents?(?:\[\d\])?\s*/\s*[\"']" + SIBLING)


def tracked_text_files():
  for folder in ("tests", "dro_jax", "benchmarks", "configs", "launch", ".ci", "notebooks"):
    for path in sorted((ROOT / folder).rglob("*")):
      if path.is_file() and path.suffix in (".py", ".sh", ".ipynb", "") and path.stat().st_size < 2e6:
        yield path


def test_no_file_reads_a_folder_beside_the_repository():
  offenders = []
  for path in tracked_text_files():
    try:
      text = path.read_text()
    except UnicodeDecodeError:
      continue
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    if OUTSIDE.search("\n".join(lines)):
      offenders.append(str(path.relative_to(ROOT)))
  assert not offenders, f"files that read outside the repository: {offenders}"


def test_the_t5x_fixtures_are_in_the_repository(fixtures_dir):
  assert ROOT in fixtures_dir.resolve().parents
  for family in ("t5_1_1_tiny", "t5_1_0_tiny"):
    folder = fixtures_dir / "t5x" / family
    assert (folder / "checkpoint_1000" / "checkpoint").is_file()
    assert (folder / "reference_outputs.npz").is_file()
    assert (folder / "t5x_config.json").is_file()


def test_ci_runs_the_suite_from_a_copy_with_nothing_beside_it():
  script = (ROOT / ".ci" / "run").read_text()
  assert "mktemp -d" in script and 'test "$(ls -A ..)" = "$(basename "$COPY")"' in script
  readme = (ROOT / "README.md").read_text()
  command = re.search(r"^python -m pytest tests[^\n]*$", readme, flags=re.M).group(0)
  assert script.rstrip().endswith(command)

"""The import graph of dro_jax/ has no cycle: the shared setup (data, state, loading policies)
sits below the runners (train, demo, evaluate, the judges), which stand on it side by side."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dro_jax"


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the dro_jax modules it imports anywhere (inside functions, relative imports)."""
  paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
  graph = {name: set() for name in paths}
  for name, path in paths.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
      graph[name].update(t for t in targets if t in paths and t != name)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        return stack[stack.index(target):] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_finder_sees_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_dro_jax_has_no_import_cycle():
  graph = import_graph()
  assert "dro_jax.train" in graph and "dro_jax.datasets" in graph["dro_jax.train"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_shared_setup_imports_no_runner():
  graph = import_graph()
  runners = {"dro_jax.train", "dro_jax.demo", "dro_jax.evaluate", "dro_jax.main",
             "dro_jax.periodic_evaluation"}

  def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
      for target in graph[todo.pop()]:
        if target not in seen:
          seen.add(target)
          todo.append(target)
    return seen

  for base in ("dro_jax.datasets", "dro_jax.initialization", "dro_jax.policies",
               "dro_jax.files", "dro_jax.judges", "dro_jax.evaluation", "dro_jax.judge_inputs"):
    assert not reachable(base) & runners, (base, reachable(base) & runners)

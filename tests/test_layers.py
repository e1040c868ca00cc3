"""The package's imports go one way (docs/design.md section 2): read from the source with ``ast``,
the graph of imports between ``weit_jax`` modules has no cycle, and no module imports another of
the package inside a function (the usual way to hide a cycle)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "weit_jax"


def modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        name = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = os.path.join(dirpath, f)
  return out


def imported(node, module: str, is_package: bool, known) -> list[str]:
  """The package modules an import statement names (``from a import b`` names ``a.b`` when that is a
  module, else ``a``)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    base = node.module or ""
    if node.level:
      parts = module.split(".")[:None if is_package else -1]
      parts = parts[:len(parts) - node.level + 1]
      base = ".".join(parts + ([base] if base else []))
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
  out = []
  for name in names:
    while name and name not in known:  # a name inside a module -> the module
      name = name.rpartition(".")[0]
    if name.startswith(PACKAGE) and name != module:
      out.append(name)
  return out


def graph():
  mods = modules()
  edges, in_functions = {m: set() for m in mods}, []
  for module, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    is_package = path.endswith("__init__.py")
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges[module].update(imported(node, module, is_package, mods))
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for sub in ast.walk(node):
          if isinstance(sub, (ast.Import, ast.ImportFrom)) and imported(sub, module, is_package, mods):
            in_functions.append(f"{module}:{sub.lineno}")
  return edges, in_functions


def find_cycle(edges) -> list[str] | None:
  """One cycle of the directed graph (depth-first search with colours), or None."""
  state, stack = {}, []

  def visit(v):
    state[v] = "open"
    stack.append(v)
    for w in sorted(edges[v]):
      if v.startswith(w + "."):  # a submodule imports its own package's __init__ as part of loading
        continue
      if state.get(w) == "open":
        return stack[stack.index(w):] + [w]
      if w not in state and (cycle := visit(w)):
        return cycle
    state[v] = "done"
    stack.pop()
    return None

  for v in sorted(edges):
    if v not in state and (cycle := visit(v)):
      return cycle
  return None


def test_the_oracle_finds_a_planted_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_has_no_cycle():
  edges, _ = graph()
  assert len(edges) > 40 and sum(map(len, edges.values())) > 60  # it read the package
  assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_no_module_imports_the_package_inside_a_function():
  _, in_functions = graph()
  assert in_functions == []


def test_configs_build_without_the_data_libraries():
  """A config is built from ``weit_jax.data_catalog``: building every config file (in a fresh
  interpreter) loads none of tensorflow_datasets, grain, PIL."""
  import subprocess
  import sys
  names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f != "common.py")
  script = (
      "import importlib, sys\n"
      f"for name in {names!r}:\n"
      "  module = importlib.import_module('configs.' + name)\n"
      "  module.get_config('runlocal' if name != 'baseline_pretrain' else 'family=dit,runlocal')\n"
      "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'PIL') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", out.stdout
  assert len(names) >= 13

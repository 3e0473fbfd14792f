"""The package's layers import one way only, and no modules import each other in a cycle.

Layers, lowest first (docs/design.md): a module may import its own package and any package
below it, never one above. Every ``import`` is counted, including those inside functions: an
import deferred into a function body is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "svdquant_jax"
LAYERS = ("utils", "formats", "models", "pipelines", "eval", "pallas", "nn", "quant", "flows")
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imports_of(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[tuple[int, str]]:
  """``(line, absolute module name)`` of every import in a file (relative imports resolved)."""
  tree = ast.parse(path.read_text(), str(path))
  here = module_name(path, root)
  package = here if path.name == "__init__.py" else here.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module
      out.append((node.lineno, mod))
      # ``from pkg import submodule`` depends on the submodule.
      out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
  return out


def package_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def layer_of(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def upward_imports(root: pathlib.Path = ROOT) -> list[str]:
  """Every import of a higher layer (or of a package that is in no layer)."""
  problems, seen = [], set()
  for name, path in package_modules(root).items():
    mine = layer_of(name)
    for line, target in imports_of(path, root):
      theirs = layer_of(target)
      if theirs is None or theirs == mine or mine is None or (path, line, theirs) in seen:
        continue
      seen.add((path, line, theirs))
      if mine not in RANK or theirs not in RANK:
        problems.append(f"{path.relative_to(root)}:{line}: {name} -> {target}: package "
                        f"{mine if mine not in RANK else theirs!r} is in no layer; add it to LAYERS and docs/design.md")
      elif RANK[theirs] > RANK[mine]:
        problems.append(f"{path.relative_to(root)}:{line}: {name} ({mine}) imports {target} ({theirs}), a higher layer")
  return problems


def module_cycles(root: pathlib.Path = ROOT) -> list[list[str]]:
  """Cycles in the module import graph (each reported once, as the list of its modules)."""
  modules = package_modules(root)
  graph = {}
  for name, path in modules.items():
    deps = set()
    for _, target in imports_of(path, root):
      # ``a.b.c`` may name a function of module ``a.b``: depend on the longest module prefix.
      while target and target not in modules:
        target = target.rpartition(".")[0]
      # A package's __init__ is imported with every submodule; only explicit edges count.
      if target and target != name and not name.startswith(target + "."):
        deps.add(target)
    graph[name] = deps
  cycles, state, stack = [], {}, []

  def visit(node: str) -> None:
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        cycle = stack[stack.index(dep):]
        if sorted(cycle) not in [sorted(c) for c in cycles]:
          cycles.append(cycle + [dep])
      elif dep not in state:
        visit(dep)
    stack.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return cycles


def test_every_package_has_a_layer():
  packages = {p.name for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").exists()}
  assert packages <= set(LAYERS), f"packages in no layer: {sorted(packages - set(LAYERS))}"


def test_no_import_goes_up_a_layer():
  problems = upward_imports()
  assert not problems, "imports that go up a layer:\n" + "\n".join(problems)


def test_no_import_cycles():
  cycles = module_cycles()
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_package_never_imports_test_references():
  hits = [f"{p.relative_to(ROOT)}:{line}: {t}" for p in package_modules().values() for line, t in imports_of(p)
          if t.split(".")[0] in ("torch", "diffusers", "peft", "torchvision", "lpips")]
  assert not hits, "the package imports test-only references:\n" + "\n".join(hits)


@pytest.fixture
def planted(tmp_path):
  """A copy of the package layout with one planted violation per test."""
  def make(files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
      path = tmp_path / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
    for sub in {pathlib.Path(rel).parent for rel in files}:
      while sub != pathlib.Path("."):
        init = tmp_path / sub / "__init__.py"
        if not init.exists():
          init.write_text("")
        sub = sub.parent
    return tmp_path
  return make


def test_checker_catches_a_planted_upward_import(planted):
  root = planted({"svdquant_jax/formats/packing.py": "from svdquant_jax.quant import ptq\n",
                  "svdquant_jax/quant/ptq.py": "import numpy\n"})
  problems = upward_imports(root)
  assert len(problems) == 1 and "svdquant_jax.formats.packing (formats) imports svdquant_jax.quant" in problems[0]


def test_checker_catches_an_upward_import_hidden_in_a_function(planted):
  root = planted({"svdquant_jax/nn/dense.py": "def f():\n  from svdquant_jax.flows import ptq\n  return ptq\n",
                  "svdquant_jax/flows/ptq.py": ""})
  assert len(upward_imports(root)) == 1


def test_checker_catches_a_cycle_inside_a_layer(planted):
  root = planted({"svdquant_jax/quant/a.py": "from svdquant_jax.quant import b\n",
                  "svdquant_jax/quant/b.py": "def f():\n  from svdquant_jax.quant.a import g\n"})
  cycles = module_cycles(root)
  assert [sorted(set(c)) for c in cycles] == [["svdquant_jax.quant.a", "svdquant_jax.quant.b"]]

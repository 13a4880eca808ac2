"""The package's layers (docs/architecture.md): every module imports only from its own layer or the layers below
it, and no two modules import each other, directly or through others. Imports inside functions count too: a late
import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvprec"

#: module prefix -> layer (docs/architecture.md). A module belongs to the longest prefix that matches it.
LAYERS = {
    "kvprec._native": 0,
    "kvprec._C": 0,
    "kvprec._tempdirs": 0,
    "kvprec.storage": 1,
    "kvprec.models": 1,
    "kvprec.ops": 2,
    "kvprec.triton_kernels": 2,
    "kvprec.analysis": 3,
    "kvprec.serving": 3,  # docs/serving.md: the vLLM page accounting and layout conversion, over storage and ops
    "kvprec.hf": 4,
    "kvprec.studies": 5,
    "kvprec.commands": 6,
    "kvprec.cli": 6,
    "kvprec": 6,  # kvprec/__init__.py: the public surface, which only the command line uses from inside
}


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module}: not in any layer of docs/architecture.md; add it to LAYERS")
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set:
    """Absolute names of the kvprec modules a file imports (``from pkg import name`` counts pkg.name when that is a
    module of the package, else pkg)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kvprec")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kvprec":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in FILES} | {"kvprec._C"}  # the C++ extension is a module too
GRAPH = {module_name(p): imported_modules(p) for p in FILES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_from_layers_below(module):
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports from a layer above it: {upward}"


def test_no_import_cycles():
    """Depth-first search for a cycle among the package's modules (a package's __init__ counts as a module)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH or t == m:
                continue
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_reads_relative_and_late_imports(tmp_path, monkeypatch):
    """The parser resolves relative imports (also inside functions) to the modules they name."""
    pkg = tmp_path / "kvprec" / "storage"
    pkg.mkdir(parents=True)
    (tmp_path / "kvprec" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    probe = pkg / "probe.py"
    probe.write_text("from .formats import Tier\n\ndef f():\n    from ..hf import cache\n    import kvprec.ops\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = imported_modules(probe)
    assert {"kvprec.storage.formats", "kvprec.hf.cache", "kvprec.ops"} <= found
    assert layer_of("kvprec.hf.cache") > layer_of("kvprec.storage.probe")

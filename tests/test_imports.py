"""The house rules of docs/architecture.md, read off the source (no imports run):
which package may import which, no cycles, no other module's ``_private`` names,
modules small enough to read (an allow-list with one reason per larger module), and
tests that stand on their own (no test imports another test module or takes its
reference values from ``benchmarks/``)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WALKED = ("nasfcos", "storage", "flows", "atomicio", "benchmarks")
PRODUCT = ("nasfcos", "storage", "flows", "atomicio")
MAX_LINES = 500
# Product modules over MAX_LINES, each with why it stays one module.
LONG_MODULES = {
    "storage/features.py": "the feature store's one on-disk format: writer, reader, done mask and repair share its layout",
    "storage/results.py": "the results table's one format: schema, validation, the dedup rule and the crash-safe compaction argue together",
}
# Imports a package must never make (prefix match on the imported module).
FORBIDDEN = {
    "nasfcos": ("prefect", "storage", "flows"),
    "storage": ("nasfcos", "flows", "prefect"),
    # inside nasfcos (docs/architecture.md): arch below model and search; search drives an
    # injected evaluator and never builds models; evaluation scores what the engine predicted
    "nasfcos.arch": ("nasfcos.model", "nasfcos.search", "nasfcos.engine", "nasfcos.evaluation", "nasfcos.data", "nasfcos.cli"),
    "nasfcos.model": ("nasfcos.search", "nasfcos.engine", "nasfcos.evaluation", "nasfcos.cli"),
    "nasfcos.search": ("nasfcos.model", "nasfcos.engine", "nasfcos.evaluation", "nasfcos.data", "nasfcos.cli"),
    "nasfcos.engine": ("nasfcos.search", "nasfcos.cli"),
    "nasfcos.evaluation": ("nasfcos.model", "nasfcos.engine", "nasfcos.search", "nasfcos.cli"),
    "nasfcos.data": ("nasfcos.arch", "nasfcos.model", "nasfcos.engine", "nasfcos.search", "nasfcos.evaluation", "nasfcos.cli"),
}
# flows/report is a view of a run directory: of this repository it may import only these (no prefect).
REPORT_MAY_IMPORT = ("flows.report", "storage", "nasfcos.arch", "atomicio")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for top in WALKED for p in sorted((ROOT / top).rglob("*.py"))}


SOURCES = _sources()


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import, in functions too."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            if name.startswith("benchmarks.") and f"benchmarks.{base}" in SOURCES:
                base = f"benchmarks.{base}"  # a script importing a sibling script (run from benchmarks/)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out += [(sub, None, node.lineno)] if sub in SOURCES else [(base, a.name, node.lineno)]
    return out


IMPORTS = {name: _imports(name, path) for name, path in SOURCES.items()}


def _where(name: str, line: int) -> str:
    return f"{SOURCES[name].relative_to(ROOT)}:{line}"


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_import_cycles():
    graph = {m: {i for i, _, _ in IMPORTS[m] if i in SOURCES and i != m} for m in SOURCES}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    bad = [f"{_where(m, line)} imports {imp}" for m in SOURCES if _under(m, package) for imp, _, line in IMPORTS[m] if any(_under(imp, f) for f in FORBIDDEN[package])]
    assert not bad, "\n".join(bad)


def test_the_report_imports_only_what_a_view_of_a_run_needs():
    ours = ("flows", "storage", "nasfcos", "atomicio", "benchmarks", "prefect")
    bad = [
        f"{_where(m, line)} imports {imp}"
        for m in SOURCES
        if _under(m, "flows.report")
        for imp, _, line in IMPORTS[m]
        if imp.split(".")[0] in ours and not any(_under(imp, ok) for ok in REPORT_MAY_IMPORT)
    ]
    assert not bad, "\n".join(bad)


def test_atomicio_uses_the_standard_library_only():
    bad = [
        f"{_where(m, line)} imports {imp}"
        for m in SOURCES
        if _under(m, "atomicio")
        for imp, _, line in IMPORTS[m]
        if imp.split(".")[0] not in sys.stdlib_module_names and imp != "__future__"
    ]
    assert not bad, "\n".join(bad)


def _private_uses(name: str) -> list[str]:
    """``from other import _x`` and ``other_module._x`` for a module imported as a name."""
    out = []
    aliases = {}
    tree = ast.parse(SOURCES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in SOURCES:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if name.startswith("benchmarks.") and f"benchmarks.{module}" in SOURCES:
                module = f"benchmarks.{module}"  # a sibling script
            for a in node.names:
                sub = f"{module}.{a.name}"
                if sub in SOURCES:
                    aliases[a.asname or a.name] = sub
                elif a.name.startswith("_") and not a.name.startswith("__") and module in SOURCES and module != name:
                    out.append(f"{_where(name, node.lineno)} imports {module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            dotted = ast.unparse(node.value)
            if aliases.get(dotted, dotted) in SOURCES and aliases.get(dotted, dotted) != name:
                out.append(f"{_where(name, node.lineno)} uses {aliases.get(dotted, dotted)}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names():
    bad = [line for m in SOURCES for line in _private_uses(m)]
    assert not bad, "\n".join(bad)


def test_product_modules_are_short_or_allowed():
    long = {str(p.relative_to(ROOT)): n for m, p in SOURCES.items() if m.split(".")[0] in PRODUCT and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), f"over {MAX_LINES} lines without an allow-list entry: {set(long) - set(LONG_MODULES)}"
    stale = [p for p in LONG_MODULES if p not in long]
    assert not stale, f"allow-list entries no longer needed (the module shrank or moved): {stale}"


def test_tests_stand_on_their_own():
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    own = {p.stem for p in tests}
    bad = []
    for p in tests:
        for node in ast.walk(ast.parse(p.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for mod in mods:
                top = mod.split(".")[0]
                if top in own or top == "benchmarks" or (top == "tests" and mod != "tests.helpers"):
                    bad.append(f"tests/{p.name}:{node.lineno} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_rules_see_the_tree():
    # the walk found the packages and their imports (a test that sees nothing passes anything)
    assert {"nasfcos.arch", "nasfcos.model.backbones", "storage.results", "flows.nas_search", "atomicio"} <= set(SOURCES)
    assert ("atomicio", None) in [(m, n) for m, n, _ in IMPORTS["storage.results"]]

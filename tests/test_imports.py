"""The import graph of ``src/mlatlas``: no cycles, no experiment importing another experiment.

Every ``import``/``from … import`` is read from the source with :mod:`ast` — at module level
and inside functions alike (a lazy import that closes a cycle is still a cycle) — and
resolved to the mlatlas module it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mlatlas

SRC = Path(mlatlas.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["mlatlas", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `from pkg import name` → pkg
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_src():
    assert _cycles(_graph()) == []


def test_no_experiment_imports_another_experiment():
    bad = [f"{m} imports {d}" for m, deps in _graph().items()
           if m.startswith("mlatlas.experiments.") for d in deps
           if d.startswith("mlatlas.experiments")]
    assert bad == []


def test_components_never_import_experiments_cli_or_report():
    layer = ("mlatlas.experiments", "mlatlas.cli", "mlatlas.runner", "mlatlas.__main__")
    bad = [f"{m} imports {d}" for m, deps in _graph().items()
           if not m.startswith(layer) and m not in ("mlatlas.report", "mlatlas.site")
           and not m.startswith("mlatlas.site.")
           for d in deps if d.startswith(layer) or d == "mlatlas.report"]
    assert bad == []


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

"""The package's shape: bif's modules import each other without cycles, and ``bif.lm`` holds
library code only (the Shakespeare corpus, the tiny model and the demo live in ``bif.bench.lm``
and ``bif.demo_lm``).

Imports are read from the source with ``ast``, function-level ones included: a lazy import that
closes a cycle is a cycle all the same (it only moves the failure to call time).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import bif

SRC = Path(bif.__file__).parent.parent  # src/, holding the bif package


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC / "bif") -> dict[str, dict[str, int]]:
    """``{module: {imported bif module: line}}`` over every ``.py`` file under ``root``.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else
    ``pkg`` itself (its ``__init__``); ``import a.b`` counts as importing ``a.b``. Parent
    packages that Python initialises on the way are not edges: they run first whatever
    imports them. Imports under ``if TYPE_CHECKING:`` never run and are skipped.
    """
    modules = {module_name(p, root.parent): p for p in sorted(root.rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skipped = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            for target in targets:
                hit = resolve(target) if target.split(".")[0] == "bif" else None
                if hit is not None and hit != mod:
                    edges.setdefault(hit, node.lineno)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return "\n  ".join(f"{a} -> {b} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle))


def test_bif_modules_import_each_other_without_cycles() -> None:
    graph = import_graph()
    assert {"bif", "bif.api", "bif.bench.settings", "bif.baselines.lm_methods"} <= set(graph)
    assert "bif.runfile" in graph["bif.cli"]  # a function-level import (fast `bif --help`)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among bif's modules:\n  " + describe(graph, cycle)


def test_the_cycle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "bif"
    (pkg / "bench").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from bif.api import attribute\n")
    (pkg / "api.py").write_text("from bif._version import __version__\n")
    (pkg / "_version.py").write_text("__version__ = '0'\n")
    (pkg / "bench" / "__init__.py").write_text("")
    (pkg / "bench" / "settings.py").write_text("def lm():\n    from .lm_setting import make\n")
    (pkg / "bench" / "lm_setting.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bif import api\n"
        "def make():\n    from bif.bench import settings\n"
    )
    graph = import_graph(pkg)
    assert graph["bif.api"] == {"bif._version": 1}
    assert graph["bif.bench.lm_setting"] == {"bif.bench.settings": 5}  # TYPE_CHECKING: skipped
    cycle = ["bif.bench.lm_setting", "bif.bench.settings", "bif.bench.lm_setting"]
    assert find_cycle(graph) == cycle
    (pkg / "_version.py").write_text("import bif\n")  # bif -> bif.api -> bif._version -> bif
    (pkg / "bench" / "settings.py").write_text("")
    assert find_cycle(import_graph(pkg)) == ["bif", "bif.api", "bif._version", "bif"]


def test_bif_lm_holds_library_code_only() -> None:
    lm = SRC / "bif" / "lm"
    for name in ("shakespeare", "tiny", "finetune", "demo", "assets"):
        assert not (lm / f"{name}.py").exists() and not (lm / name).exists(), name
    graph = import_graph()
    for mod, edges in graph.items():
        if mod == "bif.lm" or mod.startswith("bif.lm."):
            outside = [m for m in edges if m.startswith(("bif.bench", "bif.demo"))]
            assert not outside, f"{mod} (library code) imports the benchmark or a demo: {outside}"

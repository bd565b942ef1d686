"""The modules of `cache_aug` import one another in layers: the graph of their imports of each other has no cycle.

Every import counts, at module level or inside a function: a lazy import still makes the two modules depend on
each other (`corpus` and `tiny` once did, only because the cache directory function lived in `tiny`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cache_aug"  # of this checkout, whichever cache_aug is installed


def internal_imports(source: str, modules: set[str]) -> set[str]:
    """The `cache_aug` modules (of `modules`) that Python source of a module directly in the package imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue  # above the package
            base = node.module or ""
            if node.level == 0 and base != "cache_aug" and not base.startswith("cache_aug."):
                continue
            base = base if node.level == 0 else ".".join(p for p in ("cache_aug", base) if p)
            # `from cache_aug import x` / `from . import x` name modules; `from cache_aug.x import y` names x
            names = [f"{base}.{a.name}" for a in node.names] if base == "cache_aug" else [base]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "cache_aug" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (itself left out)."""
    files = {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}
    return {m: internal_imports(p.read_text(), set(files)) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_parser_sees_every_form_of_import():
    modules = {"a", "b", "c", "d", "e", "f"}
    source = '''
import cache_aug.a
from cache_aug import b
from cache_aug.c import thing
from .d import other
from . import e


def later():
    import cache_aug.f as f
    from json import loads
    from cache_aug.nothere import x
'''
    assert internal_imports(source, modules) == modules


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_cache_aug_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {"corpus", "tiny", "tiny_pretrain", "paths", "decoder", "gguf_checkpoint", "records"} <= set(graph)
    assert "paths" in graph["corpus"] and "paths" in graph["tiny"] and "corpus" in graph["tiny_pretrain"]  # seen
    assert "tiny_pretrain" in graph["tiny"] and "tiny_spec" in graph["tiny_pretrain"]
    mutual = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph[b])
    assert mutual == [], f"modules that import each other: {mutual}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)

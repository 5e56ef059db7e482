"""The layering of docs/design.md, checked on the code: no import cycles among the project's modules,
and the kernel packages are leaves (kernels/ and csrc/ know nothing of engine/).

The same check from a shell: `python tests/test_architecture.py` prints the import graph's cycles.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


EXTENSIONS = {"engine._C": ROOT / "csrc"}  # compiled from csrc/ (setup.py): a leaf by construction


def modules() -> dict[str, Path]:
    found = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    return {**found, **EXTENSIONS}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module an imported dotted name lives in (longest known prefix), else None."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module `mod` imports, at top level or inside a function (a lazy import is still
    a dependency). `from . import x` names the submodule x when there is one, not the package."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps = [_resolve(a.name, known) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (prefix, node.module or "") if p)
            deps = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else _resolve(target, known)
                    for a in node.names]
        else:
            continue
        found.update(d for d in deps if d is not None and d != mod)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items() if m not in EXTENSIONS}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, f"import cycles (each line: modules that import each other in a loop): {found}"


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]


def test_kernels_package_imports_nothing_from_engine():
    g = graph()
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "engine")
           for m, deps in g.items() if m.split(".")[0] == "kernels"}
    assert not {m: d for m, d in bad.items() if d}, f"kernels/ must be a leaf: {bad}"


def test_csrc_includes_only_its_own_headers_and_the_standard_library():
    for path in sorted((ROOT / "csrc").glob("*.[ch]*")):
        for inc in re.findall(r'#include\s+[<"]([^>"]+)[>"]', path.read_text()):
            assert "engine" not in inc and "torch" not in inc.lower(), f"{path.name} includes {inc}"


def test_test_file_basenames_are_unique():
    """pytest imports tests/ (no __init__.py) by basename: two test_x.py in different folders stop
    collection of the whole suite ("import file mismatch"), which is how a CI run was lost."""
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        other = seen.setdefault(path.name, path)
        assert other == path or path.name in ("__init__.py", "conftest.py"), (
            f"{path.relative_to(ROOT)} and {other.relative_to(ROOT)} share a basename")


if __name__ == "__main__":
    g = graph()
    found = cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges, {len(found)} cycles")
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    sys.exit(1 if found else 0)

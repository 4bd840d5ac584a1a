"""Import cycles among the package's modules, read from the source (AST), not by importing it.

Why: a cycle hidden by an import inside a function still ties the modules together (neither can be
understood, tested or moved alone) and breaks as soon as someone hoists the import. This counts
every intra-package import, at module level or inside a function, and prints the strongly
connected components of that graph: module-level cycles, and those that only the lazy imports
close. Exit status 1 when there is any cycle.

    python tools/import_cycles.py [package folder, default astolfo_merge]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(name: str, modules: set) -> set:
    """A module and the packages it lives in (importing a.b.c runs a/__init__ and a/b/__init__)."""
    out, parts = set(), name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            out.add(prefix)
    return out


def imports(root: Path) -> tuple:
    """{module: {imported module: 'module' | 'lazy'}} for intra-package imports."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges = graph.setdefault(name, {})
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            found = set()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found |= _targets(alias.name, modules)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                found |= _targets(base, modules)
                for alias in node.names:
                    found |= _targets(f"{base}.{alias.name}", modules)
            kind = "module" if id(node) in top else "lazy"
            for target in found - {name}:
                if edges.get(target) != "module":
                    edges[target] = kind
    return graph, modules


def cycles(graph: dict, kinds=("module", "lazy")) -> list:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, kind in graph.get(v, {}).items():
            if kind not in kinds:
                continue
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def report(root: Path) -> int:
    graph, _modules = imports(root)
    top = cycles(graph, ("module",))
    every = cycles(graph)
    print(f"module-level import cycles: {len(top)}")
    for comp in top:
        print("  " + " <-> ".join(comp))
    print(f"cycles counting imports inside functions too: {len(every)}")
    for comp in every:
        lazy = sorted(f"{a} -> {b}" for a in comp for b, k in graph[a].items() if b in comp and k == "lazy")
        print("  " + " <-> ".join(comp) + (f"\n    closed by lazy imports: {'; '.join(lazy)}" if lazy else ""))
    return 1 if every else 0


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "astolfo_merge")
    sys.exit(report(folder.resolve()))

"""Report import loops in astolfo_merge: between modules (module-level imports) and between packages.

Why: issue 17 asks for arrows pointing down only. A loop hidden by a lazy import (inside a function) is
still a loop of design, so `--lazy` counts those too.

    .venv/bin/python tools/import_cycles.py [--lazy]
"""
from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = "astolfo_merge"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    if not level:
        return target or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(path: pathlib.Path, modules: set, lazy: bool) -> set:
    mod, is_pkg = module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(mod, is_pkg, node.level, node.module)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != mod and name.startswith(PKG):
                found.add(name)
    return found


def graph(lazy: bool) -> dict:
    files = {module_name(p): p for p in (ROOT / PKG).rglob("*.py")}
    modules = set(files)
    g = {m: imports(p, modules, lazy) for m, p in files.items()}
    for m in g:     # importing a.b.c runs a/__init__ and a/b/__init__ first
        g[m] = {d for d in g[m] if not m.startswith(d + ".")}
    return g


def sccs(g: dict) -> list:
    """Tarjan: the strongly connected components with more than one member (each is an import loop)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else mod


def main(argv) -> int:
    lazy = "--lazy" in argv
    g = graph(lazy)
    loops = sccs(g)
    pg = {}
    for m, deps in g.items():
        pg.setdefault(package_of(m), set()).update(package_of(d) for d in deps if package_of(d) != package_of(m))
    ploops = sccs(pg)
    kind = "module-level and lazy" if lazy else "module-level"
    print(f"{kind} import loops between modules: {len(loops)}")
    for comp in loops:
        print("  " + " <-> ".join(comp))
    print(f"{kind} import loops between packages: {len(ploops)}")
    for comp in ploops:
        print("  " + " <-> ".join(comp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

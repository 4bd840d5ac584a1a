"""The package layout keeps its arrows pointing down (issue 17): no module-level import loop, between modules
or between the packages io / core / methods / features / ui / cli (tools/import_cycles.py)."""
from conftest import load_tool


def test_no_module_level_import_loop_between_modules_or_packages():
    cycles = load_tool("import_cycles")
    graph = cycles.graph(lazy=False)
    packages = {}
    for mod, deps in graph.items():
        here = cycles.package_of(mod)
        packages.setdefault(here, set()).update(cycles.package_of(d) for d in deps if cycles.package_of(d) != here)
    assert cycles.sccs(graph) == []
    assert cycles.sccs(packages) == []


def test_ui_and_cli_are_not_imported_by_the_backend():
    graph = load_tool("import_cycles").graph(lazy=True)
    backend = [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in ("io", "core", "methods", "features")]
    upward = {(m, d) for m in backend for d in graph[m] if d.split(".")[1:2] and d.split(".")[1] in ("ui", "cli")}
    assert not upward, sorted(upward)

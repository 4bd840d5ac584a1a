"""The README stays true to the code: its method table is generated from the declarations."""
import importlib.util

from conftest import ROOT


def _method_table():
    spec = importlib.util.spec_from_file_location("method_table", ROOT / "tools" / "method_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_method_table_is_generated_from_the_declarations():
    module = _method_table()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert module.rewrite(readme) == readme, "README.md's method table is stale: run python tools/method_table.py --write"


def test_method_table_lists_every_method_once():
    from astolfo_merge.methods import METHODS
    rows = [line for line in _method_table().table().splitlines()[2:]]
    assert [row.split("`")[1] for row in rows] == list(METHODS)

"""The README stays true to the code: its method table is generated from the declarations."""
from conftest import ROOT, load_tool


def test_readme_method_table_is_generated_from_the_declarations():
    module = load_tool("method_table")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert module.rewrite(readme) == readme, "README.md's method table is stale: run python tools/method_table.py --write"


def test_method_table_lists_every_method_once():
    from astolfo_merge.methods import METHODS
    rows = [line for line in load_tool("method_table").table().splitlines()[2:]]
    assert [row.split("`")[1] for row in rows] == list(METHODS)

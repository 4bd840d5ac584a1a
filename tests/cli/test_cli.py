"""The CLI: exit codes (0 ok, 2 bad input without traceback), methods listing, inspect, merge."""
import json

import pytest

from conftest import cli


def test_methods_json_lists_every_parameter_with_type_default_range_and_help():
    rc, out, _ = cli("methods", "--json")
    assert rc == 0
    methods = {m["name"]: m for m in json.loads(out)}
    assert {"weighted_sum", "add_difference", "n_average", "amplify"} <= set(methods)
    alpha = methods["weighted_sum"]["params"][0]
    assert alpha["name"] == "alpha" and alpha["type"] == "float" and alpha["help"] and alpha["min"] is not None


@pytest.mark.slow
def test_merge_writes_the_output_and_prints_a_summary(models, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum",
                                  "params": {"alpha": 0.3}, "output": "cli.safetensors"}))
    rc, out, err = cli("merge", recipe, "--models-dir", models, "--no-hash", cwd=tmp_path)
    assert rc == 0, err
    assert (models / "cli.safetensors").exists() and "sha256" in out
    rc, out, err = cli("merge", recipe, "--models-dir", models, "--no-hash", cwd=tmp_path)
    assert rc == 2 and "output exists" in err and "Traceback" not in err


@pytest.mark.parametrize("doc,needle", [
    ({"pool": ["missing.safetensors", "sd1-a.safetensors"], "method": "weighted_sum"}, "not found"),
    ({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "ties_but_wrong"}, "unknown method"),
    ({"pool": ["sd1-a.safetensors", "sdxl-a.safetensors"], "method": "n_average", "output": "x"}, "same architecture"),
])
def test_bad_input_exits_2_with_one_clear_message(models, tmp_path, doc, needle):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps(doc))
    rc, _, err = cli("merge", recipe, "--models-dir", models, "--no-hash", cwd=tmp_path)
    assert rc == 2 and needle in err and "Traceback" not in err


@pytest.mark.slow
def test_inspect_json_identifies_architecture_and_components(demo_dir, tmp_path):
    rc, out, err = cli("inspect", "--json", demo_dir / "sdxl-pruned.safetensors", cwd=tmp_path)
    assert rc == 0, err
    report = json.loads(out)
    assert report["arch"] == "sdxl" and report["components"]["te0"]["missing_optional"]
    rc, _, err = cli("inspect", tmp_path / "nothing.safetensors", cwd=tmp_path)
    assert rc == 2 and "no such file" in err


@pytest.mark.slow
def test_demo_models_writes_identifiable_sd1_and_sdxl_files(tmp_path):
    rc, out, err = cli("demo-models", tmp_path / "demo", "--scale", "64", cwd=tmp_path)
    assert rc == 0, err
    rc, out, _ = cli("inspect", "--json", tmp_path / "demo" / "demo-sd1-base.safetensors", tmp_path / "demo" / "demo-sdxl-base.safetensors", cwd=tmp_path)
    assert [r["arch"] for r in json.loads(out)] == ["sd1", "sdxl"]

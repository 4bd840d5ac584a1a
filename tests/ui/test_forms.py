"""The tab's generated parts without a browser: method forms, block weights, form <-> recipe, model catalog."""
from __future__ import annotations

import os

import gradio as gr
import pytest

from astolfo_merge.core.recipe import Recipe, parse_recipe
from astolfo_merge.io import arch as archmod
from astolfo_merge.methods import METHODS, Method, Param, register
from astolfo_merge.ui import catalog as ui_catalog
from astolfo_merge.ui.catalog import Catalog, guess_base, pool_scale
from astolfo_merge.ui.forms import PRESETS, BlockWeights, ParamForm, assign_slots, preset_values, slot_kind
from astolfo_merge.ui.state import (
    BASE,
    MAIN,
    OWN,
    TAKE,
    arch_components,
    carried_extra,
    component_carry,
    component_mode,
    component_rule,
    components_of,
    form_carry,
    merge_selection,
    shown_params,
)


def build_form(methods, method):
    with gr.Blocks():
        return ParamForm(methods, method, "t")


# -- method forms come from the declarations ---------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gets_a_field_per_parameter_with_label_range_and_help(name):
    form = build_form(METHODS, name)
    method = METHODS[name]
    updates = form.updates(name)
    shown = [u for u in updates if u.get("visible")]
    assert sorted(u["label"] for u in shown) == sorted(p.name for p in shown_params(method))
    for param in shown_params(method):
        upd = next(u for u in shown if u["label"] == param.name)
        if param.help:
            assert param.help in upd["info"]
        if slot_kind(param) == "slider":
            assert (upd["minimum"], upd["maximum"]) == (param.minimum, param.maximum)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_default_form_values_are_a_valid_parameter_set(name):
    form = build_form(METHODS, name)
    values = [u.get("value") for u in form.updates(name)]
    params = form.params(name, values)
    assert METHODS[name].resolve_params(params) == METHODS[name].resolve_params({})


def test_a_method_registered_later_appears_without_ui_code():
    fresh = Method("zz_test_method", "Test method", "only for this test", lambda inputs, params: iter(()),
                   params=(Param("strength", "float", 0.25, 0.0, 1.0, help="how strong"),
                           Param("mode", "choice", "a", choices=("a", "b"), help="which mode"),
                           Param("flip", "bool", False, help="flip it"),
                           Param("iterations", "int", 3, 1, 9, help="how often")))
    register(fresh)
    try:
        form = build_form(METHODS, "zz_test_method")
        labels = {u["label"]: u for u in form.updates("zz_test_method") if u.get("visible")}
        assert set(labels) == {"strength", "mode", "flip", "iterations"}
        assert labels["mode"]["choices"] == ["a", "b"] and "which mode" in labels["mode"]["info"]
        values = [u.get("value") for u in form.updates("zz_test_method", {"strength": 0.5, "mode": "b", "iterations": 7})]
        assert form.params("zz_test_method", values) == {"strength": 0.5, "mode": "b", "flip": False, "iterations": 7}
    finally:
        METHODS.pop("zz_test_method")


def test_slots_are_shared_by_kind_so_the_form_size_is_that_of_the_largest_method():
    form = build_form(METHODS, "weighted_sum")
    for kind, slots in form.slots.items():
        assert len(slots) == max(len(assign_slots(m)[kind]) for m in METHODS.values())


def test_tiny_tolerances_get_a_number_box_not_a_slider_that_would_round_them_away():
    assert slot_kind(Param("ftol", "float", 1e-20, 0.0, 1.0)) == "number"
    assert slot_kind(Param("alpha", "float", 0.5, -1.0, 2.0)) == "slider"
    assert slot_kind(Param("open", "float", 1.0)) == "number"


def test_list_parameters_are_typed_from_comma_separated_text():
    form = build_form(METHODS, "n_average")
    values = [u.get("value") for u in form.updates("n_average")]
    i = form.components.index(form.slots["floats"][0])
    values[i] = "1, 2.5 ,3"
    assert form.params("n_average", values) == {"weights": [1.0, 2.5, 3.0]}
    values[i] = "1, x"
    with pytest.raises(Exception, match="params.weights"):
        form.params("n_average", values)


# -- block weights ------------------------------------------------------------------------------

def test_block_sliders_follow_the_architecture_sd1_26_sdxl_20_plus_vae():
    with gr.Blocks():
        mbw = BlockWeights()
    assert list(mbw.sliders["sd1"]) == archmod.block_names("sd1") and len(mbw.sliders["sd1"]) == 26
    assert list(mbw.sliders["sdxl"]) == archmod.block_names("sdxl") and len(mbw.sliders["sdxl"]) == 21
    assert mbw.show_updates("sdxl")[mbw.groups["sdxl"]]["visible"] is True
    assert mbw.show_updates("sd2")[mbw.groups["sd1"]]["visible"] is True
    values = list(range(len(mbw.components)))
    assert mbw.values("sdxl", values) == {n: float(26 + i) for i, n in enumerate(archmod.block_names("sdxl"))}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_presets_give_a_value_to_every_block(arch):
    for name in PRESETS:
        values = preset_values(name, arch)
        assert list(values) == archmod.block_names(arch)
    v = preset_values("Gradient V (ends 1, middle 0)", arch)
    last_out = archmod.block_names(arch)[-2 if arch == "sdxl" else -1]
    assert v["IN00"] == 1.0 and v[last_out] == 1.0 and v["M00"] == 0.0


# -- form <-> recipe ----------------------------------------------------------------------------

def test_components_by_architecture():
    assert components_of("sd1") == ("unet", "te0", "vae")
    assert components_of("sd2") == ("unet", "te1", "vae")
    assert components_of("sdxl") == ("unet", "te0", "te1", "vae")


def test_component_rows_round_trip_through_the_recipe_rules():
    rows = {"unet": (MAIN, {}), "te0": (TAKE, {"take": "a.safetensors"}), "vae": (BASE, {}),
            "te1": (OWN, {"method": "n_average", "params": {"weights": [1.0, 3.0]},
                          "pool": ["b.safetensors", "c.safetensors"]})}
    rules = arch_components({name: component_rule(mode, **kw) for name, (mode, kw) in rows.items()}, "sdxl")
    recipe = parse_recipe(Recipe(pool=["a.safetensors", "b.safetensors"], method="weighted_sum", params={"alpha": 0.3},
                                 base="base.safetensors", blocks={"IN00": 0.1, "OUT08": 0.9}, components=rules,
                                 output="x.safetensors", dtype="bf16", precision="fp32", seed=7, nonfinite="skip",
                                 extra={"note": "kept"}).to_dict())
    modes = {name: mode for name, (mode, _kw) in rows.items()}
    assert {name: component_mode(recipe.components.get(name)) for name in rows} == modes
    assert recipe.components["te1"].pool == ["b.safetensors", "c.safetensors"] and "unet" not in recipe.components
    assert parse_recipe(recipe.to_dict()) == recipe
    assert form_carry(recipe) == {"note": "kept"} and carried_extra(form_carry(recipe), []) == recipe.extra


def test_an_own_method_row_carries_the_base_and_blocks_it_shows_no_widget_for():
    rule = component_rule(OWN, method="weighted_sum", params={"alpha": 0.5, "nope": 1},
                          carried={"base": "b.safetensors", "blocks": {"IN00": 0.5}})
    assert rule.to_dict() == {"method": "weighted_sum", "params": {"alpha": 0.5}, "base": "b.safetensors",
                              "blocks": {"IN00": 0.5}}
    recipe = Recipe(pool=["a", "b"], method="weighted_sum", components={"te0": rule})
    assert component_carry(recipe) == {"te0": {"base": "b.safetensors", "blocks": {"IN00": 0.5}}}
    assert component_rule(OWN, method=rule.method, params=rule.params, carried=component_carry(recipe)["te0"]) == rule


def test_components_the_architecture_lacks_are_not_written():
    rules = {"unet": component_rule(MAIN), "te1": component_rule(TAKE, "a")}
    assert arch_components(rules, "sd1") == {}
    assert {name: r.to_dict() for name, r in arch_components(rules, "sdxl").items()} == {"te1": {"take": "a"}}


def test_pool_order_is_click_order_and_filtered_models_stay_selected():
    assert merge_selection([], ["a", "b", "c"], ["c", "a"]) == ["c", "a"]
    # "a" is hidden by the filter: it stays; "b" was unticked; "d" is new and goes last.
    assert merge_selection(["a", "b", "c"], ["b", "c", "d"], ["c", "d"]) == ["a", "c", "d"]


# -- model catalog ------------------------------------------------------------------------------

def test_catalog_describes_architecture_prediction_size_and_repair_status(models):
    infos = {i.name: i for i in Catalog(None).list([(p.name, str(p)) for p in sorted(models.iterdir())])}
    assert infos["sd1-a.safetensors"].title.startswith("SD1") and infos["sd1-a.safetensors"].status == "complete"
    assert infos["sdxl-vpred.safetensors"].prediction == "v-pred + ztSNR"
    assert "optional key(s) missing" in infos["sdxl-pruned.safetensors"].status
    assert infos["sd1-a.safetensors"].size == os.path.getsize(models / "sd1-a.safetensors")
    a = infos["sd1-a.safetensors"]
    assert a.label == f"sd1-a.safetensors — {a.title} · eps · {ui_catalog.format_size(a.size)} · complete"


def test_a_file_that_is_not_a_checkpoint_is_listed_as_such(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (info,) = Catalog(None).list([("broken.safetensors", str(tmp_path / "broken.safetensors"))])
    assert not info.mergeable and info.status.startswith("not readable")


def test_catalog_reads_each_header_once_per_size_and_mtime(models, tmp_path, monkeypatch):
    calls = []
    real = ui_catalog.describe
    monkeypatch.setattr(ui_catalog, "describe", lambda name, path: calls.append(name) or real(name, path))
    files = [(p.name, str(p)) for p in sorted(models.iterdir())]
    cache_file = tmp_path / "catalog.json"
    Catalog(str(cache_file)).list(files)
    assert len(calls) == len(files)
    Catalog(str(cache_file)).list(files)           # a new process: served from the file
    assert len(calls) == len(files)
    changed = models / "sd1-a.safetensors"
    os.unlink(changed)
    changed.write_bytes((models / "sd1-b.safetensors").read_bytes())
    Catalog(str(cache_file)).list(files)
    assert calls[len(files):] == ["sd1-a.safetensors"]


def test_the_base_guess_is_a_base_looking_model_of_the_pools_architecture(models):
    infos = Catalog(None).list([(p.name, str(p)) for p in sorted(models.iterdir())])
    assert guess_base(infos, "sd1") == "sd1-base.safetensors"
    assert guess_base(infos, "sdxl") == "sdxl-base.safetensors"
    assert guess_base([i for i in infos if "base" not in i.name], "sd1") is None


def test_the_base_guess_keeps_to_the_pools_scale(models):
    """A 1/64-scale demo base beside full-size models is never preset for a full-size pool (found in a
    real WebUI: Check plan then failed with "all inputs must have the same architecture")."""
    infos = Catalog(None).list([(p.name, str(p)) for p in sorted(models.iterdir())])
    by_name = {i.name: i for i in infos}
    assert pool_scale(by_name, ["sd1-a.safetensors"]) == by_name["sd1-base.safetensors"].scale > 1
    assert guess_base(infos, "sd1", by_name["sd1-base.safetensors"].scale) == "sd1-base.safetensors"
    assert guess_base(infos, "sd1", 1) is None

"""Merging end to end: each method against an independent fp64 reference, determinism, chunking,
block weights, components, non-weight keys, partial inputs, cancel, metadata."""
import hashlib
import json
import os
import threading

import pytest
import torch

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import ArchitectureError, Cancelled, MemoryBudgetError
from astolfo_merge.io import arch

from conftest import load, metadata, run_recipe

OPTS = dict(hash_inputs=False)


def merge(models, doc, name="out.safetensors", **opts):
    result = run_recipe(models, {"output": name, "dtype": "fp32", **doc}, **opts)
    return load(result.path), result


def weights(sd):
    return {k: v for k, v in sd.items() if v.is_floating_point()}


def as64(sd):
    return {k: v.double() for k, v in sd.items() if v.is_floating_point()}


def assert_matches(out, ref):
    assert set(weights(out)) == set(ref)
    for k, r in ref.items():
        torch.testing.assert_close(out[k].double(), r.float().double(), rtol=2e-7, atol=1e-30, msg=k)


def test_weighted_sum_matches_the_webui_formula_on_every_key(models):
    a, b = as64(load(models / "sd1-a.safetensors")), as64(load(models / "sd1-b.safetensors"))
    out, _ = merge(models, {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum", "params": {"alpha": 0.3}})
    assert_matches(out, {k: a[k] * (1 - 0.3) + b[k] * 0.3 for k in weights(a)})


def test_add_difference_matches_the_webui_formula_on_every_key(models):
    a, b, c = (as64(load(models / f"sd1-{n}.safetensors")) for n in ("a", "b", "base"))
    out, _ = merge(models, {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "base": "sd1-base.safetensors",
                            "method": "add_difference", "params": {"alpha": 0.7}})
    assert_matches(out, {k: a[k] + (b[k] - c[k]) * 0.7 for k in weights(a)})


@pytest.mark.slow
def test_n_average_equals_the_fp64_mean_and_weighted_mean(models):
    names = ["sdxl-a", "sdxl-b", "sdxl-c", "sdxl-base"]
    sds = [as64(load(models / f"{n}.safetensors")) for n in names]
    out, _ = merge(models, {"pool": [f"{n}.safetensors" for n in names], "method": "n_average"})
    assert_matches(out, {k: sum(sd[k] for sd in sds) / 4 for k in weights(sds[0])})
    w = [1.0, 2.0, 0.5, 0.5]
    out, _ = merge(models, {"pool": [f"{n}.safetensors" for n in names], "method": "n_average", "params": {"weights": w}},
                   name="w.safetensors")
    assert_matches(out, {k: sum(wi * sd[k] for wi, sd in zip(w, sds)) / sum(w) for k in weights(sds[0])})


def test_amplify_extrapolates_away_from_the_base(models):
    x, r = as64(load(models / "sd1-a.safetensors")), as64(load(models / "sd1-base.safetensors"))
    out, _ = merge(models, {"pool": ["sd1-a.safetensors"], "base": "sd1-base.safetensors", "method": "amplify"})
    assert_matches(out, {k: r[k] + 2.0 * (x[k] - r[k]) for k in weights(x)})


@pytest.mark.slow
def test_same_recipe_gives_byte_identical_output_and_chunking_does_not_change_it(models):
    doc = {"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors", "sdxl-c.safetensors"], "method": "n_average", "dtype": "fp16"}
    digests = []
    for chunk_bytes in (None, None, 4096):   # 4096: a few rows per chunk
        _, result = merge(models, doc, "same.safetensors", chunk_bytes=chunk_bytes)
        digests.append(result.sha256)
        os.unlink(result.path)
    assert digests[0] == digests[1] == digests[2]


def test_block_weights_override_alpha_per_block(models):
    a, b = as64(load(models / "sd1-a.safetensors")), as64(load(models / "sd1-b.safetensors"))
    out, _ = merge(models, {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum",
                            "params": {"alpha": 0.5}, "blocks": {"IN00": 0.0, "OUT11": 1.0, "BASE": 0.25}})
    expected = {}
    for k in weights(a):
        alpha = {"IN00": 0.0, "OUT11": 1.0, "BASE": 0.25}.get(arch.block_of(k, "sd1"), 0.5)
        expected[k] = a[k] * (1 - alpha) + b[k] * alpha
    assert_matches(out, expected)
    assert torch.equal(out["model.diffusion_model.out.2.weight"], b["model.diffusion_model.out.2.weight"].float())


def test_components_take_keep_base_and_own_method(models):
    sds = {n: as64(load(models / f"sdxl-{n}.safetensors")) for n in ("a", "b", "c", "base")}
    out, result = merge(models, {
        "pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "base": "sdxl-base.safetensors", "method": "weighted_sum",
        "params": {"alpha": 0.3},
        "components": {"vae": {"take": "base"}, "te0": {"take": "sdxl-c.safetensors"},
                       "te1": {"method": "n_average", "params": {}, "pool": ["sdxl-a.safetensors", "sdxl-b.safetensors", "sdxl-c.safetensors"]}}})
    for k in weights(out):
        comp = arch.component_of(k)
        if comp == "vae":
            exp = sds["base"][k]
        elif comp == "te0":
            exp = sds["c"][k]
        elif comp == "te1":
            exp = (sds["a"][k] + sds["b"][k] + sds["c"][k]) / 3
        else:
            exp = sds["a"][k] * 0.7 + sds["b"][k] * 0.3
        torch.testing.assert_close(out[k].double(), exp.float().double(), rtol=2e-7, atol=1e-30, msg=k)
    assert result.components["vae"] == "take from base"


def test_position_ids_are_written_as_int64_and_never_merged(models):
    out, _ = merge(models, {"pool": ["sdxl-a.safetensors", "sdxl-pruned.safetensors"], "base": "sdxl-base.safetensors",
                            "method": "weighted_sum", "params": {"alpha": 0.5}})
    ids = out[arch.POSITION_IDS["sdxl"]]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77).reshape(1, 77))


def test_partial_pool_members_are_filled_from_the_base_and_no_key_is_lost(models, make_checkpoint):
    vae_key = "first_stage_model.decoder.conv_in.weight"
    drop = [k for k in arch.layout("sd1", 64) if k.startswith("first_stage_model.")]
    make_checkpoint("novae.safetensors", "sd1", variant=7, folder=models, drop=drop)
    a, base = as64(load(models / "sd1-a.safetensors")), as64(load(models / "sd1-base.safetensors"))
    out, result = merge(models, {"pool": ["sd1-a.safetensors", "novae.safetensors"], "base": "sd1-base.safetensors",
                                 "method": "n_average"})
    assert set(out) == set(arch.layout("sd1", 64))
    torch.testing.assert_close(out[vae_key].double(), ((a[vae_key] + base[vae_key]) / 2).float().double())
    assert any("filled from the base" in line for line in result.log)


def test_markers_are_kept_and_mixed_prediction_types_are_refused(models):
    with pytest.raises(ArchitectureError, match="prediction type"):
        merge(models, {"pool": ["sdxl-a.safetensors", "sdxl-vpred.safetensors"], "method": "n_average"})
    out, _ = merge(models, {"pool": ["sdxl-a.safetensors", "sdxl-vpred.safetensors"], "method": "n_average",
                            "allow_mixed_prediction": True})
    assert "v_pred" in out and "ztsnr" in out


def test_mixed_architectures_are_refused_before_any_work(models):
    with pytest.raises(ArchitectureError, match="same architecture"):
        merge(models, {"pool": ["sd1-a.safetensors", "sdxl-a.safetensors"], "method": "n_average"})
    assert not (models / "out.safetensors").exists()


def test_cancel_leaves_no_output_and_no_temp_file(models):
    recipe = parse_recipe({"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "method": "n_average", "output": "c.safetensors"})
    plan = build_plan(recipe, str(models))
    cancel = threading.Event()

    def progress(p):
        if p.keys_done > 100:
            cancel.set()
    before = sorted(os.listdir(models))
    with pytest.raises(Cancelled):
        run_merge(plan, RunOptions(**OPTS), progress=progress, cancel=cancel)
    assert sorted(os.listdir(models)) == before


@pytest.mark.slow
def test_metadata_embeds_the_recipe_inputs_and_webui_fields_and_rerunning_it_gives_the_same_bytes(models, tmp_path):
    doc = {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum", "params": {"alpha": 0.3},
           "output": "meta.safetensors"}
    plan = build_plan(parse_recipe(doc), str(models))
    from astolfo_merge.io.hashes import HashCache
    result = run_merge(plan, RunOptions(hash_cache=HashCache(str(tmp_path / "h.json"))))
    meta = metadata(result.path)
    assert all(isinstance(v, str) for v in meta.values())
    inputs = json.loads(meta["astolfo_merge_inputs"])
    assert [i["name"] for i in inputs] == ["sd1-a.safetensors", "sd1-b.safetensors"]
    assert inputs[0]["sha256"] == hashlib.sha256((models / "sd1-a.safetensors").read_bytes()).hexdigest()
    assert json.loads(meta["sd_merge_recipe"])["method"] == "weighted_sum"
    assert set(json.loads(meta["sd_merge_models"])) == {i["sha256"] for i in inputs}
    from astolfo_merge.core.recipe import recipe_from_metadata
    again = recipe_from_metadata(meta)
    again.output = "again.safetensors"
    result2 = run_merge(build_plan(again, str(models)), RunOptions(hash_cache=HashCache(str(tmp_path / "h.json"))))
    assert load(result2.path).keys() == load(result.path).keys()
    for k, v in load(result.path).items():
        assert torch.equal(v, load(result2.path)[k])


def test_progress_reports_every_key_and_ends_complete(models):
    seen = []
    recipe = parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "n_average", "output": "p.safetensors"})
    plan = build_plan(recipe, str(models))
    run_merge(plan, RunOptions(**OPTS), progress=seen.append)
    keyed = [p for p in seen if not p.message]
    assert [p.keys_done for p in keyed] == list(range(1, len(plan.keys) + 1))
    assert keyed[-1].bytes_done == keyed[-1].bytes_total and keyed[-1].fraction == 1.0


def test_chunks_respect_the_chunk_budget_whatever_the_pool_size(models):
    from astolfo_merge.core.key_inputs import FileKeyInputs
    recipe = parse_recipe({"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "method": "n_average", "output": "q.safetensors"})
    plan = build_plan(recipe, str(models))
    kp = next(k for k in plan.keys if k.key.endswith("token_embedding.weight") and k.component == "te1")
    inputs = FileKeyInputs(plan, kp, [None, None], torch.float64, torch.device("cpu"), 64 * 1024, [])
    row_bytes = kp.shape[1] * 8
    for resident in (2, 10, 250):
        for a, b in inputs.chunks(resident):
            assert (b - a) == 1 or resident * (b - a) * row_bytes <= 64 * 1024


def test_budget_too_small_for_a_whole_tensor_method_is_reported_before_starting(models):
    from astolfo_merge.methods import METHODS, Method, register
    from astolfo_merge.methods.shapes import two_pass

    def run(inputs, params):
        yield sum(inputs.read(i) for i in range(inputs.n)) / inputs.n
    if "test_whole" not in METHODS:
        register(Method("test_whole", "t", "t", run, shape=two_pass(lambda n: n + 2, whole=lambda n: n + 2), min_models=1))
    recipe = parse_recipe({"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "method": "test_whole", "output": "b.safetensors"})
    plan = build_plan(recipe, str(models))
    with pytest.raises(MemoryBudgetError, match="raise --memory-gb"):
        plan.check_budget(0.0001)
    del METHODS["test_whole"]

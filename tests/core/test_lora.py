"""LoRA / LyCORIS bake-in: every affected key equals W + strength·(alpha/rank)·ΔW computed here
independently in fp64 (ΔW = up@down, LoHa (w1a@w1b)⊙(w2a@w2b), LoKr kron(w1, w2), Tucker forms, full
diffs); untouched keys stay bit-identical; wrong inputs are refused before any work."""
import json
import os

import pytest
import torch

from astolfo_merge.cli.commands import main
from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.lora import describe, list_loras, validate_loras
from astolfo_merge.core.lora_names import target_of
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.core.stage_run import Bindings
from astolfo_merge.core.stages import LORAS, Step
from astolfo_merge.errors import ArchitectureError, CheckpointError, RecipeError
from astolfo_merge.features.inspection import format_report, inspect_file
from astolfo_merge.features.lora_synth import default_modules, write_synthetic_lora
from astolfo_merge.features.trials import with_lora_strength
from astolfo_merge.io import arch
from astolfo_merge.io.header import read_header
from astolfo_merge.io.writer import save_file

from conftest import TEST_SCALE, load

OPTS = dict(hash_inputs=False)
FP32_ULP = dict(rtol=2e-7, atol=1e-30)


def bake(models, model, loras, name="out.safetensors", dtype="fp32", method="n_average", pool=None, **doc):
    """End to end: plan + engine + file; returns (output tensors, plan)."""
    recipe = parse_recipe({"pool": pool or [model], "method": method, "dtype": dtype, "output": name, "loras": loras, **doc})
    plan = build_plan(recipe, str(models))
    result = run_merge(plan, RunOptions(**OPTS))
    return load(result.path), plan


def hooked(models, model, loras):
    """The plan's LoRA hooks applied to the model's own fp64 tensors (what the engine does to a chunk
    holding the whole key): {key: baked fp64 tensor} for every key that has a hook."""
    recipe = parse_recipe({"pool": [model], "method": "n_average", "loras": loras})
    plan = build_plan(recipe, str(models), str(models / "unused.safetensors"))
    sd = load(models / model)
    out, steps = {}, bound(plan)
    for kp in plan.keys:
        if kp.post:
            t = sd[kp.key].double()
            for post in steps.post(kp):
                t = post(t, 0, kp.shape[0])
            out[kp.key] = t
    return out, sd


def bound(plan) -> Bindings:
    """The plan's steps bound to code as a process running its keys binds them (the bake stage's
    result: its LoRA files, as data)."""
    bake = next(stage for stage in plan.stages if stage.kind == "bake")
    return Bindings(plan, {LORAS: bake.loras})


def assert_exact(out, expected):
    """fp64 against fp64: same keys, equal to rounding."""
    assert set(out) == set(expected)
    for key, ref in expected.items():
        torch.testing.assert_close(out[key], ref, rtol=1e-12, atol=1e-14, msg=key)


EXTRA_SDXL = ["lora_unet_time_embedding_linear_1", "lora_unet_add_embedding_linear_2", "lora_unet_conv_in",
              "lora_unet_conv_out", "lora_te2_text_projection"]


def cross_section(arch_name, unet_names="diffusers"):
    """A few modules of every kind: both text encoders (first/last layer), a downsampler, an attention
    level, the middle block and an upsampler — enough to cover the mapping, small enough to be fast."""
    keep = ("input_blocks.3.", "input_blocks.4.", "middle_block.", "output_blocks.2.", "output_blocks.8.",
            ".layers.0.", ".layers.11.", "resblocks.0.", "resblocks.31.")
    return [n for n in default_modules(arch_name, True, unet_names) if any(k in target_of(n, arch_name).weight for k in keep)]


def lora_file(tmp_path, name, arch_name, algo, **kw):
    path = tmp_path / name
    write_synthetic_lora(path, arch_name, TEST_SCALE, algo=algo, **kw)
    return path


# ---------------------------------------------------------------------------------------------
# The reference: LyCORIS' formulas written out with tensordot / torch.kron on whole tensors

def _tucker(core, wa, wb):
    """W[p, r, k, l] = Σ_ij core[i, j, k, l] · wb[j, r] · wa[i, p]."""
    a = torch.tensordot(wa, core, dims=([0], [0]))            # [p, j, k, l]
    b = torch.tensordot(a, wb.flatten(1), dims=([1], [0]))    # [p, k, l, r]
    return b.permute(0, 3, 1, 2).contiguous()


def reference_delta(t, natural_shape):
    """(unscaled ΔW reshaped to the module's natural shape, rank or None)."""
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"]
        if "lora_mid.weight" in t:
            return _tucker(t["lora_mid.weight"], up.T, down.flatten(1)), down.shape[0]
        return (up @ down.flatten(1)).reshape(natural_shape), down.shape[0]
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            return _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]), t["hada_w1_b"].shape[0]
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return (w1 * w2).reshape(natural_shape), t["hada_w1_b"].shape[0]
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
        kernel = tuple(natural_shape[2:])
        if "lokr_t2" in t:
            w2, rank = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]), t["lokr_w2_b"].shape[0]
        else:
            w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
            w2 = w2.reshape(w2.shape[0], -1, *kernel) if kernel else w2
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(natural_shape), rank
    return t["diff"], None


def expected_keys(lora_path, model_sd, arch_name, strength, block_weights=None):
    """fp64 W + strength·block·(alpha/rank)·ΔW for every key the LoRA touches."""
    modules = {}
    for k, v in load(lora_path).items():
        name, suffix = k.split(".", 1)
        modules.setdefault(name, {})[suffix] = v.double()
    out = {}
    for name, t in modules.items():
        target = target_of(name, arch_name)
        key_shape = tuple(model_sd[target.weight].shape)
        natural = (key_shape[1], key_shape[0]) if target.transpose else (key_shape[0] // target.parts,) + key_shape[1:]
        delta, rank = reference_delta(t, natural)
        scale = t["alpha"].item() / rank if "alpha" in t and rank else 1.0
        mult = strength * (block_weights or {}).get(arch.block_of(target.weight, arch_name), 1.0)
        for key, d in ((target.weight, delta * scale), (target.bias, t.get("diff_b"))):
            if d is None:
                continue
            w = out.setdefault(key, model_sd[key].double().clone())
            d = d.reshape(natural) if key == target.weight else d
            if target.transpose:
                w += mult * d.T
            else:
                rows = w.shape[0] // target.parts
                w[target.part * rows:(target.part + 1) * rows] += mult * d.reshape((rows,) + w.shape[1:])
    return out


def assert_baked(out, model_sd, expected):
    for key, ref in expected.items():
        torch.testing.assert_close(out[key].double(), ref.float().double(), **FP32_ULP, msg=key)
    for key in set(model_sd) - set(expected):
        assert torch.equal(out[key], model_sd[key].to(out[key].dtype)), f"{key} changed"


# ---------------------------------------------------------------------------------------------
# The math, per algorithm, on every affected key

@pytest.mark.parametrize("arch_name,algo", [("sd1", "lora"), ("sd1", "locon"), ("sdxl", "locon")])
def test_lora_and_locon_bake_w_plus_strength_alpha_over_rank_up_down(models, tmp_path, arch_name, algo):
    path = lora_file(tmp_path, "x.safetensors", arch_name, algo, rank=4, alpha=3.0)
    out, sd = hooked(models, f"{arch_name}-a.safetensors", [{"file": str(path), "strength": 0.85}])
    expected = expected_keys(path, sd, arch_name, 0.85)
    assert len(expected) > 200
    assert_exact(out, expected)


@pytest.mark.parametrize("algo", ["lora_tucker", "loha", "loha_tucker", "lokr", "lokr_tucker", "full"])
def test_lycoris_forms_bake_their_products_on_every_affected_key(models, tmp_path, algo):
    path = lora_file(tmp_path, "x.safetensors", "sd1", algo, rank=3, alpha=1.5)
    out, sd = hooked(models, "sd1-b.safetensors", [{"file": str(path), "strength": -0.6}])
    assert_exact(out, expected_keys(path, sd, "sd1", -0.6))


def test_sdxl_loha_and_lokr_cover_both_text_encoders_embeddings_and_io_convs(models, tmp_path):
    for algo in ("loha", "lokr"):
        path = lora_file(tmp_path, f"{algo}.safetensors", "sdxl", algo, rank=2, alpha=2.0,
                         modules=cross_section("sdxl") + EXTRA_SDXL)
        out, sd = hooked(models, "sdxl-b.safetensors", [{"file": str(path), "strength": 1.25}])
        expected = expected_keys(path, sd, "sdxl", 1.25)
        assert {arch.component_of(k) for k in expected} == {"unet", "te0", "te1"}
        assert_exact(out, expected)


def test_te2_q_k_v_deltas_land_in_their_third_of_the_fused_in_proj(models, tmp_path):
    te2 = "conditioner.embedders.1.model."
    modules = ["lora_te2_text_model_encoder_layers_3_self_attn_k_proj", "lora_te2_text_projection",
               "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v", "lora_te1_text_model_encoder_layers_2_mlp_fc2"]
    path = lora_file(tmp_path, "x.safetensors", "sdxl", "lora", modules=modules, rank=3, alpha=None)
    sd = load(models / "sdxl-a.safetensors")
    lora = {k: v.double() for k, v in load(path).items()}
    out, _plan = bake(models, "sdxl-a.safetensors", [{"file": str(path), "strength": 0.5}])
    k_delta = lora[modules[0] + ".lora_up.weight"] @ lora[modules[0] + ".lora_down.weight"]   # no alpha: scale 1
    fused = sd[te2 + "transformer.resblocks.3.attn.in_proj_weight"].double()
    third = fused.shape[0] // 3
    want = fused.clone()
    want[third:2 * third] += 0.5 * k_delta
    torch.testing.assert_close(out[te2 + "transformer.resblocks.3.attn.in_proj_weight"].double(), want.float().double(), **FP32_ULP)
    proj = lora[modules[1] + ".lora_up.weight"] @ lora[modules[1] + ".lora_down.weight"]
    torch.testing.assert_close(out[te2 + "text_projection"].double(),
                               (sd[te2 + "text_projection"].double() + 0.5 * proj.T).float().double(), **FP32_ULP)
    unet_key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_v.weight"
    assert not torch.equal(out[unet_key], sd[unet_key].float())
    assert_baked(out, sd, expected_keys(path, sd, "sdxl", 0.5))


def test_conv_lora_3x3_down_with_1x1_up_reshapes_into_the_kernel(models, tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = lora_file(tmp_path, "x.safetensors", "sd1", "locon", modules=[name], rank=2, alpha=4.0)
    lora = {k: v.double() for k, v in load(path).items()}
    assert lora[name + ".lora_down.weight"].shape[2:] == (3, 3) and lora[name + ".lora_up.weight"].shape[2:] == (1, 1)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    out, sd = hooked(models, "sd1-a.safetensors", [{"file": str(path), "strength": 1.0}])
    up, down = lora[name + ".lora_up.weight"], lora[name + ".lora_down.weight"]
    conv = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * (4.0 / 2)
    assert_exact(out, {key: sd[key].double() + conv})


def test_sgm_spelled_unet_names_bake_exactly_like_diffusers_names(models, tmp_path):
    a = lora_file(tmp_path, "diffusers.safetensors", "sdxl", "locon", seed=7, modules=cross_section("sdxl", "diffusers"))
    b = lora_file(tmp_path, "sgm.safetensors", "sdxl", "locon", seed=7, modules=cross_section("sdxl", "sgm"))
    assert set(load(a)) != set(load(b))
    out_a, _ = hooked(models, "sdxl-c.safetensors", [{"file": str(a), "strength": 0.7}])
    out_b, _ = hooked(models, "sdxl-c.safetensors", [{"file": str(b), "strength": 0.7}])
    assert len(out_a) > 50 and set(out_a) == set(out_b)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_untouched_keys_are_bit_identical_in_fp16(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "lora", rank=2)
    sd = load(models / "sd1-c.safetensors")
    out, _plan = bake(models, "sd1-c.safetensors", [{"file": str(path), "strength": 1.0}], dtype="fp16")
    touched = set(expected_keys(path, sd, "sd1", 1.0))
    assert touched and all(torch.equal(out[k], sd[k]) for k in sd if k not in touched)
    assert all(not torch.equal(out[k], sd[k]) for k in touched)


# ---------------------------------------------------------------------------------------------
# Strength, blocks, before/after, chunking

def test_block_weights_multiply_the_strength_per_mbw_block(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sdxl", "locon", rank=2, modules=cross_section("sdxl"))
    blocks = {"IN04": 0.5, "BASE": 0.0, "OUT08": -1.0}
    out, sd = hooked(models, "sdxl-a.safetensors", [{"file": str(path), "strength": 0.9, "blocks": blocks}])
    expected = expected_keys(path, sd, "sdxl", 0.9, blocks)
    for key in list(expected):
        if arch.block_of(key, "sdxl") == "BASE":                              # text encoders: no hook at 0
            assert torch.equal(expected.pop(key), sd[key].double())
    assert {arch.block_of(k, "sdxl") for k in expected} >= {"IN04", "OUT08", "IN03", "M00"}
    assert_exact(out, expected)


def test_before_bakes_into_each_pool_member_or_only_the_named_ones(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "loha", rank=2, modules=cross_section("sd1"))
    a, b = load(models / "sd1-a.safetensors"), load(models / "sd1-b.safetensors")
    da, db = expected_keys(path, a, "sd1", 1.0), expected_keys(path, b, "sd1", 1.0)
    pool = ["sd1-a.safetensors", "sd1-b.safetensors"]
    common = dict(pool=pool, method="weighted_sum", params={"alpha": 0.3})
    only_b, _ = bake(models, None, [{"file": str(path), "when": "before", "models": ["sd1-b.safetensors"]}], name="b.safetensors", **common)
    both, _ = bake(models, None, [{"file": str(path), "when": "before"}], name="both.safetensors", **common)
    for key in da:
        torch.testing.assert_close(only_b[key].double(), (0.7 * a[key].double() + 0.3 * db[key]).float().double(), **FP32_ULP)
        torch.testing.assert_close(both[key].double(), (0.7 * da[key] + 0.3 * db[key]).float().double(), **FP32_ULP)
    for key in set(a) - set(da):
        assert torch.equal(only_b[key], both[key])


def test_before_leaves_the_base_of_add_difference_alone(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "lora", rank=2)
    a, b, c = (load(models / f"sd1-{n}.safetensors") for n in ("a", "b", "base"))
    out, _ = bake(models, None, [{"file": str(path), "when": "before"}], pool=["sd1-a.safetensors", "sd1-b.safetensors"],
                  base="sd1-base.safetensors", method="add_difference", params={"alpha": 1.0})
    da, db = expected_keys(path, a, "sd1", 1.0), expected_keys(path, b, "sd1", 1.0)
    for key in da:
        want = da[key] + (db[key] - c[key].double())
        torch.testing.assert_close(out[key].double(), want.float().double(), **FP32_ULP)


def test_delta_rows_of_any_row_range_equal_the_whole_delta(models, tmp_path):
    """The engine hands post/pre hooks arbitrary row ranges; q/k/v thirds, transposes and LoKr rows must line up."""
    path = lora_file(tmp_path, "x.safetensors", "sdxl", "lokr", rank=2, modules=cross_section("sdxl") + EXTRA_SDXL)
    recipe = parse_recipe({"pool": ["sdxl-a.safetensors"], "method": "n_average", "loras": [{"file": str(path), "strength": 0.4}]})
    plan = build_plan(recipe, str(models), str(tmp_path / "unused.safetensors"))
    hooked, steps = [kp for kp in plan.keys if kp.post], bound(plan)
    assert any(kp.key.endswith("in_proj_weight") for kp in hooked) and any(kp.key.endswith("text_projection") for kp in hooked)
    assert all(kp.post == [Step("lora", 0, 0.4)] for kp in hooked)     # data: the file's index and the multiplier
    for kp in hooked:
        add = steps.post(kp)[0]
        whole = add(torch.zeros(kp.shape, dtype=torch.float64), 0, kp.shape[0])
        rows, cuts = kp.shape[0], sorted({0, 1, kp.shape[0] // 3, kp.shape[0] // 2 + 1, kp.shape[0]})
        parts = [add(torch.zeros((b - a,) + kp.shape[1:], dtype=torch.float64), a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        assert torch.equal(torch.cat(parts), whole) and rows == whole.shape[0], kp.key
        assert whole.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Refusals and reports

def test_sd1_lora_on_sdxl_is_refused_before_any_work(models, tmp_path):
    path = lora_file(tmp_path, "sd1-lora.safetensors", "sd1", "locon")
    recipe = parse_recipe({"pool": ["sdxl-a.safetensors"], "method": "n_average", "output": "never.safetensors",
                           "loras": [{"file": str(path)}]})
    with pytest.raises(ArchitectureError, match=r"loras\[0\].*LoRA for SD1.*models are SDXL"):
        build_plan(recipe, str(models))
    assert not (models / "never.safetensors").exists()


def test_a_module_whose_shape_does_not_fit_is_refused_by_name(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "lora", rank=2)
    tensors = load(path)
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(7, 2, 1, 1)
    save_file(tensors, path, overwrite=True)
    with pytest.raises(ArchitectureError, match="lora_unet_down_blocks_0_attentions_0_proj_in"):
        bake(models, "sd1-a.safetensors", [{"file": str(path)}])


def test_one_layer_under_two_spellings_is_refused(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "lora", rank=2,
                     modules=["lora_unet_down_blocks_1_attentions_0_proj_in", "lora_unet_input_blocks_4_1_proj_in"])
    with pytest.raises(CheckpointError, match="both change 'model.diffusion_model.input_blocks.4.1.proj_in.weight'"):
        hooked(models, "sd1-a.safetensors", [{"file": str(path)}])


def test_unmatched_modules_are_reported_by_name(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "lora", rank=2)
    tensors = load(path)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(5, 2)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 5)
    save_file(tensors, path, overwrite=True)
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors"], "method": "n_average", "loras": [{"file": str(path)}]}),
                      str(models), str(tmp_path / "unused.safetensors"))
    assert any("lora_unet_not_a_layer" in line and "NOT" in line for line in plan.log)


def test_unsupported_lycoris_types_are_refused_by_name(models, tmp_path):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "lora", rank=2)
    tensors = load(path)
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = torch.ones(1, 5)
    save_file(tensors, path, overwrite=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        bake(models, "sd1-a.safetensors", [{"file": str(path)}])


def test_a_lora_in_the_pool_is_refused_with_a_hint_to_list_it_under_loras(models, tmp_path):
    lora_file(models, "x-lora.safetensors", "sd1", "lora", rank=2)
    recipe = parse_recipe({"pool": ["sd1-a.safetensors", "x-lora.safetensors"], "method": "n_average"})
    with pytest.raises(CheckpointError, match='LoRA.*"loras"'):
        build_plan(recipe, str(models))


@pytest.mark.parametrize("loras,field", [
    ({"file": "x"}, "loras"),
    ([{"strength": 1}], "loras[0].file"),
    ([{"file": "x", "strength": "high"}], "loras[0].strength"),
    ([{"file": "x"}, {"file": "y", "strength": 99}], "loras[1].strength"),
    ([{"file": "x", "when": "during"}], "loras[0].when"),
    ([{"file": "x", "blocks": {"IN99": 1}}], "loras[0].blocks.IN99"),
    ([{"file": "x", "weight": 1}], "loras[0].weight"),
    ([{"file": "x", "models": ["a"]}], "loras[0].models"),
])
def test_recipe_lora_errors_name_the_field(loras, field):
    with pytest.raises(RecipeError) as err:
        validate_loras(loras)
    assert err.value.field == field


def test_plan_refuses_a_missing_lora_file_and_a_block_of_the_other_architecture(models):
    with pytest.raises(RecipeError, match=r"loras\[0\]\.file.*nope\.safetensors"):
        bake(models, "sd1-a.safetensors", [{"file": "nope.safetensors"}])
    with pytest.raises(RecipeError) as err:
        bake(models, "sdxl-a.safetensors", [{"file": "nope.safetensors", "blocks": {"IN11": 0.5}}])
    assert err.value.field == "loras[0].blocks.IN11"


def test_inspect_describes_a_lora_kind_rank_components_and_vpred_metadata(tmp_path):
    path = lora_file(tmp_path, "vpred.safetensors", "sdxl", "locon", rank=4, alpha=2.0,
                     metadata={"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True", "ss_base_model_version": "sdxl_base_v1-0"})
    report = inspect_file(path)
    lora = report["lora"]
    assert (lora["kind"], lora["arch"], lora["ranks"], lora["conv_ranks"], lora["alphas"]) == ("LoCon", "sdxl", [4], [4], [2.0])
    assert lora["components"] == {"unet": 788, "te0": 72, "te1": 192}
    assert (lora["prediction"], lora["ztsnr"], lora["unmatched"]) == ("v", True, [])
    text = format_report(report)
    assert "LoCon" in text and "v-prediction" in text and "sdxl_base_v1-0" in text


def test_describe_says_none_for_a_checkpoint(models):
    assert describe(read_header(models / "sd1-a.safetensors")) is None


def test_list_loras_lists_only_lora_files_for_the_tab(models, tmp_path):
    folder = tmp_path / "Lora"
    (folder / "sub").mkdir(parents=True)
    lora_file(folder, "a.safetensors", "sd1", "lora", rank=2)
    lora_file(folder / "sub", "b.safetensors", "sdxl", "lokr", rank=2)
    os.symlink(models / "sd1-a.safetensors", folder / "checkpoint.safetensors")
    found = list_loras(folder)
    assert [(f["name"], f["kind"], f["arch"]) for f in found] == [("a.safetensors", "LoRA", "sd1"), ("sub/b.safetensors", "LoKr", "sdxl")]


def test_with_lora_strength_sets_one_entry_for_the_xyz_axis():
    recipe = parse_recipe({"pool": ["a"], "method": "n_average", "output": "x.safetensors",
                           "loras": [{"file": "x", "strength": 1.0}, {"file": "y"}]})
    changed = with_lora_strength(recipe, 0.25, index=1)
    assert changed.extra["loras"][1]["strength"] == 0.25 and changed.output is None
    assert recipe.extra["loras"][1] == {"file": "y"}
    with pytest.raises(RecipeError):
        with_lora_strength(recipe, 0.5, index=2)
    with pytest.raises(RecipeError) as err:
        with_lora_strength(recipe, 50.0)
    assert err.value.field == "loras[0].strength"


def test_bake_command_equals_the_recipe_path_and_embeds_the_recipe(models, tmp_path, capsys):
    path = lora_file(tmp_path, "x.safetensors", "sd1", "locon", rank=2)
    out = tmp_path / "baked.safetensors"
    code = main(["bake", str(models / "sd1-a.safetensors"), "--lora", f"{path}:0.75", "-o", str(out),
                 "--dtype", "fp32", "--no-hash", "-q"])
    assert code == 0
    sd = load(models / "sd1-a.safetensors")
    assert_baked(load(out), sd, expected_keys(path, sd, "sd1", 0.75))
    recipe = json.loads(read_header(out).metadata["astolfo_merge_recipe"])
    assert recipe["loras"][0]["strength"] == 0.75

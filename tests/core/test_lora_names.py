"""LoRA module name -> LDM key: checked for EVERY module of the full-size SD1 and SDXL layouts against
sd-mecha 1.1.8's own kohya conversions (an independent implementation), in both directions."""
import importlib

import pytest

from astolfo_merge.core.lora_names import module_table, target_of
from astolfo_merge.features.lora_synth import default_modules
from astolfo_merge.io import arch

UNET, TEXT = ("unet",), ("te0", "te1")


@pytest.fixture(scope="module")
def mecha():
    pytest.importorskip("sd_mecha")
    from sd_mecha.extensions import model_configs
    base = "sd_mecha.extensions.builtin.model_configs."
    return {"configs": model_configs,
            "sd1": importlib.import_module(base + "convert_sd1_kohya_to_original"),
            "sdxl_unet": importlib.import_module(base + "convert_sdxl_diffusers_unet_to_original"),
            "clip_g": importlib.import_module(base + "convert_sdxl_diffusers_clip_g_to_original")}


def _oracle(mecha, arch_name, lycoris_config, ldm_to_kohya) -> dict:
    """sd-mecha's view: kohya LoRA module name -> (LDM key, third of a fused q/k/v tensor)."""
    kohya_to_ldm = {}
    for key in arch.layout(arch_name):
        kohya = ldm_to_kohya(key)
        if kohya is None:
            continue
        kohya = (kohya,) if isinstance(kohya, str) else tuple(kohya)
        for part, k in enumerate(kohya):
            kohya_to_ldm[k] = (key, part)
    names = {}
    for lora_key, kohya_key in mecha["configs"].resolve(lycoris_config).lycoris_to_base_keys.items():
        name, suffix = lora_key.split(".", 1)
        if suffix == "lora_down.weight" and kohya_key in kohya_to_ldm:
            names[name] = kohya_to_ldm[kohya_key]
    return names


def _ours(arch_name) -> dict:
    """Our table as sd-mecha sees it: name -> (weight key, third of a fused q/k/v tensor)."""
    return {name: (t.weight, t.part) for name, t in module_table(arch_name).items()}


def _assert_same(oracle, ours):
    missing = sorted(set(oracle) - set(ours))
    wrong = sorted(n for n in oracle if n in ours and ours[n] != oracle[n])
    assert not missing, f"{len(missing)} sd-mecha names unknown to us, e.g. {missing[:3]}"
    assert not wrong, f"{len(wrong)} names map elsewhere, e.g. {[(n, oracle[n], ours[n]) for n in wrong[:3]]}"


def _sd1(mecha, key):
    if key.startswith("model.diffusion_model."):
        return mecha["sd1"].convert_unet_key(key)
    if key.startswith("cond_stage_model."):
        return mecha["sd1"].convert_clip_l_key(key)
    return None


def _sdxl(mecha, key, unet_spelling):
    if key.startswith("model.diffusion_model."):
        if unet_spelling == "sgm":
            return key.replace("model.diffusion_model.", "unet.")
        return mecha["sdxl_unet"].convert_unet_key(key, prefix="unet.")
    if key.startswith("conditioner.embedders.0."):
        return key.replace("conditioner.embedders.0.transformer.", "te1.")
    if key.startswith("conditioner.embedders.1."):
        return mecha["clip_g"].convert_clip_g_key(key)[0]
    return None


def _both_ways(oracle, ours, our_names):
    _assert_same(oracle, ours)
    extra = sorted(set(our_names) - set(oracle))
    assert not extra, f"{len(extra)} of our names sd-mecha does not know, e.g. {extra[:3]}"


def _spelled(ours, prefix_ok):
    return [n for n in ours if not n.startswith("lora_unet_") or prefix_ok(n)]


DIFFUSERS = ("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_unet_conv_in",
             "lora_unet_conv_out", "lora_unet_conv_norm_out", "lora_unet_time_embedding", "lora_unet_add_embedding")


def test_every_sd1_module_name_maps_like_sd_mecha(mecha):
    oracle = _oracle(mecha, "sd1", "sd1-kohya_kohya_lora", lambda k: _sd1(mecha, k))
    ours = _ours("sd1")
    assert len(oracle) == 490
    _both_ways(oracle, ours, _spelled(ours, lambda n: n.startswith(DIFFUSERS)))


def test_every_sdxl_module_name_maps_like_sd_mecha_diffusers_spelling(mecha):
    oracle = _oracle(mecha, "sdxl", "sdxl-kohya_but_diffusers_kohya_lora", lambda k: _sdxl(mecha, k, "diffusers"))
    ours = _ours("sdxl")
    assert len(oracle) == 1409
    _both_ways(oracle, ours, _spelled(ours, lambda n: n.startswith(DIFFUSERS)))


def test_every_sdxl_module_name_maps_like_sd_mecha_sgm_spelling(mecha):
    oracle = _oracle(mecha, "sdxl", "sdxl-kohya_kohya_lora", lambda k: _sdxl(mecha, k, "sgm"))
    ours = _ours("sdxl")
    _both_ways(oracle, ours, _spelled(ours, lambda n: not n.startswith(DIFFUSERS)))


@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_every_unet_and_text_encoder_weight_is_reachable_by_some_module(arch_name):
    lay = arch.layout(arch_name)
    reached = set()
    for t in module_table(arch_name).values():
        reached |= {t.weight, t.bias}
    skip = ("position_ids", "logit_scale")
    wanted = {k for k, s in lay.items() if s.component in UNET + TEXT and not k.endswith(skip)}
    assert wanted - reached == set()


@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_every_module_name_maps_to_existing_keys_of_consistent_shape(arch_name):
    lay = arch.layout(arch_name)
    for name, t in module_table(arch_name).items():
        assert t.weight in lay, name
        rows = t.rows(lay[t.weight].shape)[1]
        if t.bias is not None:
            assert t.bias in lay and lay[t.bias].shape[0] // t.parts == rows, name
        if t.transpose:
            assert name.endswith("text_projection") and len(lay[t.weight].shape) == 2


def test_fused_openclip_q_k_v_and_renamed_layers_of_sdxl_te2():
    te2 = "conditioner.embedders.1.model."
    for part, letter in enumerate("qkv"):
        t = target_of(f"lora_te2_text_model_encoder_layers_7_self_attn_{letter}_proj", "sdxl")
        assert (t.weight, t.bias, t.part, t.parts) == (te2 + "transformer.resblocks.7.attn.in_proj_weight",
                                                       te2 + "transformer.resblocks.7.attn.in_proj_bias", part, 3)
        assert t.rows((3840, 1280)) == (1280 * part, 1280)
    assert target_of("lora_te2_text_model_encoder_layers_7_mlp_fc1", "sdxl").weight == te2 + "transformer.resblocks.7.mlp.c_fc.weight"
    assert target_of("lora_te2_text_model_encoder_layers_7_mlp_fc2", "sdxl").weight == te2 + "transformer.resblocks.7.mlp.c_proj.weight"
    assert target_of("lora_te2_text_model_encoder_layers_7_layer_norm2", "sdxl").bias == te2 + "transformer.resblocks.7.ln_2.bias"
    assert target_of("lora_te2_text_model_encoder_layers_7_self_attn_out_proj", "sdxl").weight == te2 + "transformer.resblocks.7.attn.out_proj.weight"
    projection = target_of("lora_te2_text_projection", "sdxl")
    assert projection.weight == te2 + "text_projection" and projection.transpose


def test_unet_structural_names_map_for_sd1_and_sdxl():
    unet = "model.diffusion_model."
    cases = {
        ("sd1", "lora_unet_conv_in"): "input_blocks.0.0.weight",
        ("sd1", "lora_unet_conv_out"): "out.2.weight",
        ("sd1", "lora_unet_conv_norm_out"): "out.0.weight",
        ("sd1", "lora_unet_time_embedding_linear_2"): "time_embed.2.weight",
        ("sd1", "lora_unet_down_blocks_2_downsamplers_0_conv"): "input_blocks.9.0.op.weight",
        ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv"): "output_blocks.2.1.conv.weight",
        ("sd1", "lora_unet_up_blocks_3_attentions_2_proj_out"): "output_blocks.11.1.proj_out.weight",
        ("sd1", "lora_unet_mid_block_resnets_1_time_emb_proj"): "middle_block.2.emb_layers.1.weight",
        ("sdxl", "lora_unet_add_embedding_linear_1"): "label_emb.0.0.weight",
        ("sdxl", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"): "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"): "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        ("sdxl", "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2"): "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight",
        ("sdxl", "lora_unet_up_blocks_0_upsamplers_0_conv"): "output_blocks.2.2.conv.weight",
        ("sdxl", "lora_unet_up_blocks_2_resnets_2_conv_shortcut"): "output_blocks.8.0.skip_connection.weight",
        ("sdxl", "lycoris_unet_mid_block_attentions_0_proj_in"): "middle_block.1.proj_in.weight",
    }
    for (arch_name, name), key in cases.items():
        assert target_of(name, arch_name).weight == unet + key, name
    assert target_of("lora_unet_down_blocks_0_attentions_0_proj_in", "sdxl") is None    # SDXL level 0 has no attention
    assert target_of("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sd1") is None


def test_kohyas_default_module_sets_have_the_well_known_sizes():
    assert len(default_modules("sd1", convs=False)) == 264          # 192 UNET + 72 TE
    sdxl = default_modules("sdxl", convs=False)
    assert len([n for n in sdxl if n.startswith("lora_unet_")]) == 722
    assert len([n for n in sdxl if n.startswith("lora_te")]) == 264

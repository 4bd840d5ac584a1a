"""Build astolfo_merge/io/layouts.json from ../shared/data/keys (run by hand; the package never reads ../shared).

The shipped file lists, per architecture, every canonical weight key with its full-size shape,
component and whether its absence is harmless ("optional" in *our* policy, REPAIR.md §4: only
TE0 position ids and TE1/TE-H logit_scale, plus the SD2 WD-1.4-style tail). EMA copies are not
stored: they are derived from the UNET key names. SD2 is derived from SD1 (UNET with linear
proj_in/proj_out and 1024-wide cross-attention) and SDXL's TE1 (OpenCLIP width 1280 -> 1024,
32 -> 24 blocks), the way the real SD 2.x checkpoints are laid out.
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "keys"

SCHEDULE = ["alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
            "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
            "posterior_variance", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"]


def load(name):
    return json.loads((SHARED / f"{name}.json").read_text())["keys"]


def weights(keys, optional):
    out = {}
    for key, spec in keys.items():
        if spec["component"] == "other":
            continue
        out[key] = [spec["shape"], spec["component"], 1 if key in optional else 0]
    return out


def sd2_from(sd1, sdxl):
    out = {}
    for key, (shape, comp, _opt) in sd1.items():
        if comp == "te0":
            continue
        shape = list(shape)
        if comp == "unet" and (key.endswith("proj_in.weight") or key.endswith("proj_out.weight")):
            shape = shape[:2]
        if comp == "unet" and ("attn2.to_k.weight" in key or "attn2.to_v.weight" in key):
            shape = [shape[0], 1024]
        out[key] = [shape, comp, 0]
    width = {1280: 1024, 5120: 4096, 3840: 3072}
    prefix_xl, prefix_2 = "conditioner.embedders.1.model.", "cond_stage_model.model."
    for key, (shape, comp, _opt) in sdxl.items():
        if comp != "te1":
            continue
        rest = key[len(prefix_xl):]
        if rest.startswith("transformer.resblocks."):
            block = int(rest.split(".")[2])
            if block >= 24:
                continue
        new_shape = [width.get(d, d) for d in shape]
        optional = rest in ("logit_scale", "text_projection") or rest.startswith("transformer.resblocks.23.")
        out[prefix_2 + rest] = [new_shape, "te1", 1 if optional else 0]
    return out


def main():
    sd1_keys, sdxl_keys = load("sd1"), load("sdxl")
    sd1 = weights(sd1_keys, {"cond_stage_model.transformer.text_model.embeddings.position_ids"})
    sdxl = weights(sdxl_keys, {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                               "conditioner.embedders.1.model.logit_scale"})
    layouts = {
        "sd1": {"keys": sd1},
        "sd2": {"keys": sd2_from(sd1, sdxl)},
        "sdxl": {"keys": sdxl},
        "schedule_buffers": SCHEDULE,
        "markers": {k: v["shape"] for k, v in sdxl_keys.items()
                    if k in ("v_pred", "ztsnr", "edm_vpred.sigma_min", "edm_vpred.sigma_max")},
    }
    counts = {a: len(layouts[a]["keys"]) for a in ("sd1", "sd2", "sdxl")}
    assert counts == {"sd1": 1131, "sd2": 1228, "sdxl": 2515}, counts
    target = ROOT / "astolfo_merge" / "io" / "layouts.json"
    target.write_text(json.dumps(layouts, separators=(",", ":")))
    print(f"wrote {target} ({target.stat().st_size} bytes): {counts}")


if __name__ == "__main__":
    sys.exit(main())

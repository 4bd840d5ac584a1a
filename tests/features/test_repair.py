"""Repair = fill, never strip (REPAIR.md §10, invariants of §12), and partial inputs inside merges."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from astolfo_merge.cli.commands import main
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.errors import ArchitectureError, AstolfoError, CheckpointError
from astolfo_merge.features import repair
from astolfo_merge.io import arch
from astolfo_merge.io.header import read_header
from astolfo_merge.io.writer import save_file

from conftest import TEST_SCALE, load, run_recipe

XL_POS = arch.POSITION_IDS["sdxl"]
SD1_POS = arch.POSITION_IDS["sd1"]
SD1_VAE = [k for k, s in arch.layout("sd1", TEST_SCALE).items() if s.component == "vae"]


def canonical(arch_name) -> set:
    return set(arch.layout(arch_name, TEST_SCALE))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so 'equal' means bit for bit (dtype included)."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(as_int)


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def do_repair(path, out, base=None, **kw):
    plan = repair.plan_repair(read_header(path), read_header(base) if base else None, **kw)
    return repair.run_repair(plan, out)


def assert_full(path, arch_name, markers=()):
    ident = arch.identify(read_header(path).shapes)
    assert (ident.arch, ident.is_full, sorted(ident.markers)) == (arch_name, True, sorted(markers))


# --- the invariants ---------------------------------------------------------------------------

def test_missing_position_ids_are_added_and_every_other_tensor_is_copied_bit_for_bit(models, tmp_path):
    src = models / "sdxl-pruned.safetensors"
    result = do_repair(src, tmp_path / "fixed.safetensors")
    out, before = load(result.path), load(src)
    assert set(out) == canonical("sdxl")
    assert all(same_bits(out[k], v) for k, v in before.items())
    assert same_bits(out[XL_POS], torch.arange(77, dtype=torch.int64).reshape(1, 77))
    assert result.plan.filled == [] and result.plan.position_ids == "added"
    assert_full(result.path, "sdxl")


def test_a_whole_missing_vae_is_filled_from_the_base_cast_to_the_files_dtype(models, make_checkpoint, tmp_path):
    damaged = make_checkpoint("novae.safetensors", "sd1", variant=5, dtype=torch.bfloat16, drop=SD1_VAE)
    base = models / "sd1-base.safetensors"
    result = do_repair(damaged, tmp_path / "fixed.safetensors", base=base)
    out, own, base_tensors = load(result.path), load(damaged), load(base)
    assert set(out) == canonical("sd1")
    assert sorted(result.plan.filled) == sorted(SD1_VAE)
    assert all(same_bits(out[k], base_tensors[k].to(torch.bfloat16)) for k in SD1_VAE)
    assert all(same_bits(out[k], v) for k, v in own.items() if k != SD1_POS)
    assert_full(result.path, "sd1")


def test_missing_weights_need_a_base_and_nothing_is_written_without_one(make_checkpoint, tmp_path):
    damaged = make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE)
    plan = repair.plan_repair(read_header(damaged))
    assert plan.needs_base and len(plan.filled) == 248
    with pytest.raises(AstolfoError, match="pass --base BASE"):
        repair.run_repair(plan, tmp_path / "fixed.safetensors")
    assert not (tmp_path / "fixed.safetensors").exists()


def test_float_position_ids_are_rewritten_as_int64_0_to_76(make_checkpoint, tmp_path):
    tensors = load(make_checkpoint("src.safetensors", "sd1", variant=1))
    tensors[SD1_POS] = (torch.arange(77, dtype=torch.float32) - 0.0025).reshape(1, 77)
    save_file(tensors, tmp_path / "merged.safetensors")
    result = do_repair(tmp_path / "merged.safetensors", tmp_path / "fixed.safetensors")
    assert result.plan.position_ids == "reset"
    assert same_bits(load(result.path)[SD1_POS], torch.arange(77, dtype=torch.int64).reshape(1, 77))


def test_vae_attention_512x512_is_reshaped_with_the_same_values(make_checkpoint, tmp_path):
    tensors = load(make_checkpoint("src.safetensors", "sd1", variant=2))
    flat = {k: (v.reshape(v.shape[:2]) if arch._VAE_ATTN.match(k) else v) for k, v in tensors.items()}
    save_file(flat, tmp_path / "flat.safetensors")
    result = do_repair(tmp_path / "flat.safetensors", tmp_path / "fixed.safetensors")
    out = load(result.path)
    assert len(result.plan.reshaped) == 8
    assert all(same_bits(out[k], tensors[k]) for k in result.plan.reshaped)
    assert_full(result.path, "sd1")


def test_legacy_nai_key_names_are_normalised(make_checkpoint, tmp_path):
    prefix = "cond_stage_model.transformer."
    tensors = load(make_checkpoint("src.safetensors", "sd1", variant=3))
    nai = {k.replace(prefix + "text_model.", prefix): v for k, v in tensors.items()}
    save_file(nai, tmp_path / "nai.safetensors")
    result = do_repair(tmp_path / "nai.safetensors", tmp_path / "fixed.safetensors")
    out = load(result.path)
    assert set(out) == canonical("sd1") and len(result.plan.renamed) == 197
    assert all(same_bits(out[k], v) for k, v in tensors.items())


def _training_file(make_checkpoint, tmp_path):
    """An SD1 training checkpoint: weights + EMA copies + schedule buffers + both markers."""
    tensors = load(make_checkpoint("src.safetensors", "sd1", variant=4, markers=["v_pred", "ztsnr"]))
    unet = [k for k in tensors if k.startswith(arch.UNET_PREFIX)]
    tensors.update({"model_ema.diffusion_model" + k[len(arch.UNET_PREFIX):].replace(".", ""): tensors[k].clone()
                    for k in unet[:5]})
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors.update({b: torch.linspace(0, 1, 1000) for b in arch.schedule_buffers()})
    save_file(tensors, tmp_path / "training.safetensors")
    return tmp_path / "training.safetensors", tensors


def test_markers_are_kept_and_ema_schedule_buffers_are_dropped_by_default(make_checkpoint, tmp_path):
    path, tensors = _training_file(make_checkpoint, tmp_path)
    result = do_repair(path, tmp_path / "fixed.safetensors")
    out = load(result.path)
    assert set(out) == canonical("sd1") | {"v_pred", "ztsnr"}
    assert {kind for _k, kind, _b in result.plan.dropped} == {"EMA", "schedule"}
    assert len(result.plan.dropped) == 6 + 12
    assert_full(result.path, "sd1", ["v_pred", "ztsnr"])


def test_keep_ema_keeps_the_ema_keys(make_checkpoint, tmp_path):
    path, tensors = _training_file(make_checkpoint, tmp_path)
    result = do_repair(path, tmp_path / "fixed.safetensors", keep_ema=True)
    out = load(result.path)
    ema = {k for k in tensors if k.startswith("model_ema.")}
    assert set(out) == canonical("sd1") | {"v_pred", "ztsnr"} | ema
    assert all(same_bits(out[k], tensors[k]) for k in ema)


def test_metadata_values_all_become_strings_with_a_repair_record(models, tmp_path):
    src = tmp_path / "odd-metadata.safetensors"
    _rewrite_metadata(models / "sdxl-pruned.safetensors", src, {"ss_tag_frequency": {"astolfo": 3}, "epoch": 7,
                                                                "modelspec.title": "pruned"})
    assert read_header(src).metadata["epoch"] == 7          # the hostile input really has a non-string
    result = do_repair(src, tmp_path / "fixed.safetensors")
    meta = read_header(result.path).metadata
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["ss_tag_frequency"]) == {"astolfo": 3} and meta["epoch"] == "7"
    record = json.loads(meta["astolfo_merge_repair"])
    assert (record["source"], record["filled"], record["position_ids"]) == ("odd-metadata.safetensors", 0, "added")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_repair_record_lists_few_filled_keys_and_the_base(models, make_checkpoint, tmp_path):
    final_norm = [k for k in arch.layout("sd1", TEST_SCALE) if "final_layer_norm" in k]
    damaged = make_checkpoint("nonorm.safetensors", "sd1", variant=6, drop=final_norm)
    result = do_repair(damaged, tmp_path / "fixed.safetensors", base=models / "sd1-base.safetensors")
    record = json.loads(read_header(result.path).metadata["astolfo_merge_repair"])
    assert (record["base"], record["filled"], sorted(record["filled_keys"])) == ("sd1-base.safetensors", 2, sorted(final_norm))


def test_streaming_in_tiny_chunks_writes_the_same_file(models, tmp_path):
    plan = repair.plan_repair(read_header(models / "sd1-a.safetensors"))
    whole = repair.run_repair(plan, tmp_path / "whole.safetensors")
    chunked = repair.run_repair(plan, tmp_path / "chunked.safetensors", chunk_bytes=256)
    assert whole.sha256 == chunked.sha256


def test_a_base_of_another_architecture_is_refused(models):
    with pytest.raises(ArchitectureError, match="must have the same architecture"):
        repair.plan_repair(read_header(models / "sdxl-pruned.safetensors"), read_header(models / "sd1-base.safetensors"))


def test_an_incompatible_shape_is_not_a_repair_case(make_checkpoint, tmp_path):
    tensors = load(make_checkpoint("src.safetensors", "sd1", variant=1))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 9, 3, 3, dtype=torch.float16)
    save_file(tensors, tmp_path / "inpaint.safetensors")
    with pytest.raises(CheckpointError, match="not a repair case"):
        repair.plan_repair(read_header(tmp_path / "inpaint.safetensors"))


def test_a_base_of_another_variant_is_refused(make_checkpoint, tmp_path):
    tensors = load(make_checkpoint("src.safetensors", "sd1", variant=1))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 9, 3, 3, dtype=torch.float16)
    save_file(tensors, tmp_path / "inpaint-base.safetensors")
    damaged = make_checkpoint("novae.safetensors", "sd1", variant=2, drop=SD1_VAE)
    with pytest.raises(ArchitectureError, match="the base must be a plain SD1"):
        repair.plan_repair(read_header(damaged), read_header(tmp_path / "inpaint-base.safetensors"))


def test_the_repair_never_writes_over_its_input(models, tmp_path):
    src = tmp_path / "in.safetensors"
    src.write_bytes((models / "sdxl-pruned.safetensors").read_bytes())
    plan = repair.plan_repair(read_header(src))
    with pytest.raises(AstolfoError, match="write it to a new file"):
        repair.run_repair(plan, src, overwrite=True)


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_dry_run_prints_the_plan_and_writes_nothing(make_checkpoint, tmp_path, capsys):
    damaged = make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE)
    out = tmp_path / "fixed.safetensors"
    assert main(["repair", str(damaged), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "fill 248 key(s) from a base model (--base)" in text and "dry run: nothing written" in text
    assert not out.exists()


def test_cli_repair_with_base_writes_a_full_file(models, make_checkpoint, tmp_path, capsys):
    damaged = make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE)
    out = tmp_path / "fixed.safetensors"
    assert main(["repair", str(damaged), "--base", str(models / "sd1-base.safetensors"), "-o", str(out), "--no-hash"]) == 0
    assert "fill 248 key(s) from sd1-base.safetensors" in capsys.readouterr().out
    assert_full(out, "sd1")


def test_cli_repair_without_a_needed_base_exits_2(make_checkpoint, tmp_path, capsys):
    damaged = make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE)
    assert main(["repair", str(damaged), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "pass --base BASE" in capsys.readouterr().err


# --- partial inputs inside merges (plan.py) --------------------------------------------------------

def merge(models, doc, out="merged.safetensors"):
    return run_recipe(models, doc, models / out)


def test_a_pool_member_without_te0_position_ids_still_gives_int64_position_ids(models, make_checkpoint):
    make_checkpoint("noids.safetensors", "sd1", variant=5, drop=[SD1_POS], folder=models)
    result = merge(models, {"pool": ["sd1-a.safetensors", "noids.safetensors"], "method": "n_average"})
    out = load(result.path)
    assert set(out) == canonical("sd1")
    assert same_bits(out[SD1_POS], torch.arange(77, dtype=torch.int64).reshape(1, 77))


def test_a_pool_member_missing_part_of_its_vae_is_filled_from_the_base_and_logged_once(models, make_checkpoint):
    gone = SD1_VAE[:5]
    make_checkpoint("partvae.safetensors", "sd1", variant=5, drop=gone, folder=models)
    result = merge(models, {"pool": ["sd1-a.safetensors", "partvae.safetensors"], "method": "n_average",
                            "base": "sd1-base.safetensors"})
    out, a, base = load(result.path), load(models / "sd1-a.safetensors"), load(models / "sd1-base.safetensors")
    assert set(out) == canonical("sd1")
    assert all(same_bits(out[k], ((a[k].double() + base[k].double()) / 2).to(torch.float16)) for k in gone)
    lines = [line for line in result.log if line.startswith("VAE:")]
    assert lines == [f"VAE: 5 of 248 key(s) ({gone[0]}, {gone[1]}, … (+3)): partvae.safetensors lack(s) them; "
                     "filled from the base sd1-base.safetensors (1 of 2 inputs have their own)"]


def test_without_a_base_a_key_one_input_lacks_is_merged_from_the_others_never_lost(models, make_checkpoint):
    gone = SD1_VAE[:5]
    make_checkpoint("partvae.safetensors", "sd1", variant=5, drop=gone, folder=models)
    result = merge(models, {"pool": ["sd1-a.safetensors", "partvae.safetensors"], "method": "n_average"})
    out, a = load(result.path), load(models / "sd1-a.safetensors")
    assert set(out) == canonical("sd1")
    assert all(same_bits(out[k], a[k]) for k in gone)
    assert [line for line in result.log if "no base to fill from" in line] == [
        f"VAE: 5 of 248 key(s) ({gone[0]}, {gone[1]}, … (+3)): partvae.safetensors lack(s) them and there is no base "
        "to fill from; merged from the inputs that have them"]


def test_a_pool_member_without_its_whole_vae_is_repaired_in_memory_from_the_base(models, make_checkpoint):
    make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE, folder=models)
    doc = {"pool": ["sd1-a.safetensors", "novae.safetensors"], "method": "n_average", "base": "sd1-base.safetensors"}
    result = merge(models, doc)
    out, a, base = load(result.path), load(models / "sd1-a.safetensors"), load(models / "sd1-base.safetensors")
    assert set(out) == canonical("sd1")
    k = SD1_VAE[0]
    torch.testing.assert_close(out[k].double(), ((a[k].double() + base[k].double()) / 2).to(out[k].dtype).double())


def test_a_pool_member_without_its_whole_vae_and_no_base_is_refused_before_any_work(models, make_checkpoint):
    make_checkpoint("novae.safetensors", "sd1", variant=5, drop=SD1_VAE, folder=models)
    doc = {"pool": ["sd1-a.safetensors", "novae.safetensors"], "method": "n_average"}
    with pytest.raises(ArchitectureError, match="novae.safetensors has no VAE and there is no base"):
        build_plan(parse_recipe(doc), str(models), str(models / "merged.safetensors"))


# --- helpers ---------------------------------------------------------------------------------------

def _rewrite_metadata(src, dst, metadata):
    """Copy a safetensors file with a hand-written __metadata__ (our writer would stringify it)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    head["__metadata__"] = metadata
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])

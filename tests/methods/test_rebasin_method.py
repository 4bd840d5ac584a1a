"""The `rebasin` and `basin_sum` methods through the engine (ALGORITHMS.md §14.1, §14.4), on the tiny
1/64-scale fixtures with B written as a permuted copy, so the matching has real work to do."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from astolfo_merge.errors import Cancelled
from astolfo_merge.io import arch as archmod
from astolfo_merge.io.writer import save_file
from astolfo_merge.methods import TensorInputs, get_method
from astolfo_merge.methods.rebasin.permutation import permute
from astolfo_merge.methods.rebasin.spec import attention_heads, build_spec, groupnorm_groups

from conftest import TEST_SCALE, load, run_recipe
from ldm_forward import LDMUNet, sample_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _permuted_copy(folder, arch, source, name, seed):
    """`source` with its UNet renumbered by a random spec permutation (same function)."""
    spec = build_spec(arch, TEST_SCALE)
    perms = spec.random(seed)
    save_file({k: permute(v, k, spec, perms) for k, v in load(folder / source).items()}, folder / name)
    return name


@pytest.fixture(scope="module")
def folder(demo_dir, tmp_path_factory):
    """The fixtures plus permuted copies: π₁(A), π₂(B) for SD1 and π₃(B) for SDXL."""
    path = tmp_path_factory.mktemp("rebasin")
    for f in demo_dir.iterdir():
        os.symlink(f, path / f.name)
    _permuted_copy(path, "sd1", "sd1-a.safetensors", "sd1-a-permuted.safetensors", seed=1)
    _permuted_copy(path, "sd1", "sd1-b.safetensors", "sd1-b-permuted.safetensors", seed=2)
    _permuted_copy(path, "sdxl", "sdxl-b.safetensors", "sdxl-b-permuted.safetensors", seed=3)
    return path


POOL = ["sd1-a.safetensors", "sd1-b-permuted.safetensors"]


def _merge(folder, pool, method, output, progress=None, cancel=None, path=None, options=None, **fields):
    """A recipe of `fields` through conftest.run_recipe; `options`: RunOptions fields beyond hash_inputs=False."""
    doc = {"pool": pool, "method": method, "output": output, "dtype": "fp32", **fields}
    result = run_recipe(folder, doc, path, progress, cancel, **(options or {}))
    return result, load(path or folder / output)


@pytest.fixture(scope="module")
def rebased(folder):
    return _merge(folder, POOL, "rebasin", "rebased.safetensors", seed=5)


def _forward(state):
    scale = TEST_SCALE
    net = LDMUNet({k: v.double() for k, v in state.items()}, groupnorm_groups(scale),
                  lambda width: attention_heads("sdxl", width, scale))
    return net(*sample_inputs({k: v.double() for k, v in state.items()}, batch=1))


def test_rebasin_of_a_permuted_copy_gives_back_A(folder):
    a, b = load(folder / "sd1-a.safetensors"), load(folder / "sd1-a-permuted.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    result, out = _merge(folder, ["sd1-a.safetensors", "sd1-a-permuted.safetensors"], "rebasin", "back.safetensors")
    assert all(torch.equal(out[k], a[k].float()) for k in a if a[k].is_floating_point())
    assert "converged" in result.log[-1]


def test_rebasin_at_alpha_1_is_B_renumbered_the_same_function(folder):
    """SDXL at 1/64: one GroupNorm group, 1-channel heads (spec conventions), a real forward pass."""
    pool = ["sdxl-a.safetensors", "sdxl-b-permuted.safetensors"]
    result, out = _merge(folder, pool, "rebasin", "pib.safetensors", params={"alpha": 1.0})
    original = load(folder / pool[1])
    unet = [k for k in out if k.startswith(archmod.UNET_PREFIX)]
    assert sum(not torch.equal(out[k], original[k].float()) for k in unet) > len(unet) // 2
    assert (_forward(out) - _forward(original)).abs().max() < 1e-5


def test_text_encoders_and_vae_get_the_plain_weighted_sum(folder, rebased):
    _result, out = rebased
    a, b = load(folder / POOL[0]), load(folder / POOL[1])
    others = [k for k in out if archmod.component_of(k) in ("te0", "te1", "vae") and out[k].is_floating_point()]
    assert others
    for k in others:
        assert torch.equal(out[k], (a[k].double() * 0.5 + b[k].double() * 0.5).float()), k


def test_basin_sum_is_a_quarter_A_a_quarter_B_and_half_rebasin(folder, rebased):
    _r, rebasin_out = rebased
    _s, basin = _merge(folder, POOL, "basin_sum", "s.safetensors", seed=5)
    a, b = load(folder / POOL[0]), load(folder / POOL[1])
    for k in basin:
        if basin[k].is_floating_point():
            expected = 0.25 * a[k].double() + 0.25 * b[k].double() + 0.5 * rebasin_out[k].double()
            assert torch.allclose(basin[k].double(), expected, rtol=1e-6, atol=1e-6), k


def test_basin_sum_alpha_weighs_A_in_the_linear_part_and_pi_B_in_the_rebasin_part():
    class Reversed:                       # π reverses the rows of this key
        def index(self, key):
            return [torch.arange(3, -1, -1), None]
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    inputs = TensorInputs([a, b], key="k")
    inputs.state = Reversed()
    alpha = 0.3
    out = torch.cat(list(get_method("basin_sum").run(inputs, {"alpha": alpha})))
    expected = alpha * (alpha * a + (1 - alpha) * b) + (1 - alpha) * ((1 - alpha) * a + alpha * b.flip(0))
    assert torch.allclose(out, expected, rtol=1e-14, atol=1e-14)


def test_same_seed_gives_the_same_bytes_with_one_or_two_threads(folder, rebased, tmp_path):
    one_thread, _out = rebased            # made with torch at 1 thread (module fixture)
    try:                                  # the same recipe (the output name is part of it), another folder
        two_threads, _out = _merge(folder, POOL, "rebasin", "rebased.safetensors", options={"threads": 2},
                                   path=str(tmp_path / "rebased.safetensors"), seed=5)
    finally:
        torch.set_num_threads(1)
    assert one_thread.sha256 == two_threads.sha256


def test_cancel_during_matching_leaves_no_file(folder):
    cancel = threading.Event()

    def progress(p):
        if p.message.startswith("re-basin start"):
            cancel.set()
    before = set(os.listdir(folder))
    with pytest.raises(Cancelled):
        _merge(folder, POOL, "rebasin", "never.safetensors", progress=progress, cancel=cancel)
    assert set(os.listdir(folder)) == before
    assert cancel.is_set()


def test_matching_summary_reaches_the_merge_log(rebased):
    result, _out = rebased
    line = next(line for line in result.log if line.startswith("re-basin:"))
    assert "77 permutation groups" in line and "converged" in line       # SD1 at 1/64: no attention groups
    moved = int(line.split("; ")[1].split()[0])
    assert moved > 60

"""The a → b → c post-process, `"fermat": true` (ALGORITHMS.md §14.3):
b = Rebasin(R, amp(a, R, 2), 0.5), c = 0.5·a + 0.5·b; a and b stay off disk unless asked."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import Cancelled, RecipeError
from astolfo_merge.io import arch as archmod
from astolfo_merge.io.writer import save_file
from astolfo_merge.methods.rebasin.matching import weight_matching
from astolfo_merge.methods.rebasin.permutation import permute
from astolfo_merge.methods.rebasin.spec import build_spec

from conftest import TEST_SCALE, load, run_recipe

OPTIONS = RunOptions(hash_inputs=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(demo_dir, tmp_path_factory):
    """R = sd1-base; the pool is sd1-a and sd1-b with one UNet permutation, so a = π(average) sits
    in another basin than R and the matching has to undo π."""
    path = tmp_path_factory.mktemp("fermat")
    os.symlink(demo_dir / "sd1-base.safetensors", path / "sd1-base.safetensors")
    spec = build_spec("sd1", TEST_SCALE)
    perms = spec.random(seed=4)
    for name in ("sd1-a", "sd1-b"):
        tensors = load(demo_dir / f"{name}.safetensors")
        save_file({k: permute(v, k, spec, perms) for k, v in tensors.items()}, path / f"{name}-p.safetensors")
    return path


def _recipe(output, **fields):
    doc = {"pool": ["sd1-a-p.safetensors", "sd1-b-p.safetensors"], "method": "weighted_sum",
           "base": "sd1-base.safetensors", "output": output, "dtype": "fp32", "seed": 2}
    doc.update(fields)
    return parse_recipe(doc)


def _run(folder, output, progress=None, cancel=None, **fields):
    return run_recipe(folder, _recipe(output, **fields), progress=progress, cancel=cancel)


@pytest.fixture(scope="module")
def outputs(folder):
    result = _run(folder, "c.safetensors", fermat={"keep_a": True, "keep_b": True})
    names = ("c", "c-a", "c-b", "sd1-base", "sd1-a-p", "sd1-b-p")
    return result, {n: load(folder / f"{n}.safetensors") for n in names}


def test_fermat_keeps_a_when_asked_and_a_is_the_recipes_own_merge(outputs):
    _result, t = outputs
    for k, a in t["c-a"].items():        # weighted_sum at 0.5 in fp64, cast once
        expected = (0.5 * t["sd1-a-p"][k].double() + 0.5 * t["sd1-b-p"][k].double()).float() if a.is_floating_point() else t["sd1-a-p"][k]
        assert torch.equal(a, expected), k


def test_fermat_output_is_half_a_plus_half_b(outputs):
    _result, t = outputs
    unet = [k for k in t["c"] if k.startswith(archmod.UNET_PREFIX)]
    assert sum(not torch.equal(t["c"][k], t["c-a"][k]) for k in unet) > len(unet) // 2
    for k, c in t["c"].items():
        if not k.startswith(archmod.UNET_PREFIX):
            assert torch.equal(c, t["c-a"][k]), k              # π = id outside the UNet: c = a
        elif c.is_floating_point():
            assert torch.allclose(c.double(), 0.5 * t["c-a"][k].double() + 0.5 * t["c-b"][k].double(), atol=1e-6), k


def test_fermat_b_is_the_rebasin_midpoint_of_R_and_amp(outputs):
    """2b − R must be a spec permutation of amp(a, R, 2) = R + 2(a − R), and not the identity."""
    result, t = outputs
    spec = build_spec("sd1", TEST_SCALE)
    unet = [k for k in t["c"] if k.startswith(archmod.UNET_PREFIX)]
    r = {k: t["sd1-base"][k].double() for k in unet}
    amp = {k: r[k] + 2.0 * (t["c-a"][k].double() - r[k]) for k in unet}
    twice_b = {k: 2.0 * t["c-b"][k].double() - r[k] for k in unet}
    found = weight_matching(spec, twice_b.__getitem__, amp.__getitem__, seed=0)
    assert all(torch.allclose(permute(amp[k], k, spec, found.perms), twice_b[k], atol=1e-5) for k in unet)
    assert sum(not torch.allclose(amp[k], twice_b[k], atol=1e-3) for k in spec.axes) > len(spec.axes) // 2
    assert any(line.startswith("fermat: re-basin") for line in result.log)


def _hidden(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("."))


def test_fermat_removes_its_temp_file_on_success_error_and_cancel(folder, outputs):
    assert _hidden(folder) == []                  # after the successful runs of `outputs`
    before = set(os.listdir(folder))

    def fail_in_stage_3(p):
        if p.message.startswith("Fermat 3/3"):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        _run(folder, "failed.safetensors", progress=fail_in_stage_3, fermat=True)
    cancel = threading.Event()

    def cancel_in_matching(p):
        if p.message.startswith("Fermat 2/3"):
            cancel.set()
    with pytest.raises(Cancelled):
        _run(folder, "cancelled.safetensors", progress=cancel_in_matching, cancel=cancel, fermat=True)
    assert set(os.listdir(folder)) == before and _hidden(folder) == []


def test_fermat_needs_a_base(folder):
    recipe = parse_recipe({"pool": ["sd1-a-p.safetensors", "sd1-b-p.safetensors"], "method": "weighted_sum",
                           "output": "x.safetensors", "fermat": True})
    with pytest.raises(RecipeError, match="fermat"):
        run_merge(build_plan(recipe, str(folder)), OPTIONS)


def test_fermat_option_errors_name_the_field(folder):
    with pytest.raises(RecipeError, match="fermat.keep_c"):
        _run(folder, "x.safetensors", fermat={"keep_c": True})
    with pytest.raises(RecipeError, match="fermat.sweeps"):
        _run(folder, "x.safetensors", fermat={"sweeps": 0})
    assert not os.path.exists(folder / "x.safetensors")

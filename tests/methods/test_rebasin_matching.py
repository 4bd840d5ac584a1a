"""Weight matching (ALGORITHMS.md §14.1): recovery of a known permutation, the paper's start,
determinism across BLAS thread counts, cancel between groups."""
from __future__ import annotations

import ctypes
import hashlib
import threading

import numpy as np
import pytest
import torch

from astolfo_merge.errors import Cancelled
from astolfo_merge.methods.rebasin.matching import cost_matrices, inverse, unit_products, weight_matching
from astolfo_merge.methods.rebasin.permutation import permute
from astolfo_merge.methods.rebasin.spec import build_spec

from ldm_forward import random_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same(perms, expected) -> bool:
    return all(np.array_equal(p, q) for name in expected for p, q in zip(perms[name], expected[name]))


@pytest.mark.parametrize("arch,scale", [("sd1", 32), ("sdxl", 64)])
def test_matching_a_permuted_copy_returns_the_inverse_permutation(arch, scale):
    spec = build_spec(arch, scale)
    a = random_unet(arch, scale, seed=11)
    pi = spec.random(seed=5)
    b = {k: permute(v, k, spec, pi) for k, v in a.items()}
    result = weight_matching(spec, a.__getitem__, b.__getitem__, seed=0)
    assert result.converged
    assert _same(result.perms, inverse(pi))
    assert all(torch.equal(permute(b[k], k, spec, result.perms), a[k]) for k in a)


def test_paper_start_keeps_identity_for_identical_models():
    spec = build_spec("sd1", 32)
    a = random_unet("sd1", 32, seed=2)
    result = weight_matching(spec, a.__getitem__, a.__getitem__, seed=4, start="identity")
    assert result.converged and result.sweeps == 1 and result.gains == [0.0]
    assert _same(result.perms, spec.identity())


def test_cancel_stops_matching_between_groups():
    spec = build_spec("sd1", 64)
    a = random_unet("sd1", 64, seed=2)
    cancel, seen = threading.Event(), []

    def report(message):
        seen.append(message)
        cancel.set()
    with pytest.raises(Cancelled):
        weight_matching(spec, a.__getitem__, a.__getitem__, report=report, cancel=cancel)
    assert len(seen) == 1


def _openblas():
    """numpy's bundled OpenBLAS (ILP64 symbols end in 64_), or None where it cannot be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        for suffix in ("64_", ""):
            if hasattr(lib, f"openblas_set_num_threads{suffix}"):
                return getattr(lib, f"openblas_set_num_threads{suffix}"), getattr(lib, f"openblas_get_num_threads{suffix}")
    return None


def _digest(spec, a, b):
    result = weight_matching(spec, a.__getitem__, b.__getitem__, seed=8, sweeps=2, start="identity")
    digest = hashlib.sha256()
    for name in spec.variables:
        for p in result.perms[name]:
            digest.update(p.tobytes())
        for c in cost_matrices(spec, name, result.perms, a.__getitem__, b.__getitem__):
            digest.update(c.tobytes())
    return result, digest.hexdigest()


def test_same_seed_gives_the_same_bits_with_one_or_two_threads():
    blas = _openblas()
    if blas is None:
        pytest.skip("numpy's OpenBLAS not found in this process")
    set_blas, get_blas = blas
    spec = build_spec("sd1", 64)
    a = random_unet("sd1", 64, seed=1)
    noise = torch.Generator().manual_seed(9)
    b = {k: permute(v * (1 + torch.randn(v.shape, generator=noise, dtype=v.dtype)), k, spec, spec.random(3))
         for k, v in a.items()}
    before = get_blas()
    runs = []
    try:
        for threads in (1, 2):
            set_blas(threads)
            torch.set_num_threads(threads)
            runs.append(_digest(spec, a, b))
    finally:
        set_blas(before)
        torch.set_num_threads(1)
    (first, one), (_second, two) = runs
    assert one == two
    assert first.sweeps == 2 and sum(first.changed) > 10       # many real decisions were compared


@pytest.mark.parametrize("shape", [(40, 100_000), (320, 23_040)])
def test_unit_products_are_bitwise_the_same_with_one_or_two_blas_threads(shape):
    """Full-size shapes where torch's MKL gemm was measured to differ between 1 and 2 threads."""
    blas = _openblas()
    if blas is None:
        pytest.skip("numpy's OpenBLAS not found in this process")
    set_blas, get_blas = blas
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(shape), rng.standard_normal(shape)
    before = get_blas()
    try:
        results = []
        for threads in (1, 2):
            set_blas(threads)
            results.append(unit_products(x, y).tobytes())
    finally:
        set_blas(before)
    assert results[0] == results[1]


def test_cost_matrix_counts_only_settled_neighbours_in_the_propagation_start():
    spec = build_spec("sd1", 64)
    a = random_unet("sd1", 64, seed=2)
    name = "input_blocks.1.0:hidden"      # in_layers.2 reads the conv_in stream, out_layers.3 writes it
    assert cost_matrices(spec, name, spec.identity(), a.__getitem__, a.__getitem__, settled=set()) is None
    settled = cost_matrices(spec, name, spec.identity(), a.__getitem__, a.__getitem__,
                            settled={"input_blocks.0.0:stream", "time_embed:emb"})
    full = cost_matrices(spec, name, spec.identity(), a.__getitem__, a.__getitem__)
    assert np.allclose(settled[0], full[0])

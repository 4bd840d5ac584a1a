"""Differential tests against sd-mecha 1.1.8 (ALGORITHMS.md §0.6, §5–§11) on every key of the tiny SD1 and
SDXL fixtures, in fp64.

sd-mecha is configured to compute the same thing as ours (§0.6): `vote_sgn=True` is the SUM rule and
`False` the COUNT rule; `apply_stock=True` means NO Model-Stock factor inside TIES; `probability` reaches
its methods as a float32 tensor (its merge API casts a float literal for a Tensor parameter that way),
so the reference gets `torch.tensor(p, dtype=torch.float32)`; `seed` is the recipe seed.

Its merge-method functions are called per key on the fixtures' tensors (`.__wrapped__`); for methods that
are elementwise (TIES at k = 1) or row-local (Model Stock along the last axis) the reference is computed
on all keys at once, which gives every key exactly its own reference value at a fraction of the cost.
"""
from __future__ import annotations

import importlib.metadata
from collections import defaultdict

import pytest
import torch

from astolfo_merge.methods import apply, get_method

from conftest import load

sd_mecha = pytest.importorskip("sd_mecha")
if importlib.metadata.version("sd-mecha") != "1.1.8":
    pytest.skip("these references are pinned to sd-mecha 1.1.8", allow_module_level=True)
from sd_mecha.extensions.builtin.merge_methods import ties as mecha  # noqa: E402

TOL = 1e-6
ARCHS = ("sd1", "sdxl")


def p32(p):
    return torch.tensor(p, dtype=torch.float32)


@pytest.fixture(scope="module")
def keys(demo_dir):
    """arch -> [(key, base, [a, b, c])] for every float key (fp16 tensors as stored)."""
    out = {}
    for arch in ARCHS:
        sds = [load(demo_dir / f"{arch}-{n}.safetensors") for n in ("base", "a", "b", "c")]
        out[arch] = [(k, v, [sd[k] for sd in sds[1:]]) for k, v in sds[0].items() if v.is_floating_point()]
    return out


@pytest.fixture(scope="module")
def subset(keys):
    """A few keys per arch covering every rank: the largest, 0-d, and every 100th key."""
    out = {}
    for arch, items in keys.items():
        largest = max(items, key=lambda it: it[1].numel())
        picked = [it for i, it in enumerate(items) if i % 100 == 0 or it[1].dim() == 0 or it is largest]
        out[arch] = picked
    return out


def deltas(base, models):
    return [m.double() - base.double() for m in models]


def rel_err(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-300)) if ref.numel() else 0.0


def assert_close_per_key(results):
    """results: [(key, ours, reference)]; every key within TOL relative."""
    bad = [(k, rel_err(o, r)) for k, o, r in results if o.shape != r.shape or rel_err(o, r) > TOL]
    assert not bad, f"{len(bad)} key(s) differ, e.g. {bad[:3]}"


def batched(items, reference):
    """Elementwise reference on all keys at once: concatenate flattened deltas, split the result back."""
    flat = [torch.cat([d.reshape(-1) for d in ds]) for ds in zip(*(deltas(b, ms) for _, b, ms in items))]
    out = reference(flat)
    sizes = [b.numel() for _, b, _ in items]
    return {k: b.double() + part.reshape(b.shape) for (k, b, _), part in zip(items, out.split(sizes))}


def test_sd_mecha_casts_a_float_literal_for_a_tensor_parameter_to_float32():
    from sd_mecha.merging import cast_node_value
    assert cast_node_value(0.1, torch.Tensor).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_ties_sum_rule_with_trim_matches_ties_sum_on_every_key(keys, arch):
    """Per key: the trim threshold is a whole-key statistic."""
    ties = get_method("ties")
    params = ties.resolve_params({"k": 0.2, "sign": "sum"})
    results = []
    for key, base, models in keys[arch]:
        ref = base.double() + mecha.ties_sum.__wrapped__(*deltas(base, models), k=0.2, vote_sgn=True)
        results.append((key, apply(ties, models, base, params), ref))
    assert_close_per_key(results)


@pytest.mark.parametrize("arch", ARCHS)
def test_count_rule_and_p0_presets_match_on_every_key(keys, subset, arch):
    """TIES-SOUP (count rule) and DARE / DROP / TSD at p = 0 with k = 1 are elementwise: both sides run on
    the concatenation of every key (each element sees exactly its own math), ours also per key on the subset."""
    items = keys[arch]
    base = torch.cat([b.double().reshape(-1) for _, b, _ in items])
    models = [torch.cat([m[i].double().reshape(-1) for _, _, m in items]) for i in range(3)]
    ds = [m - base for m in models]
    count_ref = base + mecha.ties_sum_with_dropout.__wrapped__(*ds, probability=p32(0.0), rescale=False, k=1.0,
                                                                vote_sgn=False, apply_stock=True)
    assert torch.equal(count_ref, base + mecha.ties_sum.__wrapped__(*ds, k=1.0, vote_sgn=False))
    for name, ours in (("ties_soup", {}), ("tsd", {"p": 0.0}), ("drop", {"p": 0.0, "k": 1.0, "sign": "count"})):
        assert rel_err(apply(name, models, base, ours), count_ref) <= TOL, name
    sum_ref = base + mecha.ties_sum_with_dropout.__wrapped__(*ds, probability=p32(0.0), rescale=True, k=1.0,
                                                              vote_sgn=True, apply_stock=True)
    assert rel_err(apply("dare", models, base, {"p": 0.0, "k": 1.0, "sign": "sum", "rescale": True}), sum_ref) <= TOL
    per_key = subset[arch]
    ref = batched(per_key, lambda d: mecha.ties_sum.__wrapped__(*d, k=1.0, vote_sgn=False))
    assert_close_per_key([(k, apply("ties_soup", ms, b), ref[k]) for k, b, ms in per_key])
    trimmed = [(k, apply("ties_general", ms, b, {"k": 0.3, "sign": "count"}),
                b.double() + mecha.ties_sum.__wrapped__(*deltas(b, ms), k=0.3, vote_sgn=False)) for k, b, ms in per_key]
    assert_close_per_key(trimmed)


def _mecha_stock_by_rows(items):
    """sd-mecha model_stock is row-local along the last axis: group keys by last-axis length."""
    groups = defaultdict(list)
    for item in items:
        groups[item[1].shape[-1] if item[1].dim() else 0].append(item)
    ref = {}
    for length, group in groups.items():
        if length == 0:
            for k, b, ms in group:
                ref[k] = b.double() + mecha.model_stock.__wrapped__(*deltas(b, ms)).reshape(b.shape)
            continue
        rows = [torch.cat([d.reshape(-1, length) for d in ds]) for ds in zip(*(deltas(b, ms) for _, b, ms in group))]
        out = mecha.model_stock.__wrapped__(*rows)
        for (k, b, _), part in zip(group, out.split([b.numel() // length for _, b, _ in group])):
            ref[k] = b.double() + part.reshape(b.shape)
    return ref


def _undefined_t(base, models):
    """Where sd-mecha's t has a zero denominator (cos = −1/(N − 1)): our guard keeps the base there."""
    ds = deltas(base, models)
    cos = torch.stack([torch.nn.functional.cosine_similarity(ds[i], ds[i + 1], dim=-1, eps=1e-6)
                       for i in range(len(ds) - 1)]).mean(dim=0)
    return ((1 + (len(ds) - 1) * cos).abs() <= 1e-12).unsqueeze(-1).expand(base.shape if base.dim() else (1,)).reshape(base.shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_stock_matches_n_model_stock_on_every_key(keys, arch):
    items = keys[arch]
    ref = _mecha_stock_by_rows(items)
    stock = get_method("model_stock")
    guarded, results = 0, []
    for key, base, models in items:
        ours = apply(stock, models, base)
        undefined = _undefined_t(base, models)
        if bool(undefined.any()):
            guarded += 1
            assert torch.equal(ours[undefined], base.double()[undefined]), key
            ours, r = ours[~undefined], ref[key][~undefined]
        else:
            r = ref[key]
        results.append((key, ours, r))
    assert_close_per_key(results)
    if arch == "sd1":   # 1×1 convs: last axis of length 1, cos ∈ {−1, 0, 1}, so −1/2 happens
        assert guarded > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_geometric_median_matches_on_every_key(keys, subset, arch):
    """Every key with one Weiszfeld step; the subset with the default 100 iterations / ftol 1e-20."""
    gm = get_method("geometric_median")
    one_step = gm.resolve_params({"maxiter": 1})
    results = [(k, apply(gm, ms, None, one_step), mecha.geometric_median.__wrapped__(*[m.double() for m in ms], maxiter=1))
               for k, _, ms in keys[arch]]
    results += [(k, apply(gm, ms), mecha.geometric_median.__wrapped__(*[m.double() for m in ms]))
                for k, _, ms in subset[arch]]
    assert_close_per_key(results)


@pytest.mark.parametrize("arch", ARCHS)
def test_tgmd_and_dgmla_at_p0_match_ties_sum_extended_with_median(subset, arch):
    results = []
    for key, base, models in subset[arch]:
        ds = deltas(base, models)
        ref = base.double() + mecha.ties_sum_extended.__wrapped__(*ds, k=1.0, vote_sgn=False, apply_median=True)
        results.append((key, apply("tgmd", models, base, {"p": 0.0}), ref))
        ref = base.double() + mecha.ties_sum_extended.__wrapped__(*ds, k=1.0, vote_sgn=True, apply_median=True)
        results.append((key, apply("dgmla", models, base, {"p": 0.0, "eps": 0.0, "sign": "sum"}), ref))
    assert_close_per_key(results)


TORCH_CASES = [  # (ours, params, sd-mecha ties_sum_with_dropout kwargs, recipe seed)
    ("tsd", {"p": 0.1}, dict(probability=0.1, rescale=False, k=1.0, vote_sgn=False), 114514),
    ("dare", {"p": 0.3, "k": 0.5, "sign": "sum", "rescale": True}, dict(probability=0.3, rescale=True, k=0.5, vote_sgn=True), 5),
    ("della", {"p": 0.2, "eps": 0.3, "sign": "sum", "rescale": True}, dict(probability=0.2, della_eps=0.3, rescale=True, k=1.0, vote_sgn=True), 7),
    ("tgmd", {"p": 0.1}, dict(probability=0.1, rescale=False, k=1.0, vote_sgn=False, apply_median=True), 240603),
    ("dgmla", {"p": 0.1, "eps": -0.1, "sign": "sum"}, dict(probability=0.1, della_eps=-0.1, rescale=False, k=1.0, vote_sgn=True, apply_median=True), 250608),
]


@pytest.mark.parametrize("name,params,theirs,seed", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_rng_reproduces_sd_mecha_bit_for_bit(subset, name, params, theirs, seed):
    """rng = 'torch' draws the same Bernoulli masks as sd-mecha 1.x on CPU, so with p > 0 the outputs are
    identical bytes (same torch version, fp64, CPU)."""
    theirs = dict(theirs, probability=p32(theirs["probability"]), apply_stock=True, seed=seed)
    mismatched = []
    for arch in ARCHS:
        for key, base, models in subset[arch]:
            ref = base.double() + mecha.ties_sum_with_dropout.__wrapped__(*deltas(base, models), **theirs)
            ours = apply(name, models, base, dict(params, rng="torch"), recipe_seed=seed, seed=12345)
            if not torch.equal(ours, ref):
                mismatched.append((key, rel_err(ours, ref)))
    assert not mismatched, mismatched[:3]


# --- SLERP (sd-mecha linear.slerp) ---------------------------------------------------------------

def _mecha_slerp(a, b, alpha):
    from sd_mecha.extensions.builtin.merge_methods.linear import slerp
    return slerp.__wrapped__(a.double(), b.double(), alpha=p32(alpha))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alpha", [0.3, 0.75])
def test_slerp_direct_form_is_sd_mecha_slerp_bit_for_bit_on_every_key(keys, arch, alpha):
    """Whole keys (one chunk): sd-mecha's operations, its lerp fallback included. Its merge API hands
    alpha over as float32, so ours gets that same value."""
    alpha32 = float(p32(alpha))
    mismatched = []
    for key, _, (a, b, _) in keys[arch]:
        ours, ref = apply("slerp", [a, b], params={"alpha": alpha32}), _mecha_slerp(a, b, alpha)
        if not torch.equal(ours, ref):
            mismatched.append((key, rel_err(ours, ref)))
    assert not mismatched, mismatched[:3]


@pytest.mark.parametrize("arch", ARCHS)
def test_slerp_gram_form_matches_sd_mecha_slerp(subset, arch):
    """Keys in row chunks (the engine's form for every key beyond ~37k elements): within TOL."""
    results = [(key, apply("slerp", [a, b], params={"alpha": float(p32(0.4))}, chunk_rows=1), _mecha_slerp(a, b, 0.4))
               for key, _, (a, b, _) in subset[arch]]
    assert_close_per_key(results)

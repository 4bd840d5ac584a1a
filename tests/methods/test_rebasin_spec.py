"""Re-Basin permutation spec (ALGORITHMS.md §14.1): every allowed permutation is an exact
reparametrisation of the LDM UNet, checked with a real forward pass (tests/ldm_forward.py).

Both architectures run at 1/8 scale: widths 40/80/160; spec.groupnorm_groups keeps the full-size
group *size*, so GroupNorm has 32/8 = 4 groups (10/20/40 channels each, as at full size);
spec.attention_heads keeps the head count: SD1 8 heads of 5/10/20, SDXL 10 and 20 heads of 8.
A genuinely grouped multi-head network: the two "detects" tests prove that mixing groups or heads
changes the output, so the preservation test is not vacuous. fp64 throughout (differences ~1e-15).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from astolfo_merge.io import arch as archmod
from astolfo_merge.methods.rebasin.assignment import best_permutation, score
from astolfo_merge.methods.rebasin.permutation import _sample, permute
from astolfo_merge.methods.rebasin.spec import (
    UNET,
    _heads_tree,
    attention_heads,
    build_spec,
    groupnorm_groups,
    structure,
)

from ldm_forward import LDMUNet, random_unet, sample_inputs

SCALES = {"sd1": 8, "sdxl": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def network(request):
    return _network(request.param)


@functools.lru_cache(maxsize=None)
def _network(arch):
    scale = SCALES[arch]
    state = random_unet(arch, scale, seed=3)

    def run(weights):
        net = LDMUNet(weights, groupnorm_groups(scale), lambda width: attention_heads(arch, width, scale))
        return net(*sample_inputs(state, batch=1))
    return arch, scale, state, run, run(state)


def _permuted(spec, state, perms):
    return {k: permute(v, k, spec, perms) for k, v in state.items()}


def test_random_spec_permutation_preserves_the_unet_forward(network):
    arch, scale, state, run, reference = network
    spec = build_spec(arch, scale)
    perms = spec.random(seed=7)
    moved = sum(not np.array_equal(p, np.arange(len(p))) for ps in perms.values() for p in ps)
    assert moved > 0.9 * sum(len(v.facets) for v in spec.variables.values())
    out = run(_permuted(spec, state, perms))
    assert reference.abs().mean() > 0.1
    assert (out - reference).abs().max() < 1e-5


@pytest.fixture(scope="module")
def sd1_network():
    return _network("sd1")


def test_forward_detects_a_permutation_that_mixes_groupnorm_groups(sd1_network):
    arch, scale, state, run, reference = sd1_network
    spec = build_spec(arch, scale)
    perms = spec.identity()
    name = "input_blocks.1.0:hidden"
    group = spec.variables[name].size // groupnorm_groups(scale)
    swap = perms[name][0]
    swap[[0, group]] = swap[[group, 0]]           # one channel each from groups 0 and 1, exchanged
    assert (run(_permuted(spec, state, perms)) - reference).abs().max() > 1e-3


def test_forward_detects_a_permutation_that_mixes_attention_heads(sd1_network):
    arch, scale, state, run, reference = sd1_network
    spec = build_spec(arch, scale)
    perms = spec.identity()
    name = "input_blocks.4.1.transformer_blocks.0.attn1:heads"      # 4×4 tokens (the middle has one)
    head_dim = spec.variables[name].size // attention_heads(arch, spec.variables[name].size, scale)
    qk = perms[name][0]
    qk[[0, head_dim]] = qk[[head_dim, 0]]         # one q/k channel moved into the next head
    assert (run(_permuted(spec, state, perms)) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_spec_covers_every_unet_key_and_no_other_component(arch):
    spec = build_spec(arch, 1)
    unet = {k for k, s in archmod.layout(arch, 1).items() if s.component == archmod.UNET}
    assert set(spec.axes) | set(spec.unpermuted) == unet
    assert not set(spec.axes) & set(spec.unpermuted)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_latent_context_timestep_and_label_inputs_are_never_permuted(arch):
    spec = build_spec(arch, 1)
    fixed = [("input_blocks.0.0.weight", 1), ("out.2.weight", 0), ("time_embed.0.weight", 1),
             ("middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1),
             ("middle_block.1.transformer_blocks.0.attn2.to_v.weight", 1)]
    if arch == "sdxl":
        fixed.append(("label_emb.0.0.weight", 1))
    for key, axis in fixed:
        assert all(s.var is None for s in spec.axes[UNET + key][axis]), key
    assert UNET + "out.2.bias" in spec.unpermuted


def test_geglu_halves_share_one_permutation():
    spec = build_spec("sdxl", 1)
    rows = spec.axes[UNET + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"][0]
    assert [s.var for s in rows] == ["input_blocks.4.1.transformer_blocks.0.ff:hidden"] * 2
    assert sum(s.size for s in rows) == 2 * spec.variables[rows[0].var].size == 2 * 2560


def test_skip_concatenation_is_split_into_the_two_streams():
    spec = build_spec("sd1", 1)
    cols = spec.axes[UNET + "output_blocks.5.0.in_layers.2.weight"][1]
    assert [(s.var, s.size) for s in cols] == [("output_blocks.4.0:stream", 1280), ("input_blocks.6.0:stream", 640)]


def test_full_size_specs_have_the_expected_groups():
    sd1, sdxl = build_spec("sd1", 1), build_spec("sdxl", 1)
    assert len(sd1.variables) == 109 and len(sdxl.variables) == 257
    heads = {v.tree.children[0].size for v in sdxl.variables.values() if v.kind == "attention"}
    assert heads == {64}                                     # SDXL: 64-channel heads
    assert {len(v.tree.children) for v in sd1.variables.values() if v.kind == "attention"} == {8}


@pytest.mark.parametrize("scale", [1, 4, 16, 64])
def test_spec_builds_at_every_layout_scale(scale):
    for arch in ("sd1", "sdxl"):
        spec = build_spec(arch, scale)
        assert spec.groups == groupnorm_groups(scale)
        assert spec.variables["time_embed:emb"].size == 1280 // scale


def _allowed(tree, facets=1, draws=1500):
    rng = np.random.default_rng(0)
    return {tuple(map(tuple, _sample(tree, rng, facets))) for _ in range(draws)}


def test_groupings_allow_exactly_the_group_preserving_permutations():
    groups = ((0, 2, False), (2, 4, False), (4, 6, False))
    pinned = ((0, 2, False), (2, 4, False), (4, 6, True))
    assert len(_allowed(structure(6, [groups]))) == 2 ** 3 * 6          # S2 wreath S3
    assert len(_allowed(structure(6, [pinned]))) == 2 ** 3 * 2          # the pinned group stays
    crossing = [((0, 3, False), (3, 6, False)), groups]
    for (perm,) in _allowed(structure(6, crossing)):
        for part in crossing:
            blocks = [set(range(a, b)) for a, b, _ in part]
            assert all({perm[i] for i in range(a, b)} in blocks for a, b, _ in part)


def test_structured_assignment_finds_the_true_optimum():
    rng = np.random.default_rng(1)
    cases = [(structure(6, [((0, 2, False), (2, 4, False), (4, 6, False))]), 1), (_heads_tree(4, 2), 2)]
    for tree, facets in cases:
        allowed = _allowed(tree, facets)
        for _ in range(10):
            costs = [rng.standard_normal((6, 6)) for _ in range(facets)]
            brute = max(score(costs, [np.array(p) for p in perm]) for perm in allowed)
            perms, value = best_permutation(tree, costs)
            assert tuple(map(tuple, perms)) in allowed
            assert value == pytest.approx(brute, abs=1e-12) == score(costs, perms)


def test_head_tree_moves_q_k_and_v_heads_together():
    for qk, v in _allowed(_heads_tree(6, 3), 2, draws=50):
        assert [x // 2 for x in qk] == [x // 2 for x in v]

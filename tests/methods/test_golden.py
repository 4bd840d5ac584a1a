"""Byte-identity of the n-ary methods across kernel rewrites: sha256 of their outputs on small
fixtures, recorded before the per-element work of issue 14 item 6 (bench/bench_kernels.py) and
checked after it. fp64 outputs are hashed as they are (every bit counts); engine merges are hashed
tensor by tensor in fp32 output. If a change is MEANT to change the bytes, say so and re-record with
`python tests/methods/test_golden.py --record`."""
from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from astolfo_merge.methods import TensorInputs, get_method  # noqa: E402

GOLDEN = pathlib.Path(__file__).with_name("golden_methods.json")

CASES = {   # name: (method, params)
    "ties": ("ties", {"k": 0.2}),
    "ties_k05_count": ("ties_general", {"k": 0.5, "sign": "count"}),
    "ties_soup": ("ties_soup", {}),
    "dare": ("dare", {"p": 0.3}),
    "dare_torch": ("dare", {"p": 0.3, "rng": "torch"}),
    "drop": ("drop", {}),
    "tsd": ("tsd", {}),
    "tgmd": ("tgmd", {}),
    "della": ("della", {}),
    "dgmla": ("dgmla", {}),
    "dgmiz": ("dgmiz", {}),
    "ties_median_trim": ("ties_general", {"k": 0.3, "combine": "median"}),
    "model_stock": ("model_stock", {}),
    "model_stock_flat": ("model_stock", {"estimator": "all-pairs-flat"}),
    "model_stock_rows": ("model_stock", {"estimator": "all-pairs-rowwise"}),
    "geometric_median": ("geometric_median", {}),
    "karcher": ("karcher", {}),
}
SHAPES = [(6, 5, 3, 3), (40, 24), (37,), ()]
CHUNKS = [None, 2]            # whole key in one chunk; two rows per chunk (the gram / two-pass forms)
NS = [3, 8]


def fixture(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).half()
    models = [(base.float() + 0.01 * torch.randn(shape, generator=g)).half() for _ in range(n)]
    for m in models[::3]:     # exact zeros and ties in the deltas, as pruned fine-tunes have
        m.view(-1)[::4] = base.view(-1)[::4]
    return base, models


def digest(name, method, params, dtype=torch.float64) -> str:
    method = get_method(method)
    h = hashlib.sha256()
    for shape in SHAPES:
        for n in NS:
            base, models = fixture(shape, n, seed=len(shape) * 10 + n)
            for chunk in CHUNKS:
                inputs = TensorInputs(models, base if method.needs_base else None, key=f"{name}:{shape}", dtype=dtype,
                                      seed=7, chunk_rows=chunk, recipe_seed=11)
                parts = list(method.run(inputs, method.resolve_params(params)))
                for p in parts:
                    h.update(p.contiguous().to(dtype).numpy().tobytes())
    return h.hexdigest()


ENGINE_CASES = ("ties", "ties_soup", "tgmd", "dgmla", "model_stock", "geometric_median", "karcher")
ENGINE_BUDGETS = {"default": None, "small": 96 * 1024}


def engine_digest(folder, name, budget) -> str:
    """An 8-model merge of tiny SD1 checkpoints through the engine (file reads, its chunking), fp32 output."""
    from safetensors.torch import load_file

    from astolfo_merge.core.engine import run_merge
    from astolfo_merge.core.plan import build_plan
    from astolfo_merge.core.recipe import parse_recipe
    from astolfo_merge.core.run_options import RunOptions
    from astolfo_merge.features.demo import write_synthetic
    folder = pathlib.Path(folder)
    paths = []
    for i in range(9):
        path = folder / f"g{i}.safetensors"
        if not path.exists():
            write_synthetic(path, "sd1", 64, variant=None if i == 0 else 100 + i)
        paths.append(str(path))
    method, params = CASES[name]
    doc = {"pool": paths[1:], "method": method, "params": params, "precision": "fp64", "dtype": "fp32", "seed": 5}
    if get_method(method).needs_base:
        doc["base"] = paths[0]
    out = folder / f"out-{name}-{budget}.safetensors"
    plan = build_plan(parse_recipe(doc), None, str(out))
    threads = torch.get_num_threads()
    try:
        run_merge(plan, RunOptions(overwrite=True, hash_inputs=False, threads=1, chunk_bytes=ENGINE_BUDGETS[budget]))
    finally:
        torch.set_num_threads(threads)
    tensors = load_file(str(out))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().numpy().tobytes())
    out.unlink()
    return h.hexdigest()


def all_digests(folder) -> dict:
    out = {}
    for name, (method, params) in CASES.items():
        out[name] = digest(name, method, params)
        out[name + ":fp32"] = digest(name, method, params, torch.float32)
    for name in ENGINE_CASES:
        for budget in ENGINE_BUDGETS:
            out[f"engine:{name}:{budget}"] = engine_digest(folder, name, budget)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the engine runs methods (a multi-threaded fp32 SVD, in Iso-Z, is not
    reproducible bit for bit from run to run on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_are_the_recorded_bytes(name, dtype):
    golden = json.loads(GOLDEN.read_text())
    method, params = CASES[name]
    key = name if dtype == torch.float64 else name + ":fp32"
    assert digest(name, method, params, dtype) == golden[key]


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.mark.slow
@pytest.mark.parametrize("name", ENGINE_CASES)
@pytest.mark.parametrize("budget", sorted(ENGINE_BUDGETS))
def test_engine_merges_are_the_recorded_bytes(golden_dir, name, budget):
    golden = json.loads(GOLDEN.read_text())
    assert engine_digest(golden_dir, name, budget) == golden[f"engine:{name}:{budget}"]


if __name__ == "__main__":
    import tempfile
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        digests = all_digests(folder)
    if "--record" in sys.argv:
        GOLDEN.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    else:
        print(json.dumps(digests, indent=1, sort_keys=True))

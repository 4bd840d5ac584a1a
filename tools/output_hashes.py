"""Print `name sha256` for the outputs of representative recipes, so a refactor can prove it kept the bytes.

Why: issue 17 moves every module; the outputs of merges, repair, swap, LoRA bake-in and Re-Basin must not
change by one bit. Run before and after, then diff:

    .venv/bin/python tools/output_hashes.py > /tmp/after.txt && diff tools/output_hashes.before.txt /tmp/after.txt

Checkpoints are the test suite's tiny ones (tests/conftest.py: write_synthetic at scale 64). Merged files
are hashed by their tensor payload (key, dtype, shape, bytes; the metadata holds run times); the fp64 lines
hash each method's direct fp64 output on small tensors.
"""
from __future__ import annotations

import hashlib
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from astolfo_merge.core.engine import run_merge  # noqa: E402
from astolfo_merge.core.plan import build_plan  # noqa: E402
from astolfo_merge.core.recipe import parse_recipe  # noqa: E402
from astolfo_merge.core.run_options import RunOptions  # noqa: E402
from astolfo_merge.features.demo import write_synthetic  # noqa: E402
from astolfo_merge.features.lora_synth import write_synthetic_lora  # noqa: E402
from astolfo_merge.features.repair import repair_file  # noqa: E402
from astolfo_merge.features.swap import swap  # noqa: E402
from astolfo_merge.io.writer import save_file  # noqa: E402
from astolfo_merge.methods import METHODS, TensorInputs  # noqa: E402
from astolfo_merge.methods.rebasin.permutation import permute  # noqa: E402
from astolfo_merge.methods.rebasin.spec import build_spec  # noqa: E402

SCALE = 64
SD1 = {"sd1-base": None, "sd1-a": 1, "sd1-b": 2, "sd1-c": 3}
SDXL = {"sdxl-base": None, "sdxl-a": 11, "sdxl-b": 12}
SD1_VAE_KEY = "first_stage_model."
REBASIN = {"sweeps": 2}     # few sweeps: the bytes count here, not the quality


def payload_sha(path) -> str:
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_models(folder: pathlib.Path):
    for name, variant in SD1.items():
        write_synthetic(folder / f"{name}.safetensors", "sd1", SCALE, variant=variant)
    for name, variant in SDXL.items():
        write_synthetic(folder / f"{name}.safetensors", "sdxl", SCALE, variant=variant)
    write_synthetic(folder / "sd1-novae.safetensors", "sd1", SCALE, variant=5,
                    drop=[k for k in load_file(str(folder / "sd1-a.safetensors")) if k.startswith(SD1_VAE_KEY)])
    spec = build_spec("sd1", SCALE)     # Re-Basin's case: B is a permuted copy
    perms = spec.random(2)
    save_file({k: permute(v, k, spec, perms) for k, v in load_file(str(folder / "sd1-b.safetensors")).items()},
              folder / "sd1-b-permuted.safetensors")
    write_synthetic_lora(folder / "lora-sd1.safetensors", "sd1", SCALE, algo="lora", rank=4, seed=3)


def merge(folder, name, doc) -> str:
    recipe = parse_recipe({"output": f"{name}.safetensors", "dtype": "fp32", "seed": 5, **doc})
    result = run_merge(build_plan(recipe, str(folder)), RunOptions(hash_inputs=False, threads=1))
    return payload_sha(result.path)


def method_doc(name: str, method) -> dict:
    pool = ["sd1-a.safetensors", "sd1-b.safetensors", "sd1-c.safetensors"]
    pool = pool[:max(method.min_models, min(len(pool), method.max_models or len(pool)))]
    doc = {"pool": pool, "method": name}
    if method.needs_base:
        doc["base"] = "sd1-base.safetensors"
    if name in ("rebasin", "basin_sum"):
        doc["pool"], doc["params"] = ["sd1-a.safetensors", "sd1-b-permuted.safetensors"], dict(REBASIN)
    return doc


def fp64_sha(name, method) -> str:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 8, generator=g, dtype=torch.float64) * 0.05
    models = [base + 0.01 * torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    inputs = TensorInputs(models, base if method.needs_base else None, key=f"{name}:x", dtype=torch.float64,
                          seed=7, chunk_rows=None, recipe_seed=11)
    h = hashlib.sha256()
    for part in method.run(inputs, method.resolve_params({})):
        h.update(part.contiguous().to(torch.float64).numpy().tobytes())
    return h.hexdigest()


def cases(folder: pathlib.Path):
    for name, method in sorted(METHODS.items()):
        yield f"sd1-{name}-fp32", lambda n=name, m=method: merge(folder, f"m-{n}", method_doc(n, m))
    for name, method in sorted(METHODS.items()):
        if name not in ("rebasin", "basin_sum"):
            yield f"fp64-{name}", lambda n=name, m=method: fp64_sha(n, m)
    yield "sd1-n_average-fp16", lambda: merge(folder, "avg16", {"pool": ["sd1-a.safetensors", "sd1-b.safetensors"],
                                                                  "method": "n_average", "dtype": "fp16"})
    yield "sd1-ties-fp16", lambda: merge(folder, "ties16", {**method_doc("ties", METHODS["ties"]), "dtype": "fp16"})
    yield "sdxl-weighted_sum-fp16", lambda: merge(folder, "xl", {
        "pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "method": "weighted_sum", "dtype": "fp16"})
    yield "sdxl-add_difference-fp32", lambda: merge(folder, "xl-ad", {
        "pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "base": "sdxl-base.safetensors",
        "method": "add_difference"})
    yield "sd1-lora-bake-fp32", lambda: merge(folder, "lora", {
        "pool": ["sd1-a.safetensors"], "method": "n_average", "loras": [{"file": "lora-sd1.safetensors", "strength": 0.7}]})
    yield "repair-fill-vae", lambda: payload_sha(repair_file(
        folder / "sd1-novae.safetensors", base=folder / "sd1-base.safetensors",
        output=folder / "repaired.safetensors", hash_base=False).path)
    yield "swap-sdxl-vae-te0", lambda: payload_sha(swap(
        "sdxl-a.safetensors", str(folder / "swapped.safetensors"), te0="sdxl-b.safetensors",
        vae="sdxl-base.safetensors", models_dir=str(folder), hash_inputs=False).path)


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        write_models(folder)
        for name, run in cases(folder):
            print(name, run(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

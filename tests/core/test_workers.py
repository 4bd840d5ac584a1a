"""Chunk workers: ordered results, bounded in-flight chunks, clean early stops, and merges whose bytes
do not depend on the number of worker threads (every span is computed the same way wherever it runs)."""
import os
import threading
import time

import pytest
import torch

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.key_inputs import FileKeyInputs
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.core.workers import ChunkWorkers


def test_imap_returns_results_in_span_order_and_bounds_the_chunks_alive():
    alive, peak, lock = [0], [0], threading.Lock()

    def work(a, b):
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        time.sleep(0.002 * ((a * 7) % 5))       # finish out of order
        return a, b

    spans = [(a, a + 1) for a in range(40)]
    with ChunkWorkers(3) as pool:
        out = []
        for a, b in pool.imap(work, spans):
            out.append((a, b))
            with lock:
                alive[0] -= 1     # the consumer is done with this chunk
        assert out == spans
        assert peak[0] <= pool.in_flight == 5


def test_an_error_in_one_chunk_reaches_the_consumer_and_no_chunk_runs_after_it():
    started = []

    def work(a, b):
        started.append(a)
        if a == 3:
            raise ValueError("bad chunk 3")
        time.sleep(0.001)
        return a

    with ChunkWorkers(2) as pool:
        got = []
        with pytest.raises(ValueError, match="bad chunk 3"):
            for value in pool.imap(work, [(a, a + 1) for a in range(100)]):
                got.append(value)
        settled = len(started)
        time.sleep(0.05)
        assert len(started) == settled < 100     # nothing left running or queued behind the consumer's back
    assert got == [0, 1, 2]


def test_one_worker_runs_inline_on_the_calling_thread():
    pool = ChunkWorkers(1)
    assert list(pool.imap(lambda a, b: threading.current_thread() is threading.main_thread(), [(0, 1), (1, 2)])) == [True, True]
    assert pool.in_flight == 1


def test_chunks_leave_room_for_every_chunk_in_flight(models):
    recipe = parse_recipe({"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors"], "method": "n_average", "output": "q.safetensors"})
    plan = build_plan(recipe, str(models))
    kp = next(k for k in plan.keys if k.key.endswith("token_embedding.weight") and k.component == "te1")
    with ChunkWorkers(4) as pool:
        inputs = FileKeyInputs(plan, kp, [None, None], torch.float64, torch.device("cpu"), 64 * 1024, [], None, pool)
        row_bytes = kp.shape[1] * 8
        for resident in (2, 10):
            spans = inputs.chunks(resident)
            assert len(spans) > 1
            for a, b in spans:
                assert (b - a) == 1 or pool.in_flight * resident * (b - a) * row_bytes <= 64 * 1024


SD1 = ["sd1-a.safetensors", "sd1-b.safetensors", "sd1-c.safetensors"]


@pytest.mark.parametrize("method, params", [
    ("n_average", {}), ("weighted_sum", {"alpha": 0.3}), ("add_difference", {"alpha": 0.7}), ("amplify", {}),
    ("ties", {"k": 0.5}), ("dare", {"p": 0.3}), ("della", {"p": 0.3, "eps": 0.1}), ("tgmd", {"k": 0.5}),
    ("model_stock", {}), ("geometric_median", {}), ("slerp", {"alpha": 0.4}),
])
@pytest.mark.slow
def test_the_bytes_do_not_depend_on_the_number_of_worker_threads(models, method, params):
    pool = SD1[:2] if method in ("weighted_sum", "add_difference", "slerp") else SD1[:1] if method == "amplify" else SD1
    doc = {"pool": pool, "method": method, "params": params, "dtype": "fp16", "seed": 5}
    if method not in ("n_average", "weighted_sum", "geometric_median", "slerp"):
        doc["base"] = "sd1-base.safetensors"
    digests = []
    for threads in (1, 3):
        plan = build_plan(parse_recipe({**doc, "output": "w.safetensors"}), str(models))
        result = run_merge(plan, RunOptions(hash_inputs=False, threads=threads, chunk_bytes=64 * 1024))
        digests.append(result.sha256)
        os.unlink(result.path)
    assert digests[0] == digests[1]


def test_unit_weight_average_of_fp16_models_is_the_exact_ordered_sum_bit_for_bit():
    """n_average sums fp16 pool models with one reduction op (any order): fine only because the fp64
    sum of fp16 values is exact. Check it against the ordered sum on values spread over all exponents."""
    from astolfo_merge.methods import apply
    gen = torch.Generator().manual_seed(3)
    tensors = []
    for t in range(9):
        mantissa = torch.rand(64, 33, generator=gen) * 2 - 1
        exponent = torch.randint(-24, 16, (64, 33), generator=gen).double()
        tensors.append((mantissa.double() * 2.0 ** exponent).clamp(-65504, 65504).half())
    ordered = tensors[0].double()
    for t in tensors[1:]:
        ordered = ordered + t.double()
    out = apply("n_average", tensors, chunk_rows=5)
    assert torch.equal(out, ordered / 9)

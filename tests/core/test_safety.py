"""Nothing lost, values as written (issue 15): one test (or a few) per class of fault.

Faults that kill or signal a process run the CLI in a subprocess (helpers shared with
test_hardening); the rest run in-process on the tiny fixtures of conftest.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import CheckpointError, MergeKeyError, RecipeError
from astolfo_merge.io.header import MAX_HEADER_BYTES, read_header
from astolfo_merge.io.tempfiles import OutputBusyError, partial_path, reclaim_temp_files, temp_files
from astolfo_merge.io.writer import SafetensorsWriter, save_file

from conftest import ROOT, load
from test_hardening import OPTS, _cli, _recipe, listing, sha


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _holder(target):
    """A separate live process holding a writer of `target` open (until its stdin closes)."""
    code = textwrap.dedent(f"""
        import sys, torch
        from astolfo_merge.io.writer import SafetensorsWriter
        w = SafetensorsWriter({str(target)!r}, [("t", torch.float32, (4,))])
        print("ready", flush=True)
        sys.stdin.read()
        w.abort()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


# -- temp files: short names, reclaimed folder-wide, never a live one ---------------------------------

def test_output_names_up_to_255_bytes_are_written(tmp_path):
    name = "n" * (255 - len(".safetensors")) + ".safetensors"
    digest = save_file({"t": torch.arange(4.0)}, tmp_path / name)
    assert sha(tmp_path / name) == digest and listing(tmp_path) == [name]
    assert len(os.path.basename(partial_path(tmp_path / name))) <= 40


def test_a_stale_temp_file_is_reclaimed_by_a_writer_of_another_name_a_live_one_never(tmp_path):
    holder = _holder(tmp_path / "live.safetensors")
    try:
        live = partial_path(tmp_path / "live.safetensors", holder.pid)
        assert os.path.exists(live)
        stale = partial_path(tmp_path / "gone.safetensors", _dead_pid())
        legacy = tmp_path / ".older-version.safetensors.partial"
        for path in (stale, legacy):
            open(path, "wb").write(b"x" * 100)
        with SafetensorsWriter(tmp_path / "new.safetensors", [("t", torch.float32, (2,))]) as w:
            assert sorted(w.reclaimed) == sorted([str(stale), str(legacy)])
            w.write("t", torch.ones(2))
            w.commit()
        assert temp_files(tmp_path) == [live]             # the live merge's temp file is untouched
        with pytest.raises(OutputBusyError, match="another merge"):   # and its output is busy
            SafetensorsWriter(tmp_path / "live.safetensors", [("t", torch.float32, (2,))])
        assert temp_files(tmp_path) == [live]
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and temp_files(tmp_path) == []
    assert reclaim_temp_files(tmp_path) == [] and listing(tmp_path) == ["new.safetensors"]


def test_kill_9_then_a_merge_of_another_name_reclaims_the_temp_file(models, tmp_path):
    proc = _cli(["merge", _recipe(tmp_path), "--models-dir", models, "--no-hash", "-q", "--throttle", "0.002"],
                tmp_path / "work")
    tmp = partial_path(models / "o.safetensors", proc.pid)
    _wait_for(lambda: os.path.exists(tmp) and os.path.getsize(tmp) > 100_000)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert temp_files(models) == [tmp]
    run_merge(build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum",
                                       "output": "other.safetensors"}), str(models)), OPTS)
    assert temp_files(models) == [] and (models / "other.safetensors").exists() and not (models / "o.safetensors").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_stops_the_cli_removes_the_temp_file_and_says_so(models, tmp_path, sig):
    before = {f: sha(models / f) for f in listing(models)}
    proc = _cli(["merge", _recipe(tmp_path), "--models-dir", models, "--no-hash", "-q", "--throttle", "0.002"],
                tmp_path / "work")
    tmp = partial_path(models / "o.safetensors", proc.pid)
    _wait_for(lambda: os.path.exists(tmp) and os.path.getsize(tmp) > 100_000)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert f"interrupted by {signal.Signals(sig).name}" in lines[-1] and "removed" in lines[-1]
    assert "Traceback" not in err
    assert temp_files(models) == [] and {f: sha(models / f) for f in listing(models)} == before


def test_a_header_our_reader_would_refuse_is_never_written(tmp_path):
    with pytest.raises(CheckpointError, match="limit") as err:
        SafetensorsWriter(tmp_path / "big.safetensors", [("t", torch.float32, (1,))],
                          metadata={"huge": "x" * (MAX_HEADER_BYTES + 1)})
    assert "big.safetensors" in str(err.value) and os.listdir(tmp_path) == []


# -- values: checked as written (after the cast to the output dtype) --------------------------------

BIG_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def _with_values(models, source, name, key, value):
    sd = load(models / source)
    sd[key] = torch.full_like(sd[key], value)
    save_file(sd, models / name)


@pytest.fixture
def overflowing(models):
    """amplify R + 2·(X − R) of X = 60000, R = −60000 (both fit fp16) is 180000: not an fp16 value."""
    _with_values(models, "sd1-a.safetensors", "x.safetensors", BIG_KEY, 60000.0)
    _with_values(models, "sd1-base.safetensors", "r.safetensors", BIG_KEY, -60000.0)
    return {"pool": ["x.safetensors"], "base": "r.safetensors", "method": "amplify", "output": "o.safetensors"}


def test_values_that_overflow_the_output_dtype_fail_in_the_cli_naming_the_key(models, tmp_path, overflowing):
    (tmp_path / "r.json").write_text(json.dumps(overflowing))
    proc = _cli(["merge", tmp_path / "r.json", "--models-dir", models, "--no-hash", "-q"], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 2 and "Traceback" not in err      # the "merging ..." line + the error
    assert BIG_KEY in err and "fp16" in err and "1.8e+05" in err
    assert not (models / "o.safetensors").exists() and temp_files(models) == []


@pytest.mark.parametrize("policy", ["skip", "zero", "keep"])
def test_overflow_under_the_other_policies(models, overflowing, policy):
    plan = build_plan(parse_recipe({**overflowing, "nonfinite": policy}), str(models))
    if policy == "skip":          # no input to leave out: the inputs are finite
        with pytest.raises(MergeKeyError, match="do not fit fp16"):
            run_merge(plan, OPTS)
        return
    result = run_merge(plan, OPTS)
    value = load(result.path)[BIG_KEY]
    assert torch.equal(value, torch.full_like(value, float("inf") if policy == "keep" else 0.0))
    assert any(BIG_KEY in line and ("kept" if policy == "keep" else "replaced by 0") in line for line in result.log)


def test_fp32_output_of_the_same_merge_is_finite(models, overflowing):
    result = run_merge(build_plan(parse_recipe({**overflowing, "dtype": "fp32"}), str(models)), OPTS)
    assert torch.equal(load(result.path)[BIG_KEY], torch.full((load(result.path)[BIG_KEY].shape), 180000.0))


def test_a_lora_with_a_huge_alpha_fails_instead_of_writing_inf(models, tmp_path):
    from astolfo_merge.features.lora_synth import write_synthetic_lora
    write_synthetic_lora(tmp_path / "huge.safetensors", "sd1", scale=64, alpha=1e12)
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors"], "method": "n_average", "output": "o.safetensors",
                                    "loras": [{"file": str(tmp_path / "huge.safetensors")}]}), str(models))
    with pytest.raises(MergeKeyError, match="do not fit fp16"):
        run_merge(plan, OPTS)
    assert not (models / "o.safetensors").exists() and temp_files(models) == []


# -- block weights and weights: names per architecture, the parameter's range, finite -------------------

@pytest.mark.parametrize("blocks,field,needle", [
    ({"FOO": 0.5}, "blocks.FOO", "unknown block"),
    ({"IN99": 0.5}, "blocks.IN99", "unknown block"),
    ({"IN01": 2.5}, "blocks.IN01", r"2.5 is outside \[-1, 2\], the range of weighted_sum's alpha"),
    ({"OUT03": -1.5}, "blocks.OUT03", "outside"),
    ({"M00": "0.5"}, "blocks.M00", "must be a number"),
    ({"IN01": 10 ** 400}, "blocks.IN01", "too large"),
])
def test_bad_block_weights_are_refused_naming_the_block(blocks, field, needle):
    with pytest.raises(RecipeError, match=needle) as err:
        parse_recipe({"pool": ["a", "b"], "method": "weighted_sum", "blocks": blocks})
    assert err.value.field == field


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_block_weights_in_a_recipe_file_are_refused(text):
    doc = '{"pool": ["a", "b"], "method": "weighted_sum", "components": {"unet": {"blocks": {"IN04": %s}}}}' % text
    with pytest.raises(RecipeError, match="finite") as err:
        parse_recipe(doc)
    assert err.value.field == "components.unet.blocks.IN04"


def test_block_ranges_are_the_methods_own():
    assert parse_recipe({"pool": ["x"], "base": "r", "method": "amplify", "blocks": {"IN01": 7.5}}).blocks == {"IN01": 7.5}
    with pytest.raises(RecipeError, match=r"\[-4, 8\]"):
        parse_recipe({"pool": ["x"], "base": "r", "method": "amplify", "blocks": {"IN01": 9}})


def _weights_params():
    from astolfo_merge.methods import METHODS
    return [(m.name, p.name) for m in METHODS.values() for p in m.params if p.kind == "floats"]


@pytest.mark.parametrize("method,param", _weights_params())
def test_nan_in_any_methods_weights_list_is_refused(method, param):
    from astolfo_merge.methods import get_method
    m = get_method(method)
    with pytest.raises(RecipeError, match="finite") as err:
        m.resolve_params({param: [1.0, float("nan"), 1.0]})
    assert err.value.field == f"params.{param}[1]"


@pytest.mark.parametrize("pool,blocks,ok", [
    (["sdxl-a.safetensors", "sdxl-b.safetensors"], {"IN08": 0.3, "OUT08": 0.7, "VAE": 1.0}, True),
    (["sdxl-a.safetensors", "sdxl-b.safetensors"], {"IN11": 0.3}, False),
    (["sd1-a.safetensors", "sd1-b.safetensors"], {"IN11": 0.3, "OUT11": 0.7}, True),
    (["sd1-a.safetensors", "sd1-b.safetensors"], {"VAE": 0.3}, False),
])
def test_block_names_are_checked_against_the_inputs_architecture(models, pool, blocks, ok):
    recipe = parse_recipe({"pool": pool, "method": "weighted_sum", "blocks": blocks, "output": "o.safetensors"})
    if ok:
        plan = build_plan(recipe, str(models))
        assert {kp.block for kp in plan.keys if kp.action == "merge"} >= set(blocks)
        return
    with pytest.raises(RecipeError, match="has no block") as err:
        build_plan(recipe, str(models))
    assert err.value.field == f"blocks.{next(iter(blocks))}" and not (models / "o.safetensors").exists()


# -- an output that is an input is refused, whatever the overwrite flag -------------------------------

def _link_lora(models, tmp_path):
    from astolfo_merge.features.lora_synth import write_synthetic_lora
    write_synthetic_lora(models / "style.safetensors", "sd1", scale=64)
    return {"file": "style.safetensors"}


@pytest.mark.parametrize("output,extra", [
    ("sd1-a.safetensors", {}),                                           # a pool member
    ("sd1-base.safetensors", {}),                                        # the base
    ("sd1-c.safetensors", {"components": {"vae": {"take": "sd1-c.safetensors"}}}),   # a component's take file
    ("style.safetensors", "lora"),                                       # a LoRA file
    ("hard.safetensors", "hardlink"),                                    # a hard link to the base
    ("sub/../sd1-b.safetensors", {}),                                    # another spelling of a pool member
])
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(models, tmp_path, output, extra):
    if extra == "lora":
        extra = {"loras": [_link_lora(models, tmp_path)]}
    elif extra == "hardlink":
        os.link(os.path.realpath(models / "sd1-base.safetensors"), models / "hard.safetensors")
        extra = {}
    (models / "sub").mkdir()
    before = {f: sha(models / f) for f in listing(models)}
    recipe = parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "base": "sd1-base.safetensors",
                           "method": "add_difference", **extra})
    with pytest.raises(RecipeError, match="is also an input") as err:
        build_plan(recipe, str(models), str(models / output))
    assert err.value.field == "output" and "never replaces its own input" in str(err.value)
    plan = build_plan(recipe, str(models), str(models / "fine.safetensors"))
    plan.output = str(models / output)          # a plan changed after planning is refused by the engine too
    with pytest.raises(RecipeError, match="is also an input"):
        run_merge(plan, RunOptions(hash_inputs=False, overwrite=True))
    assert {f: sha(models / f) for f in listing(models)} == before and temp_files(models) == []


def test_the_cli_refuses_an_output_that_is_an_input_with_overwrite(models, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"],
                                                 "method": "weighted_sum", "output": "sd1-b.safetensors"}))
    before = sha(models / "sd1-b.safetensors")
    proc = _cli(["merge", tmp_path / "r.json", "--models-dir", models, "--overwrite", "--no-hash", "-q"], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "is also an input (pool[1]" in err, err
    assert sha(models / "sd1-b.safetensors") == before


def test_the_tabs_host_plan_refuses_an_output_that_is_an_input(models):
    from astolfo_merge.ui.host import StandaloneHost
    recipe = parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "weighted_sum",
                           "output": "sd1-a.safetensors"})
    with pytest.raises(RecipeError, match="is also an input"):
        StandaloneHost(str(models)).plan(recipe)


# -- an input that shrinks mid-merge: a clear error naming it, not SIGBUS ------------------------------

def test_an_input_that_shrinks_between_keys_is_reported_by_name(models, tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes((models / "sdxl-b.safetensors").read_bytes())
    code = textwrap.dedent(f"""
        import os, sys
        from astolfo_merge.core.engine import run_merge
        from astolfo_merge.core.run_options import RunOptions
        from astolfo_merge.errors import AstolfoError
        from astolfo_merge.core.plan import build_plan
        from astolfo_merge.core.recipe import parse_recipe
        plan = build_plan(parse_recipe({{"pool": ["sdxl-a.safetensors", {str(victim)!r}, "sdxl-c.safetensors"],
                                        "method": "n_average", "output": "o.safetensors"}}), {str(models)!r})
        def shrink(p):
            if p.keys_done == 40:
                os.truncate({str(victim)!r}, os.path.getsize({str(victim)!r}) // 2)
        try:
            run_merge(plan, RunOptions(hash_inputs=False), progress=shrink)
        except AstolfoError as exc:
            print(exc)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])     # not -SIGBUS
    assert str(victim) in proc.stdout and ("changed while being read" in proc.stdout or "shrank" in proc.stdout)
    assert not (models / "o.safetensors").exists() and temp_files(models) == []


def test_a_reader_refuses_views_of_a_file_that_changed_size(tmp_path):
    from astolfo_merge.io.reader import CheckpointReader
    save_file({"t": torch.arange(64.0).reshape(8, 8)}, tmp_path / "f.safetensors")
    with CheckpointReader(tmp_path / "f.safetensors") as reader:
        assert reader.view_rows("t", 0, 8).sum() == torch.arange(64.0).sum()
        os.truncate(tmp_path / "f.safetensors", 100)
        with pytest.raises(CheckpointError, match="f.safetensors: changed while being read"):
            reader.view_rows("t", 0, 8)
        with pytest.raises(CheckpointError, match="shrink"):
            reader.read("t")


# -- copied keys stream within the memory budget; absurd markers are refused ----------------------------

def _sparse_checkpoint(path, key, shape, dtype_name="F32", itemsize=4):
    """A checkpoint of one zero tensor written without holding it (a sparse file)."""
    nbytes = itemsize
    for d in shape:
        nbytes *= d
    blob = json.dumps({key: {"dtype": dtype_name, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + nbytes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
def test_a_large_copied_key_stays_within_the_memory_budget(tmp_path):
    _sparse_checkpoint(tmp_path / "big.safetensors", "big", (16384, 4096))      # 256 MiB of fp32
    code = textwrap.dedent(f"""
        import psutil, torch
        from astolfo_merge.io import arch
        from astolfo_merge.io.header import read_header
        from astolfo_merge.core.engine import run_merge
        from astolfo_merge.core.run_options import RunOptions
        from astolfo_merge.core.plan_data import KeyPlan, Plan, Source
        from astolfo_merge.core.recipe import parse_recipe
        header = read_header({str(tmp_path / "big.safetensors")!r})
        source = Source("big.safetensors", header.path, header, arch.Identity("sd1"), {{"big": "big"}})
        plan = Plan(parse_recipe({{"pool": ["big.safetensors"], "method": "n_average"}}), "sd1", 1, "epsilon",
                    [source], [KeyPlan("big", (16384, 4096), torch.float16, "copy", source=0)],
                    {str(tmp_path / "out.safetensors")!r})
        def peak():   # VmHWM: this process's own peak (ru_maxrss would include the forking parent's)
            line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")    # peak := now
        before = psutil.Process().memory_info().rss
        run_merge(plan, RunOptions(hash_inputs=False, memory_gb=0.0625))
        print((peak() - before) // 2 ** 20)
    """)
    # glibc would keep freed chunk buffers on its heap (the dynamic mmap threshold): measure live memory
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mib = int(proc.stdout.split()[-1])
    assert grown_mib < 64 + 96, grown_mib        # budget + slack (the writer queues up to 64 MiB); was 384+
    assert os.path.getsize(tmp_path / "out.safetensors") > 128 * 2 ** 20


def test_an_absurd_marker_is_refused_naming_file_and_key(models):
    sd = load(models / "sd1-a.safetensors")
    sd["v_pred"] = torch.zeros(2 ** 20 // 8 + 1, dtype=torch.int64)
    save_file(sd, models / "marked.safetensors")
    with pytest.raises(CheckpointError, match="marker / schedule buffer 'v_pred' is 1048584 bytes") as err:
        build_plan(parse_recipe({"pool": ["marked.safetensors", "sd1-b.safetensors"], "method": "weighted_sum",
                                 "output": "o.safetensors", "allow_mixed_prediction": True}), str(models))
    assert "marked.safetensors" in str(err.value)


# -- lineage: bounded over generations, every output readable ------------------------------------------

@pytest.mark.slow
def test_thirty_generations_of_merges_keep_a_bounded_readable_header(models, tmp_path):
    from astolfo_merge.core import lineage
    from astolfo_merge.io.hashes import HashCache

    from conftest import metadata
    hostile = {f"{i:064x}": {"name": f"ancestor-{i}.safetensors", "legacy_hash": "0" * 8,
                             "sd_merge_recipe": {"note": "y" * 300}} for i in range(400)}
    hostile["f" * 64] = {"name": "huge", "sd_merge_recipe": {"note": "z" * 2_000_000}}
    sd = load(models / "sd1-a.safetensors")
    save_file(sd, models / "gen0.safetensors", metadata={"sd_merge_models": json.dumps(hostile)})
    options = RunOptions(hash_cache=HashCache(str(tmp_path / "hashes.json")))
    sizes = []
    for gen in range(1, 31):
        plan = build_plan(parse_recipe({"pool": [f"gen{gen - 1}.safetensors", "sd1-b.safetensors"], "method": "weighted_sum",
                                        "output": f"gen{gen}.safetensors"}), str(models))
        result = run_merge(plan, options)
        header = read_header(result.path)         # our reader, and the reference library, read every generation
        assert metadata(result.path)["sd_merge_models"] == header.metadata["sd_merge_models"]
        ancestors = json.loads(header.metadata["sd_merge_models"])
        assert len(ancestors) <= lineage.MAX_ENTRIES
        parents = {options.hash_cache.get(p.path) for p in plan.sources}
        assert parents <= set(ancestors)                     # the direct inputs are always kept
        assert "kept" in header.metadata[lineage.TRUNCATED_KEY]
        sizes.append(header.data_start)
    assert max(sizes) < lineage.MAX_BYTES + 64 * 1024        # lineage cap + this recipe and the tensor index


def test_a_small_lineage_is_written_as_it_always_was():
    from astolfo_merge.core.lineage import bound_lineage
    small = {f"{i:064x}": {"name": f"m{i}", "legacy_hash": None, "sd_merge_recipe": None} for i in range(5)}
    assert bound_lineage(small, [f"{0:064x}"]) == (small, None)
    big = {f"{i:064x}": {"name": f"m{i}"} for i in range(100)}
    kept, note = bound_lineage(big, [f"{0:064x}"])
    assert list(kept) == [f"{0:064x}"] + [f"{i:064x}" for i in range(69, 100)] and "kept 32 of 100" in note

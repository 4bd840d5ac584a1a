"""Clear errors (issue 15): every bad input gives exit 2 and one line naming the file and the problem,
never a traceback, an exit 1 or a misleading message. One test per class; CLI cases run as subprocesses."""
from __future__ import annotations

import json
import logging
import os
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import (
    NONFINITE,
    OUTPUT_DTYPES,
    PRECISIONS,
    TOP_FIELDS,
    Recipe,
    load_recipe,
    parse_recipe,
)
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import CheckpointError, OptionError, RecipeError
from astolfo_merge.features.analysis import PLOT_FORMATS, analyze
from astolfo_merge.features.inspection import format_report, inspect_file
from astolfo_merge.features.lora_synth import default_modules, write_synthetic_lora
from astolfo_merge.io.hashes import HashCache, sha256_file
from astolfo_merge.io.header import check_file, read_header
from astolfo_merge.io.reader import ensure_open_files
from astolfo_merge.io.writer import save_file
from astolfo_merge.methods import METHODS
from astolfo_merge.ui.host import StandaloneHost

from conftest import TEST_SCALE, one_line_error, run_cli

POOL = ["sd1-a.safetensors", "sd1-b.safetensors"]


def raw_safetensors(path, header: bytes, data: bytes = b""):
    """A safetensors file with exactly these header bytes (no validation, no padding)."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def entry(begin, end, shape=None, dtype="F32"):
    return {"dtype": dtype, "shape": [(end - begin) // 4] if shape is None else shape, "data_offsets": [begin, end]}


def recipe_file(tmp_path, doc, name="r.json"):
    path = tmp_path / name
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return path


# ---------------------------------------------------------------------------------------------
# Safetensors headers: JSON that is hostile, shapes that overflow, names twice, bytes of no tensor

HOSTILE_HEADERS = {
    "huge-int": (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', "integer of 5000 digits"),
    "deep-array": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "deep-object": (b'{"__metadata__":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001, "nested too deeply"),
    "deep-but-parsable": (b'{"__metadata__":{"x":' + b"[" * 500 + b"]" * 500 + b"}}", "nested too deeply"),
    "not-utf8": (b'{"\xff":1}', "not UTF-8"),
}


@pytest.mark.parametrize("name", HOSTILE_HEADERS)
def test_header_json_that_is_huge_deep_or_not_text_is_refused_naming_the_file(tmp_path, name):
    header, needle = HOSTILE_HEADERS[name]
    path = raw_safetensors(tmp_path / f"{name}.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match=needle) as err:
        read_header(path)
    assert err.value.path == str(path)


def test_a_hostile_header_is_one_line_with_exit_2_from_the_cli(tmp_path):
    path = raw_safetensors(tmp_path / "deep.safetensors", HOSTILE_HEADERS["deep-array"][0])
    one_line_error(run_cli("inspect", path, cwd=tmp_path), "deep.safetensors", "nested too deeply")


@pytest.mark.parametrize("shape", [[2 ** 62, 2 ** 62, 0], [0, 2 ** 40, 2 ** 40], [2 ** 63, 0], [2 ** 61, 0]])
def test_a_marker_whose_shape_overflows_is_refused_before_any_allocation(tmp_path, shape):
    """Zero elements, so the data length matches; but torch cannot even describe such a tensor (its
    strides overflow int64): refused from Python ints, naming file and key."""
    path = raw_safetensors(tmp_path / "m.safetensors", json.dumps({"v_pred": entry(0, 0, shape, "F32")}).encode())
    with pytest.raises(CheckpointError, match="'v_pred'.*too large") as err:
        read_header(path)
    assert "m.safetensors" in str(err.value)


def test_large_but_representable_empty_shapes_still_read(tmp_path):
    path = raw_safetensors(tmp_path / "m.safetensors", json.dumps({"v_pred": entry(0, 0, [0, 2 ** 40], "I64")}).encode())
    assert read_header(path).tensors["v_pred"].shape == (0, 2 ** 40)


LAYOUTS = {   # name -> (header object as text, data bytes, what the message says)
    "duplicate tensor": ('{"a":%s,"a":%s}' % (json.dumps(entry(0, 4)), json.dumps(entry(4, 8))), 8, "name 'a' twice"),
    "duplicate field": ('{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}', 4, "name 'dtype' twice"),
    "duplicate metadata": ('{"__metadata__":{"k":"1","k":"2"},"a":%s}' % json.dumps(entry(0, 4)), 4, "name 'k' twice"),
    "hole between": (json.dumps({"a": entry(0, 4), "b": entry(8, 12)}), 12, "4 bytes after tensor 'a' belong to no tensor"),
    "hole at start": (json.dumps({"a": entry(4, 8)}), 8, "4 bytes at the start of the data section"),
    "bytes after last": (json.dumps({"a": entry(0, 4)}), 9, "5 bytes after the last tensor"),
    "overlap": (json.dumps({"a": entry(0, 8), "b": entry(4, 8)}), 8, "overlap"),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_duplicate_names_and_bytes_of_no_tensor_are_refused_as_the_reference_library_does(tmp_path, name):
    from safetensors import safe_open
    header, size, needle = LAYOUTS[name]
    path = raw_safetensors(tmp_path / "x.safetensors", header.encode(), b"\0" * size)
    with pytest.raises(CheckpointError, match=needle):
        read_header(path)
    if "field" not in name and "metadata" not in name:   # the reference reads those as "last one wins"
        with pytest.raises(Exception):
            with safe_open(str(path), "pt"):
                pass


def test_files_the_reference_library_writes_read_as_before(tmp_path):
    from safetensors.torch import save_file as reference_save
    tensors = {"b": torch.ones(3, dtype=torch.float16), "a": torch.zeros(2, 2), "empty": torch.zeros(0, 5), "c": torch.ones(1, dtype=torch.int64)}
    reference_save(tensors, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    header = read_header(tmp_path / "ref.safetensors")
    assert {k: v.shape for k, v in header.tensors.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    assert header.metadata == {"k": "v"} and header.warnings == []


# ---------------------------------------------------------------------------------------------
# Files that are not checkpoints, and files that are not files

def test_a_fifo_or_a_device_is_not_a_regular_file_not_not_found(models, tmp_path):
    os.mkfifo(models / "pipe.safetensors")
    for path in (models / "pipe.safetensors", "/dev/null"):
        with pytest.raises(CheckpointError, match="not a regular file"):
            check_file(path)
        with pytest.raises(CheckpointError, match="not a regular file"):
            read_header(path)   # returns at once: a FIFO is never opened
    with pytest.raises(CheckpointError, match="pipe.safetensors: is not a regular file \\(a FIFO\\)"):
        build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "pipe.safetensors"], "method": "n_average"}), str(models))
    recipe = recipe_file(tmp_path, {"pool": ["sd1-a.safetensors", "pipe.safetensors"], "method": "n_average", "output": "o.safetensors"})
    one_line_error(run_cli("merge", recipe, "--models-dir", models, cwd=tmp_path, timeout=60), "pipe.safetensors", "not a regular file")


def test_a_pickle_with_code_is_refused_in_our_words(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload()}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError) as err:
        read_header(tmp_path / "x.ckpt")
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'x.ckpt'}: contains Python objects beyond tensors")
    assert "refusing to unpickle it (unsafe). Convert it with a trusted tool or use a .safetensors file" in text
    assert "weights_only" not in text and "system" in text and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"hello, this is a text file", b"\x80\x02garbage", b"PK\x03\x04broken zip", b""])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="empty" if not content else "not a safetensors or PyTorch"):
        read_header(path)


def test_a_pickle_of_something_else_than_a_state_dict_says_what_it_holds(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a pickled list, not a state dict"):
        read_header(tmp_path / "list.pt")


def test_not_a_checkpoint_from_the_cli_is_one_line(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"hello, this is a text file")
    one_line_error(run_cli("inspect", tmp_path / "x.ckpt", cwd=tmp_path), "x.ckpt", "not a safetensors or PyTorch")


# ---------------------------------------------------------------------------------------------
# inspect: an embedded recipe that is not JSON is reported, the rest of the report stands

@pytest.mark.parametrize("text,needle", [("{not json", "not valid JSON"), ("[" * 5000 + "]" * 5000, "nested too deeply"),
                                         ("[1, 2]", "JSON object"), ('{"seed": ' + "9" * 5000 + "}", "5000 digits")])
@pytest.mark.slow
def test_inspect_reports_an_unreadable_embedded_recipe_and_keeps_the_rest(models, tmp_path, text, needle):
    from conftest import load
    save_file(load(models / "sd1-a.safetensors"), tmp_path / "m.safetensors", metadata={"astolfo_merge_recipe": text})
    report = inspect_file(tmp_path / "m.safetensors")
    assert report["recipe"] is None and needle in report["recipe_error"]
    assert report["arch"] == "sd1" and report["keys"] == 1131
    assert f"Recipe: unreadable (the recipe in the metadata {report['recipe_error'].split('metadata ', 1)[1]}" in format_report(report)
    if needle != "not valid JSON":
        return   # the CLI once is enough
    proc = run_cli("inspect", tmp_path / "m.safetensors", cwd=tmp_path)
    assert proc.returncode == 0 and "Recipe: unreadable" in proc.stdout and proc.stderr == ""
    one_line_error(run_cli("merge", tmp_path / "m.safetensors", "--models-dir", models, cwd=tmp_path),
                   "the recipe in", "m.safetensors", needle)


def test_hostile_lineage_in_an_input_is_dropped_not_a_crash(models, tmp_path):
    """The WebUI's lineage fields of an input are JSON text we did not write: too deep or too long, they
    are left out of the output's lineage; the merge goes on."""
    from conftest import load
    save_file(load(models / "sd1-b.safetensors"), models / "odd.safetensors",
              metadata={"sd_merge_models": "[" * 100_000 + "]" * 100_000, "sd_merge_recipe": '{"a": ' + "9" * 5000 + "}"})
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "odd.safetensors"], "method": "n_average",
                                    "output": "o.safetensors"}), str(models))
    result = run_merge(plan, RunOptions(hash_cache=HashCache(str(tmp_path / "h.json"))))
    lineage = json.loads(read_header(result.path).metadata["sd_merge_models"])
    assert {v["name"] for v in lineage.values()} == {"sd1-a.safetensors", "odd.safetensors"}


# ---------------------------------------------------------------------------------------------
# Recipes: not UTF-8, too deep, huge numbers, fields twice

BAD_RECIPES = {
    "latin-1": ('{"pool": ["caf\xe9.safetensors"], "method": "n_average"}'.encode("latin-1"), "not UTF-8 text"),
    "deep": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "deep-parsable": (b'{"pool": ["a"], "method": "n_average", "note": ' + b"[" * 100 + b"]" * 100 + b"}", "nested too deeply"),
    "huge-seed": (b'{"pool": ["a"], "method": "n_average", "seed": ' + b"9" * 5000 + b"}", "integer of 5000 digits"),
    "seed-2**63": (json.dumps({"pool": ["a"], "method": "n_average", "seed": 2 ** 63}).encode(), "0 to 2**63 - 1"),
    "twice": (b'{"pool": ["a"], "method": "n_average", "pool": ["b"]}', "field 'pool' twice"),
    "not-json": (b'{"pool": ', "not valid JSON"),
}


@pytest.mark.parametrize("name", BAD_RECIPES)
def test_a_recipe_file_that_is_not_utf8_deep_or_huge_is_refused_naming_the_file(tmp_path, name):
    data, needle = BAD_RECIPES[name]
    path = recipe_file(tmp_path, data)
    with pytest.raises(RecipeError, match=re.escape(needle)) as err:
        load_recipe(path)
    assert str(path) in str(err.value) or name.startswith("seed")


@pytest.mark.slow
def test_a_bad_recipe_from_the_cli_is_one_line(tmp_path):
    for name in ("latin-1", "deep", "huge-seed"):
        path = recipe_file(tmp_path, BAD_RECIPES[name][0], f"{name}.json")
        one_line_error(run_cli("merge", path, cwd=tmp_path), f"{name}.json", BAD_RECIPES[name][1])


def test_the_largest_seed_and_a_utf8_bom_are_accepted():
    assert parse_recipe({"pool": ["a"], "method": "n_average", "seed": 2 ** 63 - 1}).seed == 2 ** 63 - 1
    assert parse_recipe(b'\xef\xbb\xbf{"pool": ["a"], "method": "n_average"}').pool == ["a"]
    with pytest.raises(RecipeError, match="an integer of"):
        parse_recipe({"pool": ["a"], "method": "n_average", "seed": 10 ** 5000})   # from a script: no repr of it


# ---------------------------------------------------------------------------------------------
# Output names that cannot be encoded

@pytest.mark.parametrize("name", ["\ud800x.safetensors", "a\udcff.safetensors"])
def test_an_output_name_that_cannot_be_encoded_is_refused(models, tmp_path, name):
    with pytest.raises(RecipeError, match="cannot be used as a file name"):
        parse_recipe({"pool": POOL, "method": "n_average", "output": name})
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"pool": POOL, "method": "n_average", "output": name}))   # \ud800 as a JSON escape
    one_line_error(run_cli("merge", path, "--models-dir", models, cwd=tmp_path), "output", "cannot be used as a file name")


# ---------------------------------------------------------------------------------------------
# Memory budgets: NaN, inf, 0, negative, not a number (CLI, library, tab)

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "lots"])
def test_a_memory_budget_that_is_not_a_positive_finite_number_is_refused(models, tmp_path, value):
    recipe = recipe_file(tmp_path, {"pool": POOL, "method": "n_average"})
    one_line_error(run_cli("merge", recipe, "--models-dir", models, f"--memory-gb={value}", cwd=tmp_path), "--memory-gb", value)
    with pytest.raises(OptionError, match="memory budget"):
        RunOptions(memory_gb=value)
    with pytest.raises(OptionError, match="memory budget"):
        StandaloneHost(str(models)).run_options(memory_gb=value)   # what the tab's and the app's Merge / Check plan build
    with pytest.raises(OptionError, match="memory budget"):
        analyze([str(models / p) for p in POOL], memory_gb=value)


# ---------------------------------------------------------------------------------------------
# The hash cache: a file of the wrong shape is rebuilt, never breaks a merge

@pytest.mark.parametrize("content", ['["a", "b"]', '{"x|1|2": 5}', '{"x": {"y": 1}}', "{broken", "[" * 100_000, '"text"', "\xff"])
def test_a_hash_cache_of_the_wrong_shape_is_rebuilt_with_a_log_line(models, tmp_path, caplog, content):
    cache_path = tmp_path / "hashes.json"
    cache_path.write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="astolfo_merge"):
        cache = HashCache(str(cache_path))
    assert any("hash cache" in r.getMessage() and str(cache_path) in r.getMessage() for r in caplog.records)
    plan = build_plan(parse_recipe({"pool": POOL, "method": "n_average", "output": "o.safetensors"}), str(models))
    result = run_merge(plan, RunOptions(hash_cache=cache))
    assert cache.get(models / "sd1-a.safetensors") == sha256_file(models / "sd1-a.safetensors")
    again = HashCache(str(cache_path))   # rewritten in the right shape
    assert again.get(result.path) == result.sha256


def test_good_entries_of_a_partly_damaged_hash_cache_are_kept(models, tmp_path):
    good = HashCache(str(tmp_path / "h.json"))
    digest = good.sha256(models / "sd1-a.safetensors")
    doc = json.loads((tmp_path / "h.json").read_text())
    doc["junk"] = 7
    (tmp_path / "h.json").write_text(json.dumps(doc))
    assert HashCache(str(tmp_path / "h.json")).get(models / "sd1-a.safetensors") == digest


# ---------------------------------------------------------------------------------------------
# Degenerate LoRA shapes: rank 0, missing dimensions

@pytest.mark.parametrize("algo", ["lora", "locon", "lora_tucker", "loha", "lokr"])
def test_a_rank_0_lora_is_refused_naming_the_lora_file_and_key(models, algo):
    name = default_modules("sd1", convs=algo != "lora")[0]
    write_synthetic_lora(models / "rank0.safetensors", "sd1", TEST_SCALE, algo=algo, rank=0, modules=[name])
    with pytest.raises(CheckpointError, match=f"rank0.safetensors: module '{name}': tensor '{name}\\..*\\(rank 0\\)"):
        build_plan(parse_recipe({"pool": ["sd1-a.safetensors"], "method": "n_average", "output": "o.safetensors",
                                 "loras": [{"file": "rank0.safetensors"}]}), str(models))


def test_a_lora_factor_without_its_dimensions_is_refused(models, tmp_path):
    name = default_modules("sd1", convs=False)[0]
    save_file({f"{name}.lora_up.weight": torch.zeros(8), f"{name}.lora_down.weight": torch.zeros(4, 8)}, models / "flat.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}.lora_up.weight' has shape \\[8\\]; .*at least 2 dimensions"):
        build_plan(parse_recipe({"pool": ["sd1-a.safetensors"], "method": "n_average", "output": "o.safetensors",
                                 "loras": [{"file": "flat.safetensors"}]}), str(models))
    one_line_error(run_cli("bake", models / "sd1-a.safetensors", "--lora", models / "flat.safetensors", "-o", tmp_path / "o.safetensors",
                           cwd=tmp_path), "flat.safetensors", "lora_up.weight")


# ---------------------------------------------------------------------------------------------
# analyze --plot: image formats only, no silent replacement

def test_analyze_plot_refuses_a_non_image_extension_listing_the_supported_ones(models, tmp_path):
    proc = run_cli("analyze", models / "sd1-a.safetensors", models / "sd1-b.safetensors", "--plot", tmp_path / "out.txt", cwd=tmp_path)
    err = one_line_error(proc, "out.txt", "'.txt'")
    assert all(f".{fmt}" in err for fmt in PLOT_FORMATS)
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.slow
def test_analyze_plot_replaces_an_existing_file_only_with_overwrite(models, tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"my holiday picture")
    args = ("analyze", models / "sd1-a.safetensors", models / "sd1-b.safetensors", "--plot", target)
    one_line_error(run_cli(*args, cwd=tmp_path), "out.png", "--overwrite")
    assert target.read_bytes() == b"my holiday picture"
    proc = run_cli(*args, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Open-file limits: raised to the hard limit up front, or a clear error before any work

def test_the_soft_open_file_limit_is_raised_to_the_hard_one_when_a_pool_needs_it():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 16
    if hard != resource.RLIM_INFINITY and hard < in_use + 400:
        pytest.skip("hard limit too low to test raising")
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))
    try:
        ensure_open_files(150)
        now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert now == hard if hard != resource.RLIM_INFINITY else now >= in_use + 300
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_pool_larger_than_the_hard_open_file_limit_fails_up_front(models, tmp_path):
    resource = pytest.importorskip("resource")
    for i in range(40):
        os.symlink(models / "sd1-a.safetensors", models / f"copy{i}.safetensors")
    recipe = recipe_file(tmp_path, {"pool": [f"copy{i}.safetensors" for i in range(40)], "method": "n_average",
                                    "output": "o.safetensors"})

    def cap():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    proc = run_cli("merge", recipe, "--models-dir", models, "--no-hash", "-q", cwd=tmp_path, preexec=cap)
    one_line_error(proc, "40 files at once", "ulimit -n")
    assert not (models / "o.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Output commands whose reader went away

@pytest.mark.parametrize("command", [["methods"], ["methods", "--json"]])
def test_a_closed_output_pipe_ends_quietly(tmp_path, command):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = run_cli(*command, cwd=tmp_path, stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


@pytest.mark.slow
def test_a_bad_command_line_is_one_line(tmp_path):
    one_line_error(run_cli("merge", cwd=tmp_path), "recipe", "--help")
    one_line_error(run_cli("frobnicate", cwd=tmp_path), "frobnicate")


# ---------------------------------------------------------------------------------------------
# Recipe fuzzing: any JSON document or byte string gives a Recipe or a RecipeError, nothing else

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=12),
                         st.sampled_from(["a.safetensors", "base", "unet", "IN00", "after", "fp16", "skip"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
file_lists = st.lists(st.sampled_from(["a.safetensors", "b.safetensors", "c.ckpt", "d.safetensors", "", "../x", "base"]), max_size=4)


def mostly(valid, junk=json_scalars):
    """Valid values seven times in eight: a recipe has over a dozen fields, each may spoil it."""
    return st.integers(0, 7).flatmap(lambda n: junk if n == 0 else valid)


fields = {
    "pool": mostly(st.lists(st.sampled_from(["a.safetensors", "b.safetensors", "c.ckpt", "d.safetensors"]), min_size=1, max_size=4),
                   st.one_of(file_lists, json_values)),
    "method": mostly(st.sampled_from(sorted(METHODS)), json_values),
    "params": mostly(st.just({}), st.dictionaries(st.sampled_from(["alpha", "weights", "k", "lambda", "density", "seed"]),
                                                               json_scalars | st.lists(json_scalars, max_size=3), max_size=3)),
    "base": mostly(st.just("base.safetensors")), "seed": mostly(st.integers(-5, 2 ** 64)),
    "output": mostly(st.sampled_from(["o.safetensors", "sub/o", "o.ckpt"])),
    "version": mostly(st.just(1)), "precision": mostly(st.sampled_from(PRECISIONS)),
    "dtype": mostly(st.sampled_from(OUTPUT_DTYPES)), "nonfinite": mostly(st.sampled_from(NONFINITE)),
    "position_ids": mostly(st.sampled_from(["reset", "omit"])), "allow_mixed_prediction": mostly(st.booleans()),
    "components": mostly(st.just({}), st.dictionaries(st.sampled_from(["unet", "te0", "te1", "vae", "x"]),
                                                           st.one_of(st.fixed_dictionaries({"take": json_scalars}), json_values),
                                                           max_size=2) | json_values),
    "loras": mostly(st.just([]), st.lists(st.fixed_dictionaries({"file": json_scalars}, optional={"strength": json_scalars,
                                                                                        "when": json_scalars}), max_size=2)
                                         | json_values),
    "blocks": mostly(st.just({}), json_values), "fermat": mostly(st.just(False), json_values), "note": json_values,
}
recipe_docs = st.one_of(
    st.fixed_dictionaries({"pool": fields["pool"], "method": fields["method"]},
                          optional={k: v for k, v in fields.items() if k not in ("pool", "method")}
                          | {k: json_values for k in sorted(TOP_FIELDS - set(fields))}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4), json_values)


def _parse_or_refuse(doc):
    try:
        return parse_recipe(doc)
    except RecipeError:
        return None


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(doc=recipe_docs)
def test_fuzzed_recipe_documents_give_a_recipe_or_a_recipe_error(doc):
    recipe = _parse_or_refuse(doc)
    assert recipe is None or isinstance(recipe, Recipe)
    text = json.dumps(doc, allow_nan=True)
    again = _parse_or_refuse(text)
    assert (again is None) == (recipe is None)
    if recipe is not None:   # what is accepted round-trips through the recipe's own JSON
        assert parse_recipe(recipe.to_json()).to_dict() == recipe.to_dict()


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                      st.builds(lambda d, cut: json.dumps(d).encode()[:cut], json_values, st.integers(0, 60))))
def test_fuzzed_recipe_bytes_give_a_recipe_or_a_recipe_error(data):
    recipe = _parse_or_refuse(data)
    assert recipe is None or isinstance(recipe, Recipe)


def test_recipe_fuzzing_reaches_valid_recipes():
    """The generators are not only noise: valid recipes are among the documents (else the fuzzing proves little)."""
    from hypothesis import find
    found = find(recipe_docs, lambda d: _parse_or_refuse(d) is not None, settings=settings(max_examples=500, database=None,
                                                                                             phases=[Phase.generate]))
    assert isinstance(_parse_or_refuse(found), Recipe)


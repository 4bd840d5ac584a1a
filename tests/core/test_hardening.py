"""Bad input fails early and clearly; faults leave nothing half-written and lose nothing (issue 7)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import ArchitectureError, CheckpointError, MergeKeyError
from astolfo_merge.io.header import read_header
from astolfo_merge.io.tempfiles import OutputBusyError, partial_path, temp_files
from astolfo_merge.io.writer import SafetensorsWriter, save_file

from conftest import ROOT, load

OPTS = RunOptions(hash_inputs=False)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def listing(folder):
    """What a user (or the WebUI's checkpoint list) sees: visible files, not folders."""
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def with_nan(models, make_checkpoint, name, key, value=float("nan")):
    src = load(models / "sd1-b.safetensors")
    src[key] = src[key].clone()
    src[key].view(-1)[3] = value
    save_file(src, models / name)


NAN_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def test_nan_in_an_input_fails_by_default_naming_file_and_key(models, make_checkpoint):
    with_nan(models, make_checkpoint, "nan.safetensors", NAN_KEY)
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "nan.safetensors", "sd1-c.safetensors"],
                                    "method": "n_average", "output": "o.safetensors"}), str(models))
    with pytest.raises(MergeKeyError) as err:
        run_merge(plan, OPTS)
    assert err.value.key == NAN_KEY and "nan.safetensors" in str(err.value)
    assert not (models / "o.safetensors").exists() and not temp_files(models)


def test_nan_policy_skip_leaves_that_input_out_of_that_key_only(models, make_checkpoint):
    with_nan(models, make_checkpoint, "inf.safetensors", NAN_KEY, float("inf"))
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "inf.safetensors", "sd1-c.safetensors"],
                                    "method": "n_average", "output": "o.safetensors", "nonfinite": "skip", "dtype": "fp32"}),
                      str(models), )
    result = run_merge(plan, RunOptions(hash_inputs=False, chunk_bytes=2048))   # rewinds a multi-chunk tensor
    out, a, b, c = (load(p) for p in (result.path, models / "sd1-a.safetensors", models / "inf.safetensors", models / "sd1-c.safetensors"))
    torch.testing.assert_close(out[NAN_KEY].double(), ((a[NAN_KEY].double() + c[NAN_KEY].double()) / 2).float().double())
    other = "model.diffusion_model.input_blocks.1.0.in_layers.2.bias"
    torch.testing.assert_close(out[other].double(), ((a[other].double() + b[other].double() + c[other].double()) / 3).float().double())
    assert any("left out" in line for line in result.log)
    assert result.sha256 == sha(result.path)


def test_nan_policy_keep_writes_them(models, make_checkpoint):
    with_nan(models, make_checkpoint, "nan.safetensors", NAN_KEY)
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "nan.safetensors"], "method": "n_average",
                                    "output": "o.safetensors", "nonfinite": "keep"}), str(models))
    result = run_merge(plan, OPTS)
    assert torch.isnan(load(result.path)[NAN_KEY]).sum() == 1


@pytest.mark.parametrize("pool,needle", [
    (["sd1-a.safetensors", "sdxl-a.safetensors"], "same architecture"),
    (["sdxl-a.safetensors", "sdxl-vpred.safetensors"], "prediction type"),
])
def test_incompatible_pools_are_refused_before_any_work(models, pool, needle):
    with pytest.raises(ArchitectureError, match=needle):
        build_plan(parse_recipe({"pool": pool, "method": "n_average", "output": "o.safetensors"}), str(models))


def test_a_base_of_another_architecture_is_refused(models):
    with pytest.raises(ArchitectureError, match="same architecture"):
        build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "base": "sdxl-base.safetensors",
                                 "method": "add_difference", "output": "o.safetensors"}), str(models))


def test_lora_and_vae_only_files_are_refused_as_full_models(models):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(5, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 5)}, models / "l.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 2, 3, 3)},
              models / "vae.safetensors")
    vae_keys = {k: v for k, v in load(models / "sd1-a.safetensors").items() if k.startswith("first_stage_model.")}
    save_file(vae_keys, models / "vae-prefixed.safetensors")
    for name, needle in (("l.safetensors", "LoRA"), ("vae.safetensors", "stand-alone VAE"),
                         ("vae-prefixed.safetensors", "has no UNET")):
        with pytest.raises((CheckpointError, ArchitectureError), match=needle) as err:
            build_plan(parse_recipe({"pool": ["sd1-a.safetensors", name], "method": "n_average", "output": "o.safetensors"}), str(models))
        assert name in str(err.value)


def test_metadata_that_is_huge_or_not_strings_is_read_and_written_back_as_strings(models):
    sd = load(models / "sd1-a.safetensors")
    header_meta = {"big": "x" * 3_000_000, "nested": {"a": [1, 2]}, "num": 5}
    # write non-string metadata by hand (our writer would stringify it)
    from safetensors.torch import save_file as st_save
    path = models / "weird.safetensors"
    st_save(sd, str(path), metadata={"big": header_meta["big"]})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    doc = json.loads(raw[8:8 + n])
    doc["__metadata__"].update({"nested": header_meta["nested"], "num": 5})
    blob = json.dumps(doc).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    header = read_header(path)
    assert header.metadata["num"] == 5
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "weird.safetensors"], "method": "n_average",
                                    "output": "o.safetensors"}), str(models))
    result = run_merge(plan, OPTS)
    assert all(isinstance(v, str) for v in read_header(result.path).metadata.values())


def test_an_exception_in_a_method_leaves_no_output_and_inputs_unchanged(models):
    from astolfo_merge.methods import METHODS, Method, register

    def explode(inputs, params):
        if "output_blocks" in inputs.key:
            raise ValueError("boom")
        yield inputs.read(0)
    register(Method("test_explode", "x", "x", explode, min_models=1))
    try:
        before = {f: sha(models / f) for f in listing(models)}
        plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors"], "method": "test_explode", "output": "o.safetensors"}), str(models))
        with pytest.raises(MergeKeyError, match="boom"):
            run_merge(plan, OPTS)
        assert {f: sha(models / f) for f in listing(models)} == before
        assert not temp_files(models)
    finally:
        del METHODS["test_explode"]


def test_existing_output_survives_a_failed_overwrite(models):
    target = models / "o.safetensors"
    target.write_bytes(b"previous model")
    plan = build_plan(parse_recipe({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"], "method": "n_average",
                                    "output": "o.safetensors"}), str(models))
    cancel = threading.Event()
    with pytest.raises(Exception):
        run_merge(plan, RunOptions(hash_inputs=False, overwrite=True), progress=lambda p: p.keys_done > 50 and cancel.set(), cancel=cancel)
    assert target.read_bytes() == b"previous model"
    assert listing(models).count("o.safetensors") == 1 and not temp_files(models)


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    entries = [("t", torch.float32, (4,))]
    with SafetensorsWriter(tmp_path / "x.safetensors", entries) as first:
        with pytest.raises(OutputBusyError, match="another merge"):
            SafetensorsWriter(tmp_path / "x.safetensors", entries)
        first.write("t", torch.ones(4))
        first.commit()
    assert os.listdir(tmp_path) == ["x.safetensors"]


def _cli(args, cwd, env_extra=None, preexec=None):
    env = {"PYTHONPATH": str(ROOT), "HOME": str(cwd), "PATH": "/usr/bin:/bin", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "astolfo_merge", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def _recipe(tmp_path, output="o.safetensors"):
    (tmp_path / "work").mkdir(exist_ok=True)
    path = tmp_path / "work" / "r.json"
    path.write_text(json.dumps({"pool": ["sdxl-a.safetensors", "sdxl-b.safetensors", "sdxl-c.safetensors"],
                                "method": "n_average", "output": output}))
    return path


def test_disk_full_is_reported_and_leaves_nothing(models, tmp_path):
    import resource
    before = {f: sha(models / f) for f in listing(models)}
    limit = 1_000_000  # bytes: well below the output size

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = _cli(["merge", _recipe(tmp_path), "--models-dir", models, "--no-hash", "-q"], tmp_path / "work", preexec=cap)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "File too large" in err and "Traceback" not in err
    assert {f: sha(models / f) for f in listing(models)} == before
    assert not (models / "o.safetensors").exists() and not temp_files(models)


@pytest.mark.slow
def test_kill_9_while_writing_leaves_no_output_and_the_next_run_reclaims_the_temp_file(models, tmp_path):
    before = {f: sha(models / f) for f in listing(models)}
    proc = _cli(["merge", _recipe(tmp_path), "--models-dir", models, "--no-hash", "-q", "--throttle", "0.002"],
                tmp_path / "work")
    tmp = partial_path(models / "o.safetensors", proc.pid)
    deadline = time.time() + 60
    while not (os.path.exists(tmp) and os.path.getsize(tmp) > 100_000) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (models / "o.safetensors").exists()
    assert listing(models) == sorted(before) and {f: sha(models / f) for f in listing(models)} == before
    proc = _cli(["merge", _recipe(tmp_path), "--models-dir", models, "--no-hash", "-q"], tmp_path / "work")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (models / "o.safetensors").exists() and not os.path.exists(tmp) and not temp_files(models)

"""Live merge (astolfo_merge/features/live.py): the plan's output streamed into a loaded model's tensors.

The loaded model here is a dict of fp32 tensors loaded from sd1-a (what the WebUI holds with
--no-half); references are the same recipes merged to files by the engine and loaded the same way.
"""
from __future__ import annotations

import threading

import pytest
import torch

from astolfo_merge.core import live_workers
from astolfo_merge.core.engine import run_merge
from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.run_options import RunOptions
from astolfo_merge.errors import Cancelled, OutputExistsError
from astolfo_merge.features import live, live_state, live_webui
from astolfo_merge.io.arch import block_of

from conftest import load, metadata
from webui_fakes import lora_network, network_apply_weights

LOADED = "sd1-a.safetensors"
OPTS = RunOptions(hash_inputs=False)


def recipe(alpha=0.3, blocks=None, **doc):
    return parse_recipe({"pool": [LOADED, "sd1-b.safetensors"], "method": "weighted_sum", "params": {"alpha": alpha},
                         "output": "x.safetensors", **({"blocks": blocks} if blocks else {}), **doc})


def plan_of(models, rec, output=None):
    return build_plan(rec, str(models), str(output) if output else None)


def loaded_model(models, dtype=torch.float32):
    """What a WebUI holds after loading sd1-a: its tensors in the model's dtype, and the target over them."""
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v.clone()) for k, v in load(models / LOADED).items()}
    return tensors, live_state.TensorTarget(tensors, str(models / LOADED))


def file_merge(models, rec, name):
    rec.output = name
    return load(run_merge(plan_of(models, rec, models / name), OPTS).path)


def assert_holds(tensors, reference, skip_other=True):
    """Every tensor of the model equals the reference file's value as loading casts it."""
    for key, ref in reference.items():
        if skip_other and key.startswith(("betas", "alphas", "sqrt", "log_one", "posterior")):
            continue
        assert torch.equal(tensors[key], ref.to(tensors[key].dtype)), key


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield
    live_workers.release_crew()       # no parked workers outlive their test


def test_a_live_merge_holds_exactly_what_loading_the_merged_file_would(models):
    tensors, target = loaded_model(models)
    threads = torch.get_num_threads()
    result = live.merge_into(target, plan_of(models, recipe(0.3)), OPTS)
    assert torch.get_num_threads() == threads
    assert_holds(tensors, file_merge(models, recipe(0.3), "ref.safetensors"))
    merged = [k for k in target.state.merged]
    assert result.keys == len(merged) > 0 and result.restored == 0
    assert target.labels == [f"[Merger] {live_state.recipe_hash(recipe(0.3))[:10]}"] and result.label == target.labels[-1]


def test_a_second_merge_rewrites_only_keys_whose_recipe_changed(models):
    tensors, target = loaded_model(models)
    live.merge_into(target, plan_of(models, recipe(0.3)), OPTS)
    first = dict(target.state.merged)
    again = live.merge_into(target, plan_of(models, recipe(0.3)), OPTS)
    assert again.keys == 0 and again.restored == 0 and target.state.merged == first
    one_block = live.merge_into(target, plan_of(models, recipe(0.3, blocks={"IN04": 0.9})), OPTS)
    in04 = [k for k in first if block_of(k, "sd1") == "IN04"]
    assert 0 < one_block.keys == len(in04) < len(first)
    assert_holds(tensors, file_merge(models, recipe(0.3, blocks={"IN04": 0.9}), "ref.safetensors"))


def test_keys_no_longer_merged_come_back_from_the_checkpoint(models):
    tensors, target = loaded_model(models)
    live.merge_into(target, plan_of(models, recipe(0.3)), OPTS)
    only_unet = recipe(0.3, components={"te0": {"take": LOADED}, "vae": {"take": LOADED}})
    result = live.merge_into(target, plan_of(models, only_unet), OPTS)
    assert result.keys == 0 and result.restored > 0
    assert all(k.startswith("model.diffusion_model.") for k in target.state.merged)
    assert_holds(tensors, file_merge(models, only_unet, "ref.safetensors"))


def test_restore_rereads_only_changed_keys_and_equals_the_file(models, monkeypatch):
    tensors, target = loaded_model(models)
    live.merge_into(target, plan_of(models, recipe(0.7)), OPTS)
    changed = set(target.state.merged)
    read = []
    original = live.CheckpointReader.read
    monkeypatch.setattr(live.CheckpointReader, "read", lambda self, key: read.append(key) or original(self, key))
    result = live.restore(target)
    assert set(read) == changed and result.restored == len(changed)
    assert target.state.merged == {} and target.labels[-1] == ""
    assert_holds(tensors, load(models / LOADED), skip_other=False)


def test_a_cancelled_merge_is_restored_whole(models):
    tensors, target = loaded_model(models)
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.keys_done)
        if p.keys_done == 5:
            cancel.set()
    with pytest.raises(Cancelled):
        live.merge_into(target, plan_of(models, recipe(0.5)), OPTS, progress, cancel)
    assert not target.state.complete and 5 <= len(target.state.merged) <= 6
    assert target.labels[-1].startswith("[Merger]") and target.labels[-1].endswith("(incomplete)")
    with pytest.raises(live_state.LiveError, match="interrupted"):
        live.save_loaded(target, models / "saved.safetensors")
    live.restore(target)
    assert_holds(tensors, load(models / LOADED), skip_other=False)


def test_other_weights_loaded_since_start_a_fresh_state(models):
    tensors, target = loaded_model(models)
    live.merge_into(target, plan_of(models, recipe(0.3)), OPTS)
    target.checkpoint = str(models / "sd1-b.safetensors")      # the host loaded another file meanwhile
    for key, value in load(models / "sd1-b.safetensors").items():
        tensors[key].copy_(value)
    result = live.merge_into(target, plan_of(models, recipe(0.3)), OPTS)
    assert result.restored == 0 and result.keys > 0
    assert_holds(tensors, file_merge(models, recipe(0.3), "ref.safetensors"))


def test_save_writes_the_loaded_merge_with_its_recipe_and_never_overwrites(models):
    tensors, target = loaded_model(models)
    with pytest.raises(live_state.LiveError, match="no live merge"):
        live.save_loaded(target, models / "saved.safetensors")
    live.merge_into(target, plan_of(models, recipe(0.4)), OPTS)
    result = live.save_loaded(target, models / "saved.safetensors")
    saved, reference = load(result.path), file_merge(models, recipe(0.4), "ref.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    meta = metadata(result.path)
    assert parse_recipe(meta["astolfo_merge_recipe"]).params == {"alpha": 0.4}
    assert live_state.recipe_hash(recipe(0.4)) in meta["astolfo_merge_live"]
    with pytest.raises(OutputExistsError):
        live.save_loaded(target, models / "saved.safetensors")


def test_a_shape_the_model_lacks_stops_before_any_write(models):
    tensors, target = loaded_model(models)
    key = "model.diffusion_model.out.2.weight"
    tensors[key] = torch.zeros(3)
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(live_state.LiveError, match="out.2.weight"):
        live.merge_into(target, plan_of(models, recipe(0.3)), OPTS)
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)


# -- the WebUI's built-in LoRA (extensions-builtin/Lora/networks.py) after a live merge ----------------

class Model(torch.nn.Module):
    """A module tree with one Linear per key, as networks.py sees the WebUI's model."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.layer.weight.copy_(tensors["w"])
            self.layer.bias.copy_(tensors["b"])


def test_lora_backups_neither_undo_nor_double_a_live_merge():
    torch.manual_seed(0)
    file = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    merged = torch.randn(3, 4)
    delta = lora_network("style", torch.randn(3, 4))
    model = Model(file)
    layer = model.layer
    # 1. a generation with the LoRA (backup = the file's weights), then one without it (backup kept)
    network_apply_weights(layer, [delta])
    assert torch.allclose(layer.weight, file["w"] + delta.updown)
    network_apply_weights(layer, [])
    assert torch.equal(layer.weight, file["w"]) and layer.network_weights_backup is not None
    # 2. a live merge writes the layer: its LoRA state is released first, then the merged values go in
    assert live_webui.release_network_backups(model, ["layer.weight"]) == 1
    with torch.no_grad():
        layer.weight.copy_(merged)
    # 3. the LoRA again: applied once, on top of the merge (not on the stale backup of the file)
    network_apply_weights(layer, [delta])
    assert torch.allclose(layer.weight, merged + delta.updown)
    # 4. a live merge while the LoRA is applied: the merged values replace the LoRA'd ones; the next
    #    generation with the same LoRA re-applies it (networks.py would otherwise think it is still there)
    merged2 = torch.randn(3, 4)
    live_webui.release_network_backups(model, ["layer.weight"])
    assert torch.equal(layer.weight, merged)               # the LoRA delta was taken out first
    with torch.no_grad():
        layer.weight.copy_(merged2)
    network_apply_weights(layer, [delta])
    assert torch.allclose(layer.weight, merged2 + delta.updown)
    network_apply_weights(layer, [])
    assert torch.equal(layer.weight, merged2) and torch.equal(layer.bias, file["b"])


def test_unwrapped_names_of_the_webui_text_encoder_hijack():
    names = ["cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight",
             "model.diffusion_model.out.2.weight"]
    assert live_webui.state_dict_target_keys(names) == {
        names[0]: "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", names[1]: names[1]}


@pytest.mark.slow
def test_keys_computed_in_worker_processes_come_back_over_the_pipe_exactly(models):
    tensors, target = loaded_model(models)
    threads = torch.get_num_threads()
    result = live.merge_into(target, plan_of(models, recipe(0.6)), RunOptions(hash_inputs=False, workers=2))
    assert torch.get_num_threads() == threads and result.keys > 0 and live_state.PARTIAL not in target.state.merged.values()
    assert_holds(tensors, file_merge(models, recipe(0.6), "ref.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_worker_chunks_land_in_the_weights_in_the_models_dtype_or_widened_to_it(models, dtype):
    """fp16 outputs into an fp16 model: read from the pipe straight into the weights; into an fp32
    model (--no-half): widened by the pipe's reading thread."""
    tensors, target = loaded_model(models, dtype)
    live.merge_into(target, plan_of(models, recipe(0.6)), RunOptions(hash_inputs=False, workers=2))
    assert live_state.PARTIAL not in target.state.merged.values()
    assert_holds(tensors, file_merge(models, recipe(0.6), "ref.safetensors"))


def parked_after_a_merge(models, workers=2):
    """A loaded model after one live merge on `workers` processes: (tensors, target, options, the parked crew)."""
    tensors, target = loaded_model(models)
    options = RunOptions(hash_inputs=False, workers=workers)
    live.merge_into(target, plan_of(models, recipe(0.6)), options)
    crew = live_workers.kept_crew()
    assert crew is not None and crew.alive()
    return tensors, target, options, crew


@pytest.mark.slow
def test_a_grid_of_live_merges_reuses_its_parked_workers_and_a_restore_ends_them(models):
    tensors, target, options, crew = parked_after_a_merge(models)
    pids = [w.proc.pid for w in crew.workers]
    live.merge_into(target, plan_of(models, recipe(0.2)), options)        # the next cell: the same interpreters
    assert live_workers.kept_crew() is crew and [w.proc.pid for w in crew.workers] == pids
    assert_holds(tensors, file_merge(models, recipe(0.2), "ref.safetensors"))
    live.restore(target)
    assert live_workers.kept_crew() is None and all(w.proc.poll() is not None for w in crew.workers)


@pytest.mark.slow
def test_a_parked_worker_that_died_is_replaced_by_a_fresh_crew(models):
    tensors, target, options, crew = parked_after_a_merge(models)
    crew.workers[0].proc.kill()
    crew.workers[0].proc.wait()
    live.merge_into(target, plan_of(models, recipe(0.4)), options)
    fresh = live_workers.kept_crew()
    assert fresh is not None and fresh is not crew and all(w.proc.poll() is not None for w in crew.workers)
    assert_holds(tensors, file_merge(models, recipe(0.4), "ref.safetensors"))
    live_workers.release_crew()
    assert all(w.proc.poll() is not None for w in fresh.workers)


@pytest.mark.slow
def test_with_automatic_workers_a_merge_runs_here_unless_a_grid_parked_workers_first(models, monkeypatch):
    monkeypatch.setattr(live, "auto_process_count", lambda *_: 2)     # the test models are below auto's threshold
    tensors, target = loaded_model(models)
    auto = RunOptions(hash_inputs=False, workers=0)
    live.merge_into(target, plan_of(models, recipe(0.6)), auto)        # nothing parked: in this process
    assert live_workers.kept_crew() is None
    assert live.start_workers(target, plan_of(models, recipe(0.2)), auto) == 2      # a grid's start
    crew = live_workers.kept_crew()
    pids = [w.proc.pid for w in crew.workers]
    runs = []
    monkeypatch.setattr(live, "ChunkRun", lambda *a, **k: runs.append(a[2]) or live_workers.ChunkRun(*a, **k))
    live.merge_into(target, plan_of(models, recipe(0.2)), auto)        # its cells: on the parked workers
    assert runs == [crew] and live_workers.kept_crew() is crew and crew.alive()
    assert [w.proc.pid for w in crew.workers] == pids
    assert_holds(tensors, file_merge(models, recipe(0.2), "ref.safetensors"))

"""Live merge through the WebUI glue, against the fake host surfaces (webui_fakes.py): the loaded
model is a torch module named as A1111's (hijacked text encoder); Forge hosts keep weights in their
model patcher and say "not supported on this host"."""
from __future__ import annotations

import pytest
import torch

from astolfo_merge.core import jobs
from astolfo_merge.errors import AstolfoError
from astolfo_merge.features import live, live_state, trials
from astolfo_merge.features.live_webui import live_label, state_dict_target_keys
from astolfo_merge.ui.live import TO_MODEL

from conftest import load
from webui_fakes import KINDS, installed, lora_network, network_apply_weights, p_object

LOADED = "sd1-a.safetensors"
TEMPLATE = {"pool": [LOADED, "sd1-b.safetensors"], "method": "weighted_sum"}


@pytest.fixture
def a1111(models, tmp_path, monkeypatch):
    yield from installed("a1111", models, tmp_path, monkeypatch)


@pytest.fixture(params=KINDS)
def host(request, models, tmp_path, monkeypatch):
    yield from installed(request.param, models, tmp_path, monkeypatch)


def weights_of(model) -> dict:
    """The model's tensors under checkpoint key names (the hijack's `wrapped` dropped)."""
    held = model.state_dict()
    return {key: held[name] for name, key in state_dict_target_keys(held).items()}


def assert_equals_file(model, path):
    held = weights_of(model)
    for key, value in load(path).items():
        assert torch.equal(held[key], value.to(held[key].dtype)), key


def load_a(fake, glue):
    message, _ = glue.HOST.load_model(str(fake.models / LOADED))
    assert message.startswith("Loaded")
    return fake.sd.model_data.sd_model


def test_only_a1111_shaped_models_take_a_live_merge(host):
    fake, glue = host
    assert glue.HOST.has_loaded_model
    assert ("no model is loaded" if fake.kind == "a1111" else "not supported on this host") in glue.HOST.live_unsupported()
    load_a(fake, glue)
    reason = glue.HOST.live_unsupported()
    if fake.kind == "a1111":
        assert reason is None
    else:                                  # Forge Classic / Neo: ForgeDiffusionEngine with forge_objects
        assert "not supported on this host" in reason and "merge to a file" in reason


def test_a_tab_merge_into_the_loaded_model_marks_it_and_restores(a1111):
    fake, glue = a1111
    model = load_a(fake, glue)
    recipe = trials.with_alpha(trials.parse_recipe(TEMPLATE), 0.25)
    plan = trials.live_plan(glue.HOST, recipe)
    job = jobs.manager(glue.HOST.key).submit(plan, glue.HOST.run_options(), title="live", runner=glue.HOST.merge_live)
    result = job.wait(60)
    assert result.keys > 0 and job.snapshot().status == jobs.DONE
    label = f"[Merger] {live_state.recipe_hash(recipe)[:10]}"
    assert live_label(model) == label and model.sd_checkpoint_info.name_for_extra == f"sd1-a {label}"
    assert model.sd_checkpoint_info.filename == str(fake.models / LOADED)     # the WebUI still sees its file
    assert not (fake.models / trials.TRIALS_DIR).exists()
    saved = glue.HOST.save_live("live-save.safetensors")
    assert glue.find_checkpoint(saved.path) is not None                    # listed, hash written
    assert fake.hashes["checkpoint/live-save.safetensors"]["sha256"] == saved.sha256
    with pytest.raises(AstolfoError, match="exists"):
        glue.HOST.save_live("live-save.safetensors")
    restored = glue.HOST.restore_live()
    assert restored.restored == result.keys and live_label(model) == ""
    assert_equals_file(model, fake.models / LOADED)


def xyz_grid(fake, glue, values):
    glue.add_xyz_axes()
    axis = next(o for o in fake.xyz.axis_options if o.label == "[Merger] alpha")
    script = fake.xyz_class()
    images = []

    def generate(cell):
        model = fake.sd.model_data.sd_model
        held = weights_of(model) if isinstance(model, torch.nn.Module) else {}
        images.append((model.sd_checkpoint_info.name_for_extra, cell.override_settings.copy(),
                       {k: v.clone() for k, v in held.items() if k.startswith("model.diffusion_model.out")}))
    script.generate = generate
    script.run(p_object(), axis, values)
    return images


def test_xyz_cells_merge_into_the_loaded_model_and_the_grid_restores_it(a1111):
    fake, glue = a1111
    model = load_a(fake, glue)
    trials.save_template(glue.HOST, TEMPLATE)
    before = sorted(p.name for p in fake.models.iterdir())
    images = xyz_grid(fake, glue, [0.2, 0.5, 0.8])
    assert sorted(p.name for p in fake.models.iterdir()) == before            # no file written
    assert [name.split(" [Merger] ")[0] for name, _, _ in images] == ["sd1-a"] * 3
    assert len({name for name, _, _ in images}) == 3 and all(not o for _, o, _ in images)
    outs = [w for _, _, w in images]
    assert all(not torch.equal(outs[0][k], outs[1][k]) for k in outs[0])    # cells differ
    reference = trials.with_alpha(trials.parse_recipe(TEMPLATE), 0.8)
    reference.output = "ref.safetensors"
    from astolfo_merge.core.engine import run_merge
    from astolfo_merge.core.run_options import RunOptions
    ref = load(run_merge(glue.HOST.plan(reference), RunOptions(hash_inputs=False)).path)
    assert all(torch.equal(outs[2][k], ref[k].float()) for k in outs[2])     # the cell = the file merge
    assert live_label(model) == "" and fake.loads == [str(fake.models / LOADED)]
    assert_equals_file(model, fake.models / LOADED)


def test_a_live_merge_loaded_before_the_grid_is_back_after_it(a1111):
    fake, glue = a1111
    model = load_a(fake, glue)
    trials.save_template(glue.HOST, TEMPLATE)
    mine = trials.with_alpha(trials.parse_recipe(TEMPLATE), 0.9)
    glue.HOST.merge_live(trials.live_plan(glue.HOST, mine), glue.HOST.run_options())
    held = {k: v.clone() for k, v in weights_of(model).items()}
    xyz_grid(fake, glue, [0.1, 0.3])
    assert live_label(model) == f"[Merger] {live_state.recipe_hash(mine)[:10]}"
    assert all(torch.equal(held[k], v) for k, v in weights_of(model).items())


@pytest.mark.slow
def test_file_cells_stay_an_option(a1111):
    fake, glue = a1111
    load_a(fake, glue)
    fake.opts.astolfo_merge_xyz_target = "file (cached in _merger_trials)"
    trials.save_template(glue.HOST, TEMPLATE)
    images = xyz_grid(fake, glue, [0.2, 0.4])
    names = [o["sd_model_checkpoint"] for _, o, _ in images]
    assert all(n.startswith("_merger_trials/") and (fake.models / n).is_file() for n in names)
    assert len(trials.trial_files(glue.HOST)) == 2
    count, freed = trials.empty_trials(glue.HOST)
    assert count == 2 and freed > 0 and trials.trial_files(glue.HOST) == []


def test_forge_hosts_merge_xyz_cells_to_files(models, tmp_path, monkeypatch):
    for kind in ("classic", "neo"):
        gen = installed(kind, models, tmp_path / kind, monkeypatch)
        (tmp_path / kind).mkdir()
        fake, glue = next(gen)
        load_a(fake, glue)
        trials.save_template(glue.HOST, TEMPLATE)
        images = xyz_grid(fake, glue, [0.3])
        assert images[0][1]["sd_model_checkpoint"].startswith("_merger_trials/")
        gen.close()


def test_the_webui_lora_applies_once_on_top_of_a_live_merge(a1111):
    """networks.py's backup of a layer taken before the live merge must not bring the file back, and
    a LoRA applied when the merge lands must not be counted twice."""
    fake, glue = a1111
    model = load_a(fake, glue)
    key = "model.diffusion_model.out.2.weight"
    layer = model.get_submodule("model.diffusion_model.out.2")
    delta = lora_network("style", torch.full_like(layer.weight, 0.01))
    network_apply_weights(layer, [delta])                 # a generation with the LoRA
    network_apply_weights(layer, [])                      # one without: backup (= the file) kept
    glue.HOST.merge_live(trials.live_plan(glue.HOST, trials.with_alpha(trials.parse_recipe(TEMPLATE), 0.5)),
                         glue.HOST.run_options())
    merged = layer.weight.detach().clone()
    assert not torch.equal(merged, load(fake.models / LOADED)[key].float())
    network_apply_weights(layer, [delta])                 # the LoRA again: on the merge, once
    assert torch.equal(layer.weight, (merged + delta.updown))
    glue.HOST.merge_live(trials.live_plan(glue.HOST, trials.with_alpha(trials.parse_recipe(TEMPLATE), 0.7)),
                         glue.HOST.run_options())         # merged while the LoRA is applied
    merged2 = layer.weight.detach().clone()
    network_apply_weights(layer, [delta])
    assert torch.equal(layer.weight, merged2 + delta.updown)
    glue.HOST.restore_live()                              # restore while applied: the file, LoRA next time
    network_apply_weights(layer, [delta])
    assert torch.equal(layer.weight, load(fake.models / LOADED)[key].float() + delta.updown)


def test_the_merge_target_is_offered_only_where_a_model_is_loaded(a1111, models):
    from astolfo_merge.ui.host import StandaloneHost
    from astolfo_merge.ui.tab import MergerTab
    fake, glue = a1111
    tab = MergerTab(glue.HOST)
    tab.build()
    assert tab.target.visible and tab.save_live is not None
    standalone = MergerTab(StandaloneHost(str(models)))
    standalone.build()
    assert not standalone.target.visible
    message = standalone.on_merge_to(TO_MODEL, *([None] * 3))[0]
    assert "needs the WebUI" in message


def test_the_loaded_model_route_reports_what_the_model_holds(a1111):
    fake, glue = a1111
    routes = {}
    app = type("App", (), {"add_api_route": lambda self, path, fn, methods: routes.update({path: fn})})()
    fake.callbacks["app_started"][0](None, app)
    route = routes[glue.LOADED_MODEL_ROUTE]
    assert route() == {"supported": False, "reason": route()["reason"]} and "no model" in route()["reason"]
    load_a(fake, glue)
    glue.HOST.merge_live(trials.live_plan(glue.HOST, trials.with_alpha(trials.parse_recipe(TEMPLATE), 0.5)),
                         glue.HOST.run_options())
    info = route(digests=True)
    assert info["supported"] and info["label"].startswith("[Merger]") and info["merged_keys"] > 0
    file = {k: live.tensor_digest(v.float() if v.is_floating_point() else v) for k, v in load(fake.models / LOADED).items()}
    assert 0 < sum(info["digests"][k] != d for k, d in file.items()) <= info["merged_keys"]   # equal inputs: equal
    glue.HOST.restore_live()
    assert route(digests=True)["digests"] == file and route()["label"] == ""


def test_the_tab_buttons_save_restore_and_empty_the_trials_folder(a1111):
    from astolfo_merge.ui.tab import MergerTab
    fake, glue = a1111
    tab = MergerTab(glue.HOST)
    tab.build()
    assert "no model is loaded" in tab.on_restore_live()
    model = load_a(fake, glue)
    assert "nothing to restore" in tab.on_restore_live()
    assert "no live merge" in tab.on_save_live("x.safetensors", False)[0]
    glue.HOST.merge_live(trials.live_plan(glue.HOST, trials.with_alpha(trials.parse_recipe(TEMPLATE), 0.5)),
                         glue.HOST.run_options())
    assert "File name" in tab.on_save_live("", False)[0]
    saved = tab.on_save_live("kept.safetensors", False)[0]
    assert saved.startswith("Saved the loaded merge") and (fake.models / "kept.safetensors").is_file()
    assert tab.on_restore_live().startswith("Restored") and live_label(model) == ""
    trial = fake.models / trials.TRIALS_DIR / "weighted_sum-0123.safetensors"
    trial.parent.mkdir()
    trial.write_bytes((fake.models / "kept.safetensors").read_bytes())
    assert "Deleted 1 cached XYZ cell file(s)" in tab.on_empty_trials()[0] and not trial.exists()
    assert "holds no cell files" in tab.on_empty_trials()[0]

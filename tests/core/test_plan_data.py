"""The plan as plain data (plan_data.py, plan.py, stages.py): no closures, the same plan from the
same recipe and folder, the pipeline of stages a recipe declares, and no import cycle among the
modules that build and run it (tools/import_cycles.py)."""
from __future__ import annotations

import io
import json
import pickle
import types

import pytest
import torch

from astolfo_merge.core.plan import build_plan
from astolfo_merge.core.plan_data import key_seed
from astolfo_merge.core.recipe import parse_recipe
from astolfo_merge.core.stages import FERMAT_A, FERMAT_MATCH, LORAS, OUTPUT, TEMP, Step, prepare_result
from astolfo_merge.features.lora_synth import write_synthetic_lora
from astolfo_merge.io.writer import SafetensorsWriter

from conftest import ROOT, TEST_SCALE

POOL = ["sd1-a.safetensors", "sd1-b.safetensors"]
BASE = "sd1-base.safetensors"


@pytest.fixture
def folder(models):
    write_synthetic_lora(models / "l.safetensors", "sd1", TEST_SCALE, seed=2)
    return models


def staged_recipe(**fields):
    """A recipe with every kind of stage: LoRA bake-in before and after, a prepared method (Re-Basin
    on the UNet), Fermat with a kept side output, MBW block weights."""
    return parse_recipe({"pool": POOL, "base": BASE, "method": "rebasin", "seed": 9, "output": "o.safetensors",
                         "blocks": {"IN04": 0.25}, "fermat": {"keep_a": True},
                         "loras": [{"file": "l.safetensors", "strength": 0.5, "when": "before"},
                                   {"file": "l.safetensors", "strength": 0.3}], **fields})


class NoCode(pickle.Pickler):
    """A pickler that refuses functions, methods and lambdas: what a plan must not hold."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.LambdaType)):
            raise AssertionError(f"the plan holds code: {obj!r}")
        return NotImplemented


def test_a_plan_with_every_stage_pickles_without_code_and_round_trips(folder):
    plan = build_plan(staged_recipe(), str(folder))
    NoCode(io.BytesIO()).dump(plan)
    back = pickle.loads(pickle.dumps(plan))
    assert back.to_data() == plan.to_data()


def test_the_same_recipe_and_folder_rebuild_the_same_plan_as_json(folder):
    first = json.dumps(build_plan(staged_recipe(), str(folder)).to_data(), sort_keys=True)
    second = json.dumps(build_plan(staged_recipe(), str(folder)).to_data(), sort_keys=True)
    assert first == second
    other_seed = json.dumps(build_plan(staged_recipe(seed=10), str(folder)).to_data(), sort_keys=True)
    assert other_seed != first


def test_each_key_carries_its_dtype_shape_byte_range_method_params_block_weight_and_seed(folder, tmp_path):
    plan = build_plan(staged_recipe(), str(folder))
    data = {k["key"]: k for k in plan.to_data()["keys"]}
    merged = [kp for kp in plan.keys if kp.action == "merge"]
    assert merged and all(kp.seed == key_seed(9, kp.key) for kp in plan.keys)
    in04 = [kp for kp in merged if kp.block == "IN04"]
    assert in04 and all(kp.block_weight == 0.25 and kp.params["alpha"] == 0.25 for kp in in04)
    assert all(kp.block_weight is None and kp.params["alpha"] == 0.5 for kp in merged if kp.block != "IN04")
    some = merged[0]
    assert data[some.key]["method"] == "rebasin" and data[some.key]["pool"] == some.pool
    assert data[some.key]["dtype"] == "F16" and data[some.key]["shape"] == list(some.shape)
    with SafetensorsWriter(tmp_path / "x.safetensors", [(k.key, k.dtype, k.shape) for k in plan.keys]) as writer:
        ranges = writer.ranges()
        writer.abort()
    assert all(ranges[kp.key] == (writer.data_start + kp.span[0], kp.span[1] - kp.span[0]) for kp in plan.keys)


def test_the_pipeline_declares_bake_prepare_then_fermat_stages(folder):
    plan = build_plan(staged_recipe(), str(folder))
    kinds = [(s.kind, s.name) for s in plan.stages]
    assert kinds == [("bake", LORAS), ("prepare", prepare_result("rebasin")), ("keys", FERMAT_A),
                     ("match", FERMAT_MATCH), ("keys", "output"), ("keys", "fermat a")]
    bake, _prepare, temp, _match, out, side = plan.stages
    assert [use.when for use in bake.loras] == ["before", "after"] and all(use.targets for use in bake.loras)
    assert temp.output == TEMP and all(kp.dtype == torch.float64 for kp in temp.keys)
    assert out.output == OUTPUT and side.output == str(folder / "o-a.safetensors")
    unet = [kp for kp in out.keys if kp.note == "fermat c"]
    assert unet and all(kp.action == "copy" and kp.post == [Step("fermat", "c", whole=True)] for kp in unet)
    lora_keys = [kp for kp in plan.keys if kp.pre]
    assert lora_keys and all(steps[0] == Step("lora", 0, 0.5) for kp in lora_keys for steps in kp.pre.values())


def test_a_plain_recipe_has_one_key_stage_writing_the_output(folder):
    plan = build_plan(parse_recipe({"pool": POOL, "method": "n_average", "output": "o.safetensors"}), str(folder))
    assert [(s.kind, s.output, s.keys) for s in plan.stages] == [("keys", OUTPUT, None)]


def test_no_import_cycle_runs_through_the_modules_that_build_and_run_plans():
    """Before this change engine <-> rebasin.fermat, recipe -> fermat / lora and plan -> lora -> recipe
    formed one loop, closed by imports inside functions. None may come back, hidden or not."""
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    import import_cycles

    assert import_cycles.sccs(import_cycles.graph(lazy=True)) == []    # lazy imports counted too

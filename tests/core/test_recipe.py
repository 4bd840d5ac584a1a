"""Recipe validation: bad recipes are rejected before any work, naming the field."""
import pytest

from astolfo_merge.core.recipe import check_output_name, parse_recipe
from astolfo_merge.errors import RecipeError

GOOD = {"pool": ["a.safetensors", "b.safetensors"], "base": "c.safetensors", "method": "weighted_sum",
        "params": {"alpha": 0.3}, "blocks": {"IN00": 0.1, "out11": 0.9},
        "components": {"vae": {"take": "base"}, "te0": {"take": "b.safetensors"},
                       "te1": {"method": "n_average"}, "unet": {"pool": ["a.safetensors", "b.safetensors"]}},
        "seed": 0, "precision": "fp64", "dtype": "fp16", "output": "merged.safetensors"}


def test_the_issue_example_recipe_parses_and_round_trips():
    recipe = parse_recipe(GOOD)
    assert recipe.blocks == {"IN00": 0.1, "OUT11": 0.9}
    again = parse_recipe(recipe.to_json())
    assert again.to_dict() == recipe.to_dict()
    assert recipe.files() == ["a.safetensors", "b.safetensors", "c.safetensors"]


@pytest.mark.parametrize("change,field", [
    ({"method": "nope"}, "method"),
    ({"params": {"alpha": 0.3, "beta": 1}}, "params.beta"),
    ({"params": {"alpha": 99}}, "params.alpha"),
    ({"params": {"alpha": "x"}}, "params.alpha"),
    ({"pool": []}, "pool"),
    ({"pool": ["a.safetensors"]}, "pool"),
    ({"method": "add_difference", "base": None}, "base"),
    ({"precision": "fp8"}, "precision"),
    ({"dtype": "int8"}, "dtype"),
    ({"seed": -1}, "seed"),
    ({"output": "../escape.safetensors"}, "output"),
    ({"output": "/abs/path.safetensors"}, "output"),
    ({"output": "CON.safetensors"}, "output"),
    ({"components": {"clip": {"take": "a.safetensors"}}}, "components.clip"),
    ({"components": {"vae": {"take": "a.safetensors", "method": "n_average"}}}, "components.vae"),
    ({"components": {"te1": {"method": "weighted_sum", "pool": ["a.safetensors"]}}}, "components.te1.pool"),
    ({"blocks": {"IN00": "high"}}, "blocks.IN00"),
    ({"unexpected": 1}, "unexpected"),
    ({"version": 2}, "version"),
])
def test_invalid_recipes_name_the_field(change, field):
    doc = {**GOOD, **change}
    doc = {k: v for k, v in doc.items() if v is not None}
    with pytest.raises(RecipeError) as err:
        parse_recipe(doc)
    assert err.value.field == field, str(err.value)


def test_block_weights_need_a_method_with_a_block_parameter():
    with pytest.raises(RecipeError, match="block weights"):
        parse_recipe({"pool": ["a", "b", "c"], "method": "n_average", "blocks": {"IN00": 1}})


def test_output_names_get_the_safetensors_suffix_and_stay_inside_the_folder():
    assert check_output_name("sub/merge") == "sub/merge.safetensors"
    for bad in ("..", "a/../b", "C:\\x", ".hidden", "a//b"):
        with pytest.raises(RecipeError):
            check_output_name(bad)

"""Recipes: every shipped file validates; bad keys and values fail at load time."""

import pytest

from lgframe.errors import LgframeError
from lgframe.training.recipes import load_recipe, shipped_recipes


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_names_its_command(path):
    cfg = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lgframe ") and path.name in first
    assert cfg.trainer.max_steps > 0


def test_at_least_the_four_foundation_recipes():
    names = {p.name for p in shipped_recipes()}
    assert {"dit_digits_pretrain.yaml", "dit_digits_descend.yaml", "vit_digits_pretrain.yaml", "vit_digits_descend.yaml"} <= names


def test_constraint_is_one_line_to_swap():
    cfg = load_recipe("dit_digits_pretrain", ["constraint=scratch"])
    assert cfg.constraint == "scratch"
    cfg = load_recipe("dit_digits_pretrain", ["constraint={name: svd, rank: 16}"])
    assert cfg.constraint.rank == 16


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown recipe key 'optim.lrr'.*Did you mean 'optim.lr'.*Valid keys in optim: name, lr,"),
        ("trainr.max_steps=3", "unknown recipe key 'trainr'.*Did you mean 'trainer'"),
        ("trainer.max_steps=many", "recipe key 'trainer.max_steps'.*could not be converted to Integer"),
        ("constraint=svdd", "unknown constraint 'svdd'. Did you mean 'svd'\\?.*Registered constraints: .*scratch.*svd"),
        ("constraint={name: svd, rnk: 3}", "unknown option 'rnk' \\(did you mean 'rank'\\?\\)"),
        ("model.heads=3", "width 128 is not divisible by heads 3.*Valid head counts"),
        ("model.name=DiT-Nanoo/2", "unknown model 'DiT-Nanoo/2'. Did you mean DiT-Nano/2"),
        ("task=segmentation", "valid: diffusion, classification"),
        ("data.name=imagenet", "valid: digits, shapes"),
        ("trainer.max_steps", "must look like key=value"),
    ],
)
def test_bad_recipe_input_fails_at_load_time(override, message):
    with pytest.raises(LgframeError, match=message):
        load_recipe("dit_digits_pretrain", [override])


def test_bad_yaml_files(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: diffusion\nmodel: {nmae: DiT-Pico/2}\n")
    with pytest.raises(LgframeError, match=f"unknown recipe key 'model.nmae' in {p}.*Did you mean 'model.name'"):
        load_recipe(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(LgframeError, match="must be a mapping"):
        load_recipe(p)
    with pytest.raises(LgframeError, match="does not exist. Shipped recipes: .*dit_digits_descend"):
        load_recipe(tmp_path / "missing.yaml")


WEIGHTSPACE = sorted((shipped_recipes()[0].parent / "weightspace").glob("*.yaml"))


@pytest.mark.parametrize("path", WEIGHTSPACE, ids=lambda p: p.name)
def test_every_weightspace_recipe_validates_and_names_its_command(path):
    from lgframe.apps.weightspace import load_cfg

    c = load_cfg(str(path), [])
    assert path.read_text().splitlines()[0].startswith("# lgframe weightspace fit")
    assert c.n > 0 and c.repr in ("mlora", "lora", "full")
    with pytest.raises(LgframeError, match="valid keys"):
        load_cfg(str(path), ["no_such_key=1"])


def test_there_is_a_weightspace_recipe():
    assert WEIGHTSPACE

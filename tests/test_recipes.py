"""The presets in the code are the recipes docs/RECIPES.md lists, value for value."""

import re
from pathlib import Path

import pytest

from dmdctl.settings.distill import DistillConfig
from dmdctl.settings.make_pairs import MakePairsConfig
from dmdctl.teachers import KINDS

DOC = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"


def documented() -> dict[str, dict[str, str]]:
    """{preset: {setting: value cell}} for the rows whose setting is in `code` font."""
    out, section = {}, None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^## `([\w-]+)`", line)
        if m:
            section = out.setdefault(m.group(1), {})
            continue
        m = re.match(r"^\| `(\w+)` \| ([^|]+) \|", line)
        if m and section is not None:
            section[m.group(1)] = m.group(2).strip()
    return out


def parse(cell: str):
    if cell in ("true", "false"):
        return cell == "true"
    try:
        return float(cell)
    except ValueError:
        return cell


RECIPE_PRESETS = [
    "sd15",
    "sd15-gan",
    "sd15-dmd",
    "sdxl",
    "sdxl-lora",
    "sdxl-1step",
    "sd3",
    "edm-imagenet64",
    "edm-imagenet64-gan",
    "edm-cifar10",
]


@pytest.mark.parametrize("name", RECIPE_PRESETS)
def test_preset_equals_its_documented_recipe(name):
    doc = documented()[name]
    recipe = DistillConfig.preset_layer({"teacher": name})
    assert recipe, name
    fields = {f.name for f in DistillConfig.__dataclass_fields__.values()}
    for key, value in recipe.items():
        assert key in fields, (name, key)
        assert key in doc, f"{name}: `{key}` = {value!r} is not in docs/RECIPES.md"
        assert parse(doc[key]) == value, (name, key, doc[key], value)
    # a row documented with a value (not "default ...") is set by the preset
    for key, cell in doc.items():
        if not cell.startswith("default"):
            assert key in recipe, (
                f"{name}: docs/RECIPES.md lists `{key}` but the preset does not set it"
            )


def test_every_preset_is_documented():
    names = {p for kind in KINDS.values() for p in kind.presets()}
    text = DOC.read_text()
    for name in names:
        assert f"`{name}`" in text, name


def test_dmd2_recipes_have_no_regression_and_dmd_pairs_match_the_real_guidance():
    assert DistillConfig.preset_layer({"teacher": "sd15"})["reg_weight"] == 0.0
    assert DistillConfig.preset_layer({"teacher": "edm-imagenet64"})["reg_weight"] == 0.0
    # a bare SD pipeline folder takes the sd15 (DMD2) recipe; `--teacher sd` too
    assert DistillConfig.preset_layer({"teacher": "sd"}) == DistillConfig.preset_layer(
        {"teacher": "sd15"}
    )
    # the DMD text-to-image recipe: pairs at the real score's own CFG
    dmd = DistillConfig.preset_layer({"teacher": "sd15-dmd"})
    pairs = MakePairsConfig.preset_layer({"teacher": "sd15-dmd"})
    assert pairs["guidance"] == dmd["real_guidance"] == 3.0
    # make-pairs for sd15 (whose DMD2 recipe has no pairs) or a bare pipeline makes DMD's pairs
    assert MakePairsConfig.preset_layer({"teacher": "sd15"}) == pairs
    assert MakePairsConfig.preset_layer({"teacher": "sd"}) == pairs
    # every key of a pairs recipe is a make-pairs setting, read through the same layer
    assert set(pairs) <= {f.name for f in MakePairsConfig.__dataclass_fields__.values()}
    # edm: only a named preset brings a recipe (ImageNet and CIFAR-10 recipes differ)
    assert DistillConfig.preset_layer({"teacher": "edm"}) == {}

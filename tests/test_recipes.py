"""The presets in the code are the recipes docs/RECIPES.md lists, value for value."""

import re
from pathlib import Path

import pytest

from dmdctl.settings.distill import DistillConfig
from dmdctl.settings.make_pairs import MakePairsConfig
from dmdctl.teachers import KINDS, preset_source
from dmdctl.teachers.edm.kind import GAN_RESUMED

DOC = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"


def documented(cell: int = 1) -> dict[str, dict[str, str]]:
    """{preset: {setting: value cell}} for the rows whose setting is in `code` font (cell=2:
    the source cell)."""
    out, section = {}, None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^## `([\w.-]+)`", line)
        if m:
            section = out.setdefault(m.group(1), {})
            continue
        m = re.match(r"^\| `(\w+)` \| ([^|]+) \|(?: ([^|]+) \|)?", line)
        if m and section is not None:
            section[m.group(1)] = (m.group(cell + 1) or "").strip()
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
    "flux-dev",
    "wan-t2v-1.3b",
    "edm-imagenet64",
    "edm-imagenet64-gan",
    "edm-cifar10",
    "edm2-img512-s-autog",
    "edm2-img512-xxl-autog",
    "edm2-img512-s-guid",
    "edm2-img64-s-autog",
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


def count(text: str) -> int:
    return int(text.replace(",", ""))


def source_table() -> dict[str, tuple[float, int, int, int]]:
    """{preset: (FID, iterations, ratio, steps)} from the table of "Steps and iterations" (FID
    None where the source published none: "-")."""
    text = DOC.read_text().split("## Steps and iterations", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        m = re.match(
            r"^\| (`[\w-]+`|\(no preset[^|]*) \|[^|]+\| ([\d.]+|-) \| ([\d,]+) \| (\d+) \| ([\d,]+) \|$",
            line,
        )
        if m:
            name = m.group(1).strip("`") if m.group(1).startswith("`") else "resumed"
            fid = None if m.group(2) == "-" else float(m.group(2))
            rows[name] = (fid, *(count(m.group(i)) for i in (3, 4, 5)))
    return rows


@pytest.mark.parametrize("name", RECIPE_PRESETS)
def test_preset_steps_are_its_source_checkpoints_length(name):
    """--steps counts generator updates: a DMD2 preset trains as long as its published
    checkpoint (iterations / dfake_gen_update_ratio), and RECIPES.md shows that arithmetic."""
    cell = documented()[name].get("steps")
    why = documented(cell=2)[name].get("steps")
    assert cell is not None, f"{name}: docs/RECIPES.md has no `steps` row"
    recipe = DistillConfig.preset_layer({"teacher": name})
    source = preset_source(name)
    table = source_table()
    if source is None:  # no published length: our default, said so
        assert "steps" not in recipe, name
        assert cell == f"default {DistillConfig().steps}", (name, cell)
        assert name not in table, name
        return
    assert recipe["steps"] == source.steps == source.iterations // source.ratio, name
    assert recipe["fake_updates"] == source.ratio, name  # steps x fake updates = its iterations
    assert parse(cell) == source.steps, (name, cell)
    m = re.search(r"([\d,]+) iterations / (\d+) = ([\d,]+) generator steps", why)
    assert m, (name, why)
    assert (count(m.group(1)), int(m.group(2)), count(m.group(3))) == (
        source.iterations, source.ratio, source.steps,
    ), (name, why)  # fmt: skip
    if source.fid is not None:
        assert f"FID {source.fid:g}" in why, (name, why)
    else:  # a published length without a published checkpoint: said so
        assert "No FID" in why, (name, why)
    assert table[name] == (source.fid, source.iterations, source.ratio, source.steps), name


def test_the_resumed_imagenet_run_is_documented_as_in_the_code():
    fid, iterations, ratio, steps = source_table()["resumed"]
    assert (fid, iterations, ratio, steps) == (
        GAN_RESUMED.fid, GAN_RESUMED.iterations, GAN_RESUMED.ratio, GAN_RESUMED.steps,
    )  # fmt: skip
    assert f"--steps {GAN_RESUMED.steps}" in DOC.read_text()
    assert len(source_table()) == 1 + sum(preset_source(n) is not None for n in RECIPE_PRESETS)


def test_the_start_line_names_the_presets_source_checkpoint():
    from dmdctl.teachers.source import run_length_line
    from dmdctl.training.loop import run_length

    sd15 = DistillConfig.preset_layer({"teacher": "sd15"})
    line = run_length_line(sd15["steps"], sd15["fake_updates"], "sd15", preset_source("sd15"))
    assert line == (
        "3,900 generator steps = 39,000 DMD2 iterations (DMD2's SD1.5 stage-1 checkpoint, FID 9.28)"
    )
    # what distill prints: the preset found from --teacher, the length from the settings
    assert run_length(DistillConfig(teacher="sd15", steps=3900, fake_updates=10)) == line
    # a length other than the source's says both
    other = run_length(DistillConfig(teacher="sd15", steps=39000, fake_updates=10))
    assert other.startswith("39,000 generator steps = 390,000 DMD2 iterations")
    assert "trained 3,900 generator steps = 39,000 iterations" in other
    # a preset whose source gives no length, and no preset at all
    assert "sd3 preset's length is ours" in run_length(DistillConfig(teacher="sd3", fake_updates=5))
    assert run_length(DistillConfig(steps=10)) == "10 generator steps = 10 DMD2 iterations"

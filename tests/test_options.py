"""The option machinery: one field declares a flag, its help, default, limits and choices."""

import inspect
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from dmdctl.errors import UserError
from dmdctl.options import check_options, option, typer_parameters


@dataclass
class Demo:
    steps: int = option(2000, "Generator updates.", min=1)
    lr: float = option(3e-4, "Learning rate.", above=0)
    frac: float = option(0.98, "A fraction.", min=0, max=1)
    schedule: str = option("cosine", "Schedule.", choices=("cosine", "constant"))
    out: str = option("runs/x", "Output folder.", path=True)
    cpu: bool = option(False, "Use the CPU.")
    name: str | None = option(None, "A name.")
    internal: int = 3  # not an option


def make_app(seen: dict) -> typer.Typer:
    app = typer.Typer()

    def cmd(**kwargs):
        seen.update(kwargs)

    cmd.__signature__ = inspect.Signature(typer_parameters(Demo))
    app.command()(cmd)
    return app


def test_flags_are_generated_with_real_defaults_and_ranges():
    seen = {}
    r = CliRunner().invoke(make_app(seen), ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for fragment in (
        "--steps", "Generator updates. [>= 1]", "[default: 2000]",
        "Learning rate. [> 0]", "[default: 0.0003]", "A fraction. [>= 0 and <= 1]",
        "Schedule. [one of cosine, constant]", "--cpu", "--name",
    ):  # fmt: skip
        assert fragment in text, fragment
    assert "--internal" not in text
    r = CliRunner().invoke(make_app(seen), ["--steps", "5", "--cpu", "--out", "o"])
    assert r.exit_code == 0, r.output
    # flags given arrive with their values, the others as None ("not given")
    assert seen["steps"] == 5 and seen["cpu"] is True and str(seen["out"]) == "o"
    assert seen["lr"] is None and seen["schedule"] is None


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(steps=0), "--steps must be positive, got 0"),
        (dict(lr=0.0), "--lr must be positive, got 0.0"),
        (dict(lr=float("inf")), "--lr must be finite, got inf"),
        (dict(frac=1.5), "--frac must be <= 1, got 1.5"),
        (dict(frac=-0.1), "--frac must be >= 0, got -0.1"),
        (dict(schedule="step"), "--schedule must be one of cosine, constant, got 'step'"),
        (dict(lr=float("nan")), "--lr must be a number, got nan"),
    ],
)
def test_one_message_shape_for_every_bad_value(kw, message):
    with pytest.raises(UserError) as e:
        check_options(Demo(**kw))
    assert str(e.value) == message


def test_good_values_pass():
    check_options(Demo())
    check_options(Demo(steps=1, frac=0.0, schedule="constant", name="x"))

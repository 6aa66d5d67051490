"""The ``dmdctl`` command line, generated from the commands' settings (``dmdctl.settings``).

Each command's options come from the fields of its settings dataclass: the flag, help text,
limits, choices and the default shown in ``--help`` are declared once, on the field. Every
option defaults to None here so that a flag left out can be told from one given; what was given
goes to :func:`dmdctl.config.resolve` (defaults < preset < ``--config`` file < flags). Nothing
heavy is imported until a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from dmdctl import __version__
from dmdctl.config import resolve
from dmdctl.errors import UserError
from dmdctl.options import help_paragraphs, typer_parameters
from dmdctl.settings import COMMANDS, command_module, settings_module


class _NoFlagMetavar:
    """Flags (``--cpu``, ``--help``) without the ``<bool>`` that Typer's rich help gives them."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_bool_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Group(_NoFlagMetavar, TyperGroup):
    pass


class _Command(_NoFlagMetavar, TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    name="dmdctl",
    help="Distil a diffusion model into a one-step generator with Distribution Matching Distillation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

CONFIG_PARAMETER = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Path | None,
        typer.Option("--config", help="TOML file with this command's settings; flags override it."),
    ],
)


def _versions() -> str:
    from dmdctl.commands.env import package_versions

    found = package_versions(("torch", "diffusers", "accelerate")).items()
    parts = [f"dmdctl {__version__}", *(f"{k} {v or '(not installed)'}" for k, v in found)]
    return "\n".join(parts)


def _version_callback(value: bool):
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def root(
    version_: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the versions of dmdctl, torch, diffusers and accelerate.",
        ),
    ] = False,
):
    threads = os.environ.get("DMDCTL_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def user_errors(fn):
    """A user mistake becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dmdctl.ui import error_line

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if not getattr(e, "quiet", False):  # e.g. said once by the main process of a launch
                error_line(str(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _add_command(name: str) -> None:
    module = settings_module(name)
    settings = module.SETTINGS

    def command(**given):
        config = given.pop("config", None)
        cfg = resolve(settings, config, **given)
        code = command_module(name).run(cfg)  # the command's work: imported only now
        if code:
            raise typer.Exit(code)

    command.__name__ = name.replace("-", "_")
    command.__doc__ = "\n\n".join(help_paragraphs(module.HELP))  # paragraphs as written
    command.__signature__ = inspect.Signature([*typer_parameters(settings), CONFIG_PARAMETER])
    app.command(name, cls=_Command)(user_errors(command))


for _name in COMMANDS:
    _add_command(_name)


def main() -> None:
    from dmdctl.runtime import exit_process, process_session

    # the one place a command's process group is shut down: at the end, on error, on SIGTERM
    code: object = 0
    try:
        with process_session():
            app()
    except SystemExit as e:
        code = e.code
    exit_process(code)  # os._exit where gloo threads outlived the group (runtime.py)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``sdengine`` command line: the composition root, above api_compat, export and benchmarks; nothing imports it.

Each subcommand is a module of this package, imported when the command runs (``COMMANDS``: name ->
"module:attribute", read as import edges by tests/test_engine_middle.py), so ``sdengine --help`` stays fast and
an optional extra is only needed by the command that uses it. ``python -m cli`` runs the same group."""

from __future__ import annotations

import importlib
import logging

import click

# command name -> "module:attribute" of a click command
COMMANDS = {
    "models": "cli.models:models",
    "export": "cli.export:export",
    "txt2img": "cli.generate:txt2img",
    "img2img": "cli.generate:img2img",
    "serve": "cli.serve:serve",
    "worker": "cli.serve:worker",
    "paths": "cli.paths:paths",
    "bench": "cli.bench:bench",
    "doctor": "cli.doctor:doctor",
}

# every command: -h as well as --help, and the defaults in the help text
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class LazyGroup(click.Group):
    def invoke(self, ctx):
        """Ctrl-C anywhere in a command exits 130 (a command that runs a task cancels it first)."""
        from core.errors import MissingDependency

        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except MissingDependency as exc:  # an optional extra not installed: one line, no traceback
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdengine")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown (not installed)"


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(_version(), "-V", "--version", prog_name="sdengine")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """sdengine: local Stable Diffusion inference with the sd_txt2img / sd_img2img / sd_get_result contract.

    Files live under one home (models, artefact cache, results); see `sdengine paths` and docs/API.md.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


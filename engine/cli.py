"""The ``sdengine`` command line. Subcommands live beside the code they drive and are imported lazily,
so ``sdengine --help`` stays fast and an optional extra is only needed by the command that uses it."""

from __future__ import annotations

import importlib
import logging

import click

# command name -> "module:attribute" of a click command
COMMANDS = {
    "models": "engine.models.cli:models",
    "export": "engine.export_cli:export",
    "txt2img": "api_compat.cli:txt2img",
    "img2img": "api_compat.cli:img2img",
    "serve": "api_compat.cli:serve",
    "worker": "api_compat.cli:worker",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """sdengine: local Stable Diffusion inference with the sd_txt2img / sd_img2img / sd_get_result contract."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":  # pragma: no cover
    main()

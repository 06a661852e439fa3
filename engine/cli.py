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
    "paths": "engine.cli:paths",
    "bench": "benchmarks._cli:bench",
}


@click.command()
def paths() -> None:
    """Print where models, the artefact cache and results live (absolute paths, after flags/environment)."""
    from engine.config import ENV_CACHE_DIR, ENV_HOME, ENV_MODELS_DIR, ENV_RESULTS_DIR, default_cache_dir, \
        default_models_dir, default_results_dir, sdengine_home
    from engine.models.store import bundled_root

    models = default_models_dir()
    for name, path, env in (("home", sdengine_home(), ENV_HOME), ("models", models, ENV_MODELS_DIR),
                            ("cache", default_cache_dir(models), ENV_CACHE_DIR),
                            ("results", default_results_dir(), ENV_RESULTS_DIR),
                            ("bundled", bundled_root(), None)):
        click.echo(f"{name:<8} {path}" + (f"   (${env})" if env else "   (read-only, shipped models)"))


# every command: -h as well as --help, and the defaults in the help text
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class Shown(click.Option):
    """An option whose default lives elsewhere (the payload's schema, the engine): ``shown`` is what ``--help``
    prints as its default, while the option itself stays unset so that it does not override the payload."""

    def __init__(self, *args, shown: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown = shown

    def get_help_record(self, ctx):
        names, text = super().get_help_record(ctx)
        return names, f"{text}  [default: {self.shown}]".strip()


class LazyGroup(click.Group):
    def invoke(self, ctx):
        """Ctrl-C anywhere in a command exits 130 (a command that runs a task cancels it first)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)

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


if __name__ == "__main__":  # pragma: no cover
    main()

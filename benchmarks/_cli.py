"""``sdengine bench NAME [args...]``: the benchmarks of ``python -m benchmarks`` from the sdengine command."""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run a benchmark: ``sdengine bench gpu --device cuda`` (``sdengine bench`` lists them)."""
    from benchmarks.__main__ import main

    raise SystemExit(main(list(args)))

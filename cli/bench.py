"""``sdengine bench NAME [args...]``: the benchmarks of ``python -m benchmarks`` from the sdengine command."""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run a benchmark: ``sdengine bench gpu --device cuda`` (``sdengine bench`` lists them).

    ``sdengine bench NAME -h`` shows that benchmark's own options."""
    from benchmarks.__main__ import available, main

    if list(args[:1]) in (["-h"], ["--help"]):  # the command's own help; after NAME, -h is the benchmark's
        ctx = click.get_current_context()
        click.echo(ctx.get_help())
        click.echo(f"\nNAME is one of: {', '.join(available())}")
        ctx.exit(0)
    raise SystemExit(main(list(args)))

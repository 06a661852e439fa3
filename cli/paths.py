"""``sdengine paths``: where models, the artefact cache and results live."""

from __future__ import annotations

import click


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
    # ControlNet annotator weights (model-based preprocessors), searched in this order; never downloaded
    from engine.controlnet.annotators import ENV_ANNOTATORS_DIR, search_dirs

    dirs = search_dirs(models)
    notes = [f"${ENV_ANNOTATORS_DIR}"] * (len(dirs) - 2) + ["Forge's folder", "sd-webui-controlnet's downloads"]
    for path, note in zip(dirs, notes):
        click.echo(f"annotator {path}   ({note}; ControlNet preprocessor weights, never downloaded)")
    from engine.config import ENV_DEFAULT_MODEL, config_file, configured_default_model

    click.echo(f"{'settings':<8} {config_file()}   (sdengine models default NAME writes default_model)")
    value, source = configured_default_model()
    click.echo(f"{'default':<8} {value or 'sdengine-demo'}   ({source}; ${ENV_DEFAULT_MODEL} overrides)")

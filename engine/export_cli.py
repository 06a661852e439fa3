"""``sdengine export MODEL``: export a model's components to ONNX (manifest-cached) with a progress bar.

The command lives on the engine side: export/ is the lower layer and knows no engine type (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger(__name__)

DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def load(config, name: str, controlnet: bool, vae: str = "Automatic"):
    """(components, hash) of a checkpoint or ControlNet from the model store (imported lazily)."""
    from engine.models.store import ModelStore

    store = ModelStore.from_config(config)
    if controlnet:
        cn = store.load_controlnet(name, allow_pickle=config.allow_pickle)
        return {"controlnet": cn.module}, cn.short_hash
    loaded = store.load_model(name, vae=vae, allow_pickle=config.allow_pickle)
    return loaded.components, loaded.family.artefact_key  # the key the engine uses (engine.models.family)


def _split(values) -> list[str]:
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


@click.command("export")
@click.argument("model")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--components", "components", multiple=True,
              help="Components to export (repeat or comma-separate); default: all the model has. "
                   "One of text_encoder, text_encoder_2, unet, unet_control, vae_decoder, vae_encoder, controlnet.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root (default: $SDENGINE_MODELS_DIR or ./models).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artefact cache (default: MODELS_DIR/cache).")
@click.option("--controlnet", is_flag=True, help="MODEL names a ControlNet, not a checkpoint.")
@click.option("--vae", default="Automatic", show_default=True,
              help='External VAE from MODELS_DIR/VAE (as the payload\'s "sd_vae": "Automatic", "None" or a name).')
@click.option("--gpu", is_flag=True, help="Also run onnxruntime's transformer optimizer (CUDA EP graphs).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.ckpt/.pt) checkpoints.")
def export(model, precision, components, models_dir, cache_dir, controlnet, vae, gpu, allow_pickle):
    """Export MODEL's components to ONNX under the artefact cache; up-to-date artefacts are skipped."""
    from engine.config import EngineConfig, default_models_dir
    from engine.errors import SdEngineError
    from export.descriptors import available_components
    from export.onnx import export_component

    try:
        config = EngineConfig(models_dir=models_dir or default_models_dir(), cache_dir=cache_dir,
                              allow_pickle=allow_pickle)
        modules, model_hash = load(config, model, controlnet, vae)
        names = _split(components) or [c for c in available_components(modules) if c in DEFAULT_COMPONENTS
                                       or c == "controlnet"]
        stages = 1 + int(gpu) + int(precision == "fp16")
        results = {}
        with click.progressbar(length=len(names) * stages, label=f"exporting {model}",
                               item_show_func=lambda s: s) as bar:
            def progress(what: str, done: int, total: int) -> None:
                bar.update(1, what)

            for name in names:
                results[name] = export_component(name, modules, model_hash, config.artefacts_dir,
                                                 precision=precision, gpu_optimize=gpu, progress=progress)
    except SdEngineError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, art in results.items():
        click.echo(f"{name}: {art.path} ({art.precision})")

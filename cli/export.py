"""``sdengine export MODEL``: export a model's components to ONNX (manifest-cached) with a progress bar.

The command composes the engine's model store (the model, its artefact key) with export/ (the lower layer, which
knows no engine type: docs/ARCHITECTURE.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cli.options import Shown
from engine.config import default_models_dir
from core.events import BUILDING

log = logging.getLogger(__name__)

# every component the engine's non-torch backends export before they release a module's torch weights
# (engine/backends/weights.py): unet_control comes with unet, vae_encoder with vae_decoder
DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "unet_control", "vae_decoder", "vae_encoder")


def load(config, name: str, controlnet: bool, vae: str = "Automatic"):
    """(components, hash) of a checkpoint or ControlNet from the model store (imported lazily)."""
    from engine.models.store import ModelStore

    store = ModelStore.from_config(config)
    if controlnet:
        cn = store.load_controlnet(name, allow_pickle=config.allow_pickle)
        return {"controlnet": cn.module}, cn.short_hash
    loaded = store.load_model(name, vae=vae, allow_pickle=config.allow_pickle)
    return loaded.components, loaded.family.artefact_key  # the key the engine uses (engine.models.family)


def peek(config, name: str, controlnet: bool, vae: str = "Automatic") -> tuple[str, list[str]] | None:
    """(artefact key, default components) of a model WITHOUT loading it: the key from the file's hash (the
    store's hash cache: not recomputed while path, size and mtime are unchanged) and the components from the
    family of its header. None when the architecture cannot be read from the header."""
    from engine.models.checkpoints import Kind, detect_path_arch
    from engine.models.family import artefact_key
    from engine.models.hashing import short_hash
    from engine.models.store import ModelStore

    store = ModelStore.from_config(config)
    kind = Kind.CONTROLNET if controlnet else Kind.CHECKPOINT
    entry = store.resolve(name, kind, field="model")
    arch = detect_path_arch(entry.path)
    if arch is None or arch.kind is not kind:
        return None
    key = short_hash(store.hash_of(entry))
    if controlnet:
        return key, ["controlnet"]
    vae_path = store.resolve_vae(entry, vae)
    components = [*arch.definition.text_encoders, "unet", "vae_decoder", "vae_encoder"]
    return artefact_key(key, vae_path), components


def _split(values) -> list[str]:
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


@click.command("export")
@click.argument("model")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32")
@click.option("--components", "components", multiple=True, cls=Shown, shown="all the model has",
              help="Components to export (repeat or comma-separate). "
                   "One of text_encoder, text_encoder_2, unet, unet_control, vae_decoder, vae_encoder, controlnet.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root.", cls=Shown, shown="$SDENGINE_MODELS_DIR or {home}/models (sdengine paths)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artefact cache.", cls=Shown, shown="$SDENGINE_CACHE_DIR or MODELS_DIR/cache")
@click.option("--controlnet", is_flag=True, help="MODEL names a ControlNet, not a checkpoint.")
@click.option("--vae", default="Automatic",
              help='External VAE from MODELS_DIR/VAE (as the payload\'s "sd_vae": "Automatic", "None" or a name).')
@click.option("--gpu", is_flag=True, help="Also run onnxruntime's transformer optimizer (CUDA EP graphs).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.ckpt/.pt) checkpoints.")
def export(model, precision, components, models_dir, cache_dir, controlnet, vae, gpu, allow_pickle):
    """Export MODEL's components to ONNX under the artefact cache.

    Up-to-date artefacts are found from their manifests and the model file's cached hash, without loading
    the model: the command then says "up to date" and returns at once. Otherwise it says what it built.
    """
    from engine.config import EngineConfig
    from core.errors import SdEngineError
    from export.descriptors import available_components
    from export.onnx import cached_artefact, export_component

    try:
        config = EngineConfig(models_dir=models_dir or default_models_dir(), cache_dir=cache_dir,
                              allow_pickle=allow_pickle)
        results = {}
        quick = peek(config, model, controlnet, vae)
        if quick is not None:
            key, defaults = quick
            for name in _split(components) or defaults:
                art = cached_artefact(name, key, config.artefacts_dir, precision=precision, gpu_optimize=gpu)
                if art is None:
                    results = {}
                    break
                results[name] = art
        if results:
            for name, art in results.items():
                click.echo(f"{name}: up to date: {art.path} ({art.precision})")
            click.echo(f"{model}: up to date in {config.artefacts_dir / key} (nothing to build)", err=True)
            return
        modules, model_hash = load(config, model, controlnet, vae)
        names = _split(components) or [c for c in available_components(modules) if c in DEFAULT_COMPONENTS
                                       or c == "controlnet"]
        stages = 1 + int(gpu) + int(precision == "fp16")
        with click.progressbar(length=len(names) * stages, label=f"exporting {model}", file=click.get_text_stream(
                "stderr"), item_show_func=lambda s: s) as bar:
            def progress(what: str, done: int, total: int) -> None:
                if not what.endswith(f"({BUILDING})"):
                    bar.update(1, what)

            for name in names:
                results[name] = export_component(name, modules, model_hash, config.artefacts_dir,
                                                 precision=precision, gpu_optimize=gpu, progress=progress)
    except SdEngineError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, art in results.items():
        click.echo(f"{name}: {'built' if art.built else 'up to date'}: {art.path} ({art.precision})")
    built = [n for n, a in results.items() if a.built]
    click.echo(f"{model}: built {', '.join(built)}" if built else f"{model}: up to date (nothing to build)",
               err=True)

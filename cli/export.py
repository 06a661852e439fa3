"""``sdengine export MODEL``: export a model's components to ONNX (manifest-cached) with a progress bar.

The command composes the engine's model store (the model, its artefact key) with export/ (the lower layer, which
knows no engine type: docs/ARCHITECTURE.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cli.options import BACKEND_DEFAULT, PRECISION_DEFAULT, Shown, engine_options
from engine.config import default_models_dir
from core.events import BUILDING

log = logging.getLogger(__name__)

# what a txt2img loads (engine/backends/weights.py: unet_control and vae_encoder are exported on their first use,
# a ControlNet request's and an img2img's; name them with --components to prepare them too)
DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


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
    components = [*arch.definition.text_encoders, "unet", "vae_decoder"]
    return artefact_key(key, vae_path), components


def _split(values) -> list[str]:
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


def _cached(config, name: str, key: str, gpu: bool):
    """The artefact the configured backend would load for ``name``, found without the model (None: build):
    onnxruntime's ONNX (its precision, chunked attention); openvino's full-attention fp32 ONNX and the IR its
    precision compiles from."""
    from export.onnx import cached_artefact

    kind = config.backend.value
    if kind == "openvino":
        from engine.backends.openvino import ATTENTION_CHUNKS, cpu_capabilities, import_openvino, \
            inference_precision, ir_key, ir_stage
        from export.manifest import artefact_dir, valid_artefact

        art = cached_artefact(name, key, config.artefacts_dir, precision="fp32", attention_chunks=ATTENTION_CHUNKS)
        if art is None:
            return None
        stage = ir_stage(inference_precision(config.precision, cpu_capabilities()))
        directory = artefact_dir(config.artefacts_dir, key, name, stage)
        return art if valid_artefact(directory, ir_key(art, import_openvino().__version__, stage)) else None
    precision = "fp32" if config.precision.value == "bf16" else config.precision.value
    return cached_artefact(name, key, config.artefacts_dir, precision=precision, gpu_optimize=gpu)


@click.command("export")
@click.argument("model")
@click.option("--backend", help="The backend to prepare for: openvino (ONNX + OpenVINO IR), onnxruntime (ONNX), "
                                "torch (nothing to export).", cls=Shown, shown=BACKEND_DEFAULT)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), cls=Shown, shown=PRECISION_DEFAULT,
              help="The precision the backend will run (onnxruntime: fp16 ONNX; openvino: bf16 reads an "
                   "fp16-compressed IR).")
@click.option("--components", "components", multiple=True, cls=Shown,
              shown="what a txt2img loads: text encoders, unet, vae_decoder",
              help="Components to export (repeat or comma-separate). "
                   "One of text_encoder, text_encoder_2, unet, unet_control, vae_decoder, vae_encoder, controlnet; "
                   "unet_control (ControlNet) and vae_encoder (img2img) are otherwise exported on first use.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root.", cls=Shown, shown="$SDENGINE_MODELS_DIR or {home}/models (sdengine paths)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artefact cache.", cls=Shown, shown="$SDENGINE_CACHE_DIR or MODELS_DIR/cache")
@click.option("--controlnet", is_flag=True, help="MODEL names a ControlNet, not a checkpoint.")
@click.option("--vae", default="Automatic",
              help='External VAE from MODELS_DIR/VAE (as the payload\'s "sd_vae": "Automatic", "None" or a name).')
@click.option("--gpu", is_flag=True, help="Also run onnxruntime's transformer optimizer (CUDA EP graphs).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.ckpt/.pt) checkpoints.")
def export(model, backend, precision, components, models_dir, cache_dir, controlnet, vae, gpu, allow_pickle):
    """Prepare MODEL for the backend commands will use (the configured default unless --backend): its ONNX
    artefacts and, for openvino, the OpenVINO IR -- what a txt2img loads, and nothing it will not.

    Up-to-date artefacts are found from their manifests and the model file's cached hash, without loading
    the model: the command then says "up to date" and returns at once. Otherwise it says what it built.
    """
    from engine.backends import create_backend
    from engine.config import EngineConfig
    from core.errors import SdEngineError
    from export.descriptors import available_components

    try:
        config = EngineConfig(models_dir=models_dir or default_models_dir(), cache_dir=cache_dir,
                              allow_pickle=allow_pickle, **engine_options(backend, None, precision))
        kind = config.backend.value
        if kind == "torch":
            click.echo(f"{model}: the torch backend runs the checkpoint's own modules: nothing to export", err=True)
            return
        results = {}
        quick = peek(config, model, controlnet, vae)
        if quick is not None:
            key, defaults = quick
            for name in _split(components) or defaults:
                art = _cached(config, name, key, gpu)
                if art is None:
                    results = {}
                    break
                results[name] = art
        if results:
            for name, art in results.items():
                click.echo(f"{name}: up to date: {art.path} ({art.precision})")
            click.echo(f"{model}: up to date for {kind} in {config.artefacts_dir / key} (nothing to build)",
                       err=True)
            return
        modules, model_hash = load(config, model, controlnet, vae)
        names = _split(components) or [c for c in available_components(modules) if c in DEFAULT_COMPONENTS
                                       or c == "controlnet"]
        stages = 1 + int(gpu) + int(config.precision.value == "fp16") + int(kind == "openvino")
        with click.progressbar(length=len(names) * stages, label=f"exporting {model} for {kind}",
                               file=click.get_text_stream("stderr"), item_show_func=lambda s: s) as bar:
            def progress(what: str, done: int, total: int) -> None:
                if not what.endswith(f"({BUILDING})"):
                    bar.update(1, what)

            options = {"gpu_optimize": gpu} if kind == "onnxruntime" else {}
            runtime = create_backend(config, modules, model_hash, progress=progress, **options)
            irs = {}
            for name in names:
                runtime.descriptor(name)  # an unknown component: InvalidRequest naming what the model has
                results[name] = runtime.artefact(name)
                if kind == "openvino":
                    irs[name] = runtime.ir_path(name, results[name])
                    bar.update(1, f"{name} (IR)")
    except SdEngineError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, art in results.items():
        click.echo(f"{name}: {'built' if art.built else 'up to date'}: {art.path} ({art.precision})")
        if name in irs:
            click.echo(f"{name}: OpenVINO IR: {irs[name]}")
    built = [n for n, a in results.items() if a.built]
    click.echo(f"{model}: built {', '.join(built)} for {kind}" if built else
               f"{model}: up to date for {kind} (nothing to build)", err=True)

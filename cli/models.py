"""``sdengine models ...``: list the model store, write the tiny test store, convert to a webui single file."""

from __future__ import annotations

import os
from pathlib import Path

import click

from cli.options import Shown
from core.errors import ModelError

MODELS_DIR_DEFAULT = "$SDENGINE_MODELS_DIR or {home}/models (sdengine paths)"


def _store(models_dir):
    from engine.models.store import ModelStore

    return ModelStore(models_dir) if models_dir else ModelStore()


@click.group()
def models() -> None:
    """The model store (webui layout: Stable-diffusion/, VAE/, ControlNet/, Lora/, LyCORIS/, embeddings/)."""


@models.command("list")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root.", cls=Shown, shown=MODELS_DIR_DEFAULT)
@click.option("--no-hash", is_flag=True, help="Skip hashing (hashes are cached after the first listing).")
def list_models(models_dir, no_hash: bool) -> None:
    """Print name, kind, architecture and short hash of every model: the webui's short hash of its kind (a
    checkpoint, VAE or ControlNet: sha256 of the file, 10 hex; a LoRA: the Lora hash, 12 hex; an embedding:
    sha256, 12 hex), as the infotext writes it. `models info NAME` says which."""
    store = _store(models_dir)
    entries = store.entries()
    rows = []
    with click.progressbar(entries, label="Reading models", file=click.get_text_stream("stderr"),
                           show_pos=True) as bar:
        for entry in bar:
            rows.append(store.describe(entry, hash=not no_hash))
    if not rows:
        click.echo(f"no models in {store.root}", err=True)
        return
    from engine.config import configured_default_model

    try:
        default = store.default_checkpoint(configured_default_model()[0]).path
    except ModelError:
        default = None
    from engine.models.checkpoints import Kind, pickle_refusal
    from engine.networks.files import lora_problem

    width = max(len(r.name) for r in rows)
    click.echo(f"{'NAME':<{width}}  {'KIND':<10}  {'ARCHITECTURE':<15}  {'HASH':<12}  SOURCE")
    for r in rows:
        arch = r.architecture.value if r.architecture else "unknown"
        # the webui's short hash of each kind (store.webui_hash): 10 hex for models, 12 for LoRAs and embeddings
        shown = store.webui_hash(r)[0] if r.sha256 else "-"
        # a file the engine refuses (a pickle without the opt-in, a LoRA it does not apply): `models info` says why
        refused = lora_problem(r.path) if r.kind is Kind.LORA else pickle_refusal(r.path, False)
        click.echo(f"{r.name:<{width}}  {r.kind.value:<10}  {arch:<15}  {shown:<12}  "
                   f"{'bundled' if r.bundled else 'store'}{'  (default)' if r.path == default else ''}"
                   f"{'  (refused: models info says why)' if refused else ''}")


@models.command("info")
@click.argument("name", required=False)
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root.", cls=Shown, shown=MODELS_DIR_DEFAULT)
def info(name, models_dir) -> None:
    """What model NAME is and knows: kind, family, hash (and which convention), and for a checkpoint its
    native size, prediction type, components, the ControlNets that fit, and -- when the file carries them --
    its prompt vocabulary and best settings. NAME is any model `models list` shows (checkpoint, ControlNet,
    LoRA, VAE, embedding) and defaults to the default model. Nothing is loaded (header, configs and the cached
    hash only)."""
    from engine.models.card import card, card_lines

    from engine.config import configured_default_model

    store = _store(models_dir)
    try:
        if name is None:
            name = store.default_checkpoint(configured_default_model()[0]).name
        result = card(store, name)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    for line in card_lines(result):
        click.echo(line)


@models.command("default")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Forget the configured default (back to the bundled demo model).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root (NAME is checked there).", cls=Shown, shown=MODELS_DIR_DEFAULT)
def default_model(name, clear: bool, models_dir) -> None:
    """Show or set the default checkpoint: the one txt2img, img2img, serve and export use when no --model (or
    payload model) is given. It is kept in the settings file ({home}/config.json, `sdengine paths`);
    $SDENGINE_DEFAULT_MODEL overrides it."""
    from engine.config import ENV_DEFAULT_MODEL, configured_default_model, write_settings
    from engine.models.checkpoints import Kind

    store = _store(models_dir)
    if clear:
        click.echo(f"default model cleared in {write_settings(default_model=None)}")
    elif name is not None:
        try:
            entry = store.resolve(name, Kind.CHECKPOINT, field="default_model")
        except ModelError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"default model: {entry.stem} (written to {write_settings(default_model=entry.stem)})")
    value, source = configured_default_model()
    if name is not None and os.environ.get(ENV_DEFAULT_MODEL):
        click.echo(f"note: ${ENV_DEFAULT_MODEL}={value} overrides it in this shell", err=True)
    try:
        entry = store.default_checkpoint(value)
    except ModelError as exc:
        raise click.ClickException(f"{exc} (configured in {source})") from None
    click.echo(f"{entry.stem}   ({source})")


@models.command("write-tiny")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
def write_tiny(root: Path) -> None:
    """Write the tiny random test models (both formats) into ROOT."""
    from engine.models.tiny import write_tiny_store

    write_tiny_store(root)
    click.echo(f"tiny models written to {root}")


@models.command("to-single-file")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
def to_single_file(folder: Path, output: Path) -> None:
    """Convert a diffusers pipeline or ControlNet FOLDER into a webui single .safetensors OUTPUT."""
    from engine.models.checkpoints import Arch, detect_folder_arch, load_controlnet, load_diffusers_folder
    from engine.models.convert import save_single_file

    arch = detect_folder_arch(folder)
    if arch is None or arch is Arch.VAE:
        raise click.ClickException(str(ModelError(folder, "not a diffusers pipeline or ControlNet folder")))
    if arch.is_controlnet:
        cn = load_controlnet(folder)
        save_single_file({"controlnet": cn.module}, output, arch=arch)
    else:
        m = load_diffusers_folder(folder)
        comps = {k: v for k, v in m.components.items() if not k.startswith("tokenizer")}
        save_single_file(comps, output, prediction_type=m.prediction_type, arch=arch, native_size=m.native_size)
    click.echo(f"wrote {output}")

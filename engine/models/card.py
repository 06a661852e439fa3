"""What a model file says of itself, read from its header without loading it: the model card.

``sdengine models info NAME`` prints it: family, native size, prediction type, hash, components, the
ControlNets of the store that fit, and -- when the file carries them -- the vocabulary of the prompts the
model was trained on and its best settings. The vocabulary and the settings live in the safetensors metadata
(keys :data:`VOCABULARY_KEY` and :data:`SETTINGS_KEY`, JSON), written by ``training/export.py`` from
``training/scenes.py``: nothing here is a hand-kept list.

:func:`write_metadata` (core.safetensors_header) adds or replaces metadata of a safetensors file atomically
(temporary file, rename) and keeps every tensor byte identical (only the header changes).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.errors import ModelNotFound
from core.safetensors_header import data_sha256, read_safetensors_header, write_metadata  # noqa: F401 (tools use them)
from engine.models.checkpoints import SAFETENSORS_SUFFIXES, Kind, detect_path_arch, metadata_configs, pickle_refusal
from engine.models.family import FAMILIES
from engine.models.store import DEMO_CHECKPOINT, bundled_root

CARD_KINDS = (Kind.CHECKPOINT, Kind.CONTROLNET, Kind.LORA, Kind.VAE, Kind.EMBEDDING)
VOCABULARY_KEY = "sdengine.vocabulary"
SETTINGS_KEY = "sdengine.settings"


@dataclass(frozen=True)
class ModelCard:
    name: str
    path: Path
    kind: str
    family: str | None
    native_size: int | None
    prediction_type: str | None
    sha256: str | None
    components: tuple[str, ...]
    controlnets: tuple[str, ...] = ()  # of the store, fitting this checkpoint
    vocabulary: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    bundled: bool = False
    notes: tuple[str, ...] = field(default=())
    short_hash: str | None = None  # the webui's short hash of this kind (ModelStore.webui_hash)
    hash_note: str = ""  # how it is made


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for folders and other formats)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    return read_safetensors_header(path).metadata


def _json(metadata: Mapping[str, str], key: str) -> dict | None:
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def vocabulary_of(path: str | os.PathLike) -> dict[str, Any] | None:
    """The vocabulary a model file carries (``None``: it carries none)."""
    return _json(read_metadata(path), VOCABULARY_KEY)


def card(store, name: str) -> ModelCard:
    """The model card of checkpoint (or ControlNet, LoRA, VAE, embedding) ``name`` of ``store`` (an engine ModelStore), from the
    file's header, its folder's configs and the store's hash cache. Nothing is loaded."""
    entry, first_error = None, None
    for kind in CARD_KINDS:  # a name of any kind `models list` shows; checkpoints first
        try:
            entry = store.resolve(name, kind, field="model")
            break
        except ModelNotFound as exc:
            first_error = first_error or exc
    if entry is None:
        raise first_error
    webui_hash, hash_note = store.webui_hash(entry)
    if entry.kind in (Kind.LORA, Kind.EMBEDDING):
        return _network_card(store, entry, webui_hash, hash_note)
    # a pickle is used only with the pickle opt-in (EngineConfig.allow_pickle, off by default), as the server
    # refuses it at submit (api_compat.engine_api.check_models)
    notes = [f"refused: {entry.path.name}: {why}"] if (why := pickle_refusal(entry.path, False)) else []
    if entry.kind not in (Kind.CHECKPOINT, Kind.CONTROLNET):
        described = store.describe(entry)
        return ModelCard(
            name=entry.name, path=entry.path, kind=entry.kind.value,
            family=described.architecture.value if described.architecture else None, native_size=None,
            prediction_type=None, sha256=described.sha256, components=(), bundled=entry.bundled,
            notes=tuple(notes), short_hash=webui_hash, hash_note=hash_note)
    arch = detect_path_arch(entry.path)
    metadata = read_metadata(entry.path)
    configs = metadata_configs(metadata, entry.path) or {}
    definition = FAMILIES.get(arch) if arch is not None else None
    if entry.kind is Kind.CHECKPOINT:
        native = configs.get("native_size") or (definition.native_size if definition else None)
        prediction = configs.get("prediction_type") or (definition.prediction_type if definition else None)
        if "native_size" not in configs and definition is not None:
            notes.append("native size and prediction type: the family's defaults (the file does not say)")
        text = list(definition.text_encoders) if definition else []
        components = tuple(text + ["unet", "vae (vae_decoder, vae_encoder)"])
        fitting = tuple(e.name for e in store.entries(Kind.CONTROLNET)
                        if definition and detect_path_arch(e.path) in definition.controlnets)
    else:
        native = prediction = None
        components, fitting = ("controlnet",), ()
    return ModelCard(
        name=entry.name, path=entry.path, kind=entry.kind.value, family=arch.value if arch else None,
        native_size=int(native) if native else None, prediction_type=prediction, sha256=store.hash_of(entry),
        components=components, controlnets=fitting, vocabulary=_json(metadata, VOCABULARY_KEY),
        settings=_json(metadata, SETTINGS_KEY), bundled=entry.bundled, notes=tuple(notes), short_hash=webui_hash,
        hash_note=hash_note)


def _network_card(store, entry, webui_hash: str | None = None, hash_note: str = "") -> ModelCard:
    """The card of a LoRA or embedding file: the family it was made for (from its header) and, for a file the
    engine refuses (a LyCORIS kind, a foreign format, a pickle without the opt-in), why."""
    from engine.networks.files import detect_network_arch, lora_problem

    arch = detect_network_arch(entry.path, entry.kind)
    why = lora_problem(entry.path) if entry.kind is Kind.LORA else pickle_refusal(entry.path, False)
    notes = [f"refused: {entry.path.name}: {why}"] if why else []
    return ModelCard(name=entry.name, path=entry.path, kind=entry.kind.value, family=arch.value if arch else None,
                     native_size=None, prediction_type=None, sha256=store.hash_of(entry), components=(),
                     bundled=entry.bundled, notes=tuple(notes), short_hash=webui_hash, hash_note=hash_note)


# ------------------------------------------------------------------------------------------ text
VOCABULARY_ORDER = ("counts", "sizes", "colours", "shapes", "positions", "backgrounds")


def vocabulary_lines(vocabulary: Mapping[str, Any]) -> list[str]:
    """Human lines for a vocabulary: each list with its count, then the template, rules and examples."""
    lines = []
    for key in VOCABULARY_ORDER:
        values = vocabulary.get(key)
        if values:
            lines.append(f"{key} ({len(values)}): {', '.join(str(v) for v in values)}")
    if vocabulary.get("template"):
        lines.append(f"prompt: {vocabulary['template']}")
    for rule in vocabulary.get("rules") or ():
        lines.append(f"rule: {rule}")
    for example in vocabulary.get("examples") or ():
        lines.append(f"example: {example}")
    return lines


def card_lines(c: ModelCard) -> list[str]:
    size = f"{c.native_size}x{c.native_size}" if c.native_size else "-"
    lines = [
        f"name:            {c.name}{' (bundled)' if c.bundled else ''}",
        f"path:            {c.path.absolute()}",
        f"kind:            {c.kind}",
        f"family:          {c.family or 'unknown'}",
        f"hash:            {c.short_hash or (c.sha256[:10] if c.sha256 else '-')} ({c.hash_note or 'sha256 of the file, 10 hex'})",
        f"sha256:          {c.sha256 or '-'} (the whole file)",
    ]
    if c.kind == "checkpoint":
        lines += [
            f"native size:     {size} (the default width/height; far from it the result carries a warning)",
            f"prediction type: {c.prediction_type or '-'}",
            f"components:      {', '.join(c.components)}",
            f"controlnets:     {', '.join(c.controlnets) or 'none in the store fit this family'}",
        ]
    if c.settings:
        lines.append("best settings:   " + ", ".join(f"{k} {v}" for k, v in c.settings.items()))
    if c.vocabulary:
        lines.append("vocabulary (from the model file):")
        lines += [f"  {line}" for line in vocabulary_lines(c.vocabulary)]
    elif c.kind == "checkpoint":
        lines.append("vocabulary:      not recorded in the file (a general model: any prompt)")
    lines += [f"note:            {n}" for n in c.notes]
    return lines


# ------------------------------------------------------------------------------------------ README
_README_BLOCK = re.compile(r"(<!-- generated:demo_card -->\n)(.*?)\n?(<!-- /generated:demo_card -->)", re.S)


def demo_card_text() -> str:
    """The README's description of the bundled demo model, from the shipped file's card."""
    path = bundled_root() / "Stable-diffusion" / DEMO_CHECKPOINT
    metadata = read_metadata(path)
    vocabulary, settings = _json(metadata, VOCABULARY_KEY) or {}, _json(metadata, SETTINGS_KEY) or {}
    native = (metadata_configs(metadata, path) or {}).get("native_size")
    lines = ["```", f"native size: {native}x{native} (the default width/height)" if native else "native size: -"]
    if settings:
        lines.append("best settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    lines += vocabulary_lines(vocabulary)
    lines.append("```")
    return "\n".join(lines)


def render_readme(text: str) -> str:
    """README text with its demo-card block rendered from the shipped file (``python -m engine.models.card``)."""
    return _README_BLOCK.sub(lambda m: m[1] + demo_card_text() + "\n" + m[3], text)


def main() -> None:  # python -m engine.models.card: refresh README's block
    readme = Path(__file__).resolve().parents[2] / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = render_readme(text)
    if new != text:
        readme.write_text(new, encoding="utf-8")
        print(f"updated {readme}")


if __name__ == "__main__":
    main()

"""Textual-inversion embeddings from the store's ``embeddings/`` folder, by the webui rules.

An embedding is triggered by its file name (without extension) written as a word in a prompt: the tokens of
that name are replaced by the embedding's vectors (webui ``EmbeddingDatabase.find_embedding_at_position``;
longest name first; an embedding never straddles two 75-token chunks). Formats (webui
``create_embedding_from_data``): ``string_to_param`` (webui .pt; one term), ``emb_params`` (safetensors), a
single-tensor dict (diffusers ``{"<token>": vector}``), and SDXL's ``clip_l`` + ``clip_g``. Only embeddings
whose width fits the model's text encoders are used (the webui skips the others too).

The vectors reach the text encoders as rows of their ``extra_embeddings`` input (export/wrappers.py): a chunk
holds placeholder ids at the embedding's positions (:class:`engine.prompts.Chunk` ``fixes``), which
:func:`engine.conditioning` replaces by ``vocab_size + row`` when it builds the batch. Nothing is exported
per embedding.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelError
from core.tokens import CHUNK_LENGTH
from engine.models.checkpoints import SAFETENSORS_SUFFIXES, read_safetensors_header
from engine.models.family import Kind
from engine.models.hashing import sha256_file
from engine.networks.files import load_pickle, read_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    """One embedding: ``vectors[component]`` (K, D) float32 torch tensors, K the same for every encoder."""

    name: str
    path: Path
    sha256: str
    vectors: dict[str, Any]

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


MAX_VECTORS = CHUNK_LENGTH  # an embedding never straddles two 75-token chunks: longer ones are skipped


def _vector_keys(keys, path: Path) -> dict[str, str]:
    """Which tensors of an embedding file hold its vectors (webui ``create_embedding_from_data``):
    ``{"clip_l": key, "clip_g": key}`` (SDXL) or ``{"": key}``. ModelError for other files."""
    keys = list(keys)
    if "clip_l" in keys and "clip_g" in keys:
        return {"clip_l": "clip_l", "clip_g": "clip_g"}
    terms = [k for k in keys if k.startswith("string_to_param.")]
    if terms:
        if len(terms) != 1:
            raise ModelError(path, f"embedding file has {len(terms)} terms in string_to_param; one is allowed")
        return {"": terms[0]}
    if "emb_params" in keys:
        return {"": "emb_params"}
    if len(keys) == 1:
        return {"": keys[0]}
    raise ModelError(path, "not a textual-inversion embedding (no string_to_param, emb_params, clip_l/clip_g "
                           "or single tensor)")


def _check_shapes(shapes: dict[str, tuple], path: Path) -> dict[str, tuple[int, int]]:
    """``(vectors, width)`` per key (a 1-d vector is one vector); ModelError for other shapes."""
    out = {}
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if len(shape) == 1:
            shape = (1, *shape)
        if len(shape) != 2 or shape[0] < 1:
            raise ModelError(path, f"embedding vectors of shape {shape}; expected (vectors, width)")
        out[key] = shape
    if len({s[0] for s in out.values()}) != 1:
        raise ModelError(path, f"clip_l and clip_g have different vector counts {sorted({s[0] for s in out.values()})}")
    return out


def read_embedding(path: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """``{"clip_l": (K, D)[, "clip_g": (K, D2)]}`` or ``{"": (K, D)}`` of an embedding file (webui formats)."""
    import torch

    data = read_tensors(Path(path), allow_pickle)
    vectors = {key: data[name] for key, name in _vector_keys(data, Path(path)).items()}
    _check_shapes({k: tuple(v.shape) for k, v in vectors.items()}, Path(path))
    out = {}
    for key, vec in vectors.items():
        vec = vec.detach().to(torch.float32)
        out[key] = vec.unsqueeze(0) if vec.dim() == 1 else vec
    return out


@dataclass(frozen=True)
class EmbeddingInfo:
    """What the webui lists of an embedding file, read without its tensors where the format allows (the
    safetensors header): ``shapes[key]`` = (vectors, width) as in :func:`read_embedding`; ``step``,
    ``sd_checkpoint`` (hash) and ``sd_checkpoint_name`` as the webui's training wrote them (pickle keys, or the
    same names in a safetensors file's metadata), else None."""

    name: str
    path: Path
    shapes: dict[str, tuple[int, int]]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def vectors(self) -> int:
        return next(iter(self.shapes.values()))[0]

    @property
    def shape(self) -> int:
        """The webui's ``shape``: the vector width (SDXL: clip_l + clip_g widths, 768 + 1280 = 2048)."""
        return sum(s[1] for s in self.shapes.values())


def embedding_info(path: Path, name: str, allow_pickle: bool = False) -> EmbeddingInfo:
    """:class:`EmbeddingInfo` of an embedding file: a safetensors file from its header only; a pickle (only with
    ``allow_pickle``) is loaded. ModelError for unreadable or non-embedding files."""
    import torch

    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        shapes, meta = header.shapes, header.metadata
    else:
        obj = load_pickle(path, allow_pickle)
        if not isinstance(obj, dict):
            raise ModelError(path, "not a textual-inversion embedding (not a dict of tensors)")
        flat: dict[str, tuple] = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, torch.Tensor):
                flat[prefix] = tuple(value.shape)
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)

        walk("", obj)
        shapes, meta = flat, {k: v for k, v in obj.items() if not isinstance(v, (torch.Tensor, dict))}
    vectors = _check_shapes({key: shapes[name_] for key, name_ in _vector_keys(shapes, path).items()}, path)

    def text(key: str) -> str | None:
        value = meta.get(key)
        return None if value is None or value == "" else str(value)

    try:
        step = int(meta["step"]) if meta.get("step") not in (None, "") else None
    except (TypeError, ValueError):
        step = None
    return EmbeddingInfo(name, path, vectors, step, text("sd_checkpoint"), text("sd_checkpoint_name"))


def _components(keys, widths: dict[str, int]) -> dict[str, str] | None:
    """Model text-encoder component -> embedding key, or None when the file is for another architecture
    (by its keys: SDXL files carry clip_l + clip_g, the others one tensor)."""
    components = list(widths)
    if len(components) == 2 and set(keys) == {"clip_l", "clip_g"}:
        return dict(zip(components, ("clip_l", "clip_g")))
    if len(components) == 1 and set(keys) == {""}:
        return {components[0]: ""}
    if components == ["text_encoder_2"] and set(keys) == {"clip_l", "clip_g"}:  # the SDXL refiner: OpenCLIP-G's
        return {"text_encoder_2": "clip_g"}  # part of an SDXL embedding (the webui's embedding_key "clip_g")
    return None


def fits(shapes: dict[str, tuple[int, int]], widths: dict[str, int]) -> bool:
    """Whether an embedding of ``shapes`` (:attr:`EmbeddingInfo.shapes`) is used with a model whose text
    encoders have ``widths``: the same encoders, each width equal, at most 75 vectors (the rule of
    :class:`EmbeddingDatabase`)."""
    pairs = _components(shapes, widths)
    return (pairs is not None and all(shapes[key][1] == widths[c] for c, key in pairs.items())
            and next(iter(shapes.values()))[0] <= MAX_VECTORS)


def fit_to_model(vectors: dict[str, Any], widths: dict[str, int]) -> dict[str, Any] | None:
    """The vectors per text-encoder component of a model with ``widths`` (component -> hidden size), or None
    when the embedding is for another architecture."""
    pairs = _components(vectors, widths)
    if pairs is None or any(int(vectors[key].shape[1]) != widths[c] for c, key in pairs.items()):
        return None
    return {c: vectors[key] for c, key in pairs.items()}


def store_embeddings(store, allow_pickle: bool = False) -> list[EmbeddingInfo]:
    """:class:`EmbeddingInfo` of each embedding file of the store (``embeddings/``), in the store's order;
    unreadable files (and pickles without ``allow_pickle``) are logged and left out, as the engine skips them."""
    out = []
    for entry in store.entries(Kind.EMBEDDING):
        try:
            out.append(embedding_info(entry.path, entry.stem, allow_pickle))
        except ModelError as exc:
            log.warning("embedding %s not listed: %s", entry.stem, exc)
    return out


class EmbeddingDatabase:
    """The embeddings of the store that fit one model: names -> :class:`Embedding` (re-scanned when the folder
    changes). ``key`` identifies the loaded set (part of the prompt cache key)."""

    def __init__(self, store, widths: dict[str, int], allow_pickle: bool = False):
        self.store = store
        self.widths = dict(widths)
        self.allow_pickle = allow_pickle
        self._files: dict[tuple, Embedding | None] = {}
        self._state: tuple = ()
        self.embeddings: dict[str, Embedding] = {}
        self.key = ""

    def refresh(self) -> None:
        entries = self.store.entries(Kind.EMBEDDING)
        state = []
        for entry in entries:
            try:
                st = entry.path.stat()
            except OSError:
                continue
            state.append((str(entry.path), st.st_size, st.st_mtime_ns))
        state = tuple(state)
        if state == self._state:
            return
        embeddings = {}
        for entry, ident in zip(entries, state):
            if ident not in self._files:
                self._files[ident] = self._load(entry.path, entry.stem)
            emb = self._files[ident]
            if emb is not None:
                embeddings.setdefault(emb.name, emb)
        self.embeddings = embeddings
        self._state = state
        self.key = hashlib.sha256("|".join(f"{e.name}:{e.sha256}" for e in embeddings.values()).encode()
                                  ).hexdigest()[:16] if embeddings else ""
        log.info("textual-inversion embeddings loaded: %d (%s)", len(embeddings), ", ".join(embeddings) or "none")

    def _load(self, path: Path, name: str) -> Embedding | None:
        try:
            vectors = read_embedding(path, self.allow_pickle)
        except ModelError as exc:
            log.warning("skipping embedding %s: %s", name, exc)
            return None
        if next(iter(vectors.values())).shape[0] > MAX_VECTORS:
            log.warning("skipping embedding %s: more than %d vectors", name, MAX_VECTORS)
            return None
        fitted = fit_to_model(vectors, self.widths)
        if fitted is None:
            log.info("skipping embedding %s: made for another architecture", name)
            return None
        return Embedding(name, path, sha256_file(path), fitted)

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

from engine.errors import ModelError
from engine.networks.files import read_tensors

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


def read_embedding(path: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """``{"clip_l": (K, D)[, "clip_g": (K, D2)]}`` or ``{"": (K, D)}`` of an embedding file (webui formats)."""
    import torch

    data = read_tensors(Path(path), allow_pickle)
    if "clip_l" in data and "clip_g" in data:
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    else:
        terms = [k for k in data if k.startswith("string_to_param.")]
        if terms:
            if len(terms) != 1:
                raise ModelError(path, f"embedding file has {len(terms)} terms in string_to_param; one is allowed")
            vec = data[terms[0]]
        elif "emb_params" in data:
            vec = data["emb_params"]
        elif len(data) == 1:
            vec = next(iter(data.values()))
        else:
            raise ModelError(path, "not a textual-inversion embedding (no string_to_param, emb_params, clip_l/clip_g "
                                   "or single tensor)")
        vectors = {"": vec}
    out = {}
    for key, vec in vectors.items():
        vec = vec.detach().to(torch.float32)
        if vec.dim() == 1:
            vec = vec.unsqueeze(0)
        if vec.dim() != 2 or vec.shape[0] < 1:
            raise ModelError(path, f"embedding vectors of shape {tuple(vec.shape)}; expected (vectors, width)")
        out[key] = vec
    counts = {v.shape[0] for v in out.values()}
    if len(counts) != 1:
        raise ModelError(path, f"clip_l and clip_g have different vector counts {sorted(counts)}")
    return out


def fit_to_model(vectors: dict[str, Any], widths: dict[str, int]) -> dict[str, Any] | None:
    """The vectors per text-encoder component of a model with ``widths`` (component -> hidden size), or None
    when the embedding is for another architecture."""
    components = list(widths)
    if len(components) == 2 and set(vectors) == {"clip_l", "clip_g"}:
        pairs = dict(zip(components, (vectors["clip_l"], vectors["clip_g"])))
    elif len(components) == 1 and set(vectors) == {""}:
        pairs = {components[0]: vectors[""]}
    else:
        return None
    if any(int(v.shape[1]) != widths[c] for c, v in pairs.items()):
        return None
    return pairs


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
        from engine.models.family import Kind

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
        from engine.models.hashing import sha256_file

        try:
            vectors = read_embedding(path, self.allow_pickle)
        except ModelError as exc:
            log.warning("skipping embedding %s: %s", name, exc)
            return None
        if next(iter(vectors.values())).shape[0] > 75:
            log.warning("skipping embedding %s: more than 75 vectors", name)
            return None
        fitted = fit_to_model(vectors, self.widths)
        if fitted is None:
            log.info("skipping embedding %s: made for another architecture", name)
            return None
        return Embedding(name, path, sha256_file(path), fitted)

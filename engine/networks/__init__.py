"""Extra networks named in prompts: LoRA (``<lora:NAME:MULT>``) and textual-inversion embeddings.

``syntax`` parses the tags (webui rules), ``files`` reads the LoRA/embedding formats, ``lora`` maps a LoRA
onto the model's modules and gives the weight deltas; :class:`Networks` ties them to a model store and a
loaded model (one per runtime; it caches the mapped files). Backends apply a ``WeightPatch``
(engine/backends); the pipeline calls :meth:`Networks.prepare` once per request.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine.conditioning import TextualInversion
from engine.models.family import Kind
from engine.networks.embeddings import EmbeddingDatabase
from engine.networks.files import addnet_hash, read_lora
from engine.networks.lora import EMPTY, LoraUse, WeightPatch, map_lora
from engine.networks.syntax import ParsedPrompt, parse_prompt

log = logging.getLogger(__name__)

MAX_CACHED_LORAS = 16


@dataclass(frozen=True)
class PreparedNetworks:
    """A request's networks: the prompt without tags, the weight patch, and the infotext hashes."""

    prompt: str
    patch: WeightPatch
    lora_hashes: tuple[tuple[str, str], ...] = ()  # (name as written, 12-hex webui hash)


class Networks:
    """The extra networks of one loaded model: LoRAs (names resolved in the store, files mapped once, LRU) and
    the textual-inversion embeddings of the store that fit it."""

    def __init__(self, store, model, allow_pickle: bool = False, max_cached: int = MAX_CACHED_LORAS):
        self.store = store
        self.model = model
        self.allow_pickle = allow_pickle
        self.max_cached = max_cached
        self._mapped: OrderedDict = OrderedDict()
        self._tables: dict = {}
        widths = {c: int(model.components[c].config.hidden_size) for c in model.family.text_encoders}
        self.embeddings = EmbeddingDatabase(store, widths, allow_pickle)
        self._ti = (None, None)

    def textual_inversion(self):
        """``(conditioning.TextualInversion or None, key)`` of the store's embeddings now (re-scanned)."""
        db = self.embeddings
        db.refresh()
        if self._ti[0] != db.key:
            ti = None
            if db.embeddings:
                ti = TextualInversion({n: e.count for n, e in db.embeddings.items()},
                                      {n: {c: v.numpy() for c, v in e.vectors.items()}
                                       for n, e in db.embeddings.items()})
            self._ti = (db.key, ti)
        return self._ti[1], db.key

    def ti_hashes(self, names) -> tuple[tuple[str, str], ...]:
        """webui ``TI hashes``: (name, first 12 hex of the file's sha256) of the embeddings used."""
        return tuple((n, self.embeddings.embeddings[n].sha256[:12]) for n in names
                     if n in self.embeddings.embeddings)

    def _load(self, name: str, field: str):
        entry = self.store.resolve(name, Kind.LORA, field=field)
        st = entry.path.stat()
        key = (str(entry.path.resolve()), st.st_size, st.st_mtime_ns)
        hit = self._mapped.get(key)
        if hit is None:
            lora = read_lora(entry.path, allow_pickle=self.allow_pickle)
            sha = addnet_hash(entry.path) if entry.path.suffix.lower() == ".safetensors" else \
                self.store.hashes.sha256(entry.path)
            hit = map_lora(lora, entry.stem, sha, self.model.components, self.model.family.arch, self._tables)
            self._mapped[key] = hit
            while len(self._mapped) > self.max_cached:
                self._mapped.popitem(last=False)
            log.info("LoRA %s: %d layers (%s format)", entry.stem, sum(len(t) for t in hit.targets.values()),
                     lora.format)
        self._mapped.move_to_end(key)
        return hit

    def prepare(self, prompt: str, *, disabled: bool = False, field: str = "prompt") -> PreparedNetworks:
        """Parse ``prompt``'s tags and build the patch (empty when ``disabled``: the tags are still removed)."""
        parsed: ParsedPrompt = parse_prompt(prompt, field)
        if disabled or not parsed.loras:
            return PreparedNetworks(parsed.text, EMPTY)
        uses, hashes = [], {}
        for tag in parsed.loras:
            mapped = self._load(tag.name, field)
            uses.append(LoraUse(mapped, tag.te, tag.unet))
            hashes.setdefault(tag.name, mapped.sha256[:12])
        return PreparedNetworks(parsed.text, WeightPatch(tuple(uses)), tuple(hashes.items()))

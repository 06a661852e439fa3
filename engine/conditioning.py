"""Prompt conditioning: token chunks -> embeddings through a backend.

:class:`StepConditioning` is the contract between conditioning (which builds it) and the denoiser (which
consumes it). :func:`encode_request` builds a :class:`ConditioningPlan` for a batch of images: prompts are
split on AND, scheduled (prompt editing, alternation), tokenised into 77-token chunks, encoded through a
backend (``run(component, feeds) -> outputs``: ``input_ids`` int64 (B, 77), ``clip_skip`` int64 (1,) ->
``hidden_state``, ``hidden_state_raw``, ``pooled``; see export/wrappers.py), weighted ("Original" emphasis)
and concatenated. Arrays are whatever the backend returns: numpy arrays or torch tensors.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine.arrays import as_like, concat, stack, zeros_like
from core.errors import InvalidRequest
from core.tokens import CHUNK_LENGTH, TOKENS_PER_CHUNK
from engine.models.tokenizer import clip_tokenizer
from engine.prompts import COMMA_BACKTRACK, Chunk, TokenWords, prompt_schedule, split_and, token_words, tokenize_prompt

Array = Any  # numpy.ndarray or torch.Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepConditioning:
    """Everything the denoiser needs about the prompts at one sampling step, for a batch of B images.

    ``context`` holds M rows: every positive AND-part of every image, then the negative prompt of every
    image (all rows padded to the same token count, 77*k). ``positive[b]`` lists ``(row, weight)`` of the
    AND-parts of image b, ``negative[b]`` the row of its negative prompt. CFG, as the webui does it:
    ``x0_b = uncond_b + sum_(row, w) w * cfg_scale * (x0[row] - uncond_b)``; with cfg_scale <= 1 the
    negative rows are not run at all (``x0_b = sum w * x0[row]`` with weights normalised to 1).
    ``pooled`` (M, P) and ``time_ids`` (M, 6; the SDXL refiner's M, 5) are set for SDXL only.
    """

    context: Array
    positive: tuple[tuple[tuple[int, float], ...], ...]
    negative: tuple[int, ...]
    pooled: Array | None = None
    time_ids: Array | None = None

    @property
    def batch_size(self) -> int:
        return len(self.positive)


# ------------------------------------------------------------------------------------ model families

PROMPT_FIELD = "prompt"
NEGATIVE_FIELD = "negative_prompt"


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder: its component name, padding token, which output is the context, clip skip offset."""

    component: str
    pad_token: str
    output: str  # "hidden_state" (final layer norm applied) or "hidden_state_raw"
    skip_offset: int = 0  # fed clip_skip = webui N + skip_offset


@dataclass(frozen=True)
class TextSpec:
    """How a model family turns text into conditioning. The families' specs are defined in
    engine/models/family.py (the one place that knows each family's encoders and pad tokens)."""

    encoders: tuple[EncoderSpec, ...]
    pooled_component: str | None = None  # SDXL: the pooled output of this encoder (first chunk)
    time_ids: bool = False  # SDXL add_time_ids
    zero_empty_negative: bool = False  # SDXL: an empty negative prompt is all zeros (webui, diffusers)
    # the SDXL refiner: time ids (original size, crop, aesthetic score), the score of positive rows then of
    # negative rows (webui sdxl_refiner_high_aesthetic_score / low; sgm's refiner conditioner); None: SDXL's
    # six (original size, crop, target size)
    aesthetic_scores: tuple[float, float] | None = None


@dataclass(frozen=True)
class TextModelInfo:
    """What conditioning needs to know about a loaded model: its text spec and its hash (the cache key)."""

    text: TextSpec
    model_hash: str


def apply_emphasis(z, weights):
    """webui "Original" emphasis: multiply each token's vector by its weight, then restore the mean.

    ``z`` (k, 77, D), ``weights`` (k, 77); the mean is restored per chunk (the webui restores it over the batch
    of texts it encodes at once, which for one prompt is the same thing). numpy arrays or torch tensors.
    """
    out = []
    for i in range(z.shape[0]):
        zi = z[i]
        w = as_like(weights[i], zi)
        original = zi.mean()
        zi = zi * w[:, None]
        out.append(zi * (original / zi.mean()))
    return stack(out)


@dataclass
class TextualInversion:
    """Embeddings usable as words in prompts (engine.networks.embeddings): ``counts[name]`` vectors each,
    ``vectors[name][component]`` (K, D) arrays per text encoder. Part of the prompt cache key through the
    model hash the caller gives (the database's key)."""

    counts: dict[str, int]
    vectors: dict[str, dict[str, Any]]
    _words: dict = None

    def words(self, pad_token: str) -> TokenWords | None:
        if self._words is None:
            self._words = {}
        if pad_token not in self._words:
            self._words[pad_token] = token_words(self.counts, _tokenizer(pad_token))
        return self._words[pad_token]


# -------------------------------------------------------------------------------------------- the cache

@dataclass(frozen=True)
class EncodedText:
    """One text through one encoder: ``hidden`` (77*k, D) after emphasis, ``pooled`` (P,) of the first chunk."""

    hidden: Array
    pooled: Array | None

    @property
    def chunks(self) -> int:
        return self.hidden.shape[0] // TOKENS_PER_CHUNK


class EmbeddingCache:
    """LRU of encoded texts keyed by (model hash, text, clip skip, encoder component).

    Hand one to :func:`encode_request` per loaded model and backend: a batch or a queue of requests with the
    same prompt then encodes it once. ``hits`` / ``misses`` count lookups. Not thread-safe: one per worker.
    """

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key) -> EncodedText | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key, value: EncodedText) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# ----------------------------------------------------------------------------------------------- encode

def _tokenizer(pad_token: str):
    return clip_tokenizer(pad_token)


def _extra_layout(backend, component: str) -> tuple[int, int]:
    """(vocab size, width) of a text encoder's ``extra_embeddings`` rows (export.descriptors)."""
    desc = backend.descriptor(component)
    spec = next(t for t in desc.inputs if t.name == "extra_embeddings")
    return int(desc.config["vocab_size"]), int(spec.shape[1])


def _run_encoder(backend, encoder: EncoderSpec, chunks: list[Chunk], clip_skip: int, max_batch: int,
                 ti: TextualInversion | None = None):
    """Encode chunks through the backend in batches; returns per-chunk (hidden (77, D), pooled (P,)).

    Embedding placeholders (``Chunk.fixes``) become ids ``vocab + row`` of the batch's ``extra_embeddings``."""
    import numpy as np

    skip = np.array([clip_skip + encoder.skip_offset], dtype=np.int64)
    vocab, width = _extra_layout(backend, encoder.component)
    hidden, pooled = [], []
    for start in range(0, len(chunks), max_batch):
        part = chunks[start:start + max_batch]
        ids = np.array([c.tokens for c in part], dtype=np.int64)
        rows, placed = [], {}
        for i, chunk in enumerate(part):
            for position, name in chunk.fixes:
                if name not in placed:
                    placed[name] = sum(len(r) for r in rows)
                    rows.append(np.asarray(ti.vectors[name][encoder.component], dtype=np.float32))
                k = ti.counts[name]
                ids[i, position:position + k] = vocab + placed[name] + np.arange(k)
        extra = np.concatenate(rows) if rows else np.zeros((1, width), dtype=np.float32)
        out = backend.run(encoder.component, {"input_ids": ids, "clip_skip": skip, "extra_embeddings": extra})
        hidden.extend(out[encoder.output][i] for i in range(len(part)))
        pooled.extend(out["pooled"][i] for i in range(len(part)))
    return hidden, pooled


def encode_texts(backend, model: TextModelInfo, texts, clip_skip: int, cache: EmbeddingCache | None = None,
                 max_batch: int = 8, tokenized: dict | None = None,
                 ti: TextualInversion | None = None) -> dict[str, dict[str, EncodedText]]:
    """Encode distinct texts (no AND or schedule syntax left) through every encoder of the model's family.

    Returns ``{component: {text: EncodedText}}``. Texts found in ``cache`` are not run; the chunks of all
    other texts go through the backend together, ``max_batch`` chunks per call.
    """
    result: dict[str, dict[str, EncodedText]] = {}
    for encoder in model.text.encoders:
        done: dict[str, EncodedText] = {}
        missing: list[tuple[str, list[Chunk]]] = []
        for text in dict.fromkeys(texts):
            key = (model.model_hash, text, clip_skip, encoder.component)
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                done[text] = hit
                continue
            chunks = (tokenized or {}).get((encoder.pad_token, text))
            if chunks is None:
                chunks = tokenize_prompt(text, _tokenizer(encoder.pad_token),
                                         words=ti.words(encoder.pad_token) if ti else None)
            missing.append((text, chunks))
        if missing:
            flat = [c for _, chunks in missing for c in chunks]
            log.debug("%s: encoding %d texts (%d chunks), %d from the cache", encoder.component, len(missing),
                      len(flat), len(done))
            hidden, pooled = _run_encoder(backend, encoder, flat, clip_skip, max_batch, ti)
            pos = 0
            for text, chunks in missing:
                k = len(chunks)
                z = stack(hidden[pos:pos + k])
                if any(c.weighted for c in chunks):
                    z = apply_emphasis(z, [c.weights for c in chunks])
                encoded = EncodedText(z.reshape(k * TOKENS_PER_CHUNK, z.shape[-1]), pooled[pos])
                pos += k
                done[text] = encoded
                if cache is not None:
                    cache.put((model.model_hash, text, clip_skip, encoder.component), encoded)
        result[encoder.component] = done
    return result


# ------------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class _Row:
    """The schedule of one row: ``(end_at_step, text)`` entries; ``zero`` rows are all zeros (SDXL "")."""

    entries: tuple[tuple[int, str], ...]
    zero: bool = False


@dataclass(frozen=True)
class ConditioningPlan:
    """Conditioning for a whole sampling run: :meth:`at` gives the :class:`StepConditioning` of a step.

    Distinct segments are built once; ``at`` is a lookup. ``ends[i]`` is the last step (0-based, as the
    webui's CFG denoiser counts) that uses ``segments[i]``.
    """

    ends: tuple[int, ...]
    segments: tuple[StepConditioning, ...]
    texts: tuple[tuple[str, ...], ...] = ()  # per segment: the text of each row (for logs and tests)
    embeddings: tuple[str, ...] = ()  # textual-inversion embeddings the prompts used (webui "TI hashes")

    def at(self, step: int) -> StepConditioning:
        i = bisect.bisect_left(self.ends, step)
        return self.segments[min(i, len(self.segments) - 1)]

    @property
    def changes(self) -> bool:
        return len({id(s) for s in self.segments}) > 1


def _check_length(chunks: int, limit: int, field: str) -> None:
    if chunks > limit:
        raise InvalidRequest(
            field,
            f"prompt is {chunks} chunks of 75 tokens long, more than the limit",
            f"at most {limit} chunks ({limit * CHUNK_LENGTH} tokens)",
        )


def _rows(spec: TextSpec, prompts: list[str], negative_prompts: list[str], steps: int):
    """The rows to encode: each positive prompt's AND parts and each negative prompt, with their schedules."""
    rows: list[_Row] = []
    positive = []
    for prompt in prompts:
        parts = []
        for text, weight in split_and(prompt):
            parts.append((len(rows), weight))
            rows.append(_Row(tuple(prompt_schedule(text, steps))))
        positive.append(tuple(parts))
    negative = []
    for prompt in negative_prompts:
        negative.append(len(rows))
        entries = tuple(prompt_schedule(prompt, steps))
        rows.append(_Row(entries, zero=spec.zero_empty_negative and all(t == "" for _, t in entries)))
    return rows, positive, negative, sum(len(p) for p in positive)


def _tokenize(spec: TextSpec, rows: list, n_positive: int, max_chunks: int, ti=None) -> dict:
    """Tokenise every distinct text once (per padding token) and check the length limit."""
    tokenized: dict[tuple[str, str], list[Chunk]] = {}
    for r, row in enumerate(rows):
        field = PROMPT_FIELD if r < n_positive else NEGATIVE_FIELD
        for _, text in row.entries:
            for encoder in spec.encoders:
                key = (encoder.pad_token, text)
                if key not in tokenized:
                    tokenized[key] = tokenize_prompt(text, _tokenizer(encoder.pad_token),
                                                     words=ti.words(encoder.pad_token) if ti else None)
            _check_length(len(tokenized[(spec.encoders[0].pad_token, text)]), max_chunks, field)
    return tokenized


def most_chunks(text: str) -> int | None:
    """An upper bound on the chunks :func:`~engine.prompts.tokenize_prompt` makes of ``text`` without running the
    tokenizer, or None when there is no cheap one. For ASCII text: the CLIP tokenizers' normalisation
    (lowercase, whitespace) keeps its length and every byte-level BPE token covers at least one character, so
    there are at most ``len(text)`` tokens; a full chunk keeps at least ``CHUNK_LENGTH - COMMA_BACKTRACK`` of
    them (the comma backtrack moves at most that many on), and each ``BREAK`` closes one more chunk."""
    if not text.isascii():
        return None
    return text.count("BREAK") + len(text) // (CHUNK_LENGTH - COMMA_BACKTRACK) + 1


def check_prompts(spec: TextSpec, prompt: str, negative_prompt: str, steps: int, max_chunks: int) -> None:
    """What :func:`encode_request` would refuse about the prompts' length, found without encoding anything (the
    model's tokenizer only): InvalidRequest naming ``prompt`` / ``negtive_prompt``. For the submit-time check;
    prompts short enough that they cannot exceed the limit (:func:`most_chunks`) are not tokenised."""
    bounds = [most_chunks(prompt), most_chunks(negative_prompt)]
    if all(b is not None and b <= max_chunks for b in bounds):
        return  # (schedules and AND parts only pick parts of the text: never longer)
    rows, _, _, n_positive = _rows(spec, [prompt], [negative_prompt], max(int(steps), 1))
    _tokenize(spec, rows, n_positive, max_chunks)


def encode_request(
    backend,
    model: TextModelInfo,
    prompts: list[str],
    negative_prompts: list[str],
    steps: int,
    clip_skip: int = 1,
    width: int = 1024,
    height: int = 1024,
    cache: EmbeddingCache | None = None,
    max_chunks: int = 32,
    max_batch: int = 8,
    ti: TextualInversion | None = None,
) -> ConditioningPlan:
    """Parse, schedule, tokenise and encode the prompts of a batch of images into a :class:`ConditioningPlan`.

    ``prompts[b]`` / ``negative_prompts[b]`` belong to image b. Positive prompts are split on ``AND``;
    each part and each negative prompt follows its own editing/alternation schedule over ``steps``.
    Rows of different token counts are padded with the encoded empty chunk. For SDXL, ``width`` and
    ``height`` give the add_time_ids (original size = target size, crop at the top left). ``ti``: the
    textual-inversion embeddings whose names are words of the prompts (the cache key must cover them).
    """
    if len(prompts) != len(negative_prompts):
        raise InvalidRequest(NEGATIVE_FIELD, "needs one negative prompt per prompt",
                             f"{len(prompts)} negative prompts")
    if not prompts:
        raise InvalidRequest(PROMPT_FIELD, "no prompts to encode", "one prompt per image")
    if steps < 1:
        raise InvalidRequest("steps", f"invalid step count {steps}", "an integer >= 1")
    if clip_skip < 1:
        raise InvalidRequest("clip_skip", f"invalid clip skip {clip_skip}", "an integer >= 1")
    spec = model.text
    rows, positive, negative, n_positive = _rows(spec, prompts, negative_prompts, steps)
    tokenized = _tokenize(spec, rows, n_positive, max_chunks, ti)

    texts = {"": None}
    for row in rows:
        if not row.zero:
            texts.update((t, None) for _, t in row.entries)
    encoded = encode_texts(backend, model, list(texts), clip_skip, cache, max_batch, tokenized, ti)
    used = {}
    for row in rows:
        for _, text in row.entries:
            for chunk in tokenized[(spec.encoders[0].pad_token, text)]:
                used.update((name, None) for _, name in chunk.fixes)

    def context_of(text: str):
        return concat([encoded[e.component][text].hidden for e in spec.encoders], axis=-1)

    def pooled_of(text: str):
        return encoded[spec.pooled_component][text].pooled

    empty = context_of("")  # (77, D): the padding of shorter rows

    # the segments: every step boundary of every row; identical selections share one StepConditioning
    ends = sorted({end for row in rows for end, _ in row.entries})
    built: dict[tuple[str, ...], StepConditioning] = {}
    segments, seg_texts, seg_ends = [], [], []
    for end in ends:
        selection = tuple(next(t for e, t in row.entries if end <= e) for row in rows)
        if seg_texts and seg_texts[-1] == selection:
            seg_ends[-1] = end
            continue
        if selection not in built:
            built[selection] = _build_step(rows, selection, context_of, pooled_of, empty, spec,
                                           tuple(positive), tuple(negative), width, height)
        segments.append(built[selection])
        seg_texts.append(selection)
        seg_ends.append(end)
    return ConditioningPlan(tuple(seg_ends), tuple(segments), tuple(seg_texts), tuple(used))


def _build_step(rows, selection, context_of, pooled_of, empty, spec, positive, negative, width, height):
    contexts = []
    for row, text in zip(rows, selection):
        c = context_of(text)
        contexts.append(zeros_like(c) if row.zero else c)
    k = max(c.shape[0] for c in contexts) // TOKENS_PER_CHUNK
    padded = []
    for c in contexts:
        missing = k - c.shape[0] // TOKENS_PER_CHUNK
        padded.append(concat([c] + [empty] * missing, axis=0) if missing else c)
    context = stack(padded)
    pooled = time_ids = None
    if spec.pooled_component is not None:
        pooled = stack([zeros_like(pooled_of(t)) if row.zero else pooled_of(t) for row, t in zip(rows, selection)])
    if spec.time_ids and spec.aesthetic_scores is not None:
        high, low = spec.aesthetic_scores
        negatives = set(negative)
        time_ids = as_like([[height, width, 0, 0, low if r in negatives else high] for r in range(len(rows))],
                           context)
    elif spec.time_ids:
        time_ids = as_like([[height, width, 0, 0, height, width]] * len(rows), context)
    return StepConditioning(context, positive, negative, pooled, time_ids)

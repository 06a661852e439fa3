"""The prompt parser and the tokenizer over the 1,632 real prompts of PartiPrompts (the shared weights'
``prompts/PartiPrompts.tsv``), with the chunking checked against the webui's 75-token rule.

The reference here is our own implementation of the rule of the webui's ``modules/sd_hijack_clip.py``
(``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``), written from its description, not shared with
engine/prompts.py: tokens go into chunks of 75; a ``BREAK`` closes the current chunk (an empty one too); when a
chunk is full and the next token is not a comma, and the last comma of the chunk is at most 20 tokens back
(``comma_padding_backtrack``), the tokens after that comma move to the next chunk; a last, partly filled chunk
(or the only, empty one) closes at the end. Compared per prompt: the chunk count, and every chunk's token ids
and weights (exact). Each prompt is run as written and in three variants that reach the rule's branches the
short prompts alone do not: three prompts joined by commas (> 75 tokens: the comma back-off), two joined by
``BREAK``, and with emphasis. Skips with a reason where the shared folder is absent.
"""

from __future__ import annotations

import csv

import pytest

from core.tokens import CHUNK_LENGTH
from engine.conditioning import most_chunks
from engine.prompts import parse_prompt_attention, prompt_schedule, split_and, tokenize_prompt
from tests.weights_support import WEIGHTS, needs

pytestmark = needs("prompts/PartiPrompts.tsv", "the real prompts")

BACKTRACK = 20  # the webui's comma_padding_backtrack default


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    with open(WEIGHTS / "prompts" / "PartiPrompts.tsv", newline="", encoding="utf-8") as f:
        return [row["Prompt"] for row in csv.DictReader(f, delimiter="\t")]


class _Memo:
    """The CLIP tokenizer with its ids of each text remembered (the variants repeat the prompts' texts): a
    stand-in the engine's tokenize_prompt calls as it calls the tokenizer. Keeps the test fast."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: dict[str, list[int]] = {}

    def __call__(self, texts, truncation=False, add_special_tokens=False):
        assert truncation is False and add_special_tokens is False
        missing = [t for t in dict.fromkeys(texts) if t not in self.ids]
        if missing:
            found = self.tokenizer(missing, truncation=False, add_special_tokens=False)["input_ids"]
            self.ids.update(zip(missing, found))
        return {"input_ids": [self.ids[t] for t in texts]}

    def __getattr__(self, name):  # bos/eos/pad ids, convert_tokens_to_ids ...
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def tokenizer():
    from engine.models.tokenizer import clip_tokenizer

    return _Memo(clip_tokenizer())


def webui_chunks(runs, ids, comma: int, bos: int, eos: int) -> list[tuple[list[int], list[float]]]:
    """The webui's 75-token rule (see the module docstring): ``(77 token ids, 77 weights)`` per chunk, padded
    with EOS (SD1's padding)."""
    out: list[tuple[list[int], list[float]]] = []
    cur: list[int] = []
    mul: list[float] = []
    last_comma = -1

    def close():
        nonlocal cur, mul, last_comma
        pad = CHUNK_LENGTH - len(cur)
        out.append(([bos] + cur + [eos] * (pad + 1), [1.0] + mul + [1.0] * (pad + 1)))
        cur, mul, last_comma = [], [], -1

    for (text, weight), tokens in zip(runs, ids):
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(cur)
            elif len(cur) == CHUNK_LENGTH and last_comma != -1 and len(cur) - last_comma <= BACKTRACK:
                cut = last_comma + 1
                moved, moved_mul = cur[cut:], mul[cut:]
                cur, mul = cur[:cut], mul[:cut]
                close()
                cur, mul = moved, moved_mul
            if len(cur) == CHUNK_LENGTH:
                close()
            cur.append(token)
            mul.append(weight)
    if cur or not out:
        close()
    return out


def _variants(prompts: list[str]):
    n = len(prompts)
    for i, p in enumerate(prompts):
        a, b = prompts[(i + 1) % n], prompts[(i + 2) % n]
        yield p
        yield f"{p}, {a}, {b}"
        yield f"{p} BREAK {a}"
        yield f"({p}:1.3), [{a}], (({b}))"


def test_every_real_prompt_parses_and_chunks_as_the_webui(prompts, tokenizer):
    """All 1,632 prompts (and 3 variants each) through the schedule parser, AND split, attention parser and
    tokenizer without error; our chunks equal the webui rule's, chunk for chunk; the submit check's cheap
    bound (engine.conditioning.most_chunks) is never below the real count."""
    assert len(prompts) == 1632
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    counts: dict[int, int] = {}
    backed_off = 0
    for text in _variants(prompts):
        schedule = prompt_schedule(text, 20)
        assert schedule[-1][0] == 20 and all(isinstance(t, str) for _, t in schedule)
        for part, weight in split_and(text):
            assert isinstance(part, str) and weight == weight  # (not NaN)
        runs = parse_prompt_attention(text)
        ids = tokenizer([t for t, _ in runs], truncation=False, add_special_tokens=False)["input_ids"]
        expected = webui_chunks(runs, ids, comma, bos, eos)
        ours = tokenize_prompt(text, tokenizer)
        assert len(ours) == len(expected), text
        for chunk, (tokens, weights) in zip(ours, expected):
            assert list(chunk.tokens) == tokens, text
            assert list(chunk.weights) == weights, text  # the runs' own weights: exact
        bound = most_chunks(text)
        assert bound is None or bound >= len(ours), text
        counts[len(ours)] = counts.get(len(ours), 0) + 1
        # a chunk closed before 75 tokens without a BREAK: the comma back-off moved tokens on
        backed_off += any(list(c.tokens[1:CHUNK_LENGTH + 1]).count(eos) and i + 1 < len(ours)
                          for i, c in enumerate(ours)) and "BREAK" not in text
    # the variants reach the rule's branches: several chunks, BREAKs, back-offs
    assert counts.get(1) and counts.get(2) and counts.get(3), counts
    assert backed_off > 100, backed_off

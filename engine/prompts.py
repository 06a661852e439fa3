"""The webui prompt syntax: schedules, composable parts, attention weights and 77-token chunks.

Semantics follow AUTOMATIC1111 webui v1.10 (``modules/prompt_parser.py``, ``modules/sd_hijack_clip.py``),
re-implemented here without its grammar library:

- :func:`split_and` -- ``a AND b:0.5`` -> composable parts with weights (summed in CFG).
- :func:`prompt_schedule` -- prompt editing ``[a:b:N]``, ``[a:N]``, ``[a::N]`` and alternation ``[a|b]``
  -> ``[(end_at_step, text), ...]``. ``N`` with a decimal point is a fraction of the steps, without one a
  step count (webui v1.10; ``use_old_scheduling`` gives the older "fraction when < 1" rule).
- :func:`parse_prompt_attention` -- ``(a)`` x1.1, ``(a:1.3)``, ``[a]`` /1.1, escapes, ``BREAK`` -> runs of
  ``(text, weight)``.
- :func:`tokenize_prompt` -- runs -> :class:`Chunk` s of 75 tokens + BOS/EOS, with the comma backtrack.

Deliberate differences from the webui, where the webui has a bug rather than a behaviour:

- ``BREAK`` inside brackets still breaks the chunk (the webui multiplies its marker weight and then
  tokenises the word "break" with a negative weight).
- A malformed weight such as ``(a:1.2.3)`` is literal text (the webui raises ``ValueError``).
- Step numbers too large for an int (``[a:b:1e999]``) are clamped instead of raising ``OverflowError``.
- An edit directly followed by two or more unmatched brackets (``[a:1]((b``) is still scheduled; the webui's
  grammar library (lark 1.3, checked by fuzzing) rejects such prompts and drops all their schedules. On
  80 000 random prompts over the syntax characters this was the only difference.
- Hundreds of nested brackets (Python's recursion limit) give no schedule instead of a parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.tokens import CHUNK_LENGTH  # tokens per chunk, without BOS/EOS

COMMA_BACKTRACK = 20  # webui opts.comma_padding_backtrack
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

BREAK = ("BREAK", -1.0)  # marker run in parse_prompt_attention's output (the webui's representation)

Run = tuple[str, float]


# ---------------------------------------------------------------------------------------------- AND parts

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt on the word ``AND`` into ``(text, weight)`` parts; ``text:1.5`` at a part's end is its weight."""
    parts = []
    for part in _AND.split(prompt):
        m = _PART_WEIGHT.search(part)
        if m is None:  # unreachable with this pattern, kept for safety
            parts.append((part, 1.0))
            continue
        text, weight = m.groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


# ------------------------------------------------------------------------------------ schedules (editing)

@dataclass
class _Scheduled:
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list  # of node lists


_NUMBER = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")


class _ScheduleParser:
    """Recursive descent over the webui's schedule grammar.

    Inside brackets the grammar is deterministic: a prompt runs up to the first unnested ``) ] : |``, and
    that delimiter decides between emphasis, editing and alternation. At the top level, brackets and colons
    that close nothing are literal text; a top-level ``|`` or a trailing backslash makes the whole prompt
    unparsable, and then it is used as it is, without any schedule (as in the webui).
    """

    def __init__(self, text: str):
        self.s = text
        self.memo: dict[int, tuple | None] = {}  # bracket results by position: linear time on failures

    def parse(self) -> list | None:
        s, pos, nodes = self.s, 0, []
        while pos < len(s):
            seq, pos = self.prompt(pos)
            nodes.extend(seq)
            if pos < len(s):
                if s[pos] in "[]():":
                    nodes.append(s[pos])
                    pos += 1
                else:
                    return None
        return nodes

    def prompt(self, pos: int) -> tuple[list, int]:
        s, nodes = self.s, []
        while pos < len(s):
            c = s[pos]
            if c in "([":
                got = self.bracket(pos)
                if got is None:
                    break
                node, pos = got
                nodes.append(node)
            elif c in ")]:|":
                break
            else:
                m = _PLAIN.match(s, pos)
                if m is None:  # a backslash at the end, or before a newline
                    break
                nodes.append(m.group(0))
                pos = m.end()
        return nodes, pos

    def bracket(self, pos: int):
        if pos not in self.memo:
            self.memo[pos] = self._bracket(pos)
        return self.memo[pos]

    def _bracket(self, pos: int):
        s = self.s
        opener = s[pos]
        first, q = self.prompt(pos + 1)
        if q >= len(s):
            return None
        c = s[q]
        if opener == "(":
            if c == ")":
                return ["(", *first, ")"], q + 1
            if c == ":":
                second, r = self.prompt(q + 1)
                if r < len(s) and s[r] == ")":
                    return ["(", *first, ":", *second, ")"], r + 1
            return None
        if c == "]":
            return ["[", *first, "]"], q + 1
        if c == "|":
            options = [first]
            while q < len(s) and s[q] == "|":
                option, q = self.prompt(q + 1)
                options.append(option)
            if q < len(s) and s[q] == "]":
                return _Alternate(options), q + 1
            return None
        if c == ":":
            m = _NUMBER.match(s, q + 1)
            if m is not None:
                return _Scheduled(None, first, m.group(1)), m.end()
            second, r = self.prompt(q + 1)
            if r < len(s) and s[r] == ":":
                m = _NUMBER.match(s, r + 1)
                if m is not None:
                    return _Scheduled(first, second, m.group(1)), m.end()
        return None


def _walk(nodes, visit):
    for node in nodes:
        if isinstance(node, list):
            _walk(node, visit)
        elif isinstance(node, _Scheduled):
            visit(node)
            if node.before is not None:
                _walk(node.before, visit)
            _walk(node.after, visit)
        elif isinstance(node, _Alternate):
            visit(node)
            for option in node.options:
                _walk(option, visit)


def _render(nodes, step: int, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, list):
            _render(node, step, out)
        elif isinstance(node, _Scheduled):
            _render((node.before or []) if step <= node.when else node.after, step, out)
        else:
            _render(node.options[(step - 1) % len(node.options)], step, out)


def prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]``: the text to use while ``step <= end_at_step`` (first match wins).

    Same results as the webui's ``get_learned_conditioning_prompt_schedules([prompt], steps, ...)[0]``.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, frac_offset, total = 0, 0.0, steps
    else:
        int_offset, frac_offset, total = steps, 1.0, hires_steps
    try:
        tree = _ScheduleParser(prompt).parse()
    except RecursionError:  # hundreds of nested brackets: no schedule, the text is used as it is
        tree = None
    if tree is None:
        return [(total, prompt)]

    boundaries = {total}

    def collect(node):
        if isinstance(node, _Alternate):
            boundaries.update(range(1, total + 1))
            return
        v = float(node.number)
        if use_old_scheduling:
            v = v * total if v < 1 else v
        elif "." in node.number:
            v = (v - frac_offset) * total
        else:
            v = v - int_offset
        node.when = int(min(max(v, -1.0), total))  # clamped: every value < 1 acts the same
        if node.when >= 1:
            boundaries.add(node.when)

    _walk(tree, collect)
    schedule = []
    for end in sorted(boundaries):
        out: list[str] = []
        _render(tree, end, out)
        schedule.append((end, "".join(out)))
    return schedule


# -------------------------------------------------------------------------------------- attention weights

_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\] | \\ |          # escapes, or a lone backslash
    \( | \[ |                    # openers
    :\s*([+-]?[.\d]+)\s*\) |     # weight and closer
    \) | \] |                    # closers
    [^\\()\[\]:]+ |              # text
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_prompt_attention(text: str) -> list[Run]:
    """``(text, weight)`` runs of a prompt, with :data:`BREAK` runs where ``BREAK`` stands.

    ``(a)`` multiplies by 1.1, ``(a:w)`` by w, ``[a]`` divides by 1.1; nesting multiplies; brackets left open
    apply to the end; ``\\( \\) \\[ \\] \\\\`` are literal; neighbouring runs of equal weight merge.
    """
    runs: list[list] = []
    breaks: set[int] = set()
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for i in range(start, len(runs)):
            if i not in breaks:
                runs[i][1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        value = _float(weight) if weight is not None else None
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif value is not None and round_open:
            multiply(round_open.pop(), value)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    breaks.add(len(runs))
                    runs.append(list(BREAK))
                runs.append([part, 1.0])

    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    merged: list[Run] = []
    previous_break = True
    for i, (part, weight) in enumerate(runs):
        is_break = i in breaks
        if merged and not is_break and not previous_break and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append(BREAK if is_break else (part, weight))
        previous_break = is_break
    return merged or [("", 1.0)]


# ------------------------------------------------------------------------------------------------ chunks

@dataclass(frozen=True)
class Chunk:
    """77 token ids (BOS, 75 tokens or padding, EOS...) and the weight of each (1.0 on special tokens).

    ``fixes``: ``(position, name)`` of each textual-inversion embedding in the chunk (webui ``PromptChunkFix``):
    its vectors take the positions ``position ..`` (placeholder id 0 there until the encoder feeds them).
    """

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


@dataclass(frozen=True)
class TokenizerSpec:
    """Token ids of one text encoder's tokenizer. SD1 pads with EOS; OpenCLIP pads with ``pad`` after EOS."""

    bos: int
    eos: int
    pad: int
    comma: int | None


def tokenizer_spec(tokenizer) -> TokenizerSpec:
    # one lookup: get_vocab() copies the whole vocabulary (~0.1 s for CLIP's 49408 entries, twice per request)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    return TokenizerSpec(
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        comma=None if comma in (None, tokenizer.unk_token_id) else comma,
    )


@dataclass(frozen=True)
class TokenWords:
    """Words that stand for K vectors instead of their tokens (textual-inversion embeddings by file name):
    ``by_first[first token id]`` lists ``(token ids, name, K)``, longest first (webui ``ids_lookup``)."""

    by_first: dict

    def find(self, tokens: list[int], position: int) -> tuple[str, int, int] | None:
        """``(name, vectors, tokens consumed)`` of the word starting at ``position``, or None."""
        for ids, name, count in self.by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                return name, count, len(ids)
        return None


def token_words(counts: dict[str, int], tokenizer) -> TokenWords | None:
    """The :class:`TokenWords` of names -> vector counts for ``tokenizer`` (None when there are none)."""
    if not counts:
        return None
    names = list(counts)
    by_first: dict = {}
    for name, ids in zip(names, tokenizer(names, truncation=False, add_special_tokens=False)["input_ids"]):
        if ids:
            by_first.setdefault(ids[0], []).append((tuple(ids), name, counts[name]))
    return TokenWords({k: tuple(sorted(v, key=lambda e: -len(e[0]))) for k, v in by_first.items()})


def _close_chunk(tokens: list[int], weights: list[float], spec: TokenizerSpec, fixes=()) -> Chunk:
    fill = CHUNK_LENGTH - len(tokens)
    ids = (spec.bos, *tokens, spec.eos, *([spec.pad] * fill))
    return Chunk(ids, (1.0, *weights, 1.0, *([1.0] * fill)), tuple((p + 1, n) for p, n in fixes))


def chunk_runs(runs: list[Run], token_ids: list[list[int]], spec: TokenizerSpec,
               comma_backtrack: int = COMMA_BACKTRACK, words: TokenWords | None = None) -> list[Chunk]:
    """Pack tokenised runs into chunks of 75 (webui ``tokenize_line``).

    When a chunk is full and a comma lies within its last ``comma_backtrack`` tokens, the tokens after the
    comma move to the next chunk. A :data:`BREAK` run closes the current chunk (an empty one too). A word of
    ``words`` (an embedding) becomes its K vectors' placeholders and a fix; it is never split over two chunks.
    """
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close():
        nonlocal tokens, weights, fixes, last_comma
        chunks.append(_close_chunk(tokens, weights, spec, fixes))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for (text, weight), ids in zip(runs, token_ids):
        if (text, weight) == BREAK:
            close()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == spec.comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                moved_fixes = [(p - cut, n) for p, n in fixes if p >= cut]
                tokens, weights = tokens[:cut], weights[:cut]
                fixes = [(p, n) for p, n in fixes if p < cut]
                close()
                tokens, weights, fixes = moved_tokens, moved_weights, moved_fixes
            if len(tokens) == CHUNK_LENGTH:
                close()
            found = words.find(ids, position) if words is not None else None
            if found is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue
            name, count, consumed = found
            if len(tokens) + count > CHUNK_LENGTH:
                close()
            fixes.append((len(tokens), name))
            tokens.extend([0] * count)
            weights.extend([weight] * count)
            position += consumed
    if tokens or not chunks:
        close()
    return chunks


def tokenize_prompt(text: str, tokenizer, comma_backtrack: int = COMMA_BACKTRACK,
                    words: TokenWords | None = None) -> list[Chunk]:
    """The chunks of one prompt text (no AND, no schedule syntax left) for ``tokenizer``; ``words``: the
    textual-inversion embeddings' names (see :func:`token_words`)."""
    runs = parse_prompt_attention(text)
    ids = tokenizer([t for t, _ in runs], truncation=False, add_special_tokens=False)["input_ids"]
    return chunk_runs(runs, ids, tokenizer_spec(tokenizer), comma_backtrack, words)


def empty_chunk(spec: TokenizerSpec) -> Chunk:
    return _close_chunk([], [], spec)

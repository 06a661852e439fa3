"""The webui prompt syntax: attention runs, schedules (editing, alternation), AND parts, 77-token chunks.

Expected values are the webui v1.10 behaviour (modules/prompt_parser.py doctests and documented rules,
modules/sd_hijack_clip.py tokenize_line), written out by hand.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.models.tokenizer import BOS_ID, EOS_ID, clip_tokenizer
from engine.prompts import (
    BREAK,
    CHUNK_LENGTH,
    Chunk,
    chunk_runs,
    empty_chunk,
    parse_prompt_attention,
    prompt_schedule,
    split_and,
    tokenize_prompt,
    tokenizer_spec,
)

B = BREAK
R = 1.1  # (a)
S = 1 / 1.1  # [a]

ATTENTION = [
    # plain text
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    ("   ", [("   ", 1.0)]),
    ("a, b; c. d!", [("a, b; c. d!", 1.0)]),
    ("a:b", [("a:b", 1.0)]),  # a colon outside brackets is text
    # round brackets
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(a)", [("a", R)]),
    ("((a))", [("a", R * R)]),
    ("(((a)))", [("a", R * R * R)]),
    ("(a) (b)", [("a", R), (" ", 1.0), ("b", R)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("()", [("", 1.0)]),
    ("(a (b) c)", [("a ", R), ("b", R * R), (" c", R)]),
    # explicit weights
    ("(a:1.3)", [("a", 1.3)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),  # spaces around the number (v1.10)
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:1.)", [("a", 1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("((a:2))", [("a", 2 * R)]),
    ("((a):2)", [("a", R * 2)]),
    ("(a:2) b (c:2)", [("a", 2.0), (" b ", 1.0), ("c", 2.0)]),
    ("(a (b:2) c:3)", [("a ", 3.0), ("b", 6.0), (" c", 3.0)]),
    ("(a:b)", [("a:b", R)]),  # not a number: ':' is text, ')' closes with 1.1
    ("a:1.2)", [("a:1.2)", 1.0)]),  # a weight with no open bracket is text
    # square brackets
    ("[a]", [("a", S)]),
    ("[[a]]", [("a", S * S)]),
    ("[a] (b)", [("a", S), (" ", 1.0), ("b", R)]),
    ("([a])", [("a", R * S)]),
    ("[(a:1.5)]", [("a", 1.5 * S)]),
    ("[a:1.5]", [("a:1.5", S)]),  # no weight syntax for square brackets
    # the doctest
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # unbalanced brackets apply to the end; stray closers are text
    ("(unbalanced", [("unbalanced", R)]),
    ("a (b", [("a ", 1.0), ("b", R)]),
    ("a [b", [("a ", 1.0), ("b", S)]),
    ("((a) b", [("a", R * R), (" b", R)]),
    ("a) b", [("a) b", 1.0)]),
    ("a] b", [("a] b", 1.0)]),
    ("(a] b)", [("a] b", R)]),
    # escapes
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("(\\(a\\))", [("(a)", R)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("\\(a:1.2\\)", [("(a:1.2)", 1.0)]),  # escaped: no weight
    # BREAK
    ("a BREAK b", [("a", 1.0), B, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), B, ("b", 1.0)]),
    ("BREAK", [("", 1.0), B, ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), B, ("", 1.0), B, ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # only the whole word
    ("a break b", [("a break b", 1.0)]),  # upper case only
    ("(a) BREAK (b)", [("a", R), ("", 1.0), B, ("", 1.0), ("b", R)]),  # BREAK takes the spaces around it
    # deliberate difference: BREAK inside brackets still breaks (the webui weights its marker, then tokenises "break")
    ("(a BREAK b)", [("a", R), B, ("b", R)]),
    # deliberate difference: a malformed number is text (the webui raises ValueError)
    ("(a:1.2.3)", [("a:1.2.3)", R)]),
]

# merged runs must hold the rule: no two neighbouring non-BREAK runs with equal weights
assert len(ATTENTION) >= 40


@pytest.mark.parametrize("text,expected", ATTENTION)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_equal_weight_runs_merge_exactly():
    # webui compares weights exactly: 1.1*1.1 from two brackets equals ((x)), so these merge
    assert parse_prompt_attention("((a))((b))") == [("ab", 1.1 * 1.1)]
    # (a:1.21) is a different float from 1.1*1.1: no merge
    runs = parse_prompt_attention("((a))(b:1.21)")
    assert len(runs) == 2


# ---------------------------------------------------------------------------------------------- schedules

SCHEDULES_10 = [  # get_learned_conditioning_prompt_schedules([p], 10)[0] doctests
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # the doctest marked "not handling this right now": with lark 1.x the webui finds no schedule at all
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    # more: [a::N] removes, [a:b:N] swaps, fractions with a decimal point
    ("a [b::3] c", [(3, "a b c"), (10, "a  c")]),
    ("[cat:dog:0.5]", [(5, "cat"), (10, "dog")]),
    ("[cat:dog:5]", [(5, "cat"), (10, "dog")]),
    ("[cat:dog:20]", [(10, "cat")]),  # beyond the end: never switches
    ("[cat:dog:0]", [(10, "dog")]),
    ("[cat:dog:1.0]", [(10, "cat")]),  # "1.0" is a fraction: 1.0 * 10 = 10
    ("[a:b:3] [c:d:7]", [(3, "a c"), (7, "b c"), (10, "b d")]),
    ("[a:b:3 ]", [(3, "a"), (10, "b")]),
    ("[a:b:1e1]", [(10, "a")]),  # a number with an exponent, no '.': a step count
    ("(a [b:c:2])", [(2, "(a b)"), (10, "(a c)")]),
    ("[a:b]", [(10, "[a:b]")]),  # no number: not editing, the text stays
    ("a | b", [(10, "a | b")]),  # a '|' outside [] makes the prompt unparsable: used as is
    ("a | [b:3]", [(10, "a | [b:3]")]),
]


@pytest.mark.parametrize("prompt,expected", SCHEDULES_10)
def test_prompt_schedule_10_steps(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_prompt_schedule_fantasy_landscape_100_steps():
    """The example at the top of the webui's prompt_parser.py."""
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_prompt_schedule_hires_and_old_scheduling():
    # doctests with hires_steps=10: fractions count in the second pass (1.5 -> half of it)
    assert prompt_schedule("a [b:.5] c", 10, 10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    # the older rule: a number < 1 is a fraction, any other number a step count
    assert prompt_schedule("[cat:dog:1.5]", 10, use_old_scheduling=True) == [(1, "cat"), (10, "dog")]
    assert prompt_schedule("[cat:dog:1.5]", 10) == [(10, "cat")]


def test_prompt_schedule_alternation_with_few_steps():
    assert prompt_schedule("[a|b|c]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "a")]
    assert prompt_schedule("[a|b]", 1) == [(1, "a")]


def test_prompt_schedule_never_raises_on_odd_numbers():
    assert prompt_schedule("[a:b:1e999]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:-1e999]", 10) == [(10, "b")]


# ---------------------------------------------------------------------------------------------- AND parts

@pytest.mark.parametrize("prompt,expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),  # trailing spaces go, leading stay
    ("a cat:1.2 AND a dog :0.5", [("a cat", 1.2), (" a dog", 0.5)]),
    ("a AND b AND c:-1", [("a", 1.0), (" b", 1.0), (" c", -1.0)]),
    ("sand ANDROID", [("sand ANDROID", 1.0)]),  # only the whole word, upper case
    ("a and b", [("a and b", 1.0)]),
    ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),  # a weight inside brackets is not the part's weight
    ("a:.5", [("a", 0.5)]),
    ("line one\nline two:2", [("line one\nline two", 2.0)]),
    ("", [("", 1.0)]),
])
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# ------------------------------------------------------------------------------------------------- chunks

SD1 = clip_tokenizer()
SD2 = clip_tokenizer("!")
CAT = SD1("cat", add_special_tokens=False)["input_ids"][0]
DOG = SD1("dog", add_special_tokens=False)["input_ids"][0]
COMMA = SD1(",", add_special_tokens=False)["input_ids"][0]
SPEC = tokenizer_spec(SD1)


def _runs(*parts):
    """(token ids, weight) parts -> runs and their token lists, as chunk_runs takes them."""
    return [("x", w) if ids is not None else BREAK for ids, w in parts], [ids or [] for ids, _ in parts]


def _chunks(*parts):
    runs, ids = _runs(*parts)
    return chunk_runs(runs, ids, SPEC)


def _text(chunk: Chunk) -> list[int]:
    return [t for t in chunk.tokens[1:] if t != EOS_ID]


def test_comma_token_id():
    assert COMMA == 267 and SPEC.comma == 267


def test_exactly_75_tokens_is_one_chunk():
    (chunk,) = _chunks(([CAT] * 75, 1.0))
    assert chunk.tokens == (BOS_ID, *[CAT] * 75, EOS_ID)
    assert len(chunk.tokens) == len(chunk.weights) == 77


def test_76_tokens_is_two_chunks():
    first, second = _chunks(([CAT] * 76, 1.0))
    assert first.tokens == (BOS_ID, *[CAT] * 75, EOS_ID)
    assert second.tokens == (BOS_ID, CAT, *[EOS_ID] * 75)


def test_comma_within_the_last_20_tokens_moves_the_rest():
    first, second = _chunks(([CAT] * 70 + [COMMA] + [DOG] * 10, 1.0))
    assert _text(first) == [CAT] * 70 + [COMMA]
    assert first.tokens[72:] == (EOS_ID,) * 5
    assert _text(second) == [DOG] * 10


def test_comma_backtrack_limit_is_20():
    # the comma at index 55: 75 - 55 = 20 -> backtrack
    first, second = _chunks(([CAT] * 55 + [COMMA] + [DOG] * 30, 1.0))
    assert _text(first) == [CAT] * 55 + [COMMA] and _text(second) == [DOG] * 30
    # the comma at index 54: 21 tokens back -> no backtrack, a hard cut at 75
    first, second = _chunks(([CAT] * 54 + [COMMA] + [DOG] * 30, 1.0))
    assert _text(first) == [CAT] * 54 + [COMMA] + [DOG] * 20 and _text(second) == [DOG] * 10
    # comma_backtrack=0 turns it off
    runs, ids = _runs(([CAT] * 70 + [COMMA] + [DOG] * 10, 1.0))
    first, second = chunk_runs(runs, ids, SPEC, comma_backtrack=0)
    assert len(_text(first)) == 75


def test_moved_tokens_keep_their_weights():
    first, second = _chunks(([CAT] * 70 + [COMMA], 1.0), ([DOG] * 10, 1.5))
    assert second.weights[:12] == (1.0, *[1.5] * 10, 1.0)
    assert first.weights == (1.0,) * 77


def test_break_forces_a_new_chunk():
    first, second = _chunks(([CAT] * 3, 1.0), (None, None), ([DOG] * 2, 1.0))
    assert _text(first) == [CAT] * 3 and _text(second) == [DOG] * 2
    # a BREAK after exactly 75 tokens closes that full chunk (no empty chunk between)
    chunks = _chunks(([CAT] * 75, 1.0), (None, None), ([DOG], 1.0))
    assert [len(_text(c)) for c in chunks] == [75, 1]
    # two BREAKs in a row leave an empty chunk
    chunks = _chunks(([CAT], 1.0), (None, None), (None, None), ([DOG], 1.0))
    assert [len(_text(c)) for c in chunks] == [1, 0, 1]


def test_empty_prompt_is_one_padded_chunk():
    (sd1,) = tokenize_prompt("", SD1)
    assert sd1.tokens == (BOS_ID, *[EOS_ID] * 76) == empty_chunk(SPEC).tokens
    (sd2,) = tokenize_prompt("", SD2)
    assert sd2.tokens == (BOS_ID, EOS_ID, *[0] * 75)  # OpenCLIP: "!" (id 0) after the EOS


def test_sd2_pads_with_its_pad_token_after_eos():
    (chunk,) = tokenize_prompt("a cat", SD2)
    assert chunk.tokens[:4] == (BOS_ID, 320, CAT, EOS_ID) and set(chunk.tokens[4:]) == {0}
    # the same ids as the diffusers tokenizer call (padding="max_length")
    assert list(chunk.tokens) == SD2("a cat", padding="max_length", max_length=77)["input_ids"]


def test_tokenize_prompt_weights_and_runs():
    (chunk,) = tokenize_prompt("a (red:1.5) [cat]", SD1)
    assert chunk.tokens[:5] == (BOS_ID, 320, SD1("red", add_special_tokens=False)["input_ids"][0], CAT, EOS_ID)
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, pytest.approx(1 / 1.1), 1.0)
    assert chunk.weighted and not tokenize_prompt("a red cat", SD1)[0].weighted


def test_tokenize_prompt_long_and_break():
    chunks = tokenize_prompt("cat " * 70 + ", " + "dog " * 10, SD1)
    assert [_text(c) for c in chunks] == [[CAT] * 70 + [COMMA], [DOG] * 10]  # cut after the comma
    assert len(tokenize_prompt("a cat BREAK a dog", SD1)) == 2
    assert len(tokenize_prompt("BREAK a dog", SD1)) == 2  # a leading BREAK leaves an empty first chunk
    assert all(len(c.tokens) == CHUNK_LENGTH + 2 for c in chunks)


# ------------------------------------------------------------------------------------------- properties

SYNTAX = st.lists(st.sampled_from(list("ab ()[]:|\\.15-,\n") + [" BREAK ", " AND "]), max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(SYNTAX, st.integers(1, 30))
def test_schedule_is_total_and_ordered(prompt, steps):
    schedule = prompt_schedule(prompt, steps)
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
    if "[" not in prompt:
        assert schedule == [(steps, prompt)]


@settings(max_examples=300, deadline=None)
@given(SYNTAX)
def test_attention_is_total_and_keeps_plain_text(text):
    runs = parse_prompt_attention(text)
    assert runs
    for (a, wa), (b, wb) in zip(runs, runs[1:]):
        assert BREAK in ((a, wa), (b, wb)) or wa != wb  # merged
    if "BREAK" not in text and not any(c in text for c in "\\()[]:"):
        assert runs == [(text, 1.0)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from([CAT, DOG, COMMA]), max_size=90), st.sampled_from([1.0, 1.5])),
                max_size=4))
def test_chunks_keep_every_token_in_order(parts):
    runs = [("x", w) for _, w in parts]
    chunks = chunk_runs(runs, [ids for ids, _ in parts], SPEC)
    assert all(len(c.tokens) == len(c.weights) == 77 and c.tokens[0] == BOS_ID for c in chunks)
    assert [t for c in chunks for t in _text(c)] == [t for ids, _ in parts for t in ids]
    weights = [w for c in chunks for t, w in zip(c.tokens[1:], c.weights[1:]) if t != EOS_ID]
    assert weights == [w for ids, w in parts for _ in ids]


# the submit-time fast path (engine.conditioning.most_chunks): an ASCII prompt is never tokenised into more
# chunks than the bound, whatever its commas, BREAKs, weights and schedules; otherwise check_prompts would let
# through a prompt the worker then refuses
_ascii_prompts = st.lists(st.one_of(
    st.sampled_from([",", " ", "BREAK", " BREAK ", "(", ")", "[", "]", ":1.3", "|", " AND ", "a", "cat,", "!!!!",
                     "supercalifragilistic", "0.5", "\\(", "<lora:x:1>", "...", "\t\n"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)), max_size=60).map("".join)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(text=_ascii_prompts)
def test_most_chunks_bounds_the_tokenizer(text):
    from engine.conditioning import most_chunks

    for tokenizer in (SD1, SD2):
        assert len(tokenize_prompt(text, tokenizer)) <= most_chunks(text)
    assert most_chunks(text + "é") is None  # no cheap bound beyond ASCII: tokenised


def test_most_chunks_bound_is_tight_enough():
    from engine.conditioning import most_chunks

    assert most_chunks("") == 1 and most_chunks("a, " * 40) == 3 and most_chunks("a BREAK b") == 2
    # the default limit (32 chunks) is only tokenised beyond ~1,700 ASCII characters
    assert most_chunks("word " * 340) <= 32

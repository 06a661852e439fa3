"""The webui infotext: the `parameters` text stored in each PNG, and the info dict of sd_get_result.

Format as the webui (v1.10, modules/processing.py create_infotext):
``prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, ...``
Values holding ``,``, ``:`` or ``"`` are quoted with JSON string syntax, as the webui's ``quote`` does.
"""

from __future__ import annotations

import json
from typing import Any


def quote(value: Any) -> str:
    text = _fmt(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if value == value and abs(value) < 1e15 else str(value)
    return str(value)


def create_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """``params`` in display order; entries whose value is None are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return f"{text}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of :func:`create_infotext` for our own output (prompt, negative prompt, params as strings)."""
    *head, last = text.split("\n")
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in head:
        if line.startswith("Negative prompt: "):
            in_neg = True
            line = line[len("Negative prompt: "):]
        (neg_lines if in_neg else prompt_lines).append(line)
    params: dict[str, str] = {}
    i = 0
    while i < len(last):
        key_end = last.index(": ", i)
        key = last[i:key_end]
        j = key_end + 2
        if j < len(last) and last[j] == '"':
            value, consumed = json.JSONDecoder().raw_decode(last[j:])
            j += consumed
        else:
            k = last.find(", ", j)
            k = len(last) if k < 0 else k
            value = last[j:k]
            j = k
        params[key] = value
        i = j + 2 if last.startswith(", ", j) else len(last)
    return "\n".join(prompt_lines), "\n".join(neg_lines), params

"""Prompt styles as the webui keeps and applies them (v1.9 ``modules/styles.py``): ``styles.csv`` in the data
folder (``$SDENGINE_HOME``; columns ``name,prompt,negative_prompt``, the webui's file as is), a style's prompt
merged into the request's (``{prompt}`` replaced by it, else appended after ", "), in the order the request
names them, for the negative prompt alike."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidRequest
from engine.config import sdengine_home

log = logging.getLogger(__name__)

STYLES_FILE = "styles.csv"
MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def styles_path(home: str | Path | None = None) -> Path:
    return Path(home) / STYLES_FILE if home is not None else sdengine_home() / STYLES_FILE


def load_styles(path: str | Path | None = None) -> dict[str, Style]:
    """The styles of ``path`` (default: the data folder's styles.csv) by name, in file order; {} without one.
    As the webui: rows without a name are skipped, a later row of a name replaces an earlier one."""
    path = Path(path) if path is not None else styles_path()
    try:
        if path.stat().st_size > MAX_BYTES:
            log.warning("%s is over %d bytes; no styles read", path, MAX_BYTES)
            return {}
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("cannot read the styles file %s: %s", path, exc)
        return {}
    out: dict[str, Style] = {}
    for row in csv.DictReader(io.StringIO(text), skipinitialspace=True):
        name = (row.get("name") or "").strip()
        if name:
            out[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return out


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """webui ``merge_prompts``: the style's ``{prompt}`` replaced by the prompt, else both joined by ", "."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, names: list[str] | tuple[str, ...],
                 styles: dict[str, Style], field: str = "styles") -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order. A name that is not a style is an
    error naming ``styles[i]`` (the webui skips it silently: a misspelt style would change nothing unseen)."""
    for i, name in enumerate(names):
        style = styles.get(name)
        if style is None:
            raise InvalidRequest(f"{field}[{i}]", f"no prompt style {str(name)[:100]!r} in {STYLES_FILE}",
                                 ", ".join(list(styles)[:50]) or f"none: {STYLES_FILE} in the data folder has no styles")
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt

"""The leniency policy of both payload faces (``/scc`` and ``/sdapi/v1``), written once (docs/DECISIONS.md,
"Leniency policy"). It is about the shape of a payload only -- the engine never sees a field it does not know --
so it lives in api_compat, beside the schema, and not in :mod:`engine.rules` (which holds what a request *means*).

1. **Unknown fields are ignored**, as the webui's request models and sd-webui-controlnet's unit model ignore
   them, at every level the schema has (the top level, ``override_settings``, ``alwayson_scripts.controlnet``,
   a ControlNet unit); each is named in the result's ``info.warnings`` and in the server log
   (:func:`ignored_warning`). ``strict`` (``sdengine serve --strict``, ``TaskService(strict=True)``) makes them an
   ``unknown_field`` error naming the field, with a "did you mean".
2. **A known field that asks for something the engine does not do stays an error** naming the field
   (``styles``, ``restore_faces: true`` with no face-restoration model installed, an enabled extension script of
   :data:`SCRIPTS`): ignoring it
   would answer a different image than the one asked for.
3. **Inert values are accepted** silently: the webui's defaults of features the engine lacks, fields that only
   act on models the engine does not run (``image_cfg_scale``: instruct-pix2pix models only), extension
   scripts in their disabled form (:data:`SCRIPTS`).

``alwayson_scripts`` entries are not fields but scripts: one the engine neither runs nor knows (:data:`SCRIPTS`)
is refused as the webui refuses a script it does not have ("always on script ... not found"), in both modes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from api_compat.errors import ApiError

log = logging.getLogger(__name__)

MAX_WARNINGS = 32  # ignored fields named one by one; more are counted


def ignored_warning(path: str) -> str:
    """The ``info.warnings`` entry of an unknown field that was ignored."""
    return f"{path}: unknown field, ignored (sdengine serve --strict refuses it)"


def ignored_warnings(paths: Sequence[str]) -> tuple[str, ...]:
    out = [ignored_warning(p) for p in paths[:MAX_WARNINGS]]
    if len(paths) > MAX_WARNINGS:
        out.append(f"... and {len(paths) - MAX_WARNINGS} more unknown fields, ignored")
    return tuple(out)


# ------------------------------------------------------------------------------------- unknown fields
def _key_in(data: dict, key: Any) -> Any:
    """``key`` of ``data``, or the key the schema renamed to it (script titles match case-insensitively)."""
    if key in data or not isinstance(key, str):
        return key
    for k in data:
        if isinstance(k, str) and k.lower() == key.lower():
            return k
    return key


def without(payload: Any, locations: Sequence[tuple[Any, ...]]) -> Any:
    """A copy of ``payload`` without the keys at ``locations`` (pydantic error locations); the objects on the way
    are copied, the rest shared."""
    if not locations:
        return payload
    out = dict(payload)
    by_head: dict[Any, list[tuple[Any, ...]]] = {}
    for loc in locations:
        by_head.setdefault(loc[0], []).append(loc[1:])
    for head, rests in by_head.items():
        if isinstance(out, dict):
            key = _key_in(out, head)
            if any(not r for r in rests):
                out.pop(key, None)
                continue
            child = out.get(key)
        else:
            continue
        if isinstance(child, dict):
            out[key] = without(child, rests)
        elif isinstance(child, list):
            items = list(child)
            by_index: dict[int, list[tuple[Any, ...]]] = {}
            for rest in rests:
                if rest and isinstance(rest[0], int):
                    by_index.setdefault(rest[0], []).append(rest[1:])
            for i, sub in by_index.items():
                if 0 <= i < len(items) and isinstance(items[i], dict) and all(sub):
                    items[i] = without(items[i], sub)
            out[key] = items
    return out


# ---------------------------------------------------------------------------------- extension scripts
@dataclass(frozen=True)
class Script:
    """A popular webui extension (or built-in) script a client may send under ``alwayson_scripts``; the engine
    does not run it, and accepts it only in its disabled form. ``title`` is the script's title as the webui
    matches it (case-insensitive; ``prefix``: any title starting so, as "Dynamic Prompts v2.17.1");
    ``disabled(args)`` reads its args as the extension does."""

    title: str
    disabled: Callable[[list[Any]], bool]
    disabled_form: str  # how a client sends it disabled (in errors)
    prefix: bool = False

    def matches(self, name: str) -> bool:
        name = name.strip().lower()
        return name.startswith(self.title.lower()) if self.prefix else name == self.title.lower()


def _flag_off(index: int = 0, default: bool = False) -> Callable[[list[Any]], bool]:
    """The script's enable checkbox is its ``index``-th arg (``default`` when the args stop before it, as the
    webui fills a script's missing args with its UI defaults)."""

    def off(args: list[Any]) -> bool:
        value = args[index] if len(args) > index else default
        return value is False or value is None or value == 0

    return off


SCRIPTS: tuple[Script, ...] = (
    Script("Dynamic Prompts", _flag_off(0, default=True), '{"args": [false]} (is_enabled)', prefix=True),
    Script("Regional Prompter", _flag_off(0), '{"args": [false]} (active)'),
    Script("Self Attention Guidance", _flag_off(0), '{"args": [false]} (enabled)'),
    Script("Tiled Diffusion", _flag_off(0), '{"args": [false]} (enabled)'),
    Script("Tiled VAE", _flag_off(0), '{"args": [false]} (enabled)'),
    Script("Refiner", _flag_off(0), '{"args": [false]} (the webui\'s built-in refiner script; the refiner itself: '
                                    'refiner_checkpoint, refiner_switch_at)'),
    Script("Soft Inpainting", _flag_off(0), '{"args": [false]} (the webui\'s built-in soft inpainting)'),
)

KNOWN_SCRIPTS = ("controlnet", "adetailer")  # the alwayson_scripts the engine runs (api_compat.schema.AlwaysOnScripts)


def script_of(name: str) -> Script | None:
    return next((s for s in SCRIPTS if s.matches(name)), None)


def _args(value: Any) -> list[Any] | None:
    if value is None:
        return []
    if isinstance(value, dict):
        args = value.get("args", [])
        return [] if args is None else args if isinstance(args, list) else None
    return None


def check_scripts(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` without the :data:`SCRIPTS` entries of ``alwayson_scripts`` that are disabled; an enabled one
    is a ``not_supported`` ApiError naming ``alwayson_scripts.<title>``, as is a script that is neither one of
    those nor one the engine runs (the webui's "always on script ... not found")."""
    scripts = payload.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return payload
    kept = {}
    for name, value in scripts.items():
        if not isinstance(name, str) or name.lower() in KNOWN_SCRIPTS:
            kept[name] = value
            continue
        script = script_of(name)
        field = f"alwayson_scripts.{name[:100]}"
        if script is None:
            raise ApiError("not_supported", f"the script {name[:100]!r} is not available in this engine", field,
                           "controlnet, ADetailer; in their disabled form: " + ", ".join(s.title for s in SCRIPTS))
        args = _args(value)
        if args is None:
            raise ApiError("invalid_request", 'must be {"args": [...]}', field, script.disabled_form)
        if not script.disabled(args):
            raise ApiError("not_supported", f"not supported: {script.title} is enabled; this engine does not "
                           "implement it", field, f"leave it out, or send it disabled: {script.disabled_form}")
        log.debug("alwayson_scripts.%s is disabled; ignored", name)
    return {**payload, "alwayson_scripts": kept}

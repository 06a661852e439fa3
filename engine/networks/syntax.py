"""Extra-network tags in prompts, by the webui rules (``modules/extra_networks.py`` and the Lora extension).

``<lora:NAME:MULT>`` activates the LoRA ``NAME``; the tags are cut out of the prompt text before it is
parsed any further, so a tag inside a prompt-editing schedule (``[a <lora:x:1>:b:5]``) or an AND part still
activates its network for the whole generation and never reaches the text encoder.

Arguments (webui ``networks.activate``): ``<lora:NAME>`` (1.0 on both), ``<lora:NAME:M>`` (M on both),
``<lora:NAME:TE:UNET>``, named ``te=`` / ``unet=`` overriding the positional ones (``<lora:NAME:0.5:unet=1>``).
``<lyco:...>`` is the LyCORIS extension's alias of ``<lora:...>``. The same network named twice is applied
twice, so its multipliers add up (webui behaviour).

Deliberate differences from the webui, where it silently does something else than the user asked:

- A malformed tag of a known kind (``<lora:>``, ``<lora:x:abc>``, an unknown named argument) is an
  :class:`InvalidRequest` naming the prompt field; the webui raises a bare ``ValueError`` or ignores it.
- ``dyn=`` (the LyCORIS dynamic-rank cut) and ``<hypernet:...>`` are refused instead of ignored.
Tags of other kinds (``<foo:bar>``) are removed and ignored with a warning, as the webui does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from core.errors import InvalidRequest
from engine.rules import LORA_MULTIPLIER

log = logging.getLogger(__name__)

# webui: re_extra_net = re.compile(r"<(\w+):([^>]+)>")
_TAG = re.compile(r"<(\w+):([^>]+)>")
# a tag of a known kind that the webui's pattern does not even match (empty arguments)
_EMPTY_TAG = re.compile(r"<(lora|lyco):\s*>", re.I)
LORA_KINDS = ("lora", "lyco")
UNSUPPORTED_KINDS = ("hypernet",)
_NAMED = ("te", "unet")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<lora:...>`` tag: the network name and its text-encoder and UNet multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with its extra-network tags removed, and the tags in order of appearance."""

    text: str
    loras: tuple[NetworkTag, ...] = ()


def _float(value: str, field: str, tag: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(field, f"{tag}: {what} {value!r} is not a number",
                             "<lora:NAME>, <lora:NAME:MULT>, <lora:NAME:TE:UNET>, <lora:NAME:te=X:unet=Y>") from None
    r = LORA_MULTIPLIER
    if not r.lo <= number <= r.hi:  # NaN and infinities too
        raise InvalidRequest(field, f"{tag}: {what} {value.strip()!r} is out of range",
                             f"a number from {r.lo:g} to {r.hi:g}")
    return number


def parse_lora_tag(args: str, field: str, tag: str) -> NetworkTag:
    """The arguments of one ``<lora:ARGS>`` tag (webui ``ExtraNetworkParams`` + ``networks.activate``)."""
    positional, named = [], {}
    for item in args.split(":"):
        if "=" in item:
            key, value = item.split("=", 1)
            named[key.strip()] = value
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise InvalidRequest(field, f"{tag}: the LoRA name is empty", "<lora:NAME> with NAME a file in models/Lora")
    unknown = [k for k in named if k not in _NAMED]
    if "dyn" in named or len(positional) > 3:
        raise InvalidRequest(field, f"{tag}: the dynamic rank argument (dyn) is not supported", "te=, unet=")
    if unknown:
        raise InvalidRequest(field, f"{tag}: unknown argument {unknown[0]!r}", "te=, unet=")
    te = _float(positional[1], field, tag, "multiplier") if len(positional) > 1 else 1.0
    te = _float(named["te"], field, tag, "te multiplier") if "te" in named else te
    unet = _float(positional[2], field, tag, "unet multiplier") if len(positional) > 2 else te
    unet = _float(named["unet"], field, tag, "unet multiplier") if "unet" in named else unet
    return NetworkTag(name, te, unet)


def parse_prompt(prompt: str, field: str = "prompt") -> ParsedPrompt:
    """Cut the extra-network tags out of ``prompt`` (webui ``extra_networks.parse_prompt``)."""
    if m := _EMPTY_TAG.search(prompt):
        raise InvalidRequest(field, f"{m.group(0)}: the LoRA name is empty",
                             "<lora:NAME> with NAME a file in models/Lora")
    loras: list[NetworkTag] = []

    def found(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        if kind.lower() in LORA_KINDS:
            loras.append(parse_lora_tag(args, field, m.group(0)))
        elif kind.lower() in UNSUPPORTED_KINDS:
            raise InvalidRequest(field, f"{m.group(0)}: {kind} networks are not supported", "<lora:...>, <lyco:...>")
        else:
            log.warning("%s: skipping unknown extra network %r (as the webui does)", field, kind)
        return ""

    text = _TAG.sub(found, prompt)
    return ParsedPrompt(text, tuple(loras))


def strip_networks(prompt: str) -> str:
    """The prompt without its tags (no validation): what the webui encodes when networks are disabled."""
    return _TAG.sub("", prompt)

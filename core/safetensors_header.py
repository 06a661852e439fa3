"""The safetensors header, read and written in one place, without reading tensors or importing safetensors.

A safetensors file is ``u64 little-endian n`` + ``n`` bytes of JSON (``{name: {dtype, shape, data_offsets}}`` and
an optional ``"__metadata__"`` of strings) + the tensor bytes; data offsets are relative to the end of the
header, so a new header (other metadata) keeps every tensor byte as it is.

- :func:`read_safetensors_header` parses and validates a header (:class:`Header`: shapes, dtypes, metadata);
- :func:`data_sha256` hashes the tensor bytes (the webui's LoRA "addnet" hash, the model card's data check);
- :func:`write_metadata` adds or replaces metadata atomically, :func:`sort_metadata` rewrites a header in place
  with sorted metadata keys (deterministic bytes, so a deterministic file hash).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Mapping

from core.atomic import atomic_file
from core.errors import ModelError

METADATA = "__metadata__"
MAX_HEADER = 100 * 1024 * 1024
HEADER_ALIGN = 8  # new headers are padded with spaces to a multiple of this
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_LENGTH = struct.Struct("<Q")
_COPY_CHUNK = 1 << 22


@dataclass(frozen=True)
class Header:
    """The safetensors header: tensor shapes and the string metadata."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors dtype names (F32, F16, BF16, ...)


def read_raw(f: IO[bytes]) -> tuple[int, dict[str, Any]]:
    """``(n, header dict)`` from a binary file at offset 0 (no validation); the file is left at the data."""
    (n,) = _LENGTH.unpack(f.read(_LENGTH.size))
    return n, json.loads(f.read(n))


def encode(header: Mapping[str, Any], metadata: Mapping[str, str] | None) -> bytes:
    """Compact JSON of a header (tensor entries as given) with ``metadata`` first, keys sorted (None: none)."""
    ordered = ({METADATA: dict(sorted(metadata.items()))} if metadata is not None else {}) | dict(header)
    return json.dumps(ordered, separators=(",", ":")).encode()


def read_safetensors_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header without reading tensors.

    Raises :class:`ModelError` naming the file when the header is malformed or the file is shorter than the
    header says (a truncated download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(_LENGTH.size)
            if len(raw) < _LENGTH.size:
                raise ModelError(path, f"not a safetensors file: only {len(raw)} bytes (truncated or empty)")
            (n,) = _LENGTH.unpack(raw)
            if n > MAX_HEADER or n + 8 > size:
                raise ModelError(path, f"corrupt or truncated safetensors file: header of {n} bytes, file of {size}")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise ModelError(path, f"cannot read file: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(path, f"corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelError(path, "corrupt safetensors header: not a JSON object")
    metadata = header.pop(METADATA, None) or {}
    shapes, dtypes, end = {}, {}, 0
    for name, info in header.items():
        try:
            shapes[name] = tuple(int(s) for s in info["shape"])
            dtypes[name] = str(info["dtype"])
            start, stop = (int(o) for o in info["data_offsets"])
            nbytes = math.prod(shapes[name]) * DTYPE_SIZES.get(info["dtype"], 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(path, f"corrupt safetensors header entry {name!r}: {exc}") from exc
        if stop - start != nbytes and info["dtype"] in DTYPE_SIZES:
            raise ModelError(path, f"corrupt safetensors header: tensor {name!r} has {stop - start} bytes, needs {nbytes}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise ModelError(path, f"truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")
    return Header(shapes, {str(k): str(v) for k, v in metadata.items()}, dtypes)


def data_sha256(path: str | os.PathLike) -> str:
    """sha256 of the tensor bytes of a safetensors file (everything after the header)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = _LENGTH.unpack(f.read(_LENGTH.size))
        f.seek(_LENGTH.size + n)
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_metadata(path: str | os.PathLike, updates: Mapping[str, str]) -> Path:
    """Add or replace string metadata of the safetensors file ``path``, atomically; tensors stay byte-identical.

    The new header keeps the tensor entries as they are (their offsets are relative to the data section) and
    sorts the metadata keys (deterministic bytes, so a deterministic webui hash)."""
    path = Path(path)
    with open(path, "rb") as src:
        _, header = read_raw(src)
        meta = {str(k): str(v) for k, v in (header.pop(METADATA, None) or {}).items()}
        meta.update({str(k): str(v) for k, v in updates.items()})
        text = encode(header, meta)
        text += b" " * (-len(text) % HEADER_ALIGN)
        with atomic_file(path, mode_of=path) as dst:
            dst.write(_LENGTH.pack(len(text)))
            dst.write(text)
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
    return path


def sort_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header in place with sorted metadata keys (same length, padded with spaces).

    safetensors stores ``__metadata__`` from a hash map, so its key order (and the file's bytes and hash)
    changes from process to process; sorted keys make the file, and its hash, deterministic.
    """
    with open(path, "r+b") as f:
        n, header = read_raw(f)
        meta = header.pop(METADATA, None)
        text = encode(header, meta or None)
        if len(text) > n:  # cannot happen (same content, compact JSON); keep the file as written
            return
        f.seek(_LENGTH.size)
        f.write(text + b" " * (n - len(text)))

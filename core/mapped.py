"""Resident pages of memory-mapped files, dropped while a block reads them (Linux ``madvise``).

Weights read through a file mapping (a safetensors checkpoint's torch tensors, an ONNX graph's external data
read by OpenVINO's frontend, an OpenVINO IR's ``model.bin``) count in the resident set once touched, and stay
there while the mapping lives, beside the copy the reader makes of them (an ONNX export, an IR conversion, a
compile). Clean pages of a file mapping can be dropped at any time: a later read faults them back from the
page cache, so dropping them is transparent (:func:`drop_mapped_pages`), and dropping them every few tens of
milliseconds while a block reads them bounds the mapped share of the block's peak
(:func:`dropping_mapped_pages`). A private mapping some page of which was written (copy-on-write: its
``Anonymous`` pages in ``/proc/self/smaps``) is never touched: dropping would lose the written bytes. A
shared mapping's pages are the file's own: dropped like a read-only one.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux <sys/mman.h>


@functools.cache
def _libc():
    """libc with ``madvise`` typed (loaded once: :func:`dropping_mapped_pages` calls it every 50 ms)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _read(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def _header(line: str):
    """``(start, end, perms, path)`` of a ``/proc/self/maps`` (or smaps header) line naming a file, else None."""
    parts = line.split(maxsplit=5)
    if len(parts) < 6 or ":" in parts[0] or "-" not in parts[0] or not parts[5].startswith("/"):
        return None
    start, end = (int(x, 16) for x in parts[0].split("-"))
    return start, end, parts[1], parts[5].strip()


def _private_writable(perms: str) -> bool:
    """A private writable mapping: its written pages are copies only it holds (a shared one writes the file)."""
    return "w" in perms and perms.endswith("p")


def _mappings(wanted) -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of this process's file mappings whose path ``wanted(path)`` accepts and none of
    whose pages is a private written copy: read-only and shared ones, and private writable ones whose
    ``Anonymous`` pages (in ``/proc/self/smaps``, read only when there is such a mapping: it walks the page
    tables) are none."""
    found = [h for h in map(_header, _read("/proc/self/maps")) if h and wanted(h[3])]
    if not any(_private_writable(perms) for _, _, perms, _ in found):
        return [(start, end, path) for start, end, _, path in found]
    clean, current = [], None
    for line in _read("/proc/self/smaps"):
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in first and ":" not in first:  # a mapping's header line (of a file or not)
            head = _header(line)
            current = list(head) if head and wanted(head[3]) else None
            if current is not None:
                clean.append(current)
        elif current is not None and first == "Anonymous:" and int(line.split()[1]) > 0 \
                and _private_writable(current[2]):
            current[3] = None  # written pages: never dropped
    return [(start, end, path) for start, end, _, path in clean if path is not None]


def drop_mapped_pages(*paths, suffixes: tuple[str, ...] = ()) -> int:
    """Drop this process's resident pages of the file mappings of ``paths`` and of every mapped file whose name
    ends with one of ``suffixes`` (``madvise(MADV_DONTNEED)``); returns the bytes of the mappings. Private
    mappings with written (copy-on-write) pages are left alone. Linux only (elsewhere: 0, nothing done)."""
    if not sys.platform.startswith("linux"):
        return 0
    targets = {os.path.realpath(p) for p in paths}

    def wanted(path: str) -> bool:
        return path in targets or (bool(suffixes) and path.endswith(tuple(suffixes)))

    libc = _libc()
    dropped = 0
    for start, end, path in _mappings(wanted):
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
        else:
            log.debug("madvise(%s): errno %d", path, ctypes.get_errno())
    return dropped


@contextmanager
def dropping_mapped_pages(*paths, suffixes: tuple[str, ...] = (), interval: float = 0.05):
    """Within the block, drop the mapped pages of ``paths`` / ``suffixes`` every ``interval`` seconds
    (:func:`drop_mapped_pages`), and once more at its end. A reader that copies each weight of a mapped file
    (an export, a conversion, a compile) would otherwise keep every page it has read resident until it
    returns, beside its copy: the SD1.5 UNet's f32 compile peaked at 6.7 GB (3.3 GB of mapped IR + 3.4 GB
    compiled), 3.4 GB after it. Dropping while it reads bounds the mapped share to what it reads in one
    interval; a page read again faults back from the page cache."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            drop_mapped_pages(*paths, suffixes=suffixes)

    thread = threading.Thread(target=loop, name="drop-mapped-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drop_mapped_pages(*paths, suffixes=suffixes)

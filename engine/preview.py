"""Live previews and the TAESD encode / decode methods (the webui's show_progress_type, sd_vae_encode_method,
sd_vae_decode_method).

:class:`ApproxModels` (one per Engine, kept between requests) holds the networks of ``models/VAE-approx/``
(engine.models.approx): TAESD / TAESDXL as a backend of their own (components ``taesd_decoder`` /
``taesd_encoder``, exported and run like every other component on the engine's backend kind, artefacts keyed by
the files' hashes), and the webui's "Approx NN" decoders (tiny torch modules, always torch on the CPU).

:class:`Previewer` (one per request with a preview sink) is the sampling loop's side of live previews. Every
``every_n_steps`` steps the sampling thread takes the current x0 prediction of the asked content (the Denoiser's
last call: the prompt's rows, the negative prompt's, or the CFG result) to the host, drops it in a one-slot
mailbox and goes on; a decoding thread of the previewer turns the newest latent into an RGB image (``method``)
and hands ``sink(step, image)`` the result. A slow decode never holds up sampling: a newer latent replaces one
not yet decoded. Cost on the sampling thread: one device -> host copy of (B, 4, h, w) every N steps
(benchmarks/previews.py measures the whole cost, decoding thread included).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from core.errors import InvalidRequest, ModelError
from engine.arrays import to_device, to_host
from engine.backends import create_backend
from engine.models.approx import (APPROX_NN_STEMS, FOLDER, TAESD_STEMS, cheap_approximation, find, load_approx_nn,
                                  load_taesd)
from engine.request import PREVIEW_CONTENTS, PREVIEW_METHODS, VAE_METHODS, LivePreview
from engine.tiling import decode as decode_latents

log = logging.getLogger(__name__)

# the VAE components TAESD stands in for (engine.tiling runs "vae_decoder" / "vae_encoder")
_TAESD_COMPONENT = {"vae_decoder": "taesd_decoder", "vae_encoder": "taesd_encoder"}

PreviewSink = Callable[[int, np.ndarray], None]  # (sampling step, RGB uint8 (H, W, 3))


def check_methods(encode: str, decode: str, preview: LivePreview | None) -> None:
    """The request's VAE methods and live-preview settings are the webui's values (InvalidRequest names the field)."""
    for name, value in (("vae_encode_method", encode), ("vae_decode_method", decode)):
        if value not in VAE_METHODS:
            raise InvalidRequest(name, f"unknown method {value!r}", ", ".join(VAE_METHODS))
    if preview is not None:
        if preview.method not in PREVIEW_METHODS:
            raise InvalidRequest("live_preview.method", f"unknown preview method {preview.method!r}",
                                 ", ".join(PREVIEW_METHODS))
        if preview.content not in PREVIEW_CONTENTS:
            raise InvalidRequest("live_preview.content", f"unknown preview content {preview.content!r}",
                                 ", ".join(PREVIEW_CONTENTS))
        if preview.every_n_steps < 1:
            raise InvalidRequest("live_preview.every_n_steps", f"{preview.every_n_steps} is out of range", ">= 1")


class ApproxModels:
    """TAESD backends and Approx NN modules per latent space ("sd", "sdxl"), loaded on first use."""

    def __init__(self, config, models_dir, progress=None):
        self.config = config
        self.models_dir = models_dir
        self.progress = progress
        self._lock = threading.Lock()
        self._taesd: dict[str, tuple[Any, threading.Lock]] = {}
        self._nn: dict[str, Any] = {}
        self._warned: set[str] = set()

    def taesd(self, space: str, field: str = "vae_decode_method"):
        """``(backend, lock)`` of TAESD (space "sd") or TAESDXL ("sdxl")."""
        with self._lock:
            if space not in self._taesd:
                allow = self.config.allow_pickle
                modules, hashes = {}, []
                for part in ("encoder", "decoder"):
                    stem = TAESD_STEMS[(space, part)]
                    found = find(self.models_dir, stem, "taesd", allow)
                    if found is None:
                        raise ModelError(f"{self.models_dir}/{FOLDER}/{stem}.safetensors",
                                         f"no {stem} file (nor a bundled one)", field)
                    modules[f"taesd_{part}"] = load_taesd(found.path, part, allow)
                    hashes.append(found.sha256)
                    log.info("%s: %s%s", stem, found.path, " (bundled)" if found.bundled else "")
                key = f"taesd-{space}-" + hashlib.sha256("".join(hashes).encode()).hexdigest()[:12]
                backend = create_backend(self.config, modules, model_hash=key, progress=self.progress, owned=True)
                self._taesd[space] = (backend, threading.Lock())
            return self._taesd[space]

    def run(self, space: str, field: str = "vae_decode_method"):
        """``run(component, feeds)`` that serves ``vae_decoder`` / ``vae_encoder`` with TAESD (for engine.tiling):
        one call at a time (the sampling thread and a preview thread may share it)."""
        backend, lock = self.taesd(space, field)

        def run(component: str, feeds):
            with lock:
                return backend.run(_TAESD_COMPONENT[component], feeds)

        return run

    def approx_nn(self, space: str):
        """The webui's Approx NN decoder of ``space``, or None when the file is not there (or a pickle without the
        opt-in)."""
        with self._lock:
            if space not in self._nn:
                found = find(self.models_dir, APPROX_NN_STEMS[space], "approx_nn", self.config.allow_pickle)
                self._nn[space] = None if found is None else load_approx_nn(found.path, self.config.allow_pickle)
            return self._nn[space]

    def preview_decoder(self, method: str, space: str, full_run, tiling, device: str):
        """``decode(latent (B, 4, h, w) numpy) -> (B, 3, H, W) floats in [0, 1]`` for a preview method. "Approx
        NN" without its file (never bundled: the webui downloads it, this engine does not) falls back to "Approx
        cheap", said once in the log: a fallback never costs more than what was asked (TAESD at 512x512 is some
        hundred times the Approx NN's work)."""
        if method == "Approx NN":
            module = self.approx_nn(space)
            if module is not None:
                return lambda latent: _run_torch(module, latent)
            if space not in self._warned:
                self._warned.add(space)
                log.warning("live previews: no Approx NN file %s.pt/.safetensors in %s/%s (or a pickle without "
                            "allow_pickle); previews use \"Approx cheap\" (or set show_progress_type to TAESD)",
                            APPROX_NN_STEMS[space], self.models_dir, FOLDER)
            method = "Approx cheap"
        if method == "Approx cheap":
            return lambda latent: cheap_approximation(latent, space)
        run = full_run if method == "Full" else self.run(space, "live_preview.method")
        return lambda latent: to_host(decode_latents(run, to_device(np.ascontiguousarray(latent, dtype=np.float32),
                                                                      device), tiling))


def _run_torch(module, latent: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = module(torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32)))
    return np.clip(out.numpy() * 0.5 + 0.5, 0.0, 1.0)


def grid(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> one RGB uint8 (H', W', 3) image: the batch in a grid (the webui's
    show_progress_grid), columns = ceil(sqrt(B))."""
    b, _, h, w = images.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    out = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    pixels = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(b):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i]
    return out


def select(last, content: str):
    """The x0 rows of ``content`` from a Denoiser's last call ``(x0 rows, StepConditioning, combined, negative
    rows run)``: the prompt's first row of each image (webui "Prompt"), the negative prompt's row, or the CFG
    result ("Combined"; also "Negative prompt" where no negative row ran: CFG scale <= 1)."""
    x0, cond, combined, negatives = last
    if content == "Prompt":
        return x0[[parts[0][0] for parts in cond.positive]]
    if content == "Negative prompt" and negatives:
        return x0[list(cond.negative)]
    return combined


class Previewer:
    """The sampling loop's side of live previews (see the module docstring)."""

    def __init__(self, settings: LivePreview, decode: Callable[[np.ndarray], np.ndarray], sink: PreviewSink):
        self.settings = settings
        self.decode = decode
        self.sink = sink
        self._cond = threading.Condition()
        self._slot: tuple[int, np.ndarray] | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._busy = False
        self.decoded = 0  # previews handed to the sink
        self.dropped = 0  # latents replaced before they were decoded

    def offer(self, step: int, last) -> None:
        """The sampling thread, after step ``step``: at the interval, the latent to the mailbox (a host copy)."""
        if last is None or step % self.settings.every_n_steps:
            return
        latent = np.array(to_host(select(last, self.settings.content)), dtype=np.float32, copy=True)
        with self._cond:
            if self._closed:
                return
            if self._slot is not None:
                self.dropped += 1
            self._slot = (step, latent)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="live-preview", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._slot is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                step, latent = self._slot
                self._slot, self._busy = None, True
            try:
                image = grid(self.decode(latent))
                with self._cond:
                    closed = self._closed
                if not closed:
                    self.sink(step, image)
                    self.decoded += 1
            except Exception:  # noqa: BLE001 - a failed preview never fails the request
                log.exception("live preview at step %d failed", step)
            finally:
                with self._cond:
                    self._busy = False

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the mailbox is decoded (tests, the benchmark)."""
        import time

        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if self._slot is None and not self._busy:
                    break
            if end is not None and time.monotonic() > end:
                break
            time.sleep(0.005)

    def close(self, wait: float = 0.0) -> None:
        """No more previews; the decoding thread ends after the decode it is in (waited up to ``wait`` s)."""
        with self._cond:
            self._closed = True
            self._slot = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and wait:
            thread.join(wait)

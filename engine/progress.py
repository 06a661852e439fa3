"""Progress of one generation, in phases, with an ETA measured from sampling steps only.

The engine calls ``progress(Progress)`` (``Engine.generate(request, progress=...)``) at each phase change,
at each exporter stage and after each sampling step. The phases, in order: ``loading`` (reading the model),
``exporting`` (building an ONNX / runtime artefact, first use of a component only; it may interrupt any other
phase and has its own ``done/total``), ``preprocessing`` (ControlNet units' preprocessors, when a request has
units), ``encoding`` (prompts), ``sampling`` (``step/steps`` over all batches),
``decoding`` (VAE), ``detailing`` (ADetailer's detection and inpaint passes, engine.adetailer), ``saving`` (the caller's; api_compat's service writes the PNGs).

The ETA is the median time of the sampling steps measured so far times the steps left: one slow step (a
first run that builds a session, an export, a ControlNet that starts at a later step) does not skew it, and
loading or exports before sampling are never counted.

A callback of two positional parameters (the old ``progress(done, total)``) is still accepted: it gets the
sampling steps only (:func:`as_callback`).
"""

from __future__ import annotations

import inspect
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from core.errors import Cancelled
from core.events import BUILDING, UP_TO_DATE  # the exporter's events: "{component}: {stage} ({event})"

PHASES = ("loading", "exporting", "preprocessing", "encoding", "sampling", "decoding", "upscaling", "detailing",
          "saving")


@dataclass(frozen=True)
class Progress:
    """One progress event. ``step/steps`` are sampling steps of the whole request (all batches) and stay
    current in every phase; ``done/total`` are the current phase's own count (exporting: stages of the
    component; sampling: = step/steps). ``eta_seconds``: sampling time left, None until a step was measured."""

    phase: str
    done: int = 0
    total: int = 0
    step: int = 0
    steps: int = 0
    eta_seconds: float | None = None
    detail: str = ""

    @property
    def fraction(self) -> float:
        return min(self.step / self.steps, 1.0) if self.steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``progress`` object of ``sd_get_result`` (docs/API.md)."""
        out = asdict(self)
        out["phase_done"], out["phase_total"] = out.pop("done"), out.pop("total")
        out["fraction"] = round(self.fraction, 4)
        if self.eta_seconds is not None:
            out["eta_seconds"] = round(self.eta_seconds, 3)
        return out


ProgressCallback = Callable[[Progress], None]


def as_callback(progress: Callable | None) -> ProgressCallback | None:
    """``progress`` as a :data:`ProgressCallback`; a legacy ``progress(done, total)`` gets sampling steps only."""
    if progress is None:
        return None
    try:
        params = [p for p in inspect.signature(progress).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return progress
    if len(params) < 2:
        return progress

    reported = [0]

    def legacy(event: Progress) -> None:
        if event.phase == "sampling" and event.step > reported[0]:
            reported[0] = event.step
            progress(event.step, event.steps)

    return legacy


class ProgressReporter:
    """The phases of one request, reported to ``callback``; also the samplers' per-step callback and the
    point where cancellation is checked (between steps)."""

    def __init__(self, callback: Callable | None, cancel: threading.Event | None, steps: int,
                 clock: Callable[[], float] = time.monotonic):
        self.callback = as_callback(callback)
        self.cancel = cancel
        self.steps = steps
        self.clock = clock
        self.step = 0
        self.phase_name = ""
        self.detail = ""
        self._durations: list[float] = []
        self._last: float | None = None
        self._resume: tuple[str, str] | None = None  # the phase an export interrupted
        self._created = clock()
        self.preview_sink = None  # the request's live-preview sink and its engine.preview.Previewer (the pipeline's)
        self.previewer = None

    # ----------------------------------------------------------------------------------------- phases
    def phase(self, name: str, detail: str = "") -> None:
        assert name in PHASES, name
        self.phase_name, self.detail = name, detail
        if name == "sampling":
            self._last = self.clock()
        self._emit(Progress(name, *self._counts(name), self.step, self.steps, self.eta(), detail))
        self.check_cancel()

    def _counts(self, name: str) -> tuple[int, int]:
        return (self.step, self.steps) if name == "sampling" else (0, 0)

    def export(self, what: str, done: int, total: int) -> None:
        """The exporter's callback (export.onnx / export.tensorrt): a build is phase ``exporting`` until its
        last stage is done, then the interrupted phase resumes; an up-to-date artefact is not reported."""
        if what.endswith(f"({UP_TO_DATE})"):
            return
        if self.phase_name != "exporting":
            self._resume = (self.phase_name, self.detail)
            self.phase_name = "exporting"
        self._emit(Progress("exporting", done, total, self.step, self.steps, self.eta(), what))
        if not what.endswith(f"({BUILDING})") and done >= total and self._resume is not None:
            name, detail = self._resume
            self._resume = None
            if name:
                self.phase_name, self.detail = name, detail
                if name == "sampling":  # the export's time is not a sampling step's
                    self._last = self.clock()
                self._emit(Progress(name, *self._counts(name), self.step, self.steps, self.eta(), detail))

    # ----------------------------------------------------------------------------------------- sampling
    def eta(self) -> float | None:
        if not self._durations:
            return None
        return statistics.median(self._durations) * max(self.steps - self.step, 0)

    def __call__(self, info: dict | None = None) -> None:
        """The sampler's callback after each step."""
        now = self.clock()
        if self._last is not None:
            self._durations.append(now - self._last)
        self._last = now
        self.step = min(self.step + 1, self.steps)
        self._emit(Progress("sampling", self.step, self.steps, self.step, self.steps, self.eta(), self.detail))
        self.check_cancel()

    def sampled(self, step: int, steps: int) -> None:
        """A legacy ``progress(done, total)`` report of sampling steps (an engine that knows no phases): the
        first step is timed from the reporter's creation."""
        if self._last is None:
            self._last = self._created
        self.steps = max(int(steps), 1)
        self.step = int(step) - 1
        self.phase_name = "sampling"
        self()

    # ----------------------------------------------------------------------------------------- plumbing
    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("generation cancelled")

    def _emit(self, event: Progress) -> None:
        if self.callback is not None:
            self.callback(event)

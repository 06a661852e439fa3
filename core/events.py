"""The exporter's progress events, shared by export/ (which reports them) and engine.progress (which reads them).

An exporter callback gets ``(what, done, total)`` with ``what = "{component}: {stage} ({event})"``; ``event`` is
one of :data:`BUILDING` (before a build, ``done`` = stages finished), :data:`BUILT` or :data:`UP_TO_DATE` (a cache
hit). engine.progress reads the event; ``sdengine export`` counts builds."""

from __future__ import annotations

BUILDING, BUILT, UP_TO_DATE = "building", "built", "up to date"


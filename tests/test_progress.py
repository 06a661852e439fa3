"""Progress in phases (engine.progress) through the real Engine on the tiny models: the phase order, the
exporter's own events on a first run, the ETA against a fake clock (a model that "takes" 0.2 s per step after a
5 s first step: the ETA after the third step must be within 30% of the time actually left), the legacy
(done, total) callback, and the service's sd_get_result progress object."""

from __future__ import annotations

import threading

import pytest

from engine.pipeline import Engine
from engine.progress import Progress, ProgressReporter
from engine.request import GenerationRequest


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _slowed(engine: Engine, clock: FakeClock, first: float, per_step: float):
    """Make the model's UNet "take" ``per_step`` fake seconds per call (``first`` for the first call)."""
    rt = engine.runtime("tiny-sd1")
    run = rt.backend.run
    calls = []

    def slow_run(component, feeds):
        if component == "unet":
            clock.now += first if not calls else per_step
            calls.append(clock.now)
        return run(component, feeds)

    rt.backend.run = slow_run
    return calls


def test_phases_in_order_and_eta_from_sampling_steps_only(tiny_store, tmp_path):
    engine = Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path)
    clock = engine.clock = FakeClock()
    _slowed(engine, clock, first=5.0, per_step=0.2)
    events: list[Progress] = []
    at: list[float] = []  # the fake clock at each event
    steps = 12

    def progress(event: Progress) -> None:
        clock.now += 0.001  # the callback itself is not free
        events.append(event)
        at.append(clock.now)

    engine.generate(GenerationRequest(model="tiny-sd1", prompt="x", steps=steps, seed=1, sampler_name="Euler",
                                      cfg_scale=1.0), progress=progress)
    phases = [e.phase for e in events]
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order == ["loading", "encoding", "sampling", "decoding"], order
    sampling = [(e, t) for e, t in zip(events, at) if e.phase == "sampling" and e.done > 0]
    assert [e.step for e, _ in sampling] == list(range(1, steps + 1)) and sampling[-1][0].fraction == 1.0
    assert sampling[-1][0].eta_seconds == 0
    end = sampling[-1][1]
    for e, t in sampling[2:]:  # from the third step on, within 30% of the time actually left
        assert e.eta_seconds == pytest.approx(end - t, rel=0.30), (e.step, e.eta_seconds, end - t)


def test_eta_ignores_an_export_in_the_middle_of_sampling():
    clock = FakeClock()
    seen: list[Progress] = []
    rep = ProgressReporter(seen.append, None, 10, clock=clock)
    rep.phase("loading")
    clock.now += 30  # loading is never a step
    rep.phase("sampling")
    for i in range(10):
        clock.now += 1.0
        if i == 3:  # the ControlNet UNet is exported at its first step
            rep.export("unet_control: onnx-fp32 (building)", 0, 1)
            clock.now += 40
            rep.export("unet_control: onnx-fp32 (built)", 1, 1)
        rep()
        if i >= 2:
            assert seen[-1].eta_seconds == pytest.approx(1.0 * (10 - (i + 1)), rel=0.3)
    exporting = [e for e in seen if e.phase == "exporting"]
    assert [e.detail for e in exporting] == ["unet_control: onnx-fp32 (building)", "unet_control: onnx-fp32 (built)"]
    assert seen[seen.index(exporting[-1]) + 1].phase == "sampling"  # the interrupted phase resumes
    # an up-to-date artefact is not a phase
    rep2 = ProgressReporter(seen.append, None, 1, clock=clock)
    n = len(seen)
    rep2.export("unet: onnx-fp32 (up to date)", 1, 1)
    assert len(seen) == n


def test_first_run_reports_exporting_with_its_own_counts(tiny_store, tmp_path):
    pytest.importorskip("onnxruntime")
    engine = Engine(models_dir=tiny_store, backend="onnxruntime", cache_dir=tmp_path / "cache")
    events: list[Progress] = []
    req = GenerationRequest(model="tiny-sd1", prompt="x", steps=2, seed=1, sampler_name="Euler")
    engine.generate(req, progress=events.append)
    exporting = [e for e in events if e.phase == "exporting"]
    details = {e.detail.split(":")[0] for e in exporting}
    assert {"text_encoder", "unet", "vae_decoder"} <= details
    assert all(e.total >= 1 and 0 <= e.done <= e.total for e in exporting)
    # each export is followed by the phase it interrupted: the first run's exports happen at load, before any
    # compile (engine.backends.weights.export_ahead, docs/DECISIONS.md "A cold start that fits")
    interrupted = events[next(i for i, e in enumerate(events) if e.phase == "exporting") - 1].phase
    assert interrupted == "loading"
    first_unet = next(i for i, e in enumerate(events) if e.detail.startswith("unet") and e.done == e.total)
    assert events[first_unet + 1].phase == interrupted
    assert events.index(next(e for e in events if e.phase == "sampling")) > first_unet
    # a second request exports nothing
    events.clear()
    Engine(models_dir=tiny_store, backend="onnxruntime", cache_dir=tmp_path / "cache").generate(
        req, progress=events.append)
    assert "exporting" not in {e.phase for e in events}


def test_export_progress_goes_to_the_request_of_its_own_thread(tiny_store, tmp_path):
    """The exporter callback a cached backend holds reports to the request running in the calling thread; an
    export in another thread (outside any request) reports nowhere (the reporter is the request's, not the
    engine's)."""
    engine = Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path)
    rt = engine.runtime("tiny-sd1")
    run, unet_calls = rt.backend.run, []

    def run_and_export(component, feeds):
        if component == "unet" and not unet_calls:
            outside = threading.Thread(target=engine._export_progress, args=("unet: elsewhere (built)", 1, 1))
            outside.start()
            outside.join()
            engine._export_progress("unet: here (built)", 1, 1)
            unet_calls.append(component)
        return run(component, feeds)

    rt.backend.run = run_and_export
    events: list[Progress] = []
    engine.generate(GenerationRequest(model="tiny-sd1", prompt="x", steps=2, seed=1, sampler_name="Euler"),
                    progress=events.append)
    assert [e.detail for e in events if e.phase == "exporting"] == ["unet: here (built)"]
    engine._export_progress("unet: after (built)", 1, 1)  # no request running: nothing to report to, no error


def test_legacy_done_total_callback_gets_sampling_steps(tiny_store, tmp_path):
    calls = []
    Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path).generate(
        GenerationRequest(model="tiny-sd1", steps=3, seed=1, sampler_name="Euler"),
        progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_service_progress_has_phases(tiny_store, tmp_path):
    from api_compat.service import TaskService

    seen = []
    with TaskService(tiny_store, results_dir=tmp_path / "out", backend="torch", cache_dir=tmp_path / "c") as svc:
        engine_generate = Engine.generate

        def spy(self, request, *, progress=None, cancel=None):
            def tap(event):
                progress(event)
                seen.append(svc.sd_get_result({"taskId": task})["progress"])
            return engine_generate(self, request, progress=tap, cancel=cancel)

        Engine.generate = spy
        try:
            task = svc.sd_txt2img({"stable_diffusion_model": "tiny-sd1", "steps": 3, "seed": 1})["taskId"]
            result = svc.wait(task, 120)
        finally:
            Engine.generate = engine_generate
    assert result["status"] == "succeeded"
    assert [p["phase"] for p in seen][:1] == ["loading"]
    sampling = [p for p in seen if p["phase"] == "sampling" and p["step"] > 0]
    assert [p["step"] for p in sampling] == [1, 2, 3] and sampling[-1]["fraction"] == 1.0
    assert {"phase", "phase_done", "phase_total", "step", "steps", "fraction", "eta_seconds", "detail"} <= set(
        sampling[0])

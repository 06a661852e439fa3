"""Peak memory per request size: the real engine, one process per (model, backend), sizes ascending; the
growth of peak RSS (ru_maxrss) over the RSS before the request, beside engine.memory's estimate.

    python -m benchmarks memory --models-dir DIR --model tiny-sd1 --backend onnxruntime --sizes 256 384 512
    python -m benchmarks memory --write-sd15 DIR    # then --models-dir DIR --model sd15-random --sizes 1024

``--write-sd15 DIR`` writes an SD1.5-architecture checkpoint with random weights (the bundled sd15.json configs,
seed 0) to DIR/Stable-diffusion/sd15-random.safetensors and exits (a separate process: building it must not
count in the measured peak).

One warm-up request (64x64) first; 1 step, CFG 7, batch 1 unless --batch. Memory, not time: no repeats needed
(the peak of a deterministic graph), but the machine's other processes do not affect ru_maxrss.

Each row also has the peak of each phase (``phases_mib``: sampling, decoding ...) over the RSS before the
request: the high-water mark is reset at each phase change (Linux ``/proc/self/clear_refs``), so the UNet and
the VAE decode are measured apart, beside ``estimate_request``'s ``unet`` and ``vae`` terms.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import threading


def main(argv=None) -> dict:
    from engine.memory import architecture_of, estimate_request
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir")
    parser.add_argument("--cache-dir")
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--write-sd15", metavar="DIR", default=None)
    parser.add_argument("--vae-tile", type=int, default=None,
                        help="latent tile side of the tiled VAE decode (0: never tile, the decode before issue 12)")
    args = parser.parse_args(argv)
    if args.write_sd15:
        print(write_sd15(args.write_sd15), flush=True)
        return 0
    options = {k: v for k, v in (("models_dir", args.models_dir), ("cache_dir", args.cache_dir)) if v}
    from engine.tiling import VaeTiling

    tiling = VaeTiling() if args.vae_tile is None else VaeTiling(tile=args.vae_tile) if args.vae_tile else VaeTiling(0)
    engine = Engine(backend=args.backend, vae_tiling=tiling, **options)
    engine.generate(GenerationRequest(model=args.model, steps=1, width=64, height=64, seed=1))
    entry = engine.store.resolve(args.model) if args.model else engine.store.default_checkpoint()
    arch, _ = architecture_of(entry.path)
    rows = []
    for size in sorted(args.sizes):
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * resource.getpagesize()
        phases = PhasePeaks(before)
        engine.generate(GenerationRequest(model=args.model, steps=1, width=size, height=size,
                                          batch_size=args.batch, seed=1), progress=phases)
        phases.close()
        # the phases reset the high-water mark (and with it ru_maxrss): the request's peak is their largest
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   before + max(phases.peaks.values(), default=0))
        est = estimate_request(arch, size, size, args.batch, backend=args.backend, tiling=tiling)
        rows.append({"model": entry.name, "backend": args.backend, "size": size, "batch": args.batch,
                     "rss_before_mib": round(before / 2**20), "peak_mib": round(peak / 2**20),
                     "growth_mib": round((peak - before) / 2**20), "estimated_mib": round(est.activations / 2**20),
                     "estimated_total_mib": round(est.total / 2**20), "vae_tile": tiling.tile,
                     "phases_mib": {k: round(v / 2**20) for k, v in phases.peaks.items()},
                     "estimated_phases_mib": {"sampling": round(est.unet / 2**20),
                                              "decoding": round(est.vae / 2**20)}})
        print(json.dumps(rows[-1]), flush=True)
    return 0


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class PhasePeaks:
    """The engine's progress callback: the peak RSS of each phase over ``before`` (bytes), the high-water mark
    reset at each phase change (clear_refs 5). Linux only."""

    def __init__(self, before: int):
        self.before = before
        self.current: str | None = None
        self.peaks: dict[str, int] = {}
        self._reset()

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def __call__(self, event) -> None:
        if event.phase != self.current:
            self.close()
            self.current = event.phase

    def close(self) -> None:
        if self.current is not None:
            grown = _status("VmHWM") - self.before
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), grown)
            self._reset()


class LogPeaks(logging.Handler):
    """Where a run's memory goes, by what the engine logs: the peak RSS of each interval between consecutive
    log records of ``loggers`` (an export, an IR conversion, a compile, a release ... each logs when it starts),
    named after the record that opened it, with the anonymous and file-mapped RSS at its end. The high-water mark
    is reset at each record (``/proc/self/clear_refs``), which resets ``ru_maxrss`` too: :attr:`peak` is the
    run's peak (the largest interval's). Linux only."""

    def __init__(self, loggers=("engine", "export")):
        super().__init__(logging.INFO)
        self.rows: list[dict] = []
        self.current = "start"
        self._lock = threading.Lock()
        self.loggers = [logging.getLogger(name) for name in loggers]
        for lg in self.loggers:
            lg.setLevel(logging.INFO)
            lg.addHandler(self)
        PhasePeaks._reset()

    def emit(self, record) -> None:
        with self._lock:
            self._close()
            self.current = f"{record.name}: {record.getMessage()}"[:160]

    def _close(self) -> None:
        self.rows.append({"after": self.current, "peak_mib": round(_status("VmHWM") / 2**20),
                          "anon_mib": round(_status("RssAnon") / 2**20),
                          "file_mib": round(_status("RssFile") / 2**20)})
        PhasePeaks._reset()

    @property
    def peak(self) -> int:
        """The largest peak so far, bytes (the current interval's included)."""
        with self._lock:
            return max([r["peak_mib"] << 20 for r in self.rows] + [_status("VmHWM")])

    def finish(self) -> list[dict]:
        with self._lock:
            self._close()
        for lg in self.loggers:
            lg.removeHandler(self)
        return self.rows


def write_sd15(root) -> str:
    """An SD1.5-architecture single file with random weights (bundled sd15.json configs, seed 0)."""
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.checkpoints import bundled_config
    from engine.models.convert import save_single_file

    path = Path(root) / "Stable-diffusion" / "sd15-random.safetensors"
    if path.is_file():
        return str(path)
    cfg = bundled_config("sd15.json")
    torch.manual_seed(0)
    drop = ("_class_name", "_diffusers_version")
    components = {
        "unet": UNet2DConditionModel(**{k: v for k, v in cfg["unet"].items() if k not in drop}).eval(),
        "vae": AutoencoderKL(**{k: v for k, v in cfg["vae"].items() if k not in drop}).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval(),
    }
    return str(save_single_file(components, path, prediction_type="epsilon", native_size=512))

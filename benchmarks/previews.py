"""Live previews and the TAESD decoder on CPU: what a preview costs per sampling step, and TAESD vs the full VAE.

    python -m benchmarks previews [--sizes 512 1024] [--repeats 3] [--unet-repeats 2] [--json F] [--markdown F]
    python -m benchmarks previews --sizes 512 1024 --skip-preview   # the decode table only

1. **Decode time, TAESD vs the full VAE decoder**, one run, interleaved rounds (each variant once per round), after
   one warm-up call each: the ``vae_decoder`` component of an SD1.5-architecture VAE (the bundled sd15.json config,
   **random weights**: the time of a decoder does not depend on its weights) against the ``taesd_decoder``
   component (the bundled real TAESD weights), both through export.wrappers on torch, fp32, batch 1. Each
   size's row carries the 1-minute load average when its rounds ended; the header the CPU's native-bf16 flags.
2. **Preview cost per step at the default interval** (the webui's show_progress_every_n_steps = 10), at 512x512:
   the sampling thread's own part (engine.preview.Previewer.offer: the x0 rows to the host, into the mailbox) is
   timed per step; the decoding thread's part is the decode time of one preview per method, spread over the 10
   steps it serves. Both are set against one sampling step of the SD1.5 architecture (a UNet call of batch 2, the
   CFG pair, random weights, torch fp32) measured in the same run. On a CPU the decoding thread shares the cores
   with sampling, so its time is counted as a cost in full (an upper bound: nothing of it is hidden).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _median_rounds(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Interleaved rounds: each fn once per round (after ``warmup`` calls each); the times of every round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    import numpy as np
    import torch

    from engine.models.approx import find, load_taesd
    from engine.models.store import bundled_root
    from engine.preview import Previewer, select
    from engine.request import LivePreview
    from export.wrappers import TaesdDecoderWrapper, UNetWrapper, VaeDecoderWrapper

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unet-repeats", type=int, default=2)
    parser.add_argument("--preview-size", type=int, default=512)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up calls of each decoder before the rounds")
    parser.add_argument("--methods", nargs="+", default=["Approx cheap", "Approx NN", "TAESD", "Full"],
                        help="the preview methods timed (Full: the full VAE decoder at the preview size again)")
    parser.add_argument("--skip-preview", action="store_true")
    parser.add_argument("--approx-nn", default=None, help="an Approx NN file (model.pt) to time; else random weights")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = json.loads((bundled_root().parent / "configs" / "sd15.json").read_text())
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config["vae"]).eval()
    full = VaeDecoderWrapper(vae).eval()
    taesd = TaesdDecoderWrapper(load_taesd(find(None, "taesd_decoder", "taesd", False).path, "decoder")).eval()
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                            f"{threads} threads", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "cpu_flags": _cpu_flags(), "load_before": os.getloadavg()[0], "decode": [], "preview": {}}
    with torch.inference_mode():
        for size in args.sizes:
            latent = torch.randn(1, 4, size // 8, size // 8)
            times = _median_rounds({"full": lambda: full(latent), "taesd": lambda: taesd(latent)}, args.repeats,
                                   args.warmup)
            row = {"size": size, **{k: statistics.median(v) for k, v in times.items()},
                   **{f"{k}_min": min(v) for k, v in times.items()}}
            row["speedup"] = row["full"] / row["taesd"]
            row["load_after"] = os.getloadavg()[0]  # 1-min load average when the size's rounds ended
            out["decode"].append(row)
            print(json.dumps(row), flush=True)

        if args.skip_preview:
            return _finish(out, args)
        # 2. preview cost per step at the interval
        side = args.preview_size // 8
        unet = UNetWrapper(UNet2DConditionModel.from_config(config["unet"]).eval()).eval()
        sample, t, ctx = torch.randn(2, 4, side, side), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
        step = _median_rounds({"unet": lambda: unet(sample, t, ctx)}, args.unet_repeats)["unet"]
        out["preview"]["unet_step"] = statistics.median(step)
        out["preview"]["unet_step_min"] = min(step)
        from engine.models import taesd_nets
        from engine.models.approx import cheap_approximation

        nn = taesd_nets.ApproxNN().eval()
        if args.approx_nn:
            from engine.models.approx import load_approx_nn

            nn = load_approx_nn(args.approx_nn, allow_pickle=True)
        latent = torch.randn(1, 4, side, side)
        np_latent = latent.numpy()
        methods = {"Approx cheap": lambda: cheap_approximation(np_latent, "sd"), "Approx NN": lambda: nn(latent),
                   "TAESD": lambda: taesd(latent), "Full": lambda: full(latent)}
        methods = {k: v for k, v in methods.items() if k in args.methods}
        decode = {k: statistics.median(v) for k, v in _median_rounds(methods, args.repeats).items()}

        class _Cond:  # one image, CFG: rows 0 (prompt) and 1 (negative)
            positive = [[(0, 1.0)]]
            negative = [1]

        x0 = np.random.default_rng(0).standard_normal((2, 4, side, side)).astype(np.float32)
        last = (x0, _Cond, x0[:1], True)
        previewer = Previewer(LivePreview("Approx cheap", args.interval, "Prompt"), lambda lat: lat[:, :3] * 0,
                              lambda s, im: None)
        n = 2000
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            previewer.offer(i, last)
        offer = (time.perf_counter() - t0) / n
        previewer.close(5)
        unet_step = out["preview"]["unet_step"]
        for name, seconds in decode.items():
            per_step = offer + seconds / args.interval
            out["preview"][name] = {"decode": seconds, "per_step": per_step, "percent": 100 * per_step / unet_step}
        out["preview"]["offer_per_step"] = offer
    return _finish(out, args)


def _cpu_flags() -> str:
    """The CPU's native-bf16 flags (avx512_bf16, amx_bf16) from /proc/cpuinfo ("none" where it has neither)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in text) or "none"


def _finish(out: dict, args) -> dict:
    out["load_after"] = os.getloadavg()[0]
    text = markdown(out, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return out


def markdown(out: dict, args) -> str:
    lines = [f"{out['machine']}; CPU flags: {out.get('cpu_flags', 'unknown')}; {out['date']}; 1-min load average "
             f"{out['load_before']:.1f} before, {out['load_after']:.1f} after; {args.warmup} warm-up call(s), "
             f"median of {args.repeats} round(s).", "",
             "| size | full VAE decoder (SD1.5 arch, random weights) | TAESD decoder | TAESD speed-up | load after |",
             "|---|---|---|---|---|"]
    for row in out["decode"]:
        lines.append(f"| {row['size']}x{row['size']} | {row['full']:.3f} s (min {row['full_min']:.3f}) | "
                     f"{row['taesd']:.3f} s (min {row['taesd_min']:.3f}) | x{row['speedup']:.1f} | "
                     f"{row['load_after']:.1f} |")
    p = out["preview"]
    if not p:  # --skip-preview
        return "\n".join(lines) + "\n"
    lines += ["", f"Preview cost at {args.preview_size}x{args.preview_size}, every {args.interval} steps, against "
              f"one SD1.5-architecture sampling step (UNet, batch 2) of {p['unet_step']:.2f} s (min "
              f"{p['unet_step_min']:.2f}); sampling thread's own part {p['offer_per_step'] * 1e6:.1f} us per step:",
              "", "| show_progress_type | decode of one preview | cost per step | % of a sampling step |",
              "|---|---|---|---|"]
    for name in ("Approx cheap", "Approx NN", "TAESD", "Full"):
        if name not in p:
            continue
        row = p[name]
        lines.append(f"| {name} | {row['decode'] * 1e3:.1f} ms | {row['per_step'] * 1e3:.2f} ms | "
                     f"{row['percent']:.2f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Training loops of the demo model: VAE, then UNet + text encoder, then ControlNet (canny).

    PYTHONPATH=. python -m training.train all     # vae, decoder, unet, controlnet: ~80 min on 2 cores
    PYTHONPATH=. python -m training.train all --steps A B C D   # exact step budgets (demo.md has the shipped run's)
    PYTHONPATH=. python -m training.train unet --minutes 24 --resume --lr 5e-4   # one stage

Each stage writes a diffusers-format folder under ``training/out/`` (``vae/``, ``text_encoder/``, ``unet/``,
``controlnet/``) every few minutes through a temporary folder and a rename, so stopping a stage keeps the
last checkpoint. Seeds are fixed; data are drawn from :mod:`training.scenes` (training combinations only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from engine.schedule import alphas_cumprod as schedule_alphas_cumprod
from engine.schedule import scheduler_config
from training import scenes as S

log = logging.getLogger("training")

OUT = Path(os.environ.get("SDENGINE_TRAIN_OUT") or Path(__file__).resolve().parent / "out")
SEED = 20261125

# -- model configs (tiny, in the real architecture classes) --------------------------------------------
TEXT = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 64), layers_per_block=1, norm_num_groups=4, sample_size=S.SIZE,
    scaling_factor=1.0,
)
UNET = dict(
    sample_size=S.SIZE // 8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
    norm_num_groups=16,
)
CONTROLNET_EMBED = (16, 32, 64, 64)
SCHEDULER = scheduler_config("epsilon")  # the SD noise schedule, defined once in engine/schedule.py
EMPTY_CAPTION_P = 0.1
# Share of captions without their position phrase in the UNet stage. 0: a UNet (64, 128) trained with 0.15
# for 32 + 24 min still swapped left/right and top/bottom (position 60% right on validation prompts); the
# first demo model, trained without them, had positions 100% right. The ControlNet stage uses them.
NO_POSITION_CAPTION_P = 0.0
MIN_SNR_GAMMA = 5.0
OBJECT_WEIGHT = 10.0


def alphas_cumprod() -> torch.Tensor:
    """The SD noise schedule's alphas_cumprod (engine/schedule.py) as a float32 tensor."""
    return torch.from_numpy(schedule_alphas_cumprod(SCHEDULER)).float()


# -- saving ------------------------------------------------------------------------------------------------
def save_module(module, name: str, extra: dict | None = None) -> None:
    """Write ``module.save_pretrained`` to ``out/name`` atomically (temporary folder, then renames)."""
    OUT.mkdir(parents=True, exist_ok=True)
    final, tmp, old = OUT / name, OUT / f".{name}.tmp", OUT / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp, safe_serialization=True)
    if extra is not None:
        (tmp / "train_state.json").write_text(json.dumps(extra, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class Deadline:
    """A stage's budget: ``steps`` optimiser steps when given (exact reruns), else ``minutes`` of wall time.

    ``spent_s`` is time already used by the stage (data preparation) that counts against ``minutes``.
    """

    def __init__(self, minutes: float, save_every_s: float, steps: int | None = None, spent_s: float = 0.0):
        self.start = time.monotonic()
        self.end = self.start + max(minutes * 60 - spent_s, 0.0)
        self.steps = steps
        self.n = 0
        self.save_every = save_every_s
        self.last_save = self.start

    def over(self) -> bool:
        """True when the budget is spent; call once per step, before it."""
        done = self.n >= self.steps if self.steps is not None else time.monotonic() >= self.end
        self.n += 1
        return done

    def frac(self) -> float:
        """How much of the budget the current step is into (0..1), for the learning-rate schedule."""
        if self.steps is not None:
            return (self.n - 1) / max(self.steps, 1)
        return (time.monotonic() - self.start) / max(self.end - self.start, 1e-9)

    def save_due(self) -> bool:
        if time.monotonic() - self.last_save >= self.save_every:
            self.last_save = time.monotonic()
            return True
        return False


def cosine_lr(opt, base: float, frac: float, warmup: float = 0.02) -> None:
    lr = base * frac / warmup if frac < warmup else base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    for g in opt.param_groups:
        g["lr"] = lr


def object_weight(x: torch.Tensor, weight: float = OBJECT_WEIGHT) -> torch.Tensor:
    """Per-pixel loss weights (N, 1, H, W): ``weight`` on and around objects (pixels unlike the corner), 1 else.

    Objects cover a few percent of the pixels; without this the VAE learns the backgrounds first and slowly.
    """
    corner = x[:, :, :1, :1]
    obj = ((x - corner).abs().amax(dim=1, keepdim=True) > 0.1).float()
    obj = torch.nn.functional.max_pool2d(obj, 5, stride=1, padding=2)  # include the edges around them
    return 1 + (weight - 1) * obj


def weighted_rec(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Object-weighted L1 + MSE reconstruction loss."""
    w = object_weight(x)
    d = rec - x
    return ((d.abs() + d * d) * w).sum() / (w.sum() * x.shape[1])


# -- stage 1: VAE ------------------------------------------------------------------------------------------
def train_vae(minutes: float, steps: int | None = None, batch: int = 16, lr: float = 2e-3, resume: bool = False) -> None:
    """Train the VAE (L1 + MSE reconstruction, small KL); ``resume`` continues from ``out/vae``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + int(resume))
    train, _ = S.split()
    vae = AutoencoderKL.from_pretrained(OUT / "vae") if resume else AutoencoderKL(**VAE)
    step0 = json.loads((OUT / "vae" / "train_state.json").read_text())["step"] if resume else 0
    log.info("VAE params: %d", sum(p.numel() for p in vae.parameters()))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    dl = Deadline(minutes, 180, steps)
    step, ema = step0, None
    while not dl.over():
        cosine_lr(opt, lr, dl.frac(), warmup=0.0 if resume else 0.02)
        _, imgs = S.sample_batch(train, batch, SEED + step)
        x = to_tensor(imgs)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        l_rec = weighted_rec(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = l_rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        ema = l_rec.item() if ema is None else 0.98 * ema + 0.02 * l_rec.item()
        if step % 25 == 0:
            log.info("vae step %d rec %.4f kl %.2f lr %.2e", step, ema, kl.item(), opt.param_groups[0]["lr"])
        if dl.save_due():
            save_module(vae, "vae", {"step": step, "rec": ema})
    vae.register_to_config(scaling_factor=latent_scale(vae, train))
    save_module(vae, "vae", {"step": step, "rec": ema, "done": True})
    log.info("VAE done: %d steps, rec %.4f, scaling_factor %.4f", step, ema, vae.config.scaling_factor)


def train_decoder(minutes: float, steps: int | None = None, batch: int = 16, lr: float = 5e-4) -> None:
    """Fine-tune the VAE decoder only (encoder and scaling factor frozen), as SD's ft-MSE decoder was.

    Runs beside the UNet stage: the UNet only depends on the encoder's latents.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 5)
    train, _ = S.split()
    vae = AutoencoderKL.from_pretrained(OUT / "vae")
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dl = Deadline(minutes, 180, steps)
    step, ema = 0, None
    state = json.loads((OUT / "vae" / "train_state.json").read_text())
    while not dl.over():
        cosine_lr(opt, lr, dl.frac())
        _, imgs = S.sample_batch(train, batch, SEED + 10**6 + step)
        x = to_tensor(imgs)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        l_rec = weighted_rec(rec, x)
        opt.zero_grad(set_to_none=True)
        l_rec.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = l_rec.item() if ema is None else 0.98 * ema + 0.02 * l_rec.item()
        if step % 25 == 0:
            log.info("decoder step %d rec %.4f", step, ema)
        if dl.save_due():
            save_module(vae, "vae", {**state, "decoder_step": step, "decoder_rec": ema})
    save_module(vae, "vae", {**state, "decoder_step": step, "decoder_rec": ema, "decoder_done": True})
    log.info("decoder done: %d steps, rec %.4f", step, ema)


@torch.no_grad()
def latent_scale(vae, train, n: int = 1024) -> float:
    """1 / std of the latent means over ``n`` training scenes (the SD convention for ``scaling_factor``)."""
    _, imgs = S.sample_batch(train, n, SEED - 1)
    z = torch.cat([vae.encode(to_tensor(imgs[i:i + 128])).latent_dist.mean for i in range(0, n, 128)])
    return float(1.0 / z.std())


# -- shared: data of the diffusion stages ------------------------------------------------------------------
@torch.no_grad()
def build_latent_dataset(vae, n: int, seed: int, with_edges: bool = False) -> dict:
    """Render ``n`` training scenes, encode them once: latents (mean * scale), captions, optional edges."""
    train, _ = S.split()
    chosen, imgs = S.sample_batch(train, n, seed)
    lat = torch.cat([vae.encode(to_tensor(imgs[i:i + 256])).latent_dist.mean for i in range(0, n, 256)])
    data = {"latents": lat * vae.config.scaling_factor, "captions": [s.caption for s in chosen],
            "captions_without_position": [s.caption_without_position for s in chosen]}
    if with_edges:
        edges = np.stack([S.canny(im) for im in imgs])
        data["edges"] = torch.from_numpy(edges).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return data


def tokenize(captions: list[str]) -> torch.Tensor:
    from engine.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer("<|endoftext|>")
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def load_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(OUT / "vae").eval().requires_grad_(False)


# -- stage 2: UNet + text encoder --------------------------------------------------------------------------
def train_unet(minutes: float, steps: int | None = None, batch: int = 64, lr: float = 1e-3, n_data: int = 24000, resume: bool = False) -> None:
    """Train the UNet and the text encoder jointly (eps, min-SNR-5, EMA saved); captions: 10% empty, 15%
    without their position phrase, the rest whole.

    ``resume`` continues from the saved (EMA) weights with a fresh optimizer and schedule.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 17 * int(resume))
    vae = load_vae()
    t0 = time.monotonic()
    data = build_latent_dataset(vae, n_data, SEED + 7 + int(resume))
    ids_all = tokenize(data["captions"])
    ids_nopos = tokenize(data["captions_without_position"])
    empty_ids = tokenize([""])[0]
    log.info("encoded %d latents in %.0fs (std %.3f)", n_data, time.monotonic() - t0, data["latents"].std())
    spent = time.monotonic() - t0
    step = 0
    if resume:
        te = CLIPTextModel.from_pretrained(OUT / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(OUT / "unet")
        step = json.loads((OUT / "unet" / "train_state.json").read_text())["step"]
    else:
        te = CLIPTextModel(CLIPTextConfig(**TEXT))
        unet = UNet2DConditionModel(**UNET)
    te.train()
    unet.train()
    log.info("text encoder params %d, unet params %d", sum(p.numel() for p in te.parameters()),
             sum(p.numel() for p in unet.parameters()))
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in te.state_dict().items()}
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(SEED + 1 + step)
    dl = Deadline(minutes, 240, steps, spent)
    run, step0 = None, step
    while not dl.over():
        frac = dl.frac()
        cosine_lr(opt, lr, frac)
        idx = torch.randint(0, n_data, (batch,), generator=g)
        z0 = data["latents"][idx]
        ids = ids_all[idx].clone()
        u = torch.rand(batch, generator=g)
        nopos = (u >= EMPTY_CAPTION_P) & (u < EMPTY_CAPTION_P + NO_POSITION_CAPTION_P)
        ids[nopos] = ids_nopos[idx][nopos]
        ids[u < EMPTY_CAPTION_P] = empty_ids
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ctx = te(ids).last_hidden_state
        eps = unet(zt, t, encoder_hidden_states=ctx).sample
        snr = a.flatten() / (1 - a.flatten())
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # min-SNR-5 weighting (Hang et al. 2023)
        loss = (((eps - noise) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(0.999, (1 + step - step0) / (10 + step - step0))
        with torch.no_grad():
            for ema, mod in ((ema_unet, unet), (ema_te, te)):
                for k, v in mod.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 25 == 0:
            log.info("unet step %d loss %.4f lr %.2e", step, run, opt.param_groups[0]["lr"])
        if dl.save_due():
            _save_ema(unet, te, ema_unet, ema_te, {"step": step, "loss": run})
    _save_ema(unet, te, ema_unet, ema_te, {"step": step, "loss": run, "done": True})
    log.info("UNet done: %d steps, loss %.4f", step, run)


def _save_ema(unet, te, ema_unet, ema_te, state) -> None:
    """Save the EMA weights (the raw ones stay in the live modules)."""
    for mod, ema, name in ((unet, ema_unet, "unet"), (te, ema_te, "text_encoder")):
        raw = {k: v.detach().clone() for k, v in mod.state_dict().items()}
        mod.load_state_dict(ema)
        save_module(mod, name, state)
        mod.load_state_dict(raw)


# -- stage 3: ControlNet -----------------------------------------------------------------------------------
def train_controlnet(minutes: float, steps: int | None = None, batch: int = 32, lr: float = 1e-3, n_data: int = 8000,
                     resume: bool = False) -> None:
    """Train a ControlNet (from the UNet's weights) on canny edges; ``resume`` continues from ``out/controlnet``.

    Captions: half without their position phrase, a quarter empty, a quarter whole. With whole captions
    only, the prompt already fixes the layout and the ControlNet learns nothing (the first demo model:
    edge overlap equal with and without it); without the position, only the edges say where the shapes go.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(SEED + 3)
    vae = load_vae()
    t0 = time.monotonic()
    data = build_latent_dataset(vae, n_data, SEED + 11 + int(resume), with_edges=True)
    unet = UNet2DConditionModel.from_pretrained(OUT / "unet").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(OUT / "text_encoder").eval().requires_grad_(False)
    with torch.no_grad():
        ctx_all, ctx_nopos = (
            torch.cat([te(ids[i:i + 512]).last_hidden_state for i in range(0, n_data, 512)])
            for ids in (tokenize(data["captions"]), tokenize(data["captions_without_position"])))
        ctx_empty = te(tokenize([""])).last_hidden_state[0]
    spent = time.monotonic() - t0
    if resume:
        cn = ControlNetModel.from_pretrained(OUT / "controlnet")
        step = json.loads((OUT / "controlnet" / "train_state.json").read_text())["step"]
    else:
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBED)
        # The hint embedding's last conv starts small instead of zero: with it zero as well as the zero
        # convs, no gradient reaches either until the other moves (12 min of training stayed at the loss of
        # a ControlNet that sees no edges). The zero convs stay zero, so step 0 is still the plain UNet.
        torch.nn.init.normal_(cn.controlnet_cond_embedding.conv_out.weight, std=0.02)
        step = 0
    cn.train()
    log.info("controlnet params %d", sum(p.numel() for p in cn.parameters()))
    opt = torch.optim.AdamW(cn.parameters(), lr=lr, weight_decay=0.0)
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(SEED + 4)
    dl = Deadline(minutes, 120, steps, spent)
    run = None
    while not dl.over():
        cosine_lr(opt, lr, dl.frac())
        idx = torch.randint(0, n_data, (batch,), generator=g)
        z0, cond, ctx = data["latents"][idx], data["edges"][idx], ctx_all[idx].clone()
        u = torch.rand(batch, generator=g)
        ctx[u < 0.5] = ctx_nopos[idx][u < 0.5]
        ctx[(u >= 0.5) & (u < 0.75)] = ctx_empty
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        down, mid = cn(zt, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        eps = unet(zt, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        loss = ((eps - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        step += 1
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 25 == 0:
            log.info("controlnet step %d loss %.4f", step, run)
        if dl.save_due():
            save_module(cn, "controlnet", {"step": step, "loss": run})
    save_module(cn, "controlnet", {"step": step, "loss": run, "done": True})
    log.info("ControlNet done: %d steps, loss %.4f", step, run)


STAGES = {"vae": train_vae, "decoder": train_decoder, "unet": train_unet, "controlnet": train_controlnet}
# ``all``: every stage from scratch, in order (stage, minutes, options): ~77 min on a 2-core CPU. The shipped
# model is this plan's output (the steps each stage reached: benchmarks/results/demo.md). 10 min of VAE
# left its round-trip ceiling at 82% all-correct (18 + 6 min: 100%).
ALL_PLAN: list[tuple[str, float, dict]] = [
    ("vae", 18, {}),
    ("decoder", 6, {}),
    ("unet", 40, {}),
    ("controlnet", 9, {}),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--minutes", type=float, nargs="+", default=None,
                   help="time budget per stage (one value, or one per stage of 'all': "
                        + " ".join(s for s, _, _ in ALL_PLAN) + ")")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="exact step budget per stage instead of --minutes (as many values as stages); the "
                        "steps each stage reached are in its train_state.json and the log")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the stage's saved weights")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cli_opts = {k: v for k, v in (("batch", args.batch), ("lr", args.lr)) if v is not None}
    if args.resume:
        cli_opts["resume"] = True
    plan = list(ALL_PLAN) if args.stage == "all" else [(args.stage, 30.0, {})]
    plan = [(stage, minutes, {**opts, **cli_opts}) for stage, minutes, opts in plan]
    n = len(plan)
    budgets = args.minutes or [minutes for _, minutes, _ in plan]
    steps = args.steps or [None] * n
    budgets, steps = (v * n if len(v) == 1 else v for v in (budgets, steps))
    if len(budgets) != n or len(steps) != n:
        p.error(f"--minutes/--steps take one value or one per stage ({' '.join(s for s, _, _ in plan)})")
    for (stage, _, opts), minutes, k in zip(plan, budgets, steps):
        log.info("stage %s %s: %s", stage, opts or "", f"{k} steps" if k is not None else f"{minutes} minutes")
        STAGES[stage](minutes, steps=k, **opts)


if __name__ == "__main__":
    main()

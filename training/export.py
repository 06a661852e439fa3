"""Write the trained demo model as webui single-file checkpoints into the bundled model store.

    PYTHONPATH=. python -m training.export

Reads the diffusers folders under ``training/out/`` and writes, through ``engine.models.convert.save_single_file``
(the webui layout, with the tiny diffusers configs in the safetensors metadata so the loader rebuilds the
modules), in float16 (the loader casts to its working dtype):

- ``engine/models/bundled/Stable-diffusion/sdengine-demo.safetensors`` (UNet + VAE + CLIP text encoder, with its
  model card -- vocabulary and best settings from training/scenes.py -- in the metadata; ``--card-only``
  rewrites just that, keeping the tensors)
- ``engine/models/bundled/ControlNet/sdengine-demo-canny.safetensors``
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch

from training.scenes import SIZE

log = logging.getLogger("training.export")

BUNDLED = Path(__file__).resolve().parent.parent / "engine" / "models" / "bundled"
CHECKPOINT = BUNDLED / "Stable-diffusion" / "sdengine-demo.safetensors"
CONTROLNET = BUNDLED / "ControlNet" / "sdengine-demo-canny.safetensors"


def export(out: Path | None = None, checkpoint: Path = CHECKPOINT, controlnet: Path | None = CONTROLNET,
           dtype: torch.dtype = torch.float16) -> list[Path]:
    from engine.models.convert import save_single_file
    mods = load_modules(out, controlnet=controlnet is not None)
    comps = {k: copy.deepcopy(mods[k]).to(dtype) for k in ("unet", "vae", "text_encoder")}
    written = [save_single_file(comps, checkpoint, prediction_type="epsilon", native_size=SIZE,
                                extra_metadata=card_metadata())]
    if controlnet is not None:
        written.append(save_single_file({"controlnet": copy.deepcopy(mods["controlnet"]).to(dtype)}, controlnet))
    for p in written:
        log.info("wrote %s (%.1f MB)", p, p.stat().st_size / 1e6)
    return written


def card_metadata() -> dict[str, str]:
    """The model card the checkpoint carries (engine.models.card): vocabulary and best settings, from scenes.py."""
    import json

    from engine.models.card import SETTINGS_KEY, VOCABULARY_KEY
    from training.scenes import BEST_SETTINGS, vocabulary

    return {VOCABULARY_KEY: json.dumps(vocabulary(), sort_keys=True),
            SETTINGS_KEY: json.dumps(BEST_SETTINGS, sort_keys=True)}


def write_card(checkpoint: Path = CHECKPOINT) -> Path:
    """Add / refresh the model card of an exported checkpoint without retraining or re-exporting: only the
    header changes (atomically), the tensors stay byte-identical."""
    from engine.models.card import write_metadata

    return write_metadata(checkpoint, card_metadata())


def load_modules(out: Path | None = None, controlnet: bool = False) -> dict:
    """The trained modules in the training output folder (diffusers / transformers folders)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    from training.train import OUT

    out = Path(out or OUT)
    mods = {
        "vae": AutoencoderKL.from_pretrained(out / "vae").eval(),
        "unet": UNet2DConditionModel.from_pretrained(out / "unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(out / "text_encoder").eval(),
    }
    if controlnet:
        mods["controlnet"] = ControlNetModel.from_pretrained(out / "controlnet").eval()
    return mods


def load_shipped(checkpoint: Path = CHECKPOINT, controlnet: Path | None = None) -> dict:
    """The shipped files loaded through the engine's loaders, as the module dict :mod:`training.evaluate` uses."""
    from engine.models.checkpoints import load_controlnet, load_single_file

    m = load_single_file(checkpoint)
    mods = {k: m.components[k] for k in ("unet", "vae", "text_encoder")}
    if controlnet is not None:
        mods["controlnet"] = load_controlnet(controlnet).module
    return mods


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export the demo model into the bundled store")
    p.add_argument("--out", type=Path, default=None, help="training output folder (default training/out)")
    p.add_argument("--no-controlnet", action="store_true")
    p.add_argument("--card-only", action="store_true",
                   help="only (re)write the model card (vocabulary, settings) into the shipped checkpoint's metadata")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.card_only:
        log.info("model card written into %s", write_card())
        return
    export(args.out, controlnet=None if args.no_controlnet else CONTROLNET)


if __name__ == "__main__":
    main()

"""Random-weight upscaler models of the real architectures in the real file layouts, built with spandrel's own
architecture classes (nothing can be downloaded here): ESRGAN in the old (``model.N``) and the new BasicSR layout
(``conv_first``/``body.N.rdbK``, wrapped in ``params_ema`` as Real-ESRGAN ships it), Real-ESRGAN's compact
SRVGGNet, and a small SwinIR. Tiny configurations: the tests check detection, scale and tiling, not quality."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

if importlib.util.find_spec("spandrel") is None:  # not `import spandrel`: it needs torchvision (spandrel_loader)
    pytest.skip("spandrel is not installed (the 'upscalers' extra)", allow_module_level=True)


def _arches():
    from engine.spandrel_loader import registry

    registry()  # spandrel's modules importable (also where torchvision is not)
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SwinIR import SwinIR

    return ESRGAN, Compact, SwinIR


def esrgan_module(filters: int = 8, blocks: int = 1, scale: int = 4, seed: int = 0):
    import torch

    ESRGAN, _, _ = _arches()
    torch.manual_seed(seed)
    return ESRGAN(num_filters=filters, num_blocks=blocks, scale=scale).eval()


def old_to_new(state: dict, blocks: int) -> dict:
    """An old-layout 4x RRDBNet state dict in BasicSR's (Real-ESRGAN's) key names."""
    names = {"model.0": "conv_first", f"model.1.sub.{blocks}": "conv_body", "model.3": "conv_up1",
             "model.6": "conv_up2", "model.8": "conv_hr", "model.10": "conv_last"}
    out = {}
    for key, value in state.items():
        m = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key)
        if m:
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
            continue
        stem, kind = key.rsplit(".", 1)
        out[f"{names[stem]}.{kind}"] = value
    return out


def write_esrgan_old(path: Path, **kw) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(esrgan_module(**kw).state_dict(), path)
    return path


def write_esrgan_new(path: Path, blocks: int = 1, **kw) -> Path:
    """Real-ESRGAN's RRDBNet file layout: BasicSR names under ``params_ema``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": old_to_new(esrgan_module(blocks=blocks, **kw).state_dict(), blocks)}, path)
    return path


def write_compact(path: Path, scale: int = 4, seed: int = 1) -> Path:
    """Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3's architecture), as ``{"params": ...}``."""
    import torch

    _, Compact, _ = _arches()
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = Compact(num_feat=8, num_conv=2, upscale=scale).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"params": state}, path)
    return path


def write_swinir(path: Path, scale: int = 2, seed: int = 2) -> Path:
    """A small SwinIR (lightweight pixelshuffledirect upsampler), as ``{"params": ...}``."""
    import torch

    _, _, SwinIR = _arches()
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=scale,
                   upsampler="pixelshuffledirect", mlp_ratio=2.0)
    torch.save({"params": model.state_dict()}, path)
    return path

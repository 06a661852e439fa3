"""ZoeDepth files for the tests: the real ZoeD_M12_N.pt layout (tests/golden/zoedepth_ZoeD_M12_N_keys.json.gz:
its key names, shapes and dtypes as controlnet_aux 0.0.10's ZoeDepth builds it with timm 0.6.7, ZoeDepth's own
timm; generated outside the project from that model), and a reduced network of the same family in that layout
(the BEiT 4 blocks of 64 wide instead of 24 of 1024, narrower neck; the bins head as the real one) with seeded
random weights, for the tests that run the network in CI (the full 345M-parameter network takes seconds per
run and 1.4 GB; its layout is checked on the meta device instead)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "zoedepth_ZoeD_M12_N_keys.json.gz"
REDUCED_DEPTH = 4


def real_layout() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of the real file's ``model`` entry, in order."""
    with gzip.open(GOLDEN, "rt") as f:
        return [(k, tuple(s), d) for k, s, d in json.load(f)["keys"]]


def reduced_config():
    """transformers' ZoeDepthConfig of the reduced network (ZoeD_N's settings, smaller BEiT and neck)."""
    from transformers import BeitConfig, ZoeDepthConfig

    backbone = BeitConfig(image_size=384, patch_size=16, num_hidden_layers=REDUCED_DEPTH, hidden_size=64,
                          intermediate_size=128, num_attention_heads=4, use_relative_position_bias=True,
                          layer_norm_eps=1e-6, reshape_hidden_states=False,
                          out_features=[f"stage{i}" for i in range(1, REDUCED_DEPTH + 1)])
    return ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32,
                          bottleneck_features=32, num_relative_features=32, bin_centers_type="softplus",
                          bin_configurations=[{"n_bins": 64, "min_depth": 1e-3, "max_depth": 10.0}])


def _randomize(net, seed: int):
    """Seeded weights that are not trivial: LayerNorm scales about 1, BEiT layer scales 0.3, relative position
    biases, spread bin and attractor biases, the other weights ~ 1/sqrt(fan_in)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif name.endswith(("lambda_1", "lambda_2")):
                p.copy_(0.3 + 0.1 * r)
            elif "relative_position_bias_table" in name or name.endswith("cls_token"):
                p.copy_(0.5 * r)
            elif re.search(r"(seed_bin_regressor|attractors\.\d+)\.conv2\.bias", name):
                p.copy_(0.5 + r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / max(1.0, p[0].numel() ** 0.5))
    return net.eval()


def reduced_original_state(seed: int = 0) -> dict:
    """The reduced network with random weights, in the original file's layout: the real file's keys (blocks
    beyond the reduced depth left out), each holding the tensor our mapping takes from it (the fused qkv weight
    made of q, k, v), the entries the engine ignores filled as the original code fills them."""
    import torch

    from engine.controlnet import zoe

    net = _randomize(zoe.build(reduced_config()), seed)
    hf = net.state_dict()
    state = {}
    for key, shape, dtype in real_layout():
        block = re.search(r"blocks\.(\d+)\.", key)
        if block and int(block.group(1)) >= REDUCED_DEPTH:
            continue
        qkv = re.fullmatch(r".*blocks\.(\d+)\.attn\.qkv\.weight", key)
        if qkv:
            prefix = f"backbone.beit.layers.{qkv.group(1)}.attention."
            state[key] = torch.cat([hf[prefix + f"{n}_proj.weight"] for n in "qkv"])
        elif key.endswith("relative_position_index"):
            state[key] = net.backbone.beit.layers[0].relative_position_bias.generate_relative_position_index((24, 24))
        elif key.endswith("k_idx"):
            state[key] = torch.arange(64).view(1, -1, 1, 1)
        elif key.endswith("K_minus_1"):
            state[key] = torch.tensor([63.0]).view(1, -1, 1, 1)
        elif ".fc_norm." in key:
            state[key] = torch.ones(64) if key.endswith("weight") else torch.zeros(64)
        elif ".head." in key:
            state[key] = torch.zeros((1000, 64) if key.endswith("weight") else (1000,))
        else:
            state[key] = hf[zoe.transformers_key(key)].clone()
    return state


def write_reduced_file(folder: Path, seed: int = 0) -> Path:
    """``folder/zoedepth/ZoeD_M12_N.pt`` as ZoeDepth saves it (``{'model': state}``), the reduced network."""
    import torch

    path = Path(folder) / "zoedepth" / "ZoeD_M12_N.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": reduced_original_state(seed)}, path)
    return path

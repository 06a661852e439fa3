"""The demo LoRA: ``sdengine-demo-red2blue``, derived (not trained) from the demo model's text encoder.

    PYTHONPATH=. python -m training.lora [--rank 8] [--out engine/models/bundled/Lora/sdengine-demo-red2blue.safetensors]

It paints "red" objects blue. Derivation: every caption of a red object (backgrounds other than blue) is
encoded twice by the demo text encoder, as written and with "red" replaced by "blue"; the change of the last
layer's output at all 77 positions is fitted as a linear function of that layer's MLP input (``mlp.fc2``'s
input), by ridge regression, and truncated to rank ``--rank`` by SVD: ``delta W = up @ down`` on
``encoder.layers.{last}.mlp.fc2``, written as a kohya file (``lora_te_text_model_encoder_layers_N_mlp_fc2``,
alpha = rank, so the multiplier is the strength). Its effect is measured by training.evaluate in
tests/test_training_shipped.py (prompts with red objects come out blue).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from training import scenes as S

log = logging.getLogger(__name__)

NAME = "sdengine-demo-red2blue"
DEFAULT_OUT = Path("engine/models/bundled/Lora") / f"{NAME}.safetensors"


def red_scenes() -> list[S.Scene]:
    return [s for s in S.all_scenes() if s.colour == "red" and s.background != "blue"]


def _encode(text_encoder, tokenizer, captions: list[str]):
    """(fc2 inputs of the last layer (N*77, 4D), last layer outputs (N*77, D)) of the captions, padded to 77."""
    import torch

    layer = text_encoder.encoder.layers[-1] if hasattr(text_encoder, "encoder") else \
        text_encoder.text_model.encoder.layers[-1]
    seen = {}
    hook = layer.mlp.fc2.register_forward_hook(lambda m, args, out: seen.__setitem__("a", args[0]))
    try:
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = text_encoder(input_ids=ids, output_hidden_states=True, return_dict=True)
    finally:
        hook.remove()
    a = seen["a"].reshape(-1, seen["a"].shape[-1]).double()
    h = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1]).double()
    return a, h


def derive(text_encoder, tokenizer, rank: int = 8, ridge: float = 1e-3) -> dict:
    """The kohya state dict of the red -> blue LoRA for ``text_encoder`` (a CLIPTextModel)."""
    import torch

    captions = [s.caption for s in red_scenes()]
    swapped = [c.replace(" red ", " blue ") for c in captions]
    a, h = _encode(text_encoder, tokenizer, captions)
    _, h_blue = _encode(text_encoder, tokenizer, swapped)
    target = h_blue - h  # (N, D)
    gram = a.T @ a
    gram += ridge * torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
    delta = torch.linalg.solve(gram, a.T @ target).T  # (D, 4D): delta @ a_i ~ target_i
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    up = (u[:, :rank] * s[:rank]).float().contiguous()
    down = vt[:rank].float().contiguous()
    fit = float(torch.linalg.norm(a @ (up.double() @ down.double()).T - target) / torch.linalg.norm(target))
    log.info("red -> blue: %d captions, rank %d, relative residual of the fit %.3f", len(captions), rank, fit)
    layers = text_encoder.config.num_hidden_layers
    key = f"lora_te_text_model_encoder_layers_{layers - 1}_mlp_fc2"
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(float(rank))}


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    from engine.models.checkpoints import load_checkpoint
    from engine.models.store import DEMO_CHECKPOINT, bundled_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = load_checkpoint(bundled_root() / "Stable-diffusion" / DEMO_CHECKPOINT)
    state = derive(model.components["text_encoder"], model.components["tokenizer"], args.rank, args.ridge)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    save_file(state, str(tmp), metadata={"ss_output_name": NAME, "sdengine.derivation": "training/lora.py",
                                         "sdengine.rank": str(args.rank)})
    tmp.replace(args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

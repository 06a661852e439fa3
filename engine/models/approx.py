"""The webui's ``models/VAE-approx/`` folder: TAESD / TAESDXL and the "Approx NN" preview decoders, and the
"Approx cheap" latent -> RGB factors.

Files, by the webui's names (modules/sd_vae_taesd.py, modules/sd_vae_approx.py), searched in the user's
``{models_dir}/VAE-approx/`` first, then in the bundled folder (engine/models/bundled/VAE-approx: the MIT TAESD and
TAESDXL files, so TAESD works out of the box; "Approx NN" is AGPL and never bundled):

=================  ============================================  =============================================
latent space       TAESD                                          Approx NN
=================  ============================================  =============================================
``sd`` (SD1, SD2)  ``taesd_encoder`` / ``taesd_decoder``          ``model``
``sdxl``           ``taesdxl_encoder`` / ``taesdxl_decoder``      ``vaeapprox-sdxl``
=================  ============================================  =============================================

each as ``.safetensors`` (preferred) or a pickle (``.pth`` for TAESD, ``.pt`` for Approx NN). Pickles are read
with ``torch.load(weights_only=True)`` and only with the pickle opt-in (``EngineConfig.allow_pickle``), as every
other pickle of the store (docs/DECISIONS.md "VAE-approx files"); without it a pickle is skipped with a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ModelError
from engine.models.checkpoints import read_state_dict
from engine.models.family import Arch
from engine.models.store import bundled_root

log = logging.getLogger(__name__)

FOLDER = "VAE-approx"
# the webui's "Approx cheap" (modules/sd_vae_approx.cheap_approximation): latent channel -> RGB in [-1, 1]
CHEAP_FACTORS = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}
TAESD_STEMS = {("sd", "encoder"): "taesd_encoder", ("sd", "decoder"): "taesd_decoder",
               ("sdxl", "encoder"): "taesdxl_encoder", ("sdxl", "decoder"): "taesdxl_decoder"}
APPROX_NN_STEMS = {"sd": "model", "sdxl": "vaeapprox-sdxl"}
PICKLE_SUFFIX = {"taesd": ".pth", "approx_nn": ".pt"}


def latent_space(arch: Arch) -> str:
    """``"sdxl"`` for SDXL checkpoints (and the SDXL refiner), ``"sd"`` for SD1 / SD2 (one latent space): the
    family table's (engine.models.family.FamilyDef.latent_space)."""
    return arch.definition.latent_space if arch.definition.text is not None else "sd"


def cheap_approximation(latent: np.ndarray, space: str) -> np.ndarray:
    """(B, 4, h, w) sampler-space latents -> (B, 3, h, w) RGB in [0, 1] by the webui's linear factors."""
    factors = np.asarray(CHEAP_FACTORS[space], dtype=np.float32)
    rgb = np.einsum("blxy,lr->brxy", np.asarray(latent, dtype=np.float32), factors)
    return np.clip(rgb * 0.5 + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class ApproxFile:
    """One resolved file: its path, whether it is the bundled copy, and its sha256 (the artefact key)."""

    path: Path
    bundled: bool

    @property
    def sha256(self) -> str:
        from core.hashing import sha256_file

        return sha256_file(self.path)


def find(models_dir: Path | None, stem: str, kind: str, allow_pickle: bool) -> ApproxFile | None:
    """The file ``stem`` (``.safetensors``, else the pickle with the opt-in) in the user's VAE-approx folder, else
    in the bundled one; None when neither has it. A user pickle without the opt-in is skipped (logged)."""
    roots = [(Path(models_dir) / FOLDER, False)] if models_dir is not None else []
    roots.append((bundled_root() / FOLDER, True))
    for root, bundled in roots:
        safe = root / f"{stem}.safetensors"
        if safe.is_file():
            return ApproxFile(safe, bundled)
        pickle = root / f"{stem}{PICKLE_SUFFIX[kind]}"
        if pickle.is_file():
            if allow_pickle:
                return ApproxFile(pickle, bundled)
            log.info("%s: a pickle, skipped without the pickle opt-in (allow_pickle); convert it to "
                     "%s.safetensors", pickle, stem)
    return None


def read_weights(path: Path, allow_pickle: bool) -> dict:
    """The state dict of a VAE-approx file as float32 torch tensors, read as every checkpoint of the store is
    (engine.models.checkpoints.read_state_dict: pickles with weights_only, only with the opt-in)."""
    state, _ = read_state_dict(path, allow_pickle)
    return {k: v.float() for k, v in state.items()}


def load_taesd(path: Path, part: str, allow_pickle: bool = False):
    """The TAESD ``part`` ("encoder" / "decoder") of a file, float32, eval mode. Key mismatches are errors
    naming the file (a file of another kind or format never loads half)."""
    from engine.models import taesd_nets

    module = taesd_nets.taesd_encoder() if part == "encoder" else taesd_nets.taesd_decoder()
    state = read_weights(path, allow_pickle)
    # the diffusers AutoencoderTiny layout ("encoder.layers.N" / "decoder.layers.N", the decoder's tanh clamp
    # outside its layers) is read too
    prefix = f"{part}.layers."
    if any(k.startswith(prefix) for k in state):
        shift = 1 if part == "decoder" else 0
        state = {f"{int(k[len(prefix):].split('.')[0]) + shift}.{k[len(prefix):].split('.', 1)[1]}": v
                 for k, v in state.items() if k.startswith(prefix)}
    _load(module, state, path, f"TAESD {part}")
    return module


def load_approx_nn(path: Path, allow_pickle: bool = False):
    """The webui's "Approx NN" decoder of a file, float32, eval mode."""
    from engine.models import taesd_nets

    module = taesd_nets.ApproxNN()
    _load(module, read_weights(path, allow_pickle), path, "Approx NN decoder")
    return module


def _load(module, state: dict, path: Path, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(path, f"not a {what}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelError(path, f"not a {what}: {key} has shape {tuple(value.shape)}, "
                                   f"expected {tuple(expected[key].shape)}")
    module.load_state_dict(state)
    module.eval().requires_grad_(False)

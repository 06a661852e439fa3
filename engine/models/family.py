"""Model families: the one place that knows what differs between SD1, SD2 and SDXL.

A :class:`FamilyDef` is the static definition of one architecture (its bundled config, native size,
prediction type, text encoders with their pad tokens, which ControlNets fit it, whether its schedule is the
SDXL one for "Align Your Steps"). A :class:`ModelFamily` is built once by the loader for every loaded
checkpoint: the definition plus what that checkpoint says of itself (native size, prediction type, noise
schedule, the UNet's pixel multiple, the artefact key). The pipeline, the denoiser, the conditioning and the
exporter read these; none of them compares architecture names.

Adding a family: a FamilyDef here, its configs in engine/models/configs, and its key conversion in
engine/models/checkpoints.py / convert.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from engine.conditioning import EncoderSpec, TextModelInfo, TextSpec
from core.errors import InvalidRequest
from engine.models.tokenizer import clip_tokenizer
from engine.rules import check_size
from engine.schedule import ModelSchedule


class Kind(str, Enum):
    CHECKPOINT = "checkpoint"
    VAE = "vae"
    CONTROLNET = "controlnet"
    LORA = "lora"
    EMBEDDING = "embedding"


class Arch(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"  # the SDXL refiner: OpenCLIP-G only, aesthetic-score time ids
    CONTROLNET_SD1 = "controlnet_sd1"
    CONTROLNET_SDXL = "controlnet_sdxl"
    VAE = "vae"

    @property
    def is_controlnet(self) -> bool:
        return self in (Arch.CONTROLNET_SD1, Arch.CONTROLNET_SDXL)

    @property
    def kind(self) -> Kind:
        return Kind.CONTROLNET if self.is_controlnet else Kind.VAE if self is Arch.VAE else Kind.CHECKPOINT

    @property
    def definition(self) -> "FamilyDef":
        return FAMILIES[self]


_EOS = "<|endoftext|>"
_OPENCLIP_PAD = "!"
LATENT_CHANNELS = 4  # the SD VAEs' latent channels (SD1, SD2, SDXL)
VAE_SCALE_FACTOR = 8  # image pixels per latent pixel (the VAE's 3 downsamplings)


@dataclass(frozen=True)
class FamilyDef:
    """What the engine needs to know about an architecture: defaults, text encoders, fitting ControlNets."""

    bundled: str | None  # file in engine/models/configs
    native_size: int = 512
    prediction_type: str = "epsilon"
    text: TextSpec | None = None  # None: not a checkpoint
    controlnets: tuple[Arch, ...] = ()  # ControlNet architectures whose residuals fit this UNet
    sdxl_schedule: bool = False  # "Align Your Steps" uses the SDXL table
    latent_channels: int = LATENT_CHANNELS
    vae_scale_factor: int = VAE_SCALE_FACTOR
    latent_space: str = "sd"  # checkpoints of one latent space can hand latents to each other (refiner, hires)

    @property
    def text_pads(self) -> tuple[str, ...]:
        """The tokenizer padding token of each text encoder."""
        return tuple(e.pad_token for e in self.text.encoders) if self.text else ()

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(e.component for e in self.text.encoders) if self.text else ()


FAMILIES: Mapping[Arch, FamilyDef] = MappingProxyType({
    Arch.SD1: FamilyDef(
        "sd15.json", 512, "epsilon", TextSpec((EncoderSpec("text_encoder", _EOS, "hidden_state"),)),
        controlnets=(Arch.CONTROLNET_SD1,)),
    # diffusers' SD2 text encoder already lacks OpenCLIP's last layer: N=1 is the webui's SD2 "penultimate".
    # SD1.5 ControlNets take 768-wide context; SD2 has 1024: no bundled ControlNet family fits SD2.
    Arch.SD2: FamilyDef(
        "sd21_v.json", 768, "v_prediction", TextSpec((EncoderSpec("text_encoder", _OPENCLIP_PAD, "hidden_state"),))),
    Arch.SDXL: FamilyDef(
        "sdxl_base.json", 1024, "epsilon",
        TextSpec(
            (EncoderSpec("text_encoder", _EOS, "hidden_state_raw", skip_offset=1),
             EncoderSpec("text_encoder_2", _OPENCLIP_PAD, "hidden_state_raw", skip_offset=1)),
            pooled_component="text_encoder_2", time_ids=True, zero_empty_negative=True),
        controlnets=(Arch.CONTROLNET_SDXL,), sdxl_schedule=True, latent_space="sdxl"),
    # the SDXL refiner (sgm's refiner config): one text encoder, OpenCLIP-G (its penultimate layer is the context,
    # its projected pooled output text_embeds), and the time ids (original size, crop, aesthetic score) with the
    # webui's sdxl_refiner_high/low_aesthetic_score defaults; SDXL's latent space (it refines SDXL's latents)
    Arch.SDXL_REFINER: FamilyDef(
        "sdxl_refiner.json", 1024, "epsilon",
        TextSpec(
            (EncoderSpec("text_encoder_2", _OPENCLIP_PAD, "hidden_state_raw", skip_offset=1),),
            pooled_component="text_encoder_2", time_ids=True, zero_empty_negative=True,
            aesthetic_scores=(6.0, 2.5)),
        sdxl_schedule=True, latent_space="sdxl"),
    Arch.CONTROLNET_SD1: FamilyDef("controlnet_sd15.json"),
    Arch.CONTROLNET_SDXL: FamilyDef("controlnet_sdxl.json"),
    Arch.VAE: FamilyDef("sd15.json"),
})


def tokenizers(arch: Arch) -> dict:
    """``{"tokenizer": ..., "tokenizer_2": ...}`` of a checkpoint family (named after their text encoders: the SDXL
    refiner's one is ``tokenizer_2``, as diffusers names it), padded with the family's pad tokens."""
    spec = FAMILIES[arch].text
    return {e.component.replace("text_encoder", "tokenizer"): clip_tokenizer(e.pad_token)
            for e in (spec.encoders if spec else ())}


def artefact_key(short_hash: str, vae_path: str | Path | None = None) -> str:
    """The key exported artefacts of a checkpoint are stored under: its short hash, plus the external VAE
    when one replaced the checkpoint's own (a hash of its resolved path, size and mtime), since the VAE's
    weights are then not the checkpoint's. Used by the engine and by ``sdengine export`` alike."""
    if not vae_path:
        return short_hash
    path = Path(vae_path)
    st = path.stat()
    vae = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{short_hash}-vae{vae}"


@dataclass(frozen=True)
class ModelFamily:
    """One loaded checkpoint's family facts, built once by the loader (see :func:`model_family`)."""

    arch: Arch
    native_size: int
    prediction_type: str
    pixel_multiple: int  # image sizes must be multiples of this (the VAE factor x the UNet's total downscale)
    schedule: ModelSchedule = field(repr=False)
    model_hash: str = ""  # the conditioning cache key (sha256, or the short hash)
    artefact_key: str = ""

    @property
    def definition(self) -> FamilyDef:
        return FAMILIES[self.arch]

    @property
    def text(self) -> TextModelInfo:
        """What conditioning needs: the family's text spec and the model's hash."""
        return TextModelInfo(self.definition.text, self.model_hash)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return self.definition.text_encoders

    @property
    def latent_channels(self) -> int:
        return self.definition.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel."""
        return self.definition.vae_scale_factor

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """One image's latent shape (channels, height, width) for an image of ``width x height``."""
        f = self.vae_scale_factor
        return self.latent_channels, height // f, width // f

    def fits_controlnet(self, arch: Arch) -> bool:
        return arch in self.definition.controlnets

    def check_controlnet(self, controlnet: Any, model_name: str, field_name: str) -> None:
        """InvalidRequest naming ``field_name`` unless ``controlnet`` (a LoadedControlNet) fits this family."""
        if not self.fits_controlnet(controlnet.arch):
            fits = ", ".join(a.value for a in self.definition.controlnets) or "none"
            raise InvalidRequest(field_name, f"ControlNet {controlnet.name} ({controlnet.arch.value}) does not fit "
                                 f"the checkpoint {model_name} ({self.arch.value})",
                                 f"a ControlNet of the same family ({fits})")

    def size_warning(self, width: int, height: int) -> str | None:
        """A warning when a side is more than twice or less than half the native size: such a request is
        served (as the webui does), but a model paints badly far from the size it was trained at."""
        n = self.native_size
        if all(n / 2 <= v <= 2 * n for v in (width, height)):
            return None
        return (f"{width}x{height} is far from the model's native size {n}x{n}: the model was trained at "
                f"{n}x{n} and paints badly at other sizes (leave width and height empty for the native size)")

    def check_size(self, width: int, height: int, max_size: int) -> None:
        """InvalidRequest naming ``width``/``height`` unless both are multiples of the pixel multiple in range
        (engine.rules.check_size)."""
        check_size(width, height, self.pixel_multiple, max_size)


def model_family(arch: Arch, *, unet_config: Mapping[str, Any], native_size: int, prediction_type: str,
                 alphas_cumprod: Any, sha256: str = "", short_hash: str = "",
                 vae_path: str | Path | None = None) -> ModelFamily:
    """The :class:`ModelFamily` of a loaded checkpoint."""
    import numpy as np

    levels = len(unet_config["down_block_types"])
    definition = FAMILIES[arch]
    schedule = ModelSchedule(np.asarray(alphas_cumprod), sdxl=definition.sdxl_schedule)
    return ModelFamily(arch=arch, native_size=int(native_size), prediction_type=prediction_type,
                       pixel_multiple=definition.vae_scale_factor * 2 ** (levels - 1), schedule=schedule,
                       model_hash=sha256 or short_hash,
                       artefact_key=artefact_key(short_hash, vae_path) if short_hash else "")

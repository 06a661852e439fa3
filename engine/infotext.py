"""The webui infotext: the `parameters` text stored in each PNG, and the info dict of sd_get_result.

Format as the webui (v1.10, modules/processing.py create_infotext):
``prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, ...``
Values holding ``,``, ``:`` or ``"`` are quoted with JSON string syntax, as the webui's ``quote`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from engine.rules import USE_SAME_SCHEDULER


def quote(value: Any) -> str:
    text = _fmt(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if value == value and abs(value) < 1e15 else str(value)
    return str(value)


def create_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """``params`` in display order; entries whose value is None are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return f"{text}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of :func:`create_infotext` for our own output (prompt, negative prompt, params as strings)."""
    *head, last = text.split("\n")
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in head:
        if line.startswith("Negative prompt: "):
            in_neg = True
            line = line[len("Negative prompt: "):]
        (neg_lines if in_neg else prompt_lines).append(line)
    params: dict[str, str] = {}
    i = 0
    while i < len(last):
        key_end = last.index(": ", i)
        key = last[i:key_end]
        j = key_end + 2
        if j < len(last) and last[j] == '"':
            value, consumed = json.JSONDecoder().raw_decode(last[j:])
            j += consumed
        else:
            k = last.find(", ", j)
            k = len(last) if k < 0 else k
            value = last[j:k]
            j = k
        params[key] = value
        i = j + 2 if last.startswith(", ", j) else len(last)
    return "\n".join(prompt_lines), "\n".join(neg_lines), params


# ------------------------------------------------------------------------------------ describing a generation

def model_label(model: Any) -> str:
    """The webui names a checkpoint by its file name without extension."""
    name = str(model.name)
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def unit_infotext(unit: Any, model_label: str, used: Mapping[str, Any] | None = None) -> str:
    """The sd-webui-controlnet infotext of one unit; ``used``: the preprocessor values actually used
    (``PreparedUnit.used``: defaults for -1 / out of range, the pixel-perfect resolution), as the extension writes."""
    used = used or {}
    fields = {
        "Module": unit.module, "Model": model_label, "Weight": unit.weight, "Resize Mode": unit.resize_mode,
        "Processor Res": used.get("processor_res", unit.processor_res),
        "Threshold A": used.get("threshold_a", unit.threshold_a),
        "Threshold B": used.get("threshold_b", unit.threshold_b),
        "Guidance Start": unit.guidance_start, "Guidance End": unit.guidance_end,
        "Pixel Perfect": unit.pixel_perfect, "Control Mode": unit.control_mode,
    }
    return ", ".join(f"{k}: {_fmt(v)}" for k, v in fields.items())


def network_hashes(pairs) -> str | None:
    """webui ``Lora hashes`` / ``TI hashes``: ``name: hash, ...`` (":" and "," in names dropped)."""
    if not pairs:
        return None
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in pairs)


_SAMPLER_EXTRAS = ("ENSD", "Eta", "Eta DDIM")  # written where the webui writes them, after "Clip skip"


@dataclass(frozen=True)
class Generation:
    """What was generated, described as the webui does: one infotext per image and the info dict.

    ``plan`` is the engine.samplers.SamplingPlan (its ``infotext`` carries the sampler's fields by the webui
    rules: Eta only when not the sampler's default, ENSD only for samplers that use it).
    """

    request: Any  # engine.request.GenerationRequest
    model: Any  # engine.models.checkpoints.LoadedModel
    plan: Any
    width: int
    height: int
    seeds: list[int]
    subseeds: list[int]
    unit_labels: list[str]
    backend: str
    denoising_strength: float | None = None  # img2img, hires fix
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # img2img / hires fields
    lora_hashes: tuple[tuple[str, str], ...] = ()  # (name as written in the prompt, 12-hex hash)
    ti_hashes: tuple[tuple[str, str], ...] = ()
    face_restoration: str | None = None  # the restorer that ran (restore_faces), else None

    def infotext(self, index: int) -> str:
        req, model = self.request, self.model
        sampler = {k: v for k, v in self.plan.infotext.items() if k not in _SAMPLER_EXTRAS}
        extras = {k: v for k, v in self.plan.infotext.items() if k in _SAMPLER_EXTRAS}
        params: dict[str, Any] = {
            "Steps": req.steps,
            **sampler,
            "CFG scale": req.cfg_scale,
            "Seed": self.seeds[index],
            "Face restoration": self.face_restoration,  # webui: the face_restoration_model when restore_faces
            "Size": f"{self.width}x{self.height}",
            "Model hash": model.short_hash,
            "Model": model_label(model),
            "VAE": model.vae_path.stem if getattr(model, "vae_path", None) else None,
            "Variation seed": self.subseeds[index] if req.subseed_strength else None,
            "Variation seed strength": req.subseed_strength if req.subseed_strength else None,
            "Denoising strength": self.denoising_strength,
            "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
            **extras,
            # the webui's speed levers (processing.create_infotext), where it writes them
            "Token merging ratio": getattr(req, "token_merging_ratio", 0) or None,
            "Token merging ratio hr": (getattr(req, "token_merging_ratio_hr", 0) or None)
            if getattr(req, "hires", None) is not None else None,
            "NGMS": getattr(req, "s_min_uncond", 0) or None,
            "NGMS all steps": True if getattr(req, "s_min_uncond", 0) and getattr(req, "s_min_uncond_all", False)
            else None,
            "Tiling": "True" if getattr(req, "tiling", False) else None,  # webui: after RNG, before the extra params
            **self.extra,
            "Backend": self.backend,
        }
        for k, label in enumerate(self.unit_labels):
            params[f"ControlNet {k}"] = label
        # webui: set while the networks activate / the prompts are encoded, after the scripts' fields
        params["Lora hashes"] = network_hashes(self.lora_hashes)
        params["TI hashes"] = network_hashes(self.ti_hashes)
        return create_infotext(req.prompt, req.negative_prompt, params)

    def info(self, infotexts: list[str], timings: dict[str, float], *, device: str, precision: str) -> dict:
        req, model = self.request, self.model
        return {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(self.seeds),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(self.seeds),
            "seed": self.seeds[0],
            "all_seeds": list(self.seeds),
            "subseed": self.subseeds[0],
            "all_subseeds": list(self.subseeds),
            "subseed_strength": req.subseed_strength,
            "denoising_strength": self.denoising_strength,
            "width": self.width,
            "height": self.height,
            "sampler_name": self.plan.sampler.name,
            "scheduler": self.plan.sampler.schedule_label,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "n_iter": req.n_iter,
            "restore_faces": self.face_restoration is not None,
            "face_restoration_model": self.face_restoration,
            "clip_skip": req.clip_skip,
            "sd_model_name": model_label(model),
            "sd_model_hash": model.short_hash,
            "sd_vae_name": model.vae_path.name if getattr(model, "vae_path", None) else None,
            "infotexts": list(infotexts),
            "backend": self.backend,
            "device": device,
            "precision": precision,
            "timings": {k: round(v, 6) for k, v in timings.items()},
        }


def hires_infotext(req: Any, hr_plan: Any, plan: Any) -> dict[str, Any]:
    """The webui's hires fields (processing.StableDiffusionProcessingTxt2Img.init): "Hires upscale" or "Hires
    resize", "Hires steps" (when set), "Hires upscaler", and the hires sampler, schedule, prompts and CFG when
    they differ from the first pass's."""
    hr = req.hires
    out: dict[str, Any] = {}
    if not hr.resize_x and not hr.resize_y:
        out["Hires upscale"] = hr.scale
    else:
        out["Hires resize"] = f"{hr.resize_x}x{hr.resize_y}"
    out["Hires steps"] = hr.steps or None
    if hr.upscaler is not None:  # the webui writes it only when hr_upscaler was given
        out["Hires upscaler"] = hr.upscaler
    if hr_plan.sampler.name != plan.sampler.name:
        out["Hires sampler"] = hr_plan.sampler.name
    if hr.scheduler not in (None, USE_SAME_SCHEDULER) and hr_plan.sampler.schedule_label != \
            plan.sampler.schedule_label:
        out["Hires schedule type"] = hr_plan.sampler.schedule_label
    if hr.prompt is not None and hr.prompt != req.prompt:
        out["Hires prompt"] = hr.prompt
    if hr.negative_prompt is not None and hr.negative_prompt != req.negative_prompt:
        out["Hires negative prompt"] = hr.negative_prompt
    if hr.cfg_scale is not None and hr.cfg_scale != req.cfg_scale:
        out["Hires CFG Scale"] = hr.cfg_scale
    return {k: v for k, v in out.items() if v is not None}

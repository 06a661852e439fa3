"""The webui's listings (``/sdapi/v1/sd-models``, ``sd-vae``, ``loras``, ``embeddings``, ``samplers``,
``schedulers``, ``upscalers``, ``latent-upscale-modes``, ``scripts``, ``script-info``, ``hypernetworks``,
``face-restorers``, ``realesrgan-models``, ``prompt-styles``, ``cmd-flags``, ``memory``): what the model store and
the engine's registries hold, in the webui's shapes (an empty list for what the engine does not have). Nothing
here loads a model."""

from __future__ import annotations

import logging
import os
from typing import Any

from engine import faces
from engine.img2img import IMAGE_UPSCALERS, LATENT_UPSCALERS
from engine.models.checkpoints import Kind, read_safetensors_header, text_encoder_widths
from engine.models.store import SUBDIRS, folders
from engine.networks.embeddings import fits, store_embeddings
from engine.networks.files import lora_problem
from engine.samplers import SCHEDULE_NAMES, SPECS
from engine.styles import load_styles
from engine.upscalers import find_upscalers, upscaler_names

log = logging.getLogger(__name__)

# the scripts this engine runs, by the names the webui lists them under (a script's title, lower case): ControlNet
# (sd-webui-controlnet's "controlnet") and ADetailer (engine.adetailer) are the always-on scripts, on both tabs; "sd upscale" (engine.sd_upscale)
# the one selectable script, on img2img
SCRIPTS = {"txt2img": ["controlnet", "adetailer"], "img2img": ["sd upscale", "controlnet", "adetailer"]}
_SCHEDULE_RHO = {"Karras": 7.0, "Polyexponential": 1.0}


def sd_models(store) -> list[dict[str, Any]]:
    out = []
    for e in store.list(Kind.CHECKPOINT):
        out.append({"title": e.title, "model_name": e.stem, "hash": e.short_hash, "sha256": e.sha256,
                    "filename": f"{'bundled/' if e.bundled else ''}{SUBDIRS[Kind.CHECKPOINT]}/{e.name}",
                    "config": None})
    return out


def sd_vaes(store) -> list[dict[str, Any]]:
    return [{"model_name": e.name, "filename": f"{SUBDIRS[Kind.VAE]}/{e.name}"}
            for e in store.entries(Kind.VAE)]


def loras(store, allow_pickle: bool = False) -> list[dict[str, Any]]:
    """The Lora extension's listing: name (what <lora:NAME> takes), alias, path inside the store, metadata; a
    file the engine refuses by its header, or a pickle without ``allow_pickle`` (the server's opt-in:
    engine.networks.files.lora_problem) also carries ``error``: the file and why."""
    out = []
    for e in store.entries(Kind.LORA):
        meta = {}
        if e.path.suffix.lower() == ".safetensors":
            try:
                meta = read_safetensors_header(e.path).metadata
            except Exception:  # noqa: BLE001 - a broken file is still listed; using it gives the error
                meta = {}
        sub = next((f for f in folders(Kind.LORA) if (e.root / f / e.name).exists()), "Lora")
        row = {"name": e.stem, "alias": meta.get("ss_output_name", e.stem),
               "path": f"{'bundled/' if e.bundled else ''}{sub}/{e.name}", "metadata": meta}
        if why := lora_problem(e.path, allow_pickle):  # listed as the webui lists it, with why using it is refused
            row["error"] = f"{e.name}: {why}"
        out.append(row)
    return out


def current_checkpoint(store, options: dict[str, Any], default_model: str | None):
    """The checkpoint the webui routes use now: the ``sd_model_checkpoint`` option, else the store's default."""
    name = options.get("sd_model_checkpoint")
    return (store.resolve(name, Kind.CHECKPOINT, field="sd_model_checkpoint") if name
            else store.default_checkpoint(default_model))


def embeddings(store, options: dict[str, Any], config) -> dict[str, dict[str, Any]]:
    """The webui's embedding listing: ``loaded`` = the store's embeddings the current checkpoint uses (its text
    encoders' widths, read from its header: nothing is loaded), ``skipped`` = the others (another architecture,
    more than 75 vectors). Without a known checkpoint (a pickle, an empty store) every readable one is
    ``loaded``, as the webui does before it knows the expected shape."""
    widths = None
    try:
        found = text_encoder_widths(current_checkpoint(store, options, config.default_model).path)
        widths = found[1] if found else None
    except Exception as exc:  # noqa: BLE001 - an empty or broken store still lists the embeddings
        log.warning("embeddings: the current checkpoint's text encoders are unknown: %s", exc)
    out: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
    for info in store_embeddings(store, config.allow_pickle):
        if info.name in out["loaded"]:
            continue  # the first usable file of a name wins (the engine's rule)
        usable = widths is None or fits(info.shapes, widths)
        if not usable and info.name in out["skipped"]:
            continue
        out["skipped"].pop(info.name, None)
        out["loaded" if usable else "skipped"][info.name] = {
            "step": info.step, "sd_checkpoint": info.sd_checkpoint, "sd_checkpoint_name": info.sd_checkpoint_name,
            "shape": info.shape, "vectors": info.vectors}
    return out


def samplers() -> list[dict[str, Any]]:
    out = []
    for spec in SPECS.values():
        options: dict[str, str] = {}
        if spec.schedule and spec.schedule not in ("DDIM", "UniPC"):
            options["scheduler"] = spec.schedule.lower().replace(" ", "_")
        for flag, name in (("discard_penultimate", "discard_next_to_last_sigma"), ("second_order", "second_order"),
                           ("brownian", "brownian_noise"), ("uses_ensd", "uses_ensd")):
            if getattr(spec, flag):
                options[name] = "True"
        out.append({"name": spec.name, "aliases": list(spec.aliases), "options": options})
    return out


def schedulers() -> list[dict[str, Any]]:
    return [{"name": label.lower().replace(" ", "_"), "label": label, "aliases": None,
             "default_rho": _SCHEDULE_RHO.get(label, -1.0), "need_inner_model": False} for label in SCHEDULE_NAMES]


def upscalers(models_dir=None) -> list[dict[str, Any]]:
    """The image upscalers: the PIL ones, then the model files of the webui's folders (engine.upscalers), as the
    webui lists them (name, the upscaler class's model_name, the file, the listed scale)."""
    out = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
           for n in IMAGE_UPSCALERS]
    for u in find_upscalers(models_dir) if models_dir is not None else []:
        out.append({"name": u.name, "model_name": u.model_name, "model_path": str(u.path), "model_url": None,
                    "scale": float(u.scale)})
    return out


def latent_upscale_modes() -> list[dict[str, Any]]:
    """The latent upscale modes of the hires fix (engine.img2img)."""
    return [{"name": n} for n in LATENT_UPSCALERS]


def cmd_flags(config) -> dict[str, Any]:
    """The server's flags under the webui's names (no secrets, no server paths: ``ckpt_dir`` relative to the
    models dir)."""
    return {"api": True, "nowebui": True, "api_auth": None, "listen": None, "port": None,
            "ckpt_dir": "Stable-diffusion", "device": config.device,
            "backend": config.backend.value, "precision": config.precision.value, "sdengine": True}


def memory() -> dict[str, Any]:
    """``/sdapi/v1/memory`` as the webui computes it (modules/api/api.py ``get_memory``): ``ram`` of this process
    -- ``used`` its resident set, ``total`` the machine's memory (the webui's ``100 * rss / memory_percent``),
    ``free`` = total - used -- and ``cuda`` from ``torch.cuda.mem_get_info`` / ``memory_stats`` (``system``,
    ``active``, ``allocated``, ``reserved``, ``inactive``, ``events``) when this process runs CUDA; else
    ``{"error": "unavailable"}`` as the webui answers without CUDA. torch is never imported for it."""
    import sys

    try:
        rss, total = _rss_and_total()
        ram: dict[str, Any] = {"free": total - rss, "used": rss, "total": total}
    except (ValueError, OSError, AttributeError, ImportError) as exc:
        ram = {"error": str(exc) or "unavailable on this system"}
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            cuda: dict[str, Any] = {"error": "unavailable"}
        else:
            free, total_cuda = torch.cuda.mem_get_info()
            stats = dict(torch.cuda.memory_stats())

            def pair(key: str) -> dict[str, int]:
                return {"current": stats.get(f"{key}.all.current", 0), "peak": stats.get(f"{key}.all.peak", 0)}

            cuda = {"system": {"free": free, "used": total_cuda - free, "total": total_cuda},
                    "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
                    "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
                    "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    except Exception as exc:  # noqa: BLE001 - the webui answers any failure as the error text
        cuda = {"error": str(exc)}
    return {"ram": ram, "cuda": cuda}


def _rss_and_total() -> tuple[int, int]:
    """This process's resident set and the machine's memory, in bytes (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        return rss, os.sysconf("SC_PHYS_PAGES") * page
    process = psutil.Process(os.getpid())
    return process.memory_info().rss, psutil.virtual_memory().total


def scripts() -> dict[str, list[str]]:
    """``/sdapi/v1/scripts``: ``{"txt2img": [...], "img2img": [...]}`` of the scripts this engine runs."""
    return {k: list(v) for k, v in SCRIPTS.items()}


def script_info(models_dir=None) -> list[dict[str, Any]]:
    """``/sdapi/v1/script-info``: the webui's ScriptInfo items (name, is_alwayson, is_img2img, args) of
    :func:`scripts`; ControlNet's arguments are its units (one ScriptArg each, as the extension's script takes a
    unit per argument)."""
    from engine.rules import MAX_UNITS

    from engine.sd_upscale import DEFAULT_OVERLAP, DEFAULT_SCALE, MAX_OVERLAP

    def arg(label, value=None, lo=None, hi=None, step=None, choices=None):
        return {"label": label, "value": value, "minimum": lo, "maximum": hi, "step": step, "choices": choices}

    args = {"controlnet": [arg(f"ControlNet Unit {i}") for i in range(MAX_UNITS)],
            "sd upscale": [arg(None), arg("Tile overlap", DEFAULT_OVERLAP, 0, MAX_OVERLAP, 16),
                           arg("Upscaler", "None", choices=list(upscaler_names(models_dir))),
                           arg("Scale Factor", DEFAULT_SCALE, 1.0, 4.0, 0.05)],
            # the extension's: ad_enable, skip_img2img, then one settings object per tab (2 tabs by default)
            "adetailer": [arg("Enable ADetailer", False), arg("Skip img2img", False), arg(None, None), arg(None, None)]}
    return [{"name": name, "is_alwayson": name in ("controlnet", "adetailer"), "is_img2img": tab == "img2img", "args": args[name]}
            for tab, names in SCRIPTS.items() for name in names]


def hypernetworks() -> list[dict[str, Any]]:
    """``[{name, path}]`` of the hypernetworks the engine applies: none (a ``<hypernet:...>`` prompt tag is
    refused, naming it)."""
    return []


def face_restorers(store) -> list[dict[str, Any]]:
    """``[{name, cmd_dir}]`` of the face restorers with a model file (engine.faces: ``models/Codeformer``,
    ``models/GFPGAN``), the webui's order; ``cmd_dir`` is the folder the file is in."""
    return [{"name": name, "cmd_dir": str(path.parent)} for name, path in faces.installed(store.root).items()]


def realesrgan_models(models_dir=None) -> list[dict[str, Any]]:
    """``[{name, path, scale}]`` of the Real-ESRGAN models (the models folder RealESRGAN/)."""
    return [{"name": u.name, "path": str(u.path), "scale": u.scale}
            for u in (find_upscalers(models_dir) if models_dir is not None else []) if u.folder == "RealESRGAN"]


def prompt_styles() -> list[dict[str, Any]]:
    """``[{name, prompt, negative_prompt}]`` of styles.csv in the data folder (engine.styles)."""
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in load_styles().values()]

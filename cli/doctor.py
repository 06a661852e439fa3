"""``sdengine doctor``: which backend and precision a command will use and why, what torch build is installed,
and which optional extras are missing for what. Nothing is loaded but the runtimes' version information."""

from __future__ import annotations

import importlib.util
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import click

# extra -> (the modules it installs, what needs it)
EXTRAS = {
    "server": (("fastapi", "uvicorn", "multipart"), "sdengine serve (the /scc, webui and OpenAI APIs)"),
    "openvino": (("openvino",), "the openvino backend, the fastest on CPU (the CPU default when installed)"),
    "controlnet": (("cv2",), "the OpenCV ControlNet preprocessors (canny, depth, ...)"),
    "queue": (("celery", "redis"), "sdengine serve --queue and sdengine worker (many GPUs)"),
    "upscalers": (("spandrel",), "model upscalers (ESRGAN, Real-ESRGAN, SwinIR, ...)"),
    "faces": (("spandrel_extra_arches", "dlib"), "restore_faces (GFPGAN, CodeFormer)"),
    "gpu": ((), "onnxruntime on CUDA (the CUDA and TensorRT execution providers): onnxruntime-gpu"),
    "tensorrt": (("tensorrt",), "the tensorrt backend (NVIDIA GPUs)"),
}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch_lines() -> tuple[list[str], bool]:
    """The torch build and whether CUDA can run; a CUDA build on a machine without a GPU is pointed out."""
    try:
        import torch
    except ImportError:
        return ["torch: not installed (sdengine needs it: see the README's install section)"], False
    cuda_build = torch.version.cuda
    available = bool(cuda_build) and torch.cuda.is_available()
    lines = [f"torch {torch.__version__}: " + (f"CUDA {cuda_build} build" if cuda_build else "CPU build")]
    if available:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"  CUDA devices: {names}")
    elif cuda_build:
        lines.append(f"  no CUDA device usable here: the CPU build is a fraction of the size (pip install torch "
                     f"--index-url {CPU_TORCH_INDEX})")
    return lines, available


def report() -> list[str]:
    """The doctor's report, line by line."""
    from core.cpu import native_bf16
    from engine.config import configured_default_model, default_backend, default_precision, openvino_installed, \
        sdengine_home

    lines = [f"sdengine {_version('sdengine') or 'unknown (not installed)'}, Python {platform.python_version()} "
             f"({sys.executable})", f"home: {sdengine_home()} (sdengine paths)"]
    model, source = configured_default_model()
    lines.append(f"default model: {model or 'sdengine-demo'} ({source})")
    torch_lines, cuda = _torch_lines()
    lines += torch_lines
    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    providers: list[str] = []
    if ort:
        try:
            import onnxruntime

            providers = list(onnxruntime.get_available_providers())
        except ImportError:
            pass
    lines.append(f"onnxruntime {ort or 'not installed'}" + (f": {', '.join(providers)}" if providers else ""))
    lines.append(f"openvino {_version('openvino') or 'not installed'}")
    bf16 = native_bf16()
    lines.append(f"CPU: {platform.machine()}, native bf16 (AVX512-BF16/AMX): {'yes' if bf16 else 'no'}")
    lines.append("")
    # the choice, and why (engine.config.default_backend / default_precision are the rule)
    backend = default_backend("cpu")
    why = ("openvino is installed: the fastest CPU backend measured (BENCHMARKS.md)" if openvino_installed() else
           "openvino is not installed (pip install 'sdengine[openvino]' for the faster CPU backend)")
    precision = default_precision(backend, "cpu", bf16)
    lines.append(f"device cpu -> backend {backend.value}, precision {precision.value}: {why}"
                 + ("; bf16 because the CPU has native bf16" if precision.value == "bf16" else ""))
    if cuda:
        gpu_why = ("the CUDA execution provider is installed" if "CUDAExecutionProvider" in providers else
                   "but onnxruntime has no CUDA provider: pip install 'sdengine[gpu]' (or --backend torch)")
        lines.append(f"device cuda -> backend {default_backend('cuda').value}, precision fp32 unless --precision "
                     f"fp16: {gpu_why}")
    else:
        lines.append("device cuda: not usable here (no CUDA build of torch or no GPU)")
    lines.append("(a command's --backend / --device / --precision override these)")
    lines.append("")
    lines.append("optional extras:")
    for extra, (modules, purpose) in EXTRAS.items():
        if extra == "gpu":
            ok = "CUDAExecutionProvider" in providers
        else:
            ok = all(_has(m) for m in modules)
        missing = [m for m in modules if not _has(m)]
        state = "installed" if ok else ("missing " + ", ".join(missing) if missing else "missing")
        hint = "" if ok else f"  -> pip install 'sdengine[{extra}]'"
        lines.append(f"  {extra:<10} {state:<28} {purpose}{hint}")
    return lines


@click.command()
def doctor() -> None:
    """Say which backend and precision commands will use and why, which torch build is installed, and which
    optional extras are missing for what (nothing is loaded; exit 0)."""
    for line in report():
        click.echo(line)

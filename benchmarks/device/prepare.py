"""Prepare what the one-shot device suite carries to a GPU machine that has no network (run it here, online).

    python -m benchmarks.device.prepare                 # benchmarks/device/carry/wheels (< 60 MiB)
    python -m benchmarks.device.prepare --ort-gpu       # + onnxruntime-gpu in 50 MiB pieces (ort-gpu-parts/)
    python -m benchmarks.device.prepare --only-sdengine # just our wheel (what the CI test does, offline)

The GPU machines have Python 3.12, CUDA torch, triton, onnx, onnxruntime (CPU), transformers, accelerate and
opencv, and no diffusers. ``carry/wheels`` gets our own wheel (``pip wheel --no-deps``: packaging, the bundled
demo model and configs are checked by installing it there) and the wheels the image lacks
(:data:`CARRIED`), at the versions installed here (the combination our tests pass with), for CPython 3.12 on
x86-64 Linux; binary ones (pillow, pydantic-core) as manylinux wheels.

onnxruntime-gpu (CUDA 13 build, :data:`ORT_GPU`, ~256 MB) is over what one device call can carry (64 MiB), so
``--ort-gpu`` splits it into 50 MiB pieces ``ort-gpu-parts/part-NN`` with ``manifest.json`` (name, size,
sha256 of the wheel and of each piece). Carry the pieces over several calls on a warm machine (paths already
there are kept between calls), then the suite joins them, checks the sha256 and installs the wheel with
``--no-deps`` into its own folder, first on ``PYTHONPATH`` (its CUDA libraries come from the CUDA torch already
installed, through ``onnxruntime.preload_dlls()``). Both folders are git-ignored (see benchmarks/device/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger("benchmarks.device.prepare")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CARRY = HERE / "carry"
PARTS = HERE / "ort-gpu-parts"
LIMIT_MIB = 60
PIECE = 50 * 2**20
# distributions the GPU image lacks (diffusers and sdengine's own small dependencies), at our versions
CARRIED = ("diffusers", "importlib-metadata", "zipp", "click", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "typing-extensions", "pillow")
ORT_GPU = "onnxruntime-gpu==1.31.1"
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--platform",
          "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--only-binary=:all:"]


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def build_own_wheel(dest: Path) -> Path:
    """Our wheel, built offline from this checkout (no build isolation: setuptools from this environment)."""
    before = set(dest.glob("sdengine-*.whl"))
    for old in before:
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        # build from a copy without ignored folders (.venv, models, caches) so that nothing stray is packed
        src = Path(tmp) / "src"
        top = {".venv", ".git", "models", "outputs", "cache", "build", "dist", ".pytest_cache", ".hypothesis",
               "training", "tests", "docs"}

        def ignore(folder: str, names: list[str]) -> set[str]:
            skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
            if Path(folder) == ROOT:
                skip |= top & set(names)
            if Path(folder) == HERE:
                skip |= {CARRY.name, PARTS.name} & set(names)
            return skip

        shutil.copytree(ROOT, src, ignore=ignore)
        pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src))
    wheels = list(dest.glob("sdengine-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one sdengine wheel in {dest}, found {wheels}")
    return wheels[0]


def pinned(name: str) -> str:
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def download_carried(dest: Path) -> None:
    pip("download", "--no-deps", "-q", "-d", str(dest), *TARGET, *(pinned(n) for n in CARRIED))


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(wheel: Path, parts_dir: Path, piece: int = PIECE) -> dict:
    """Cut ``wheel`` into ``part-NN`` files of at most ``piece`` bytes with a manifest; returns the manifest."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("part-*"):
        old.unlink()
    manifest = {"wheel": wheel.name, "size": wheel.stat().st_size, "sha256": sha256(wheel), "parts": []}
    with open(wheel, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(piece), b"")):
            part = parts_dir / f"part-{i:02d}"
            part.write_bytes(block)
            manifest["parts"].append({"name": part.name, "size": len(block),
                                      "sha256": hashlib.sha256(block).hexdigest()})
    (parts_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def join(parts_dir: Path, dest_dir: Path) -> Path:
    """Rebuild the wheel from its pieces; raises ValueError naming a missing or corrupt piece."""
    manifest = json.loads((parts_dir / "manifest.json").read_text())
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / manifest["wheel"]
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for part in manifest["parts"]:
            path = parts_dir / part["name"]
            if not path.exists():
                raise ValueError(f"{path}: piece missing (carry it; {len(manifest['parts'])} pieces in all)")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise ValueError(f"{path}: sha256 mismatch (corrupt piece)")
            f.write(data)
    if sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise ValueError(f"{manifest['wheel']}: sha256 of the joined pieces does not match the manifest")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CARRY)
    p.add_argument("--only-sdengine", action="store_true", help="only our wheel (offline)")
    p.add_argument("--ort-gpu", action="store_true", help=f"also {ORT_GPU} in 50 MiB pieces under {PARTS}")
    p.add_argument("--parts-dir", type=Path, default=PARTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wheels = args.out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    own = build_own_wheel(wheels)
    log.info("built %s (%.1f MiB)", own.name, own.stat().st_size / 2**20)
    if not args.only_sdengine:
        download_carried(wheels)
    size = folder_mib(args.out)
    for w in sorted(wheels.iterdir()):
        log.info("  %-70s %6.1f MiB", w.name, w.stat().st_size / 2**20)
    log.info("%s: %.1f MiB (limit %d MiB)", args.out, size, LIMIT_MIB)
    if size > LIMIT_MIB:
        log.error("the carry folder is over %d MiB: a device call carries at most 64 MiB", LIMIT_MIB)
        return 1
    if args.ort_gpu:
        with tempfile.TemporaryDirectory() as tmp:
            pip("download", "--no-deps", "-q", "-d", tmp, *TARGET, ORT_GPU)
            wheel = next(Path(tmp).glob("onnxruntime_gpu-*.whl"))
            manifest = split(wheel, args.parts_dir)
        log.info("%s: %d pieces of <= 50 MiB in %s; carry one per device call, e.g. carry=[\"%s\"]",
                 manifest["wheel"], len(manifest["parts"]), args.parts_dir,
                 (args.parts_dir / "part-00").relative_to(ROOT) if args.parts_dir.is_relative_to(ROOT) else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

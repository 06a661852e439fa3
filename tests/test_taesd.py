"""TAESD / TAESDXL on real weights and real photos (the shared real-weights folder: $SDENGINE_SHARED_WEIGHTS, or
shared/weights beside the repository), through the engine's own path
(engine.preview.ApproxModels.run -> engine.tiling encode/decode over the ``taesd_*`` components) on every CPU
backend; parity with diffusers' AutoencoderTiny given the same weights; the Approx NN decoders and the "Approx
cheap" factors. Tests that need the shared weights skip with a reason where the folder is absent."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.models.approx import (TAESD_STEMS, cheap_approximation, find, latent_space, load_approx_nn, load_taesd)
from engine.models.family import Arch
from engine.preview import ApproxModels, Previewer, grid, select
from engine.request import LivePreview
from engine.tiling import VaeTiling
from engine.tiling import decode as decode_latents
from engine.tiling import encode as encode_image
from tests.weights_support import WEIGHTS

BACKENDS = ("torch", "onnxruntime", "openvino")
PSNR_MIN = 24.0  # dB at 512x512 (TAESD's README: about 25 dB on a photo)
PARITY_TOL = 2e-4  # max abs difference vs diffusers AutoencoderTiny, fp32 torch, same weights


needs_weights = pytest.mark.skipif(WEIGHTS is None,
                                   reason="the shared real-weights folder (real TAESD files, photos) is absent")


def photo(name: str, size: int = 512) -> np.ndarray:
    """A real photo, centre-cropped to a square and resized to ``size``: (1, 3, size, size) floats in [0, 1]."""
    from PIL import Image

    img = Image.open(WEIGHTS / "photos" / name).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return (np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def approx(tmp_path_factory):
    """ApproxModels per backend (each at its default precision: the engine's path) over an empty user store:
    the bundled TAESD files (real weights); "fp32:KIND" at fp32 for the agreement checks."""
    root = tmp_path_factory.mktemp("taesd")
    out = {kind: ApproxModels(EngineConfig(backend=kind, models_dir=root / "models", cache_dir=root / "cache"),
                              root / "models") for kind in BACKENDS}
    for kind in ("onnxruntime", "openvino"):
        out[f"fp32:{kind}"] = ApproxModels(EngineConfig(backend=kind, precision="fp32", models_dir=root / "models",
                                                        cache_dir=root / "cache32"), root / "models")
    return out


@pytest.fixture(scope="module")
def photos():
    """Real photos at 512x512 (the PSNR checks) and smaller (parity, agreement: the same code at less cost)."""
    if WEIGHTS is None:
        pytest.skip("the shared real-weights folder is absent")
    return {"astronaut.png": photo("astronaut.png"), "chelsea-256": photo("chelsea.png", 256),
            "coffee-128": photo("coffee.png", 128)}


@needs_weights
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("space", ["sd", "sdxl"])
def test_encode_decode_real_photos(approx, photos, backend, space):
    """encode -> decode at 512x512 through the engine's path: >= 24 dB on real photos, on every backend."""
    run = approx[backend].run(space)
    tiling = VaeTiling()
    pixels = photos["astronaut.png"]
    latent = encode_image(run, pixels, tiling)
    assert latent.shape == (1, 4, 64, 64)
    out = decode_latents(run, latent, tiling)
    assert out.shape == pixels.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert psnr(out, pixels) >= PSNR_MIN, (backend, space, psnr(out, pixels))


@needs_weights
def test_random_weights_control_and_mismatched_spaces(photos):
    """The PSNR is the weights' doing: TAESD of the real architecture with random weights scores far lower
    (about 6 dB), and the SD1 encoder with the SDXL decoder (other latent spaces) too."""
    from engine.models import taesd_nets

    pixels = photos["chelsea-256"]
    torch.manual_seed(0)
    enc, dec = taesd_nets.taesd_encoder().eval(), taesd_nets.taesd_decoder().eval()
    with torch.no_grad():
        out = dec(enc(torch.from_numpy(pixels))).clamp(0, 1).numpy()
    assert psnr(out, pixels) < 12.0
    enc1 = load_taesd(WEIGHTS / "taesd" / "taesd_encoder.safetensors", "encoder")
    decxl = load_taesd(WEIGHTS / "taesd" / "taesdxl_decoder.safetensors", "decoder")
    with torch.no_grad():
        mixed = decxl(enc1(torch.from_numpy(pixels))).clamp(0, 1).numpy()
    assert psnr(mixed, pixels) < 18.0


@needs_weights
@pytest.mark.parametrize("space", ["sd", "sdxl"])
def test_parity_with_diffusers_autoencoder_tiny(approx, photos, space):
    """Our TAESD (the official architecture and keys) vs diffusers' AutoencoderTiny with the same weights (keys
    mapped to its layout): encoder and decoder outputs within PARITY_TOL (fp32, torch)."""
    from diffusers import AutoencoderTiny

    from safetensors.torch import load_file

    ref = AutoencoderTiny().eval()
    state = {}
    for part, shift in (("encoder", 0), ("decoder", -1)):
        for key, value in load_file(str(WEIGHTS / "taesd" / f"{TAESD_STEMS[(space, part)]}.safetensors")).items():
            index, rest = key.split(".", 1)
            state[f"{part}.layers.{int(index) + shift}.{rest}"] = value.float()
    ref.load_state_dict(state)
    run = approx["torch"].run(space)
    pixels = photos["chelsea-256"]
    ours_latent = run("vae_encoder", {"image": pixels})["latent"]
    with torch.no_grad():
        ref_latent = ref.encode(torch.from_numpy(pixels) * 2 - 1).latents.numpy()
        ref_image = (ref.decode(torch.from_numpy(ref_latent)).sample / 2 + 0.5).clamp(0, 1).numpy()
    assert np.abs(ours_latent - ref_latent).max() <= PARITY_TOL
    ours_image = run("vae_decoder", {"latent": ref_latent})["image"]
    assert np.abs(ours_image - ref_image).max() <= PARITY_TOL
    # the diffusers layout of the same weights loads too (engine.models.approx.load_taesd)
    path = approx["torch"].models_dir / "diffusers-layout.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("decoder.")}, str(path))
    with torch.no_grad():
        again = load_taesd(path, "decoder")(torch.from_numpy(ref_latent)).clamp(0, 1).numpy()
    assert np.abs(again - ours_image).max() <= PARITY_TOL


@needs_weights
def test_backends_agree(approx, photos):
    """onnxruntime and openvino run the exported taesd_* graphs: at fp32 equal to the torch backend within 2e-3."""
    pixels = photos["coffee-128"]
    ref = approx["torch"].run("sd")("vae_encoder", {"image": pixels})["latent"]
    for kind in ("fp32:onnxruntime", "fp32:openvino"):
        latent = approx[kind].run("sd")("vae_encoder", {"image": pixels})["latent"]
        assert np.abs(latent - ref).max() < 2e-3, kind
        image = approx[kind].run("sd")("vae_decoder", {"latent": ref})["image"]
        ref_image = approx["torch"].run("sd")("vae_decoder", {"latent": ref})["image"]
        assert np.abs(image - ref_image).max() < 2e-3, kind


@needs_weights
def test_approx_nn_and_cheap_previews_on_real_latents(approx, photos, tmp_path):
    """The webui's Approx NN files (pickles: read only with the opt-in) and the cheap factors, on TAESD-encoded
    latents of a real photo, compared with the photo at the preview's size."""
    from PIL import Image

    pixels = photos["chelsea-256"]
    models = tmp_path / "models" / "VAE-approx"
    models.mkdir(parents=True)
    for name in ("model.pt", "vaeapprox-sdxl.pt"):
        (models / name).write_bytes((WEIGHTS / "vae-approx" / name).read_bytes())
    assert find(tmp_path / "models", "model", "approx_nn", allow_pickle=False) is None  # a pickle, no opt-in
    for space, least in (("sd", 16.0), ("sdxl", 20.0)):
        latent = approx["torch"].run(space)("vae_encoder", {"image": pixels})["latent"]
        found = find(tmp_path / "models", "model" if space == "sd" else "vaeapprox-sdxl", "approx_nn", True)
        module = load_approx_nn(found.path, allow_pickle=True)
        with torch.no_grad():
            out = np.clip(module(torch.from_numpy(latent)).numpy() * 0.5 + 0.5, 0, 1)
        assert out.shape == (1, 3, 64, 64)
        small = np.asarray(Image.fromarray((pixels[0].transpose(1, 2, 0) * 255).astype(np.uint8)).resize(
            (64, 64), Image.BOX), dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
        assert psnr(out, small) >= least, (space, psnr(out, small))
        cheap = cheap_approximation(latent, space)
        tiny = small.reshape(1, 3, 32, 2, 32, 2).mean(axis=(3, 5))
        assert cheap.shape == (1, 3, 32, 32) and psnr(cheap, tiny) >= 10.0, psnr(cheap, tiny)
        # the same with the engine's decoder choice (ApproxModels.preview_decoder) and the opt-in
        models_with_files = ApproxModels(EngineConfig(allow_pickle=True), tmp_path / "models")
        decode = models_with_files.preview_decoder("Approx NN", space, None, VaeTiling(), "cpu")
        assert np.abs(decode(latent) - out).max() < 1e-6


def test_latent_space_and_file_lookup(tmp_path):
    assert latent_space(Arch.SDXL) == "sdxl" and latent_space(Arch.SD1) == latent_space(Arch.SD2) == "sd"
    bundled = find(tmp_path, "taesd_decoder", "taesd", allow_pickle=False)
    assert bundled is not None and bundled.bundled  # shipped with the package
    user = tmp_path / "VAE-approx"
    user.mkdir()
    (user / "taesd_decoder.pth").write_bytes(b"not read without the opt-in")
    assert find(tmp_path, "taesd_decoder", "taesd", allow_pickle=False).bundled
    assert find(tmp_path, "taesd_decoder", "taesd", allow_pickle=True).path == user / "taesd_decoder.pth"


def test_previewer_keeps_the_newest_and_never_blocks():
    """The sampling side only drops a latent in the mailbox; a slow decode sees the newest one (others dropped),
    and the sink gets RGB uint8 grids of the batch."""
    import threading

    gate = threading.Event()
    seen: list[tuple[int, tuple]] = []

    def decode(latent):
        gate.wait(5)
        return np.full((latent.shape[0], 3, 16, 16), 0.5, dtype=np.float32)

    previewer = Previewer(LivePreview("Approx cheap", 2, "Combined"), decode, lambda s, im: seen.append((s, im.shape)))
    x0 = np.zeros((3, 4, 2, 2), dtype=np.float32)

    class Cond:
        positive = [[(0, 1.0)], [(1, 1.0)]]
        negative = [2, 2]

    last = (x0, Cond, x0[:2] + 1, True)
    for step in range(1, 9):
        previewer.offer(step, last)  # returns at once although the decode is held
    gate.set()
    previewer.flush(5)
    previewer.close(5)
    # offers at steps 2, 4, 6, 8 (the interval); the held decode made the middle ones replace each other
    assert seen[-1][0] == 8 and previewer.dropped >= 1 and previewer.decoded + previewer.dropped == 4
    assert all(step % 2 == 0 for step, _ in seen)
    assert all(shape == (16, 32, 3) for _, shape in seen)  # 2 images in a 2-column grid
    assert np.array_equal(select(last, "Prompt"), x0[[0, 1]]) and select(last, "Negative prompt").shape[0] == 2
    assert grid(np.ones((1, 3, 4, 4), dtype=np.float32)).dtype == np.uint8

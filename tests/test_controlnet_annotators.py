"""Model-based ControlNet preprocessors (engine.controlnet.annotators) against the reference implementation:
controlnet_aux's detectors loaded by their own ``from_pretrained`` from the same files and called the way
sd-webui-controlnet calls its annotators (the input resized and padded by ``resize_image_with_pad``, the padding
cropped off afterwards).

- Real trained weights (the shared folder: PiDiNet ``table5_pidinet.pth``, M-LSD tiny) on real photos: maps equal
  to the reference's (tolerance: 0 uint8 levels; same network, same CPU kernels) and visibly edges (mean response
  on a photo vs a flat image).
- The other networks with random weights of their real architectures, saved into files of the real names and
  layouts (key prefixes, wrapping dicts): the same equality, the sizes submit plans, the sliders.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2")
torch = pytest.importorskip("torch")
import importlib.util  # noqa: E402

if importlib.util.find_spec("controlnet_aux") is None:
    pytest.skip("controlnet_aux (the 'annotators' extra) is not installed", allow_module_level=True)

from core.errors import InvalidRequest  # noqa: E402
from engine.controlnet import annotators, unit_sizes  # noqa: E402
from engine.controlnet.images import fit_detected_map  # noqa: E402
from engine.controlnet.preprocessors import PREPROCESSORS, get_preprocessor, resize_image_with_pad  # noqa: E402
from engine.request import ControlNetUnit  # noqa: E402
from tests.test_taesd import WEIGHTS, needs_weights  # noqa: E402
from tests.conftest import assert_missing_file_refused  # noqa: E402

aux = annotators.aux


def _photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    image = Image.open(WEIGHTS / "photos" / name).convert("RGB")
    if size is not None:
        image = image.resize(size, Image.BICUBIC)
    return np.asarray(image)


def _scene(h: int = 96, w: int = 128) -> np.ndarray:
    """A drawn scene with edges and lines (rectangles, a circle, a diagonal) on a gradient."""
    import cv2

    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(40, 200, w, dtype=np.uint8)[None, :, None]
    cv2.rectangle(img, (w // 8, h // 8), (w // 2, h // 2), (250, 30, 30), -1)
    cv2.circle(img, (3 * w // 4, h // 2), h // 5, (20, 220, 60), -1)
    cv2.line(img, (0, h - 1), (w - 1, h // 3), (255, 255, 255), 2)
    return img


def _reference_padded(detector_call, image: np.ndarray, res: int) -> np.ndarray:
    """The extension's way: resize_image_with_pad, the annotator on the padded image, padding cropped off."""
    padded, remove_pad = resize_image_with_pad(image, res)
    side = min(padded.shape[:2])
    return remove_pad(np.asarray(detector_call(padded, side)))


def _gray3(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


# ----------------------------------------------------------------------------------- random-weight files


def _randomize(net, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale / max(1.0, p[0].numel() ** 0.5))
    return net.eval()


def _half(obj):
    """The floating tensors of a state dict (nested) as fp16: half the bytes on disk. The engine and the reference
    load them alike, into the fp32 networks (``load_state_dict`` casts), so their maps stay comparable bit for
    bit."""
    if isinstance(obj, torch.Tensor):
        return obj.half() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _half(v) for k, v in obj.items()}
    return obj


@pytest.fixture(scope="session")
def random_dir(tmp_path_factory):
    """An extension-layout downloads folder (``<sub>/<file>``) of random weights of the real architectures, in
    the real files' layouts: made once per session, stored as fp16 (about half the bytes: the real architectures
    are fixed by the loaders, so they cannot be made smaller), deleted after the session (pytest keeps its last
    temp folders). The networks are made in a function of their own, so none stays in memory meanwhile."""
    root = tmp_path_factory.mktemp("annotators")
    _write_random_weights(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _write_random_weights(root: Path) -> None:
    import functools

    import torch.nn as nn

    def save(sub, name, obj):
        (root / sub).mkdir(exist_ok=True)
        torch.save(_half(obj), root / sub / name)

    hed = _randomize(aux("hed").ControlNetHED_Apache2(), 1)
    save("hed", "ControlNetHED.pth", hed.state_dict())
    save("TEED", "7_model.pth", _randomize(aux("teed").TED(), 11).state_dict())
    large = _randomize(aux("mlsd").MobileV2_MLSD_Large(), 2)
    save("mlsd", "mlsd_large_512_fp32.pth", large.state_dict())
    lineart = aux("lineart")
    save("lineart", "sk_model.pth", _randomize(lineart.Generator(3, 1, 3), 3).state_dict())
    save("lineart", "sk_model2.pth", _randomize(lineart.Generator(3, 1, 3), 4).state_dict())
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    anime = _randomize(aux("lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False), 5)
    save("lineart_anime", "netG.pth", {f"module.{k}": v for k, v in anime.state_dict().items()})  # DataParallel keys
    op = aux("open_pose")
    import importlib as il

    body_mod = il.import_module("controlnet_aux.open_pose.body")
    hand_mod = il.import_module("controlnet_aux.open_pose.hand")
    face_mod = il.import_module("controlnet_aux.open_pose.face")
    del op
    for name, net, seed in (("body_pose_model.pth", body_mod.bodypose_model(), 6),
                            ("hand_pose_model.pth", hand_mod.handpose_model(), 7)):
        # the original files' keys drop the block prefix (model0.conv1_1.weight -> conv1_1.weight)
        # weights scaled down: random pose networks of the usual scale find hundreds of "people" (minutes of
        # candidate matching); at this scale they find none, and the maps are blank on both sides, so the loading
        # of these files is checked by test_openpose_files_load_as_the_reference
        state = _randomize(net, seed, 1e-3).state_dict()
        save("openpose", name, {k.split(".", 1)[1]: v for k, v in state.items()})
    save("openpose", "facenet.pth", _randomize(face_mod.FaceNet(), 8, 1e-3).state_dict())
    aux("normalbae")  # its package first, through the import shims
    nnet = il.import_module("controlnet_aux.normalbae.nets.NNET")
    import types

    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    bae = nnet.NNET(args)
    bae.eval()
    save("normal_bae", "scannet.pt", {"model": {f"module.{k}": v for k, v in bae.state_dict().items()}})


# the engine's module -> (reference detector from the folder, call kwargs); detect/image resolution added
def _reference(module: str, folder: Path):
    d = str(folder)
    if module in ("pidinet", "pidinet_safe", "pidinet_sketch", "pidinet_scribble"):
        det = aux("pidi").PidiNetDetector.from_pretrained(str(folder / "pidinet"))
        return det, {"safe": module == "pidinet_safe", "apply_filter": module == "pidinet_sketch"}
    if module in ("hed", "hed_safe", "scribble_hed"):
        return aux("hed").HEDdetector.from_pretrained(str(folder / "hed")), {"safe": module == "hed_safe"}
    if module == "softedge_teed":  # the extension's annotator/teed TEEDDetector is the same code
        return aux("teed").TEEDdetector.from_pretrained(str(folder / "TEED"), "7_model.pth"), {"safe_steps": 2}
    if module == "mlsd":
        mlsd = aux("mlsd")
        if (folder / "mlsd" / "mlsd_large_512_fp32.pth").is_file():
            return mlsd.MLSDdetector.from_pretrained(str(folder / "mlsd")), {"thr_v": 0.1, "thr_d": 0.1}
        net = __import__("controlnet_aux.mlsd.models.mbv2_mlsd_tiny", fromlist=["x"]).MobileV2_MLSD_Tiny()
        net.load_state_dict(torch.load(folder / "mlsd" / "mlsd_tiny_512_fp32.pth", weights_only=True))
        return mlsd.MLSDdetector(net.eval()), {"thr_v": 0.1, "thr_d": 0.1}
    if module in ("lineart", "lineart_coarse"):
        return aux("lineart").LineartDetector.from_pretrained(str(folder / "lineart")), \
            {"coarse": module == "lineart_coarse"}
    if module == "lineart_anime":
        return aux("lineart_anime").LineartAnimeDetector.from_pretrained(str(folder / "lineart_anime")), {}
    if module.startswith("openpose"):
        det = aux("open_pose").OpenposeDetector.from_pretrained(str(folder / "openpose"))
        return det, {"include_body": module != "openpose_faceonly",
                     "include_hand": module in ("openpose_hand", "openpose_full"),
                     "include_face": module in ("openpose_face", "openpose_faceonly", "openpose_full")}
    if module == "normal_bae":
        return aux("normalbae").NormalBaeDetector.from_pretrained(str(folder / "normal_bae")), {}
    raise AssertionError(module)


def _reference_map(module, folder, image, res):
    det, kwargs = _reference(module, folder)
    if module == "softedge_teed":  # no image_resolution: its map comes back at its input's size
        call = lambda x, s: det(x, detect_resolution=s, output_type="np", **kwargs)  # noqa: E731
    else:
        call = lambda x, s: det(x, detect_resolution=s, image_resolution=s, output_type="np", **kwargs)  # noqa: E731
    out = _reference_padded(call, image, res)
    if module in ("pidinet_scribble", "scribble_hed"):  # the extension's scribble post-processing, after the crop
        import cv2

        out = aux("util").nms(out[:, :, 0], 127, 3.0)
        out = cv2.GaussianBlur(out, (0, 0), 3.0)
        out[out > 4] = 255
        out[out < 255] = 0
    return _gray3(out)


# openpose_full stands for its family (the same detector, flags only; the random pose networks find no one, see
# random_dir); the heavy networks run on one image
RANDOM_MODULES = ("hed", "hed_safe", "scribble_hed", "softedge_teed", "mlsd", "lineart", "lineart_coarse", "lineart_anime",
                  "normal_bae", "openpose_full")
HEAVY = ("normal_bae", "openpose_full")


@pytest.mark.parametrize("module", RANDOM_MODULES)
def test_random_weight_networks_equal_the_reference(module, random_dir, annotators_env):
    """Random weights of the real architecture in files of the real names/layouts, read from the extension's
    downloads layout: the engine's map equals controlnet_aux's (from_pretrained on the same folder) called the
    way the extension calls it, at an aligned size (no padding) and an odd one (padding cropped off); tolerance
    0 uint8 levels."""
    annotators_env(random_dir)
    pre = get_preprocessor(module)
    pre.check_available("module")
    cases = ((_scene(64, 128), 64), (_scene(70, 90), 64))
    for image, res in cases[1:] if module in HEAVY else cases:
        ours = pre(image, res)
        expected = _reference_map(module, random_dir, image, res)
        _, (h, w) = pre.sizes(*image.shape[:2], res)
        assert ours.shape == expected.shape == (h, w, 3), module
        assert ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, expected, err_msg=module)


def test_openpose_files_load_as_the_reference(random_dir):
    """The openpose body, hand and face files (the original layouts: keys without the block prefix for body and
    hand) load into the same networks as controlnet_aux's own loaders make: equal weights, equal outputs."""
    ours = annotators.load_openpose(*(random_dir / "openpose" / n for n in ("body_pose_model.pth",
                                                                          "hand_pose_model.pth", "facenet.pth")))
    ref = aux("open_pose").OpenposeDetector.from_pretrained(str(random_dir / "openpose"))
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    for part in ("body_estimation", "hand_estimation", "face_estimation"):
        a, b = getattr(ours, part).model, getattr(ref, part).model
        assert a.state_dict().keys() == b.state_dict().keys(), part
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), (part, key)
        with torch.no_grad():
            for u, v in zip(a(x), b(x)):
                assert torch.equal(u, v), part


def test_random_weight_maps_are_not_trivial(random_dir, annotators_env):
    """The random networks give maps that vary (a constant map would make the equality above vacuous)."""
    annotators_env(random_dir)
    for module in ("hed", "lineart", "normal_bae", "mlsd", "softedge_teed"):
        out = get_preprocessor(module)(_scene(64, 128), 64)
        assert out.std() > 0 or module == "mlsd", module
    # softedge_teed's Safe Steps (threshold_a) reach the network's post-processing (0: no quantisation)
    teed = get_preprocessor("te_hed")  # the module's former name
    assert teed.name == "softedge_teed"
    raw, stepped = teed(_scene(64, 128), 64, 0), teed(_scene(64, 128), 64, 2)
    assert len(np.unique(stepped)) < len(np.unique(raw))


@pytest.mark.parametrize("module", ["hed", "lineart", "mlsd"])
def test_planned_sizes_are_the_sizes_the_unit_makes(module, random_dir, annotators_env):
    """unit_sizes (what submit checks against the image limits) against what the preprocessor really makes."""
    annotators_env(random_dir)
    rng = np.random.default_rng(1)
    for h, w, res in ((37, 23, 64), (50, 90, 72)):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        unit = ControlNetUnit(model="m", image=image, module=module, resize_mode="Crop and Resize",
                              processor_res=res)
        sizes = {stage: (sh, sw) for stage, sh, sw in unit_sizes(unit, 80, 48)}
        detected = PREPROCESSORS[module](image, res)
        assert sizes["detected map"] == detected.shape[:2], (module, h, w)
        assert fit_detected_map(detected, "Crop and Resize", 48, 80).shape[:2] == (48, 80)


def test_missing_file_is_refused_naming_the_file_and_folder(tmp_path, annotators_env, monkeypatch):
    """A module whose file is missing is listed, and refused at submit naming the file and where to put it."""
    annotators_env()
    monkeypatch.delenv(annotators.ENV_ANNOTATORS_DIR)
    models = tmp_path / "webui" / "models"
    field = "controlnet_units[0].module"
    assert_missing_file_refused(models, "softedge_hed", "ControlNetHED.pth", "hed", field)
    with pytest.raises(InvalidRequest, match="hand_pose_model.pth"):  # each file of a module is checked
        (models / "ControlNetPreprocessor").mkdir(parents=True)
        (models / "ControlNetPreprocessor" / "body_pose_model.pth").write_bytes(b"")  # top of the folder
        get_preprocessor("openpose_hand").check_available(field, models)
    get_preprocessor("openpose").check_available(field, models)  # the body file is enough for openpose
    assert "softedge_hed" in [p.label for p in PREPROCESSORS.values()]


def test_weights_found_in_forge_and_extension_folders(tmp_path, annotators_env, monkeypatch):
    annotators_env()
    monkeypatch.delenv(annotators.ENV_ANNOTATORS_DIR)
    models = tmp_path / "models"
    ext = tmp_path / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "pidinet"
    ext.mkdir(parents=True)
    (ext / "table5_pidinet.pth").write_bytes(b"x")
    assert annotators.find_weight(annotators.PIDINET, models) == ext / "table5_pidinet.pth"
    forge = models / "ControlNetPreprocessor"
    forge.mkdir(parents=True)
    (forge / "table5_pidinet.pth").write_bytes(b"x")  # Forge's folder comes first
    assert annotators.find_weight(annotators.PIDINET, models) == forge / "table5_pidinet.pth"


def test_not_runnable_modules_name_the_reason():
    for module, word in (("seg_ufade20k", "UniFormer"), ("segmentation", "UniFormer")):
        with pytest.raises(InvalidRequest, match=word):
            get_preprocessor(module, "module")


def test_import_shims_do_not_leak():
    """The torchvision / scikit-image stand-ins exist only while controlnet_aux's modules import."""
    aux("normalbae"), aux("open_pose")
    for name in ("torchvision", "torchvision.transforms", "skimage", "skimage.measure"):
        module = sys.modules.get(name)
        assert module is None or getattr(module, "__file__", None) is not None, name


def test_skimage_label_stand_in_equals_connected_components():
    """The stand-in for skimage.measure.label (openpose's hand detector) against OpenCV's 8-connected
    component labelling: the same partition of the pixels."""
    import cv2

    rng = np.random.default_rng(0)
    binary = rng.random((40, 50)) > 0.6
    labels, count = annotators._skimage_label(binary, return_num=True)
    n, cv_labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    assert count == n - 1
    pairs = set(zip(labels.ravel().tolist(), cv_labels.ravel().tolist()))
    assert len(pairs) == n  # a bijection between the labellings (background included)


# --------------------------------------------------------------------------------- real trained weights


@pytest.fixture(scope="module")
def real_dir():
    if WEIGHTS is None or not (WEIGHTS / "annotators" / "pidinet" / "table5_pidinet.pth").is_file():
        pytest.skip("the shared real-weights folder (PiDiNet, M-LSD files; photos) is absent")
    return WEIGHTS / "annotators"


@needs_weights
@pytest.mark.parametrize("module", ["pidinet", "pidinet_safe", "pidinet_scribble", "mlsd"])
def test_real_weights_on_real_photos_equal_the_reference(module, real_dir, annotators_env):
    """The real PiDiNet and M-LSD (tiny) files on real photos: the engine's maps equal controlnet_aux's with the
    same file (tolerance 0 uint8 levels), at an aligned size and at a photo's own size (padding)."""
    annotators_env(real_dir)
    pre = get_preprocessor(module)
    for image, res in ((_photo("camera.png", (256, 192)), 192), (_photo("coffee.png"), 160)):
        ours = pre(image, res)
        expected = _reference_map(module, real_dir, image, res)
        assert ours.shape == expected.shape
        np.testing.assert_array_equal(ours, expected, err_msg=module)


@needs_weights
def test_real_weights_see_edges(real_dir, annotators_env):
    """Visibly edges: the mean response on real photos is far above that on a flat image (PiDiNet: photo means
    of about 40 of 255 at 192 px against < 1 on flat grey; M-LSD: lines on the camera photo, none on flat)."""
    annotators_env(real_dir)
    flat = np.full((192, 256, 3), 128, np.uint8)
    for name in ("camera.png", "astronaut.png", "chelsea.png"):
        photo = _photo(name, (256, 192))
        edge = get_preprocessor("softedge_pidinet")(photo, 192).astype(np.float32).mean()
        assert edge > 15, (name, edge)
    assert get_preprocessor("softedge_pidinet")(flat, 192).astype(np.float32).mean() < 1
    lines = get_preprocessor("mlsd")(_photo("camera.png", (256, 192)), 192)
    assert (lines > 0).mean() > 0.005 and get_preprocessor("mlsd")(flat, 192).max() == 0
    scribble = get_preprocessor("scribble_pidinet")(_photo("camera.png", (256, 192)), 192)
    assert set(np.unique(scribble)) <= {0, 255} and 0.01 < (scribble > 0).mean() < 0.6


def test_preprocessor_weights_count_in_the_memory_estimate():
    """The units' model-based preprocessors add their weights (each file once) to the request's estimate."""
    from engine.admission import preprocessor_bytes

    def unit(module):
        return ControlNetUnit(model="m", image=np.zeros((8, 8, 3), np.uint8), module=module)

    mb = 1024 * 1024
    assert preprocessor_bytes([unit("canny")]) == 0
    assert preprocessor_bytes([unit("openpose_full"), unit("openpose")]) == int((209.3 + 147.3 + 153.7) * mb)
    assert preprocessor_bytes([unit("softedge_pidinet"), unit("scribble_pidinet")]) == int(2.8 * mb)



@pytest.fixture(scope="session")
def leres_dir(tmp_path_factory):
    """res101.pth as the original: ``{'depth_model': {'module.…': …}}``, random weights of LeReS's ResNeXt-101
    (fp16, as :func:`random_dir`; deleted after the session)."""
    aux("leres")
    import importlib as il

    model = il.import_module("controlnet_aux.leres.leres.multi_depth_model_woauxi")
    net = _randomize(model.RelDepthModel(backbone="resnext101"), 9)
    root = tmp_path_factory.mktemp("leres")
    (root / "leres").mkdir()
    torch.save(_half({"depth_model": {f"module.{k}": v for k, v in net.state_dict().items()}}),
               root / "leres" / "res101.pth")
    del net
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_depth_leres_equals_the_reference(leres_dir, annotators_env):
    """depth_leres (random weights of the real ResNeXt-101, the real file layout) equals controlnet_aux's
    LeresDetector with that network loaded as its from_pretrained loads it (its pix2pix boost network, which
    from_pretrained also needs, is not used without boost), thresholds mapped as the extension maps them
    (thr_a = Remove Near %, thr_b = Remove Background %); tolerance 0 uint8 levels."""
    import importlib as il

    annotators_env(leres_dir)
    leres = aux("leres")
    model = il.import_module("controlnet_aux.leres.leres.multi_depth_model_woauxi")
    tools = il.import_module("controlnet_aux.leres.leres.net_tools")
    net = model.RelDepthModel(backbone="resnext101")
    checkpoint = torch.load(leres_dir / "leres" / "res101.pth", map_location="cpu", weights_only=True)
    net.load_state_dict(tools.strip_prefix_if_present(checkpoint["depth_model"], "module."), strict=True)
    det = leres.LeresDetector(net, None)  # no eval(): from_pretrained and the extension leave it in training mode
    image = _scene(70, 90)
    for near, background in ((0, 0), (10, 30)):
        ours = get_preprocessor("depth_leres")(image, 64, near, background)
        expected = _reference_padded(lambda x, s: det(x, thr_a=near, thr_b=background, boost=False,
                                                      detect_resolution=s, image_resolution=s, output_type="np"),
                                     image, 64)
        np.testing.assert_array_equal(ours, _gray3(expected))
        assert ours.std() > 0
    assert [s.api_json()["name"] for s in get_preprocessor("depth_leres").sliders().values()] == \
        ["Resolution", "Remove Near %", "Remove Background %"]


@pytest.fixture(scope="module")
def leres_boost_dir(leres_dir):
    """leres_dir with latest_net_G.pth beside res101.pth: random weights of LeReS's boost (merge) network,
    controlnet_aux's pix2pix U-Net ('unet_1024', 2 -> 1 channels), saved as its save_networks saves it (the
    generator's state dict, no prefix)."""
    import importlib as il

    aux("leres")
    networks = il.import_module("controlnet_aux.leres.pix2pix.models.networks")
    net = _randomize(networks.define_G(2, 1, 64, "unet_1024", "none", False, "normal", 0.02, []), 10)
    torch.save(net.state_dict(), leres_dir / "leres" / "latest_net_G.pth")
    return leres_dir


@pytest.mark.slow
def test_depth_leres_boost_equals_the_reference(leres_boost_dir, annotators_env, monkeypatch):
    """depth_leres++ (random weights of the real ResNeXt-101 and of the real merge network, in the real files'
    layouts) equals controlnet_aux's LeresDetector.from_pretrained on the same folder called with boost=True the
    way the extension calls it (resize_image_with_pad, the padding cropped), thresholds mapped as depth_leres's;
    tolerance 0 uint8 levels. At processor_res 128 (a 128x192 padded image) the boost is its double estimate
    (LeReS at 448 px twice, merged by the pix2pix network at 1024 px); its patch pass starts where the padded
    image exceeds the estimate's resolution (448 px or more), too slow for this suite, and is the same
    controlnet_aux code either way."""
    annotators_env(leres_boost_dir)
    monkeypatch.setattr(sys, "argv", ["pytest"])  # from_pretrained's TestOptions().parse() reads the command line
    pre = get_preprocessor("depth_leres++")
    pre.check_available("module")
    det = aux("leres").LeresDetector.from_pretrained(str(leres_boost_dir / "leres"))
    image = _scene(70, 90)
    ours = pre(image, 128, 10, 30)
    expected = _reference_padded(lambda x, s: det(x, thr_a=10, thr_b=30, boost=True, detect_resolution=s,
                                                  image_resolution=s, output_type="np"), image, 128)
    np.testing.assert_array_equal(ours, _gray3(expected))
    assert ours.shape == (128, 165, 3) and ours.std() > 0
    loaded = annotators.LOADED.get(annotators.load_leres_boost, (annotators.find_weight(annotators.LERES),
                                                                   annotators.find_weight(annotators.LERES_BOOST)))
    assert loaded.model.training and det.model.training  # LeReS as the extension runs it (see load_leres)
    assert sum(p.numel() for p in loaded.pix2pixmodel.netG.parameters()) * 4 == pytest.approx(
        annotators.LERES_BOOST.size_mb * 1024 * 1024, rel=1e-3)  # the memory estimate's file size


def test_depth_leres_boost_refuses_a_too_small_working_image():
    """controlnet_aux's boost searches its resolution from 448 px up to 3x the image's longer side and fails
    (UnboundLocalError, in the extension too) when the padded image's longer side is under 160 px: refused at
    submit naming processor_res (a unit's, or /controlnet/detect's)."""
    from engine.controlnet import check_unit_sizes

    pre = get_preprocessor("depth_leres++")
    assert pre.sizes(70, 90, 64)[0] == (64, 128) and pre.sizes(70, 90, 128)[0] == (128, 192)
    with pytest.raises(InvalidRequest) as err:
        pre.check_work(pre.sizes(70, 90, 64)[0], "controlnet_processor_res")
    assert err.value.field == "controlnet_processor_res" and "160" in str(err.value)
    pre.check_work(pre.sizes(70, 90, 128)[0], "controlnet_processor_res")
    unit = ControlNetUnit(model="m", image=np.zeros((70, 90, 3), np.uint8), module="depth_leres++",
                          processor_res=64, pixel_perfect=False)
    with pytest.raises(InvalidRequest) as err:
        check_unit_sizes(unit, 64, 64, 10**7, "controlnet_units[0].image")
    assert err.value.field == "controlnet_units[0].processor_res"
    check_unit_sizes(ControlNetUnit(model="m", image=unit.image, module="depth_leres", processor_res=64), 64, 64,
                     10**7, "controlnet_units[0].image")


def test_torchvision_stand_ins_follow_torchvisions_definitions():
    """The stand-ins follow torchvision's documented definitions: ToTensor (HWC -> CHW; uint8 divided by 255,
    float kept), Normalize ((x - mean) / std per channel), Compose (in order); skimage's block_reduce."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    t = annotators._ToTensor()(u8)
    assert t.shape == (3, 5, 7) and torch.allclose(t, torch.from_numpy(u8.transpose(2, 0, 1).astype(np.float32)) / 255)
    f32 = rng.random((5, 7, 3)).astype(np.float32) * 255
    assert torch.equal(annotators._ToTensor()(f32), torch.from_numpy(f32.transpose(2, 0, 1).copy()))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    n = annotators._Normalize(mean, std)(t)
    for c in range(3):
        assert torch.allclose(n[c], (t[c] - mean[c]) / std[c])
    both = annotators._Compose([annotators._ToTensor(), annotators._Normalize(mean, std)])(u8)
    assert torch.equal(both, n)
    pil = annotators._ToPILImage()(t)
    assert np.abs(np.asarray(pil).astype(int) - u8).max() <= 1
    a = rng.random((6, 9))
    reduced = annotators._skimage_block_reduce(a, (3, 3), np.max)
    assert reduced.shape == (2, 3) and reduced[1, 2] == a[3:6, 6:9].max()


def test_detect_reports_a_preprocessing_phase_and_stops_when_cancelled(tmp_path):
    """/controlnet/detect's task reports "preprocessing" for each image before it runs (a model-based module
    loads its network there), then "saving"; a cancel between images stops it."""
    import threading

    from api_compat.detect import DetectRequest, run_detect
    from core.errors import Cancelled

    request = DetectRequest("invert", (_scene(16, 16), _scene(16, 16)), -1, -1, -1)
    events = []
    run_detect(request, images_dir=tmp_path, task_id="t", progress=events.append, cancel=threading.Event())
    assert [(e.phase, e.done) for e in events] == [("preprocessing", 0), ("saving", 1), ("preprocessing", 1),
                                                   ("saving", 2)]
    assert events[0].detail == "invert (from white bg & black line)"
    cancel = threading.Event()

    def stop(event):
        if event.phase == "saving":
            cancel.set()

    with pytest.raises(Cancelled):
        run_detect(request, images_dir=tmp_path, task_id="u", progress=stop, cancel=cancel)


def test_sdengine_paths_lists_the_annotator_folders(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cli import main

    monkeypatch.setenv(annotators.ENV_ANNOTATORS_DIR, str(tmp_path / "mine"))
    monkeypatch.setenv("SDENGINE_MODELS_DIR", str(tmp_path / "webui" / "models"))
    # through the group, as users run it (a command invoked on its own first caches click's help option without
    # the group's -h)
    out = CliRunner().invoke(main, ["paths"]).output
    lines = [line for line in out.splitlines() if line.startswith("annotator ")]
    assert [line.split()[1] for line in lines] == [
        str(tmp_path / "mine"), str(tmp_path / "webui" / "models" / "ControlNetPreprocessor"),
        str(tmp_path / "webui" / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads")]


def test_openpose_pose_json_draws_back_as_controlnet_aux_draws_the_people():
    """The openpose modules' pose JSON (the extension's ``poses``: annotator/openpose encode_poses_as_json):
    controlnet_aux's detected people (keypoints as fractions of the canvas, as its detect_poses gives them) as
    flat [x, y, 1.0] lists, absent keypoints [0, 0, 0], absent parts null; drawn back by the renderer of
    /controlnet/render_openpose_json it is the map controlnet_aux's draw_poses makes of the same people
    (reference: controlnet_aux 0.0.10; tolerance 0 levels)."""
    import importlib as il

    from engine.controlnet.openpose import pose_json, render_pose

    op = aux("open_pose")
    body_mod = il.import_module("controlnet_aux.open_pose.body")
    kp = body_mod.Keypoint
    rng = np.random.default_rng(3)
    h, w = 96, 128

    def points(n):
        return [kp(float(x), float(y)) for x, y in rng.uniform(0.1, 0.9, (n, 2))]

    body = points(18)
    body[4] = body[9] = None  # absent joints
    hand = points(21)
    hand[7] = kp(-1 / w, -1 / h)  # a hand point not found: detect_hands gives -1 px as a fraction (not drawn)
    people = [op.PoseResult(body_mod.BodyResult(body, 10.0, 16), hand, None, points(70)),
              op.PoseResult(body_mod.BodyResult(points(18), 12.0, 18), None, points(21), None)]
    pose = pose_json([annotators._openpose_person(p) for p in people], h, w)
    assert (pose["canvas_height"], pose["canvas_width"], pose["animals"]) == (h, w, [])
    first, second = pose["people"]
    assert first["pose_keypoints_2d"][4 * 3:5 * 3] == [0.0, 0.0, 0.0]
    assert first["pose_keypoints_2d"][:3] == [body[0].x, body[0].y, 1.0]
    assert first["hand_right_keypoints_2d"] is None and second["face_keypoints_2d"] is None
    assert first["hand_left_keypoints_2d"][7 * 3:8 * 3] == [-1 / w, -1 / h, 1.0]  # as the extension's JSON has it
    assert len(first["face_keypoints_2d"]) == 70 * 3
    np.testing.assert_array_equal(render_pose(pose), op.draw_poses(people, h, w))


def test_openpose_detect_gives_the_pose_json_of_the_padded_image(random_dir, annotators_env):
    """openpose_full with the random networks (they find no one): the callback gets one pose JSON, on the padded
    image's canvas, with the people controlnet_aux's detect_poses finds there (none)."""
    annotators_env(random_dir)
    pre = get_preprocessor("openpose_full")
    image = _scene(70, 90)
    poses = []
    pre(image, 64, pose_callback=poses.append)
    (ph, pw), _ = pre.sizes(70, 90, 64)
    padded, _ = resize_image_with_pad(image, 64)
    ref = aux("open_pose").OpenposeDetector.from_pretrained(str(random_dir / "openpose"))
    assert ref.detect_poses(padded, True, True) == []
    assert poses == [{"people": [], "animals": [], "canvas_height": ph, "canvas_width": pw}]
    assert get_preprocessor("openpose").makes_poses and not get_preprocessor("canny").makes_poses

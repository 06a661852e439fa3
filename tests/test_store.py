"""The model store: listing, webui name matching, names that try to leave the store, VAE choice, hash cache."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from core.errors import ModelNotFound, UnsafeModelPath
from engine.models import hashing
from engine.models.checkpoints import Arch, Kind
from engine.models.store import ModelStore

UNSAFE = ["../tiny-sd1.safetensors", "..", "sub/tiny-sd1", "sub\\tiny-sd1", "/etc/passwd", "C:model.safetensors",
          "c:\\models\\x.safetensors", "tiny-sd1\x00.safetensors", "~root", "..tiny"]


@pytest.fixture()
def small_store(tiny_store, tmp_path):
    """A private copy of the SD1 single file + folder and the SD1 ControlNet (safe to modify)."""
    root = tmp_path / "models"
    for sub, name in [("Stable-diffusion", "tiny-sd1.safetensors"), ("Stable-diffusion", "tiny-sd1-diffusers"),
                      ("ControlNet", "tiny-controlnet-sd1.safetensors")]:
        (root / sub).mkdir(parents=True, exist_ok=True)
        src = tiny_store / sub / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / sub / name)
    (root / "VAE").mkdir()
    return root


@pytest.mark.parametrize("name", UNSAFE)
@pytest.mark.parametrize("kind", [Kind.CHECKPOINT, Kind.VAE, Kind.CONTROLNET])
def test_names_escaping_the_store_are_refused(tiny_model_store, name, kind):
    with pytest.raises(UnsafeModelPath) as err:
        tiny_model_store.resolve(name, kind)
    assert repr(name) in str(err.value)


def test_unsafe_vae_name(tiny_model_store):
    ckpt = tiny_model_store.resolve("tiny-sd1")
    with pytest.raises(UnsafeModelPath, match="sd_vae"):
        tiny_model_store.resolve_vae(ckpt, "../../secret.safetensors")


def test_symlink_escaping_the_store(small_store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "evil.safetensors"
    shutil.copy2(small_store / "Stable-diffusion" / "tiny-sd1.safetensors", target)
    (small_store / "Stable-diffusion" / "evil.safetensors").symlink_to(target)
    (small_store / "Stable-diffusion" / "evil-dir").symlink_to(outside, target_is_directory=True)
    store = ModelStore(small_store, bundled=None)
    assert "evil.safetensors" not in [e.name for e in store.entries()]
    with pytest.raises(UnsafeModelPath, match="evil.safetensors.*outside the model store"):
        store.resolve("evil.safetensors")
    with pytest.raises(UnsafeModelPath, match="evil.*outside the model store"):
        store.resolve("evil")
    with pytest.raises(UnsafeModelPath, match="evil-dir.*outside the model store"):
        store.resolve("evil-dir")
    # the same for ControlNets and VAEs
    (small_store / "ControlNet" / "evil-cn.safetensors").symlink_to(target)
    with pytest.raises(UnsafeModelPath, match="evil-cn.safetensors.*outside the model store"):
        store.resolve("evil-cn.safetensors", Kind.CONTROLNET)
    # a symlink inside the store pointing inside the store is fine
    (small_store / "Stable-diffusion" / "alias.safetensors").symlink_to(
        small_store / "Stable-diffusion" / "tiny-sd1.safetensors")
    assert store.resolve("alias").name == "alias.safetensors"


def test_unknown_name_lists_available(tiny_model_store):
    with pytest.raises(ModelNotFound) as err:
        tiny_model_store.resolve("nope")
    msg = str(err.value)
    assert "nope" in msg and "tiny-sd1.safetensors" in msg and "tiny-sdxl-diffusers" in msg
    with pytest.raises(ModelNotFound, match="tiny-controlnet-sd1"):
        tiny_model_store.resolve("nope", Kind.CONTROLNET)


def test_webui_name_matching(tiny_model_store):
    s = tiny_model_store
    assert s.resolve("tiny-sd1.safetensors").name == "tiny-sd1.safetensors"
    assert s.resolve("tiny-sd1").name == "tiny-sd1.safetensors"
    assert s.resolve("TINY-SD1").name == "tiny-sd1.safetensors"
    assert s.resolve("tiny-sd1-diffusers").path.is_dir()
    sha = s.hashes.sha256(s.resolve("tiny-sd1").path)
    assert s.resolve(f"tiny-sd1.safetensors [{sha[:10]}]").name == "tiny-sd1.safetensors"
    assert s.resolve(f"[{sha[:10]}]").name == "tiny-sd1.safetensors"
    assert s.resolve("tiny-controlnet-sdxl [0123abcd]", Kind.CONTROLNET).name == "tiny-controlnet-sdxl.safetensors"
    assert s.resolve("Tiny-ControlNet-SD1", Kind.CONTROLNET).name == "tiny-controlnet-sd1.safetensors"


def test_checkpoint_by_bare_hash(tiny_model_store):
    """The webui's checkpoint aliases: the sha256, its first 10 hex digits, the legacy 8-digit hash (any case)."""
    from engine.models.hashing import legacy_model_hash

    path = tiny_model_store.resolve("tiny-sd1").path
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for name in (sha, sha[:10], sha[:10].upper(), legacy_model_hash(path), f"[{sha[:10]}]"):
        assert tiny_model_store.resolve(name).path == path, name


def test_listing(tiny_model_store):
    rows = {e.name: e for e in tiny_model_store.list()}
    assert rows["tiny-sd1.safetensors"].architecture is Arch.SD1
    assert rows["tiny-sd2v-diffusers"].architecture is Arch.SD2
    assert rows["tiny-sdxl.safetensors"].kind is Kind.CHECKPOINT
    assert rows["tiny-controlnet-sdxl-diffusers"].architecture is Arch.CONTROLNET_SDXL
    assert rows["tiny-controlnet-sd1.safetensors"].kind is Kind.CONTROLNET
    path = rows["tiny-sd1.safetensors"].path
    assert rows["tiny-sd1.safetensors"].short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert len(rows) == 10


def test_folder_hash_is_stable_and_location_independent(small_store, tmp_path):
    store = ModelStore(small_store, bundled=None)
    a = store.hashes.sha256(small_store / "Stable-diffusion" / "tiny-sd1-diffusers")
    copy = tmp_path / "copy"
    shutil.copytree(small_store / "Stable-diffusion" / "tiny-sd1-diffusers", copy)
    assert store.hashes.sha256(copy) == a
    with open(copy / "unet" / "config.json", "a") as f:
        f.write(" ")
    assert store.hashes.sha256(copy) != a


def test_hash_cache_avoids_rereading(small_store, monkeypatch):
    calls = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(str(p)) or real(p))
    first = {e.name: e.sha256 for e in ModelStore(small_store, bundled=None).list()}
    n = len(calls)
    assert n >= 3  # the single files + every file of the diffusers folder
    # a new store object (new process) reads the cache file: nothing is hashed again
    second = {e.name: e.sha256 for e in ModelStore(small_store, bundled=None).list()}
    assert second == first and len(calls) == n
    assert (small_store / "cache" / "hashes.json").is_file()
    # a changed file (size/mtime) is hashed again
    ckpt = small_store / "Stable-diffusion" / "tiny-sd1.safetensors"
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ModelStore(small_store, bundled=None).list()
    assert calls[n:] == [str(ckpt.resolve())]


def test_bundled_root_is_searched_after_the_store(small_store, tiny_store, tmp_path):
    bundled = tmp_path / "bundled"
    (bundled / "Stable-diffusion").mkdir(parents=True)
    shutil.copy2(tiny_store / "Stable-diffusion" / "tiny-sdxl.safetensors", bundled / "Stable-diffusion" / "demo.safetensors")
    shutil.copy2(tiny_store / "Stable-diffusion" / "tiny-sdxl.safetensors",
                 bundled / "Stable-diffusion" / "tiny-sd1.safetensors")  # shadowed by the user store
    store = ModelStore(small_store, bundled=bundled)
    assert store.resolve("demo").bundled
    user = store.resolve("tiny-sd1")
    assert not user.bundled and user.root == small_store
    assert [e.name for e in store.entries(Kind.CHECKPOINT)].count("tiny-sd1.safetensors") == 1


def test_default_bundled_root_exists():
    from engine.models.store import bundled_root

    assert (bundled_root() / "Stable-diffusion").is_dir() and (bundled_root() / "ControlNet").is_dir()


def test_vae_choice(small_store, tiny_store):
    from engine.models.convert import save_single_file
    from engine.models.tiny import build_vae

    store = ModelStore(small_store, bundled=None)
    ckpt = store.resolve("tiny-sd1")
    assert store.resolve_vae(ckpt, "Automatic") is None
    assert store.resolve_vae(ckpt, "None") is None
    other = build_vae(seed=42)
    save_single_file({"vae": other}, small_store / "VAE" / "alt.safetensors")
    assert store.resolve_vae(ckpt, "alt") == small_store / "VAE" / "alt.safetensors"
    assert store.resolve_vae(ckpt, "Automatic") is None
    with pytest.raises(ModelNotFound, match="alt.safetensors"):
        store.resolve_vae(ckpt, "missing-vae")
    # VAE/<ckpt stem>.safetensors is picked automatically, a <ckpt>.vae.safetensors beside it first
    shutil.copy2(small_store / "VAE" / "alt.safetensors", small_store / "VAE" / "tiny-sd1.safetensors")
    assert store.resolve_vae(ckpt, "Automatic") == small_store / "VAE" / "tiny-sd1.safetensors"
    beside = small_store / "Stable-diffusion" / "tiny-sd1.vae.safetensors"
    shutil.copy2(small_store / "VAE" / "alt.safetensors", beside)
    assert store.resolve_vae(ckpt, "Automatic") == beside
    assert "tiny-sd1.vae.safetensors" not in [e.name for e in store.entries(Kind.CHECKPOINT)]
    # load_model swaps the VAE: the external weights are used, "None" keeps the checkpoint's own
    m = store.load_model("tiny-sd1", vae="alt")
    assert m.vae_path.name == "alt.safetensors"
    ref = other.state_dict()
    assert all((ref[k] == v).all() for k, v in m.components["vae"].state_dict().items())
    own = store.load_model("tiny-sd1", vae="None")
    assert own.vae_path is None
    assert not (own.components["vae"].state_dict()["decoder.conv_in.weight"] == ref["decoder.conv_in.weight"]).all()


def test_load_model_cache(tiny_model_store):
    a = tiny_model_store.load_model("tiny-sd1")
    b = tiny_model_store.load_model("TINY-SD1.safetensors")
    assert a is b
    path = tiny_model_store.resolve("tiny-sd1").path
    assert a.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10] and a.sha256.startswith(a.short_hash)
    cn = tiny_model_store.load_controlnet("tiny-controlnet-sd1")
    assert cn.arch is Arch.CONTROLNET_SD1 and tiny_model_store.load_controlnet("tiny-controlnet-sd1") is cn


def test_pickle_listed_but_refused(small_store):
    from core.errors import ModelError

    (small_store / "Stable-diffusion" / "old.ckpt").write_bytes(b"not really a pickle")
    store = ModelStore(small_store, bundled=None)
    rows = {e.name: e for e in store.list(hash=False)}
    assert rows["old.ckpt"].architecture is None
    with pytest.raises(ModelError, match="old.ckpt.*pickle"):
        store.load_model("old")


def test_checkpoint_cache_is_bounded(small_store):
    store = ModelStore(small_store, bundled=None, max_loaded=1)
    a = store.load_model("tiny-sd1")
    b = store.load_model("tiny-sd1-diffusers")
    assert a is not b and store.load_model("tiny-sd1-diffusers") is b
    assert store.load_model("tiny-sd1") is not a  # evicted, loaded again


def test_controlnet_titles_and_legacy_hash(tiny_model_store, caplog):
    """sd-webui-controlnet names models "stem [old 8-hex model_hash]" (sha256 of 64 KiB at 1 MiB); both the
    title and the hash round-trip through resolve without a hash-mismatch warning."""
    import logging

    entry = tiny_model_store.resolve("tiny-controlnet-sdxl", Kind.CONTROLNET)
    data = entry.path.read_bytes()
    assert len(data) > 0x110000
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    title = tiny_model_store.controlnet_title(entry)
    assert title == f"tiny-controlnet-sdxl [{expected}]"
    with caplog.at_level(logging.WARNING, logger="engine.models.store"):
        assert tiny_model_store.resolve(title, Kind.CONTROLNET) == entry
    assert not [r for r in caplog.records if "requested hash" in r.getMessage()]


def test_default_checkpoint(small_store, tiny_store, tmp_path):
    store = ModelStore(small_store, bundled=None)
    assert store.default_checkpoint().name == "tiny-sd1-diffusers"
    assert store.default_checkpoint("tiny-sd1").name == "tiny-sd1.safetensors"
    bundled = tmp_path / "bundled"
    (bundled / "Stable-diffusion").mkdir(parents=True)
    shutil.copy2(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors",
                 bundled / "Stable-diffusion" / "sdengine-demo.safetensors")
    assert ModelStore(small_store, bundled=bundled).default_checkpoint().bundled
    with pytest.raises(ModelNotFound, match="no checkpoints"):
        ModelStore(tmp_path / "empty", bundled=None).default_checkpoint()


def test_listing_reuse_follows_the_folders(small_store, monkeypatch):
    """A listing is reused while the folders are unchanged (no walk per submit); a model added, removed or renamed
    shows at once, and a reused listing expires after SCAN_TTL_S (issue 25: submit latency)."""
    from engine.models import store as store_module

    store = ModelStore(small_store, bundled=None)
    folder = small_store / "Stable-diffusion"
    old = os.stat(folder).st_mtime_ns - 5 * 10**9  # a folder changed 5 s ago: its listing may be reused
    os.utime(folder, ns=(old, old))
    walks = []
    real = store._scan_folders
    monkeypatch.setattr(store, "_scan_folders", lambda *a: walks.append(1) or real(*a))
    assert store.resolve("tiny-sd1").name == "tiny-sd1.safetensors"
    assert store.resolve("tiny-sd1").name == "tiny-sd1.safetensors" and len(walks) == 1  # reused
    shutil.copy2(folder / "tiny-sd1.safetensors", folder / "added.safetensors")  # the folder's mtime changes
    assert store.resolve("added").name == "added.safetensors" and len(walks) == 2
    os.unlink(folder / "added.safetensors")
    with pytest.raises(ModelNotFound):
        store.resolve("added")
    os.utime(folder, ns=(old, old))
    store.resolve("tiny-sd1")
    walks.clear()
    monkeypatch.setattr(store_module, "SCAN_TTL_S", 0.0)  # expired: walked again
    store.resolve("tiny-sd1")
    assert walks == [1]

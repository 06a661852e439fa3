"""The model store: a webui-layout folder of checkpoints, VAEs and ControlNets, plus the bundled models.

Layout (``EngineConfig.models_dir``: ``--models-dir``, ``$SDENGINE_MODELS_DIR`` or ``{home}/models``, see
docs/API.md "Where files live")::

    Stable-diffusion/   checkpoints: *.safetensors (pickles listed, loaded only with allow_pickle),
                        diffusers folders (model_index.json); <name>.vae.safetensors beside = its VAE
    VAE/                external VAEs
    ControlNet/         ControlNet files and diffusers folders (config.json)
    Lora/, LyCORIS/     LoRA files (<lora:NAME:...> in prompts; engine.networks)
    embeddings/         textual-inversion embeddings (their file name as a word in a prompt)
    cache/              exported artefacts, hashes.json, modules/ (module cards: core.deferred)

The read-only bundled root ``engine/models/bundled/{Stable-diffusion,ControlNet}`` is searched after the user
store. Only top-level entries are listed (no sub-folders), so a name is a single path component.

Resolution of a payload name never leaves the store: separators, ``.``/``..``, absolute paths, drive letters
and NUL are refused, and so is a match (a symlink) that resolves outside its root (:class:`UnsafeModelPath`).
Matching follows the webui: exact name, name without extension, then case-insensitive, then ``"name [hash]"``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from core import deferred
from core.errors import ModelError, ModelNotFound, UnsafeModelPath
from engine.config import default_cache_dir, default_models_dir
from engine.models import checkpoints  # by module: load_checkpoint is looked up at call time (tests count loads)
from engine.models.checkpoints import (
    WEIGHT_SUFFIXES,
    Arch,
    Kind,
    LoadedControlNet,
    LoadedModel,
    NeedsWeights,
    detect_path_arch,
    load_controlnet,
    load_weights_into,
)
from engine.models.hashing import HashCache, legacy_model_hash, short_hash
from engine.networks.files import detect_network_arch

log = logging.getLogger(__name__)

SUBDIRS = {Kind.CHECKPOINT: "Stable-diffusion", Kind.VAE: "VAE", Kind.CONTROLNET: "ControlNet", Kind.LORA: "Lora",
           Kind.EMBEDDING: "embeddings"}
# further folders of a kind, searched after SUBDIRS[kind] (the webui's LyCORIS extension folder)
EXTRA_SUBDIRS = {Kind.LORA: ("LyCORIS",), Kind.CONTROLNET: ("ipadapter",)}  # + IP-Adapter files (engine.ip_adapter)


def folders(kind: Kind) -> tuple[str, ...]:
    """The store sub-folders that hold models of ``kind``."""
    return (SUBDIRS[kind], *EXTRA_SUBDIRS.get(kind, ()))
CACHE_DIR = "cache"
VAE_AUTOMATIC = "Automatic"
VAE_NONE = "None"
_VAE_FILE = re.compile(r"\.vae\.(safetensors|pt|ckpt|bin)$", re.I)
_HASH_SUFFIX = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")
_BARE_HASH = re.compile(r"^(?:[0-9a-fA-F]{8}|[0-9a-fA-F]{10}|[0-9a-fA-F]{64})$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_SUGGESTIONS = 8
# the bundled demo models (engine/models/bundled), used when a request names no model
DEMO_CHECKPOINT = "sdengine-demo.safetensors"
DEMO_CONTROLNET = "sdengine-demo-canny.safetensors"


@dataclass(frozen=True)
class ModelEntry:
    """One listed model. ``name`` is the file or folder name (what a payload uses)."""

    name: str
    kind: Kind
    path: Path
    root: Path
    architecture: Arch | None = None
    sha256: str | None = None
    bundled: bool = False

    @property
    def short_hash(self) -> str | None:
        return short_hash(self.sha256) if self.sha256 else None

    @property
    def stem(self) -> str:
        return self.name if self.path.is_dir() else Path(self.name).stem

    @property
    def title(self) -> str:
        """The webui's ``"name [hash]"`` title (``name`` alone before hashing)."""
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name


def bundled_root() -> Path:
    """``engine/models/bundled`` inside the installed package (read-only)."""
    return Path(str(resources.files("engine.models").joinpath("bundled")))


def unsafe_name_reasons(value: str) -> list[str]:
    """Why ``value`` could address something outside the model store (empty: it is a plain name). The one rule,
    used by the store and by the API schema."""
    reasons = []
    if any(ord(c) < 32 for c in value):
        reasons.append("contains a control character")
    if "/" in value or "\\" in value:
        reasons.append("contains a path separator")
    if value.strip() in (".", "..") or value.startswith(".."):
        reasons.append("is a relative parent reference (..)")
    if os.path.isabs(value) or value.startswith(("/", "\\", "~")):
        reasons.append("is an absolute path")
    if _DRIVE.match(value) or ":" in value:
        reasons.append("has a drive letter or colon")
    return reasons


def check_name(value, field: str = "model") -> str:
    """Refuse a payload name that could address anything outside the store (raises UnsafeModelPath)."""
    if not isinstance(value, str) or not value.strip():
        raise ModelNotFound(str(value), "empty model name", field)
    reasons = unsafe_name_reasons(value)
    if reasons:
        raise UnsafeModelPath(repr(value), f"model names are file names inside the model store; this one "
                                           f"{' and '.join(reasons)}", field)
    return value


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


SCAN_TTL_S = 2.0  # the longest a folder listing is reused (ModelStore._scan)


def _mtime(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _broken_link(path: Path) -> bool:
    """A symlink whose target is missing, or that loops."""
    try:
        return path.is_symlink() and not path.exists()
    except (OSError, RuntimeError):
        return True


class ModelStore:
    """Listing, name resolution and loading of the models under ``root`` (+ the bundled root)."""

    def __init__(self, root: str | os.PathLike | None = None, *, bundled: str | os.PathLike | None = "default",
                 cache_dir: str | os.PathLike | None = None, max_loaded: int = 1, max_controlnets: int = 4):
        self.root = Path(root).absolute() if root is not None else default_models_dir()
        self.bundled = bundled_root() if bundled == "default" else (Path(bundled) if bundled else None)
        self.cache_dir = Path(cache_dir).absolute() if cache_dir else default_cache_dir(self.root)
        self.hashes = HashCache(self.cache_dir / "hashes.json")
        # module cards (core.deferred): a load from cache builds no module it does not use
        self.cards_dir = self.cache_dir / "modules"
        self.limits = {"checkpoint": max(max_loaded, 1), "controlnet": max(max_controlnets, 1)}
        self._loaded: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time: two requests for a model load it once
        self._scans: dict[tuple[Kind, bool], tuple[tuple, float, tuple[ModelEntry, ...]]] = {}  # see _scan

    @classmethod
    def from_config(cls, config) -> "ModelStore":
        return cls(config.models_dir, cache_dir=config.cache_dir)

    # ------------------------------------------------------------------------------------------ listing

    def roots(self) -> list[tuple[Path, bool]]:
        out = [(self.root, False)]
        if self.bundled is not None:
            out.append((self.bundled, True))
        return out

    def _scan(self, kind: Kind, include_escaping: bool = False) -> list[ModelEntry]:
        """Top-level entries of ``kind``; those resolving outside their root only with ``include_escaping``
        (so that resolution can name them in an UnsafeModelPath error instead of "not found").

        A listing is reused while its folders' modification times are unchanged, for at most
        :data:`SCAN_TTL_S` (a file added, removed or renamed shows at once; a change inside a diffusers folder
        or of a symlink's target within that time): every submit resolves names, and a listing costs a
        directory walk with a stat and a realpath per file. :meth:`_checked` still checks each resolved
        entry's real path."""
        places = [(root, is_bundled, root / sub) for root, is_bundled in self.roots() for sub in folders(kind)]
        stamp = tuple(_mtime(folder) for _, _, folder in places)
        now = time.monotonic()
        hit = self._scans.get((kind, include_escaping))
        if hit is not None and hit[0] == stamp and now - hit[1] < SCAN_TTL_S:
            return list(hit[2])
        entries = self._scan_folders(kind, places, include_escaping)
        recent = time.time_ns() - 1_000_000_000  # a folder changed within the file system clock's tick is not
        if all(m is None or m < recent for m in stamp):  # told apart by its mtime from a later change: no reuse
            self._scans[(kind, include_escaping)] = (stamp, now, tuple(entries))
        return entries

    def _scan_folders(self, kind: Kind, places, include_escaping: bool) -> list[ModelEntry]:
        entries, seen = [], set()
        for root, is_bundled, folder in places:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
                if path.name.startswith(".") or path.name in seen:
                    continue
                if not self._is_model(path, kind):
                    continue
                if not include_escaping and not _inside(path, root):
                    log.warning("ignoring %s: it resolves outside the model store %s", path, root)
                    continue
                seen.add(path.name)
                entries.append(ModelEntry(path.name, kind, path, root, bundled=is_bundled))
        return entries

    @staticmethod
    def _is_model(path: Path, kind: Kind) -> bool:
        if path.is_dir():
            if kind in (Kind.LORA, Kind.EMBEDDING):
                return False
            marker = "model_index.json" if kind is Kind.CHECKPOINT else "config.json"
            return (path / marker).is_file()
        if path.suffix.lower() not in WEIGHT_SUFFIXES or not path.is_file():
            return False
        # <ckpt>.vae.safetensors beside a checkpoint is that checkpoint's VAE, not a checkpoint
        return not (kind is Kind.CHECKPOINT and _VAE_FILE.search(path.name))

    def entries(self, kind: Kind | None = None) -> list[ModelEntry]:
        """Entries without architecture or hash (cheap: a directory listing)."""
        kinds = [kind] if kind else list(SUBDIRS)
        return [e for k in kinds for e in self._scan(k)]

    def describe(self, entry: ModelEntry, hash: bool = True) -> ModelEntry:
        """The entry with its architecture (from the header) and hash (cached)."""
        try:
            if entry.kind in (Kind.LORA, Kind.EMBEDDING):
                arch = detect_network_arch(entry.path, entry.kind)
            else:
                arch = detect_path_arch(entry.path)
        except ModelError as exc:
            log.warning("%s", exc)
            arch = None
        sha = self.hashes.sha256(entry.path) if hash else None
        return ModelEntry(entry.name, entry.kind, entry.path, entry.root, arch, sha, entry.bundled)

    def webui_hash(self, entry: ModelEntry) -> tuple[str, str]:
        """(short hash, how it is made) of ``entry`` as the webui shows that kind: a checkpoint, VAE or
        ControlNet: the file's sha256, 10 hex (``Model hash``, the ``name [hash]`` titles); a LoRA: the
        sha256 of a safetensors file's tensor data, 12 hex (``Lora hashes``); an embedding (or a pickle
        LoRA): the file's sha256, 12 hex (``TI hashes``). Cached (the store's hash cache)."""
        if entry.kind is Kind.LORA and entry.path.suffix.lower() == ".safetensors":
            return (self.hashes.data_sha256(entry.path)[:12],
                    "the webui's Lora hash: sha256 of the tensor data after the header, 12 hex, as in Lora hashes")
        if entry.kind in (Kind.LORA, Kind.EMBEDDING):
            return (self.hashes.sha256(entry.path)[:12],
                    "sha256 of the file, 12 hex, as the webui's " + ("Lora" if entry.kind is Kind.LORA else "TI")
                    + " hashes")
        note = "sha256 of the file, 10 hex, as the webui's Model hash and model titles"
        if entry.kind is Kind.CONTROLNET:
            note += "; sd-webui-controlnet's model titles show the old 8-hex hash instead (/controlnet/model_list)"
        return short_hash(self.hashes.sha256(entry.path)), note

    def list(self, kind: Kind | None = None, hash: bool = True) -> list[ModelEntry]:
        """Every model with kind, architecture and (cached) hash."""
        return [self.describe(e, hash) for e in self.entries(kind)]

    # ------------------------------------------------------------------------------------------ resolution

    def resolve(self, name: str, kind: Kind = Kind.CHECKPOINT, field: str = "model") -> ModelEntry:
        """The entry a payload ``name`` means (webui matching). Raises UnsafeModelPath / ModelNotFound.

        ``kind`` is a :class:`Kind` or its value ("checkpoint", "vae", "controlnet").
        """
        kind = Kind(kind)
        check_name(name, field)
        entries = self._scan(kind, include_escaping=True)
        wanted, want_hash = name.strip(), None
        exact = [e for e in entries if e.name == wanted]
        if exact:
            return self._checked(exact[0], None, field)
        if m := _HASH_SUFFIX.match(wanted):
            wanted, want_hash = m[1], m[2].lower()
        candidates = [
            lambda e: e.name == wanted,
            lambda e: e.stem == wanted,
            lambda e: e.name.lower() == wanted.lower(),
            lambda e: e.stem.lower() == wanted.lower(),
        ]
        for match in candidates:
            found = [e for e in entries if match(e)]
            if found:
                return self._checked(found[0], want_hash, field)
        # a symlink escaping the store that is not a model (e.g. to a folder): still name it as unsafe; a broken
        # one (missing target, loop) is not found. Messages name the request's value, never a server path.
        for root, _ in self.roots():
            for sub in folders(kind):
                cand = root / sub / wanted
                if not os.path.lexists(cand):
                    continue
                if _broken_link(cand):
                    raise ModelNotFound(name, f"{name!r} is a broken link in the store's {sub}/ "
                                              "(its target is missing or it loops)", field)
                if not _inside(cand, root):
                    raise UnsafeModelPath(name, f"{name!r} resolves outside the model store", field)
        entries = [e for e in entries if _inside(e.path, e.root)]
        if not want_hash and _BARE_HASH.match(wanted) and kind == Kind.CHECKPOINT:
            want_hash = wanted.lower()  # a bare hash, as the webui's checkpoint aliases (sha256, short, legacy)
        if want_hash and (not wanted or wanted.lower() == want_hash):  # "[hash]" or the hash alone
            for e in entries:
                sha = self.hashes.sha256(e.path)
                if sha.startswith(want_hash) or (len(want_hash) == 8 and legacy_model_hash(e.path) == want_hash):
                    return e
        names = [e.stem if kind in (Kind.LORA, Kind.EMBEDDING) else e.name for e in entries]
        available = ", ".join(names[:_MAX_SUGGESTIONS]) or "none"
        more = f", ... ({len(entries)} in all)" if len(entries) > _MAX_SUGGESTIONS else ""
        where = " or ".join(f"{sub}/" for sub in folders(kind))
        raise ModelNotFound(name, f"no {kind.value} of this name in the store's {where}"
                                  f"{' or the bundled models' if self.bundled else ''} (available: {available}{more})", field)

    def _checked(self, entry: ModelEntry, want_hash: str | None, field: str) -> ModelEntry:
        if not _inside(entry.path, entry.root):
            # the message names the request's value, never the server's file system
            raise UnsafeModelPath(entry.name, "resolves outside the model store", field)
        if want_hash:
            sha = self.hashes.sha256(entry.path)
            if not sha.startswith(want_hash) and legacy_model_hash(entry.path) != want_hash:
                log.warning("%s: requested hash %s, the file has %s; using the file", entry.name, want_hash,
                            short_hash(sha))
        return entry

    def default_checkpoint(self, preferred: str | None = None) -> ModelEntry:
        """The checkpoint used when a request names none: ``preferred`` (EngineConfig.default_model), else
        the bundled demo model, else the first checkpoint listed. ModelNotFound when the store is empty."""
        if preferred:
            return self.resolve(preferred, Kind.CHECKPOINT, field="default_model")
        entries = self._scan(Kind.CHECKPOINT)
        for e in entries:
            if e.name == DEMO_CHECKPOINT and e.bundled:
                return e
        if not entries:
            raise ModelNotFound(str(self.root / SUBDIRS[Kind.CHECKPOINT]), "no checkpoints in the model store "
                                "and no bundled demo model")
        return entries[0]

    def controlnet_title(self, entry: ModelEntry) -> str:
        """The name sd-webui-controlnet lists for a ControlNet: ``"{stem} [{legacy 8-hex hash}]"``; a file too
        short for the legacy hash shows the first 8 hex digits of its sha256 (the real file's, which resolve
        accepts as well), a folder its stem alone."""
        legacy = legacy_model_hash(entry.path)
        if legacy is None and entry.path.is_file():
            legacy = self.hashes.sha256(entry.path)[:8]
        return f"{entry.stem} [{legacy}]" if legacy else entry.stem

    def resolve_vae(self, checkpoint: ModelEntry, vae: str | None = VAE_AUTOMATIC,
                    allow_pickle: bool = False) -> Path | None:
        """The external VAE file for ``checkpoint``: ``None`` means the checkpoint's own VAE.

        "Automatic": ``<ckpt>.vae.safetensors`` (or .pt/.ckpt) beside the checkpoint, else a file in ``VAE/``
        with the checkpoint's stem (``<stem>.safetensors`` or ``<stem>.vae.safetensors``), else its own. A pickle
        found so is skipped (with a log line) unless ``allow_pickle``: a stray file must not break a checkpoint
        that runs without it. "None" (or empty): its own. Anything else: a VAE from ``VAE/`` resolved by name.
        """
        if vae is None or vae == "" or vae == VAE_NONE:
            return None
        if vae == VAE_AUTOMATIC:
            stem = checkpoint.stem
            near = [checkpoint.path.parent / f"{stem}.vae.{ext}" for ext in ("safetensors", "pt", "ckpt")]
            found = [p for p in near if p.is_file() and _inside(p, checkpoint.root)]
            found += [e.path for e in self._scan(Kind.VAE) if e.stem == stem or _VAE_FILE.sub("", e.name) == stem]
            for path in found:
                if allow_pickle or path.suffix.lower() not in checkpoints.PICKLE_SUFFIXES:
                    return path
                log.info("%s: skipping the pickle VAE %s beside it (the Automatic VAE setting; pickles are loaded "
                         "only with allow_pickle)", checkpoint.name, path.name)
            return None
        return self.resolve(vae, Kind.VAE, field="sd_vae").path

    # ------------------------------------------------------------------------------------------ loading

    def hash_of(self, entry: ModelEntry) -> str:
        return entry.sha256 or self.hashes.sha256(entry.path)

    def load_model(self, name: str, vae: str | None = VAE_AUTOMATIC, allow_pickle: bool = False,
                   dtype=None, meta: bool = False) -> LoadedModel:
        """Resolve and load a checkpoint (+ VAE), cached in-process by (path, hash, vae path, dtype, meta).

        ``meta=True``: the modules without their weights where the files allow it (safetensors;
        :func:`engine.models.checkpoints.load_checkpoint`), else with them (``model.meta`` says which);
        :meth:`load_weights` puts them in later. At most ``max_loaded`` checkpoints stay cached; older ones are
        dropped before a new one is loaded.
        """
        entry = self.resolve(name, Kind.CHECKPOINT, field="sd_model_checkpoint")
        vae_path = self.resolve_vae(entry, vae, allow_pickle)
        sha = self.hash_of(entry)
        key = ("checkpoint", str(entry.path.resolve()), sha, str(vae_path.resolve()) if vae_path else None, str(dtype),
               meta)
        with self._load_lock:
            if (hit := self._cached(key)) is not None:
                return hit
            self._make_room("checkpoint")
            model = None
            if meta:
                try:
                    model = self._load_checkpoint(entry, vae_path, sha, allow_pickle, dtype, meta=True)
                except NeedsWeights as exc:
                    log.info("%s: loading with its weights (%s)", entry.name, exc)
            if model is None:
                model = self._load_checkpoint(entry, vae_path, sha, allow_pickle, dtype)
            self._remember(key, model)
            return model

    def load_weights(self, model: LoadedModel, allow_pickle: bool = False, dtype=None, only=None) -> None:
        """Load the weights of ``model`` (loaded with ``meta=True``, or released after an export) into its
        modules, in place (engine.models.checkpoints.load_weights_into). ``only``: the modules to load (e.g.
        ``("unet",)``, what one export needs; the others' tensors are not read); default: all."""
        entry = self.resolve(model.name, Kind.CHECKPOINT, field="sd_model_checkpoint")
        with self._load_lock:
            if only is None:
                full = self._load_checkpoint(entry, model.vae_path, model.sha256, allow_pickle, dtype)
                load_weights_into(model.components, full.components)
                return
            only = tuple(only)
            external_vae = model.vae_path is not None and "vae" in only
            own = tuple(k for k in only if not (external_vae and k == "vae"))
            loaded = checkpoints.load_modules(entry.path, own, allow_pickle=allow_pickle, dtype=dtype) if own else {}
            if external_vae:
                cfg = {k: v for k, v in model.components["vae"].config.items() if not k.startswith("_")}
                loaded["vae"] = checkpoints.load_vae(model.vae_path, config=cfg, allow_pickle=allow_pickle,
                                                     dtype=dtype)
            load_weights_into(model.components, loaded)

    def _load_checkpoint(self, entry, vae_path, sha, allow_pickle, dtype, meta: bool = False) -> LoadedModel:
        card = deferred.read_card(self.cards_dir, sha, dtype, ("unet", "vae"))  # (the SDXL refiner has no text_encoder)
        log.info("loading %s%s%s", entry.name, f" with VAE {vae_path.name}" if vae_path else "",
                 " (modules from their card, built on first use)" if card and meta else
                 " (modules without weights)" if meta else "")
        model = checkpoints.load_checkpoint(entry.path, name=entry.name, sha256=sha, allow_pickle=allow_pickle,
                                            dtype=dtype, meta=meta, card=card if meta else None)
        if card is None:  # the checkpoint's own modules (before an external VAE replaces its VAE)
            deferred.write_card(self.cards_dir, model.components, sha, dtype)
        if vae_path is not None:
            own = model.components["vae"]
            cfg = {k: v for k, v in own.config.items() if not k.startswith("_")}
            ext = checkpoints.load_vae(vae_path, config=cfg, allow_pickle=allow_pickle, dtype=dtype, meta=meta)
            # the latent scale belongs to the model family (SDXL 0.13025), not to the VAE file
            ext.register_to_config(scaling_factor=own.config.scaling_factor)
            model = replace(model, components={**model.components, "vae": ext}, vae_path=vae_path)
        return model

    def load_controlnet(self, name: str, allow_pickle: bool = False, dtype=None) -> LoadedControlNet:
        entry = self.resolve(name, Kind.CONTROLNET, field="controlnet.model")
        sha = self.hash_of(entry)
        key = ("controlnet", str(entry.path.resolve()), sha, str(dtype))
        with self._load_lock:
            if (hit := self._cached(key)) is not None:
                return hit
            self._make_room("controlnet")
            cn = load_controlnet(entry.path, name=entry.name, sha256=sha, allow_pickle=allow_pickle, dtype=dtype)
            self._remember(key, cn)
            return cn

    def _cached(self, key):
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        return None

    def _make_room(self, kind: str) -> None:
        with self._lock:
            same = [k for k in self._loaded if k[0] == kind]
            while len(same) >= self.limits[kind]:
                self._loaded.pop(same.pop(0))

    def _remember(self, key, value) -> None:
        """Keep ``value``; evict the least recently used of its kind beyond the limit."""
        with self._lock:
            self._loaded[key] = value
            same = [k for k in self._loaded if k[0] == key[0]]
            while len(same) > self.limits[key[0]]:
                self._loaded.pop(same.pop(0))

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()

"""The webui's state between calls: its options (GET/POST ``/sdapi/v1/options``, persisted in
``results_dir/webui-options.json`` so a restarted server keeps them) and the tasks its synchronous calls are
waiting for (``/sdapi/v1/progress``, ``/sdapi/v1/interrupt``).

The options are the webui's keys with its defaults (:mod:`api_compat.webui.option_table`); only those keys are
stored, each value checked against its type and size, the ones that act on requests (:data:`REQUEST_OPTIONS`)
checked as a request's ``override_settings`` are, against the current model. A stored option that no longer fits
(another model, an older file) is left out of a request with a warning (:meth:`WebuiState.overrides_for`)."""

from __future__ import annotations

import difflib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from core.atomic import atomic_file
from engine.models.store import ModelStore

from api_compat.errors import ApiError
from api_compat.service import DEFAULT_CONFIG
from api_compat.webui.listings import current_checkpoint
from api_compat.webui.option_table import (API_RESTRICTED, DEFAULTS, EFFECTS, MAX_BODY_BYTES, READ_ONLY,
                                           PREVIEW_OPTIONS, REQUEST_OPTIONS, OptionProblem, check_value)

log = logging.getLogger(__name__)

OPTIONS_FILE = "webui-options.json"
OPTION_NAMES = tuple(DEFAULTS)  # every option GET shows and POST takes
# the options face's field origins: POST /sdapi/v1/options checks (and loads a model through) a probe payload
# that carries the options as override_settings; its errors name the option
PROBE_ORIGINS = {f"override_settings.{name}": name for name in REQUEST_OPTIONS} | {
    "clip_skip": "CLIP_stop_at_last_layers"}
# which payload fields an error about a request option names (to tell a stored option that no longer fits)
_OPTION_FIELDS = {f"override_settings.{name}": name for name in REQUEST_OPTIONS} | {
    "clip_skip": "CLIP_stop_at_last_layers", "stable_diffusion_model": "sd_model_checkpoint", "sd_vae": "sd_vae"}


def option_of(field: str | None) -> str | None:
    """The request option an error's payload field is about (``override_settings.sd_vae`` -> ``sd_vae``)."""
    if not field:
        return None
    for path, name in _OPTION_FIELDS.items():
        if field == path or field.startswith(path + ".") or field.startswith(path + "["):
            return name
    return None


def probe_payload(options: dict[str, Any]) -> dict[str, Any]:
    """The smallest request that carries ``options`` as override_settings (checked, or run to load a model)."""
    return {"prompt": "", "steps": 1, "n_iter": 1, "batch_size": 1, "seed": 0, "sampler_name": "Euler",
            "override_settings": dict(options)}


class WebuiState:
    """What the webui keeps between calls: its options (persisted in ``results_dir/webui-options.json``, so a
    restarted server keeps them) and the tasks its synchronous calls are waiting for (for /progress and
    /interrupt). ``frozen``: option writes are refused (the webui's ``--freeze-settings``); ``authenticated``:
    the server requires credentials of every caller, else only loopback clients may write options."""

    def __init__(self, service, frozen: bool = False, authenticated: bool = True):
        self.service = service
        self.frozen = frozen
        self.authenticated = authenticated
        self.path = Path(service.results_dir) / OPTIONS_FILE
        self.lock = threading.Lock()
        self.options: dict[str, Any] = self._load()
        self.tasks: dict[str, float] = {}  # task id -> submit time, in submit order
        self.interrupted: set[str] = set()
        self._store = None

    @property
    def store(self):
        """The default configuration's model store (lists and names; never loads a model)."""
        if self._store is None:
            self._store = ModelStore.from_config(self.service.configs[DEFAULT_CONFIG])
        return self._store

    def refresh(self) -> None:
        """Forget the model store: the next listing reads the folders again."""
        self._store = None

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable webui options %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring webui options %s: not a JSON object", self.path)
            return {}
        out = {}
        for key, value in data.items():
            if key not in DEFAULTS or key in READ_ONLY or key in API_RESTRICTED:
                log.warning("webui options %s: ignoring %r (not an option this server stores)", self.path, key)
                continue
            try:
                out[key] = check_value(key, value)
            except OptionProblem as exc:
                log.warning("webui options %s: ignoring %s: %s", self.path, key, exc.message)
        return out

    def save(self, options: dict[str, Any]) -> None:
        """Replace the stored options (only the ones that differ from the defaults are written), written to a
        temp file then renamed."""
        kept = {k: v for k, v in options.items() if k in DEFAULTS and v != DEFAULTS[k]}
        with atomic_file(self.path, "w", encoding="utf-8") as f:
            json.dump(kept, f, indent=1)
        self.options = kept

    def value(self, key: str) -> Any:
        return self.options.get(key, DEFAULTS[key])

    # --------------------------------------------------------------------------------------------- GET
    def current_options(self) -> dict[str, Any]:
        """GET /sdapi/v1/options: every webui option, the stored value or the default (the checkpoint by its
        title, with its hash)."""
        store = self.store
        opts = self.options
        name = opts.get("sd_model_checkpoint")
        try:
            entry = store.describe(current_checkpoint(store, opts, self.service.configs[DEFAULT_CONFIG].default_model))
            title, sha = entry.title, entry.sha256
        except Exception as exc:  # an empty or changed store: say so rather than fail the whole call
            log.warning("options: %s", exc)
            title, sha = name, None
        return {**DEFAULTS, **opts, "sd_model_checkpoint": title, "sd_checkpoint_hash": sha}

    # -------------------------------------------------------------------------------------------- POST
    def may_write(self, client_host: str | None) -> None:
        """Raises ApiError ``forbidden`` (403) unless a caller at ``client_host`` may write options: never with
        ``frozen``; an authenticated caller (the server requires credentials); else a loopback client."""
        if self.frozen:
            raise ApiError("forbidden", "the options are read-only on this server (--freeze-settings)",
                           allowed="GET /sdapi/v1/options")
        if not self.authenticated and not _is_loopback(client_host):
            raise ApiError("forbidden", "setting options needs an authenticated caller (this server has no "
                           "--api-key/--api-auth) or a loopback client", allowed="GET /sdapi/v1/options")

    def parse(self, body: Any, current: dict[str, Any]) -> dict[str, Any]:
        """The options a POST /sdapi/v1/options body sets (checked against the table: known keys, types, sizes),
        without the ones it leaves as they are: read-only options posted back unchanged, the webui's
        API-restricted ones (accepted and ignored, as the webui does). Raises :class:`ApiError` naming the key."""
        if not isinstance(body, dict):
            raise ApiError("bad_request", "the body must be a JSON object of options",
                           allowed='{"sd_model_checkpoint": "..."}')
        size = len(json.dumps(body, ensure_ascii=False).encode("utf-8"))
        if size > MAX_BODY_BYTES:
            raise ApiError("payload_too_large", f"the options are {size} bytes", field=_largest(body),
                           allowed=f"at most {MAX_BODY_BYTES} bytes of options")
        wanted: dict[str, Any] = {}
        for key, value in body.items():
            if key not in DEFAULTS:
                close = difflib.get_close_matches(str(key), OPTION_NAMES, n=3, cutoff=0.75)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ApiError("unknown_field", f"unknown option {str(key)[:100]!r}{hint}", field=str(key)[:100],
                               allowed="the webui's option names (GET /sdapi/v1/options; docs/WEBUI_API.md)")
            if key in API_RESTRICTED:
                continue  # the webui's restrict_api options are not set over the API (its answer is 200 too)
            if key in READ_ONLY:
                if value not in (current.get(key), DEFAULTS[key]):
                    raise ApiError("not_supported", f"{key} is set by the server", field=key,
                                   allowed=f"{current.get(key)!r} (what GET shows)")
                continue  # posted back unchanged: what GET gave (clients post the whole dict back)
            if key == "sd_model_checkpoint" and value == current.get(key):
                continue  # the current checkpoint's title, as GET shows it: nothing to load
            try:
                wanted[key] = check_value(key, value)
            except OptionProblem as exc:
                code = "not_supported" if exc.message.startswith("not supported") else "invalid_request"
                raise ApiError(code, exc.message, field=key, allowed=exc.allowed) from None
        if wanted.get("sd_vae") == "Automatic":
            wanted["sd_vae"] = DEFAULTS["sd_vae"]
        return wanted

    def request_options(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The options that act on a request as its override_settings (set, and not at their defaults; the
        live-preview options always: previews are on by default, as in the webui)."""
        options = self.options if options is None else options
        out = {k: options[k] for k in REQUEST_OPTIONS if options.get(k) is not None and options[k] != DEFAULTS[k]}
        return {**{k: options.get(k, DEFAULTS[k]) for k in PREVIEW_OPTIONS}, **out}

    def check(self, options: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """Check the request options of ``options`` as a request's override_settings, on the current model
        (the engine's rules, the model store): raises the request's ApiError with the option as its field."""
        probe = self.request_options(options)
        if not probe:
            return
        try:
            self.service.check(probe_payload(probe), headers)
        except ApiError as exc:
            raise _in_option_terms(exc) from None

    # --------------------------------------------------------------------------------------- requests
    def warn_unfit(self, key: str, exc: ApiError) -> str:
        """A stored option that does not fit a request: logged; the warning for the answer's info."""
        text = f"the option {key}={self.options.get(key)!r} does not fit this request and was not applied: {exc}"
        log.warning("webui options: %s", text)
        return text

    def track(self, task_id: str) -> None:
        with self.lock:
            self.tasks[task_id] = time.time()

    def untrack(self, task_id: str) -> None:
        with self.lock:
            self.tasks.pop(task_id, None)
            self.interrupted.discard(task_id)

    def tracked(self) -> list[str]:
        with self.lock:
            return list(self.tasks)


def _is_loopback(host: str | None) -> bool:
    import ipaddress

    if host in ("localhost", "testclient"):  # testclient: Starlette's in-process client
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _largest(body: dict[str, Any]) -> str | None:
    sizes = {str(k)[:100]: len(json.dumps(v, ensure_ascii=False)) for k, v in body.items()}
    return max(sizes, key=sizes.get) if sizes else None


def _in_option_terms(exc: ApiError) -> ApiError:
    from api_compat.errors import payload_path

    out = ApiError(exc.code, exc.message, field=payload_path(exc.field, PROBE_ORIGINS), allowed=exc.allowed)
    out.http_status = exc.http_status
    return out


__all__ = ["WebuiState", "OPTION_NAMES", "PROBE_ORIGINS", "EFFECTS", "option_of", "probe_payload"]

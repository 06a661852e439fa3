"""The webui's state between calls: its options (GET/POST ``/sdapi/v1/options``, persisted in
``results_dir/webui-options.json`` so a restarted server keeps them) and the tasks its synchronous calls are
waiting for (``/sdapi/v1/progress``, ``/sdapi/v1/interrupt``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from core.atomic import atomic_file
from engine.models.store import ModelStore

from api_compat.schema import OverrideSettings
from api_compat.service import DEFAULT_CONFIG
from api_compat.webui.listings import current_checkpoint

log = logging.getLogger(__name__)

OPTIONS_FILE = "webui-options.json"
OPTION_NAMES = tuple(OverrideSettings.model_fields)  # the options GET/POST /sdapi/v1/options set
# the options face's field origins: POST /sdapi/v1/options loads a model through a probe payload that carries
# the options as override_settings; its errors name the option
PROBE_ORIGINS = {f"override_settings.{name}": name for name in OPTION_NAMES}


class WebuiState:
    """What the webui keeps between calls: its options (persisted in ``results_dir/webui-options.json``, so a
    restarted server keeps them) and the tasks its synchronous calls are waiting for (for /progress and
    /interrupt)."""

    def __init__(self, service):
        self.service = service
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
        return {k: v for k, v in data.items() if k in OPTION_NAMES} if isinstance(data, dict) else {}

    def save(self, options: dict[str, Any]) -> None:
        """Replace the options, written to a temp file then renamed."""
        with atomic_file(self.path, "w", encoding="utf-8") as f:
            json.dump(options, f, indent=1)
        self.options = dict(options)

    def current_options(self) -> dict[str, Any]:
        """GET /sdapi/v1/options: the options as the webui shows them (the checkpoint's title and hash)."""
        store = self.store
        opts = self.options
        name = opts.get("sd_model_checkpoint")
        try:
            entry = store.describe(current_checkpoint(store, opts, self.service.configs[DEFAULT_CONFIG].default_model))
            title, sha = entry.title, entry.short_hash
        except Exception as exc:  # an empty or changed store: say so rather than fail the whole call
            log.warning("options: %s", exc)
            title, sha = name, None
        return {"sd_model_checkpoint": title, "sd_checkpoint_hash": sha,
                "sd_vae": opts.get("sd_vae") or "Automatic",
                "CLIP_stop_at_last_layers": opts.get("CLIP_stop_at_last_layers") or 1,
                "eta_noise_seed_delta": opts.get("eta_noise_seed_delta") or 0,
                "samples_format": "png", "sdengine_settable": list(OPTION_NAMES)}

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

"""A seeded fuzz of every route of a real ``sdengine serve`` (issue 25): no 5xx, and every accepted task runs.

    python -m benchmarks fuzz --cases 10000 [--seed 0] [--json out.json]

:func:`corpus` makes ``cases`` requests from a seed: a valid payload of one route (both API families: ``/scc/...``
and ``/sdapi/v1/...`` generation, png-info, options, ControlNet detect and the OpenPose renderer, results and
cancels, the listings), then mutated 0 to 3 times: a value replaced by another type, NaN, +-Infinity, 1e308, a
number beyond any float (``1e999``), huge integers, out-of-range numbers, huge strings, nested junk, wrong
enum names, unsafe model paths, bad base64 and bad images (truncated, not an image, a PNG header that declares
2^31 pixels), unknown keys added, keys removed; a few raw bodies (not JSON, a wrong content type). Valid
generation payloads are tiny (64 px, 1-2 steps, one image) and the mutations only pick extreme numbers, so an
accepted case stays cheap; the server is also started with a ``fuzz`` engine configuration (max 256 px, batch
2) that most generation cases select with ``X-SP-RESOURCE-CONFIG-ID``.

:func:`run_corpus` sends them one after another and then waits for every accepted task: a failure is any 5xx,
any answer that is not JSON in the error shape, and any accepted task (``/scc`` 200 with a taskId, or a
synchronous webui call whose task failed after it was accepted: "task ... failed") that does not end
``succeeded`` or ``cancelled``. ``main`` starts the server (the demo model, ONNX Runtime unless ``--backend``),
runs the corpus and prints the 5xx count, the late failures and the status counts per route.
``tests/test_fuzz_server.py`` runs a few hundred cases of the same corpus in CI.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG_ID = "fuzz"  # the small engine configuration the server is started with (max 256 px, batch 2)
FUZZ_CONFIGS = {CONFIG_ID: {"max_size": 256, "max_batch_size": 2}}


@dataclass(frozen=True)
class Names:
    """The model names valid payloads use (the demo's by default; the CI test's tiny store has no LoRA)."""

    checkpoint: str = "sdengine-demo"
    controlnet: str = "sdengine-demo-canny"
    lora: str | None = "sdengine-demo-red2blue"


DEMO = Names()
LORA, CHECKPOINT = DEMO.lora, DEMO.checkpoint  # (the junk names below are about these)
_INF_TOKEN = "__fuzz_1e999__"  # a JSON number beyond any float (Python's json reads it as inf)


# -------------------------------------------------------------------------------------------- images
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, text: str | None = None, rgb=(200, 30, 30)) -> bytes:
    """A real RGB PNG (optionally with a ``parameters`` text chunk), written by hand: no Pillow needed."""
    row = b"\x00" + bytes(rgb) * width
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if text is not None:
        out += _png_chunk(b"tEXt", b"parameters\x00" + text.encode("latin-1", "replace"))
    return out + _png_chunk(b"IDAT", zlib.compress(row * height)) + _png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with almost no data (a decompression bomb)."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


INFOTEXT = "a red house\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"
GOOD_IMAGE = b64(png_bytes(64, 64))
SMALL_IMAGE = b64(png_bytes(16, 16, rgb=(20, 200, 40)))
BAD_IMAGES = [
    "", "!!!not base64!!!", "data:image/png;base64,", "data:text/plain,hello", "AAAA", b64(b"GIF89a" + b"\x00" * 20),
    b64(png_bytes(64, 64))[:40], b64(png_header_only(2**31 - 1, 2**31 - 1)), b64(png_header_only(20000, 20000)),
    b64(png_header_only(100000, 1)), b64(png_header_only(1, 65535)), b64(png_header_only(0, 0)),
    b64(b"\x89PNG\r\n\x1a\n" + b"\xff" * 50), "data:image/png;base64," + b64(png_header_only(2**16, 2**15)),
    "http://127.0.0.1:1/x.png", "file:///etc/passwd", b64(png_bytes(4096, 1)), b64(png_bytes(1, 1)),
]

# ------------------------------------------------------------------------------------------- values
EXTREME_NUMBERS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 2**63, 2**64, -(2**63) - 1, 2**31,
                   -(2**31), 10**30, -1, 0, -0.0, 0.5, 1e-320, 3.0000001, -1e5, 1e5]
NAMES = ["", " ", "Euler z", "None", "none", "Automatic", "../../etc/passwd", "/etc/passwd", "C:\\Windows\\x",
         "..\\x", "x/../../y", "models/../../x", "nul", "CON", "x" * 300, "\u202e\u0000", "\ud800",
         f"{CHECKPOINT}.ckpt", f"{CHECKPOINT} [deadbeef]", CHECKPOINT.upper(), "sdxl_vae.safetensors",
         f"<lora:{LORA}:1e308>", f"<lora:{LORA}:-1e5>", "<lora:nope:1>", "<lora:../x:1>", "<hypernet:x:1>"]


def junk(rng: random.Random, depth: int = 0) -> Any:
    """One junk JSON value: any type, extreme numbers, odd names, images, nested containers."""
    pick = rng.randrange(10 if depth < 2 else 7)
    if pick == 0:
        return rng.choice(EXTREME_NUMBERS)
    if pick == 1:
        return rng.choice(NAMES)
    if pick == 2:
        return rng.choice([None, True, False, "", [], {}])
    if pick == 3:
        return rng.choice(BAD_IMAGES)
    if pick == 4:
        return "x" * rng.choice([1000, 20000, 100000])
    if pick == 5:
        return rng.randint(-(2**70), 2**70)
    if pick == 6:
        return _INF_TOKEN
    if pick == 7:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 8:
        return {rng.choice(["a", "args", "enabled", "model", "image", "0", ""]): junk(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return {"a": [{"b": [junk(rng, depth + 1)]}]}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``value`` (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _set(value: Any, path: tuple, new: Any) -> None:
    _get(value, path[:-1])[path[-1]] = new


def mutate(rng: random.Random, payload: Any) -> Any:
    """One mutation of ``payload`` (changed in place where it is a container; returned)."""
    paths = _paths(payload)
    kind = rng.randrange(8)
    if not paths or not isinstance(payload, (dict, list)):
        return junk(rng)
    path = rng.choice(paths)
    old = _get(payload, path)
    if kind <= 2:  # a value replaced by junk
        _set(payload, path, junk(rng))
    elif kind == 3:  # a number out of range / of the wrong kind, or a name that is not one
        if isinstance(old, bool) or not isinstance(old, (int, float)):
            _set(payload, path, rng.choice(NAMES) if isinstance(old, str) else rng.choice(EXTREME_NUMBERS))
        else:
            _set(payload, path, rng.choice([old * 1e6 + 1, -old - 1, old + 0.5, str(old), [old], float("nan")]))
    elif kind == 4:  # a key removed
        container = _get(payload, path[:-1])
        if isinstance(container, dict):
            del container[path[-1]]
        else:
            container.pop(path[-1])
    elif kind == 5:  # an unknown key added
        container = _get(payload, path[:-1]) if len(path) > 1 else payload
        container = container if isinstance(container, dict) else payload
        if isinstance(container, dict):
            container[rng.choice(["stepz", "Model", "wieght", "x", "__proto__", "override_settings_x", ""])] = junk(rng)
    elif kind == 6:  # a type swap
        _set(payload, path, {"list": [old], "dict": {"value": old}, "str": json.dumps(old)[:50]}[
            rng.choice(["list", "dict", "str"])] if not isinstance(old, str) else rng.choice([[old], {old[:20]: 1}, 7]))
    else:  # a whole object (or list) made junk
        parent = path[:-1]
        if parent:
            _set(payload, parent, junk(rng))
        else:
            _set(payload, path, junk(rng))
    return payload


# ------------------------------------------------------------------------------------- valid payloads
PROMPTS = ["a red house by a lake", "", "(blue:1.2) sky, [green|red] field", "a [dog:cat:0.5] AND a bird :0.5",
           "ünïcødé 家 BREAK sky", "<foo:bar> a cat", "a <lora:nope:1> cat"]
SAMPLERS = ["Euler a", "Euler", "DPM++ 2M", "DDIM", "LMS", "Heun", "DPM++ 2M Karras", "UniPC", "LCM"]
SCHEDULERS = ["Automatic", "Karras", "Exponential", "SGM Uniform"]
MODULES = ["canny", "none", "invert", "blur_gaussian", "color", "threshold", "tile_resample", "binary"]


def _generation(rng: random.Random, webui: bool, img2img: bool, names: Names) -> dict[str, Any]:
    prompt = rng.choice(PROMPTS)
    if names.lora and rng.random() < 0.05:  # a LoRA (each multiplier change re-patches the weights: rare)
        prompt = f"{prompt} <lora:{names.lora}:0.8>"
    p: dict[str, Any] = {"prompt": prompt, "steps": rng.choice([1, 1, 2]), "width": 64, "height": 64,
                         "sampler_name": rng.choice(SAMPLERS), "seed": rng.choice([-1, rng.randrange(2**32)])}
    if rng.random() < 0.3:
        p["negative_prompt" if webui or rng.random() < 0.5 else "negtive_prompt"] = "blurry"
    if rng.random() < 0.3:
        p["cfg_scale"] = rng.choice([1, 4.5, 7])
    if rng.random() < 0.3:
        p["scheduler"] = rng.choice(SCHEDULERS)
    if rng.random() < 0.2:
        p["batch_size"] = 2
    if rng.random() < 0.2:
        p["subseed"], p["subseed_strength"] = rng.randrange(1000), 0.3
    if rng.random() < 0.3:
        if webui:
            p.setdefault("override_settings", {})["sd_model_checkpoint"] = names.checkpoint
        else:
            p["stable_diffusion_model"] = names.checkpoint
    if rng.random() < 0.3:
        p.setdefault("override_settings", {}).update(rng.choice([
            {"CLIP_stop_at_last_layers": 1}, {"samples_format": "png"}, {"show_progressbar": True},
            {"eta_noise_seed_delta": 31337}, {"save_to_dirs": False, "grid_save": False}]))
    if img2img:
        p["init_images"] = [rng.choice([GOOD_IMAGE, SMALL_IMAGE])]
        p["denoising_strength"] = rng.choice([0.3, 0.75, 1.0])
        if rng.random() < 0.3:
            p["mask"] = SMALL_IMAGE
            p["inpainting_fill"] = rng.randrange(4)
        if rng.random() < 0.2:
            p["resize_mode"] = rng.randrange(4)
    elif rng.random() < 0.2:
        p.update(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=1,  # one more size: 128 px
                 hr_upscaler=rng.choice(["Latent", "Lanczos", "Latent (nearest)"]), denoising_strength=0.5)
    if rng.random() < 0.25:
        unit = {"model": names.controlnet, "module": rng.choice(MODULES), "weight": rng.choice([0.5, 1.0]),
                ("image" if webui and rng.random() < 0.5 else "input_image"): SMALL_IMAGE}
        if rng.random() < 0.3:
            unit["processor_res"] = rng.choice([64, -1])
        p["alwayson_scripts"] = {"controlnet": {"args" if webui else "units": [unit]}}
    return p


def valid_body(rng: random.Random, route: str, task_ids: list[str], names: Names = DEMO) -> Any:
    """A valid body for ``route`` (one of :data:`POSTS`)."""
    if route in ("/scc/sd_txt2img", "/sdapi/v1/txt2img"):
        return _generation(rng, route.startswith("/sdapi"), False, names)
    if route in ("/scc/sd_img2img", "/sdapi/v1/img2img"):
        return _generation(rng, route.startswith("/sdapi"), True, names)
    if route in ("/scc/sd_get_result", "/scc/sd_cancel"):
        return {"taskId": rng.choice(task_ids) if task_ids and rng.random() < 0.8 else "0" * 32}
    if route == "/sdapi/v1/png-info":
        return {"image": b64(png_bytes(8, 8, INFOTEXT if rng.random() < 0.7 else None))}
    if route == "/sdapi/v1/options":
        return rng.choice([{"CLIP_stop_at_last_layers": rng.choice([1, 2])}, {"samples_format": "png"},
                           {"sd_model_checkpoint": names.checkpoint}, {"eta_noise_seed_delta": rng.choice([0, 31337])},
                           {"show_progressbar": True, "jpeg_quality": 80}, {"sd_vae": "Automatic"}])
    if route == "/controlnet/detect":
        return {"controlnet_module": rng.choice(MODULES), "controlnet_input_images": [SMALL_IMAGE],
                "controlnet_processor_res": rng.choice([64, -1]), "controlnet_threshold_a": rng.choice([-1, 100])}
    if route == "/controlnet/render_openpose_json":
        points = [v for i in range(18) for v in (10 + 2 * i, 10 + i, 1)]  # OpenPose's 18 body keypoints
        return [{"people": [{"pose_keypoints_2d": points}], "canvas_width": 64, "canvas_height": 64}]
    if route in ("/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints",
                 "/sdapi/v1/refresh-vae"):
        return {}
    raise KeyError(route)


POSTS = {  # route -> weight in the corpus
    "/scc/sd_txt2img": 20, "/scc/sd_img2img": 10, "/sdapi/v1/txt2img": 12, "/sdapi/v1/img2img": 6,
    "/scc/sd_get_result": 5, "/scc/sd_cancel": 2, "/sdapi/v1/png-info": 8, "/sdapi/v1/options": 6,
    "/controlnet/detect": 6, "/controlnet/render_openpose_json": 4, "/sdapi/v1/interrupt": 1,
    "/sdapi/v1/skip": 1, "/sdapi/v1/refresh-checkpoints": 1, "/sdapi/v1/refresh-vae": 1,
}
GETS = ["/sdapi/v1/sd-models", "/sdapi/v1/sd-vae", "/sdapi/v1/samplers", "/sdapi/v1/schedulers",
        "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes", "/sdapi/v1/loras", "/sdapi/v1/embeddings",
        "/sdapi/v1/scripts", "/sdapi/v1/script-info", "/sdapi/v1/hypernetworks", "/sdapi/v1/face-restorers",
        "/sdapi/v1/realesrgan-models", "/sdapi/v1/prompt-styles", "/sdapi/v1/cmd-flags", "/sdapi/v1/memory",
        "/sdapi/v1/options", "/sdapi/v1/progress", "/controlnet/version", "/controlnet/settings",
        "/controlnet/model_list", "/controlnet/module_list", "/controlnet/control_types", "/health",
        "/scc/images/{id}/0.png"]
GENERATION = ("/scc/sd_txt2img", "/scc/sd_img2img", "/sdapi/v1/txt2img", "/sdapi/v1/img2img")


@dataclass
class Case:
    method: str
    route: str  # the route's path pattern (for the counts)
    path: str  # the path sent (with a query string or ids filled in)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    mutations: int = 0


def _dumps(value: Any) -> bytes:
    text = json.dumps(value, allow_nan=True)
    return text.replace(f'"{_INF_TOKEN}"', "1e999").encode()


def corpus(seed: int, cases: int, task_ids: list[str] | None = None, names: Names = DEMO) -> Iterator[Case]:
    """``cases`` requests from ``seed`` (the same seed, the same corpus). ``task_ids`` (filled by the runner as
    tasks are accepted) are what result/cancel/image cases ask about."""
    rng = random.Random(seed)
    task_ids = task_ids if task_ids is not None else []
    routes, weights = list(POSTS), list(POSTS.values())
    for _ in range(cases):
        if rng.random() < 0.08:
            route = rng.choice(GETS)
            path = route.replace("{id}", rng.choice(task_ids) if task_ids and rng.random() < 0.7 else "0" * 32)
            if rng.random() < 0.5:
                path += rng.choice(["?skip_current_image=true", "?skip_current_image=NaN", "?x=1e999&y=%00",
                                    "?" + "a=1&" * 200, "/../../etc/passwd"])
            yield Case("GET", route, path)
            continue
        route = rng.choices(routes, weights)[0]
        body = valid_body(rng, route, task_ids, names)
        headers = {"Content-Type": "application/json"}
        if route in GENERATION and rng.random() < 0.9:
            headers["X-SP-RESOURCE-CONFIG-ID"] = CONFIG_ID
        n = rng.choices([0, 1, 2, 3], [2, 5, 2, 1])[0]
        for _ in range(n):
            body = mutate(rng, body)
        data = _dumps(body)
        if rng.random() < 0.03:  # raw bodies: not JSON, cut short, a form, a bad header
            data, headers = rng.choice([
                (data[: len(data) // 2], headers), (b"\xff\xfe{", headers), (b"NaN", headers),
                (b"1e999", headers), (b'{"prompt": "x"', headers),
                (data, {"Content-Type": "application/x-www-form-urlencoded"}),
                (data, {**headers, "X-SP-RESOURCE-CONFIG-ID": rng.choice(["nope", "x" * 300, "default"])})])
        yield Case("POST", route, route, data, headers, n)


# ------------------------------------------------------------------------------------------------ runner
LATE = re.compile(r"^task ([0-9a-f]{32}) failed")


@dataclass
class Report:
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: list[tuple[str, str, str]] = field(default_factory=list)  # (route, body head, answer head)
    bad_answers: list[tuple[str, str]] = field(default_factory=list)  # a 4xx not in the error shape
    late_failures: list[tuple[str, str, str]] = field(default_factory=list)  # (route, task id, error)
    accepted: dict[str, str] = field(default_factory=dict)  # task id -> route (/scc submits)
    outcomes: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)  # route -> seconds spent waiting for its answers
    planned: int = 0
    wall_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"cases": self.total, "planned": self.planned, "5xx": len(self.server_errors), "late_failures": len(self.late_failures),
                "bad_answers": len(self.bad_answers), "accepted_tasks": len(self.accepted),
                "outcomes": dict(self.outcomes), "wall_s": round(self.wall_s, 1),
                "per_route": {r: dict(sorted(c.items())) for r, c in sorted(self.counts.items())},
                "server_errors": self.server_errors[:20], "late": self.late_failures[:20],
                "bad": self.bad_answers[:20]}

    def markdown(self) -> str:
        lines = ["| route | 2xx | 4xx | 5xx | statuses | s total |", "|---|---|---|---|---|---|"]
        for route, c in sorted(self.counts.items()):
            by = Counter()
            for status, n in c.items():
                by[f"{status // 100}xx"] += n
            lines.append(f"| {route} | {by['2xx']} | {by['4xx']} | {by['5xx']} | "
                         + ", ".join(f"{s}: {n}" for s, n in sorted(c.items())) + f" | {self.seconds[route]:.1f} |")
        lines.append(f"\n{self.total} cases (of {self.planned} planned) in {self.wall_s:.0f} s: **{len(self.server_errors)} 5xx**, "
                     f"{len(self.late_failures)} accepted tasks that failed later, {len(self.bad_answers)} answers "
                     f"not in the error shape; {len(self.accepted)} /scc tasks accepted, outcomes "
                     f"{dict(self.outcomes)}")
        for route, body, answer in self.server_errors[:10]:
            lines.append(f"- 5xx {route}: {body[:200]!r} -> {answer[:200]!r}")
        for route, task_id, error in self.late_failures[:10]:
            lines.append(f"- late failure {route} {task_id}: {error[:200]}")
        return "\n".join(lines)


class Client:
    """One keep-alive HTTP/1.1 connection to the server (reopened after an error)."""

    def __init__(self, port: int, timeout: float = 300):
        self.port, self.timeout, self.conn = port, timeout, None

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                ) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body if method == "POST" else None, headers or {})
                response = self.conn.getresponse()
                data = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                return response.status, data
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _error_shape(data: bytes) -> bool:
    try:
        body = json.loads(data)
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and bool(error.get("code")) and bool(error.get("message"))


def run_corpus(port: int, seed: int, cases: int, *, names: Names = DEMO, settle_s: float = 600,
               budget_s: float | None = None, progress=None) -> Report:
    """Send the corpus to the server on ``port``, then wait (at most ``settle_s``) for every accepted task.
    ``budget_s``: stop sending after that many seconds (the report says how many cases ran)."""
    report = Report(planned=cases)
    client = Client(port)
    task_ids: list[str] = []
    t0 = time.perf_counter()
    for i, case in enumerate(corpus(seed, cases, task_ids, names)):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        sent = time.perf_counter()
        try:
            status, data = client.request(case.method, case.path, case.body, case.headers)
        except (OSError, http.client.HTTPException) as exc:
            status, data = 599, repr(exc).encode()  # the server went away or hung: counted as a server error
        report.seconds[case.route] += time.perf_counter() - sent
        report.counts[case.route][status] += 1
        if status >= 500:
            report.server_errors.append((case.route, case.body[:300].decode("latin-1"), data[:300].decode("latin-1")))
        elif status >= 400 and case.method == "POST" and status not in (404, 405) and not _error_shape(data):
            report.bad_answers.append((case.route, data[:300].decode("latin-1")))
        if case.method == "POST" and case.route in GENERATION and status == 200 and case.route.startswith("/scc"):
            task_id = json.loads(data)["taskId"]
            report.accepted[task_id] = case.route
            task_ids.append(task_id)
        elif case.method == "POST" and status >= 400 and _error_shape(data):
            message = json.loads(data)["error"]["message"]
            m = LATE.match(message)
            code = json.loads(data)["error"]["code"]
            if m and code != "cancelled":
                report.late_failures.append((case.route, m.group(1), f"{code}: {message}"))
        if progress is not None and (i + 1) % 500 == 0:
            progress(i + 1, cases)
    # every accepted /scc task must end succeeded (or cancelled)
    pending = dict(report.accepted)
    end = time.monotonic() + settle_s
    while pending and time.monotonic() < end:
        for task_id in list(pending):
            status, data = client.request("POST", "/scc/sd_get_result", json.dumps({"taskId": task_id}).encode(),
                                          {"Content-Type": "application/json"})
            result = json.loads(data) if status == 200 else {"status": f"http {status}"}
            if result.get("status") in ("waiting", "running"):
                continue
            route = pending.pop(task_id)
            error = result.get("error") or {}
            outcome = result.get("status") if result.get("status") != "failed" else f"failed {error.get('code')}"
            report.outcomes[outcome] += 1
            if outcome not in ("succeeded", "failed cancelled"):
                report.late_failures.append((route, task_id, f"{outcome}: {error.get('message', '')}"))
        if pending:
            time.sleep(0.2)
    for task_id, route in pending.items():
        report.outcomes["unfinished"] += 1
        report.late_failures.append((route, task_id, f"not finished within {settle_s:g} s"))
    report.wall_s = time.perf_counter() - t0
    client.close()
    return report


# ------------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, *, backend: str | None = None, models_dir: Path | None = None,
                 cache_dir: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """``sdengine serve`` (the demo model unless ``models_dir``) with the ``fuzz`` configuration, on a free port,
    exported models kept in ``cache_dir`` (reused by the next run); returns once it answers /health."""
    port = free_port()
    configs = tmp / "configs.json"
    configs.write_text(json.dumps(FUZZ_CONFIGS))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("SDENGINE_API_KEY", None)
    if cache_dir is not None:
        env["SDENGINE_CACHE_DIR"] = str(cache_dir)
    log = open(tmp / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(models_dir or tmp / "m"),
         "--results-dir", str(tmp / "r"), "--configs", str(configs), "--max-queue", "100000",
         "--max-body-mb", "2", *(("--backend", backend) if backend else ()), *extra],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 120
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > end:
            server.kill()
            raise RuntimeError(f"the server did not start: {(tmp / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", help="the server's engine backend (default: serve's)")
    parser.add_argument("--port", type=int, help="fuzz a server already running here instead (started with "
                        "--configs holding the 'fuzz' configuration)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "sdengine-fuzz-cache",
                        help="the server's exported models, kept for the next run (default: %(default)s)")
    parser.add_argument("--budget-min", type=float, help="stop sending new cases after this many minutes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    def progress(done, total):
        sys.stderr.write(f"\r{done}/{total} cases")
        sys.stderr.flush()

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        port = args.port
        if port is None:
            server, port = start_server(Path(tmp), backend=args.backend, cache_dir=args.cache_dir)
        try:
            report = run_corpus(port, args.seed, args.cases, progress=progress,
                                budget_s=args.budget_min * 60 if args.budget_min else None)
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
            if report_log := (Path(tmp) / "serve.log"):
                if report_log.exists() and args.json:
                    (args.json.with_suffix(".serve.log")).write_bytes(report_log.read_bytes()[-200000:])
    sys.stderr.write("\n")
    print(report.markdown())
    print(f"seed {args.seed}; load average before: {load}; {os.cpu_count()} CPUs")
    summary = report.summary()
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()

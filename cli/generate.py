"""``sdengine txt2img`` and ``img2img``: one task through the task service, its progress on stderr."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from cli.options import BACKEND_DEFAULT, PRECISION_DEFAULT, Shown, dirs_help, engine_options, load_factory
from engine.rules import default

log = logging.getLogger(__name__)

FLAG_FIELDS = {  # option name -> payload field
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "sampler": "sampler_name",
    "scheduler": "scheduler",
    "cfg_scale": "cfg_scale",
    "batch_size": "batch_size",
    "n_iter": "n_iter",
    "model": "stable_diffusion_model",
}


def _read_payload(source: str | None) -> dict[str, Any]:
    if source is None:
        return {}
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        payload = json.loads(text)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read a JSON payload from {source}: {exc}", param_hint="PAYLOAD") from None
    if not isinstance(payload, dict):
        raise click.BadParameter("the payload must be a JSON object", param_hint="PAYLOAD")
    return payload


def _outputs(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}") for i in range(count)]


def _payload_default(field: str) -> str:
    """The payload field's default as ``--help`` shows it (from the schema, so it cannot drift)."""
    from api_compat.schema import Txt2ImgPayload

    default = Txt2ImgPayload.model_fields[field].default
    return json.dumps(default) if default is not None else "none"


@click.command()
@click.argument("payload", required=False, metavar="[PAYLOAD.json | -]")
@click.option("--prompt", help="Positive prompt (webui attention syntax).", cls=Shown, shown=_payload_default("prompt"))
@click.option("--negative-prompt", help="Negative prompt.", cls=Shown, shown=_payload_default("negtive_prompt"))
@click.option("--steps", type=int, cls=Shown, shown=_payload_default("steps"))
@click.option("--seed", type=int, help="-1 draws a random seed.", cls=Shown, shown=_payload_default("seed"))
@click.option("--width", type=int, cls=Shown, shown="the model's native size (sdengine models info)")
@click.option("--height", type=int, cls=Shown, shown="the model's native size (sdengine models info)")
@click.option("--sampler", help='Sampler name, e.g. "Euler a" or "DPM++ 2M Karras".', cls=Shown,
              shown=json.dumps(default("sampler_name")))
@click.option("--scheduler", help="Schedule type (Automatic, Karras, Exponential, ...).",
              cls=Shown, shown=_payload_default("scheduler"))
@click.option("--cfg-scale", type=float, cls=Shown, shown=_payload_default("cfg_scale"))
@click.option("--batch-size", type=int, cls=Shown, shown=_payload_default("batch_size"))
@click.option("--n-iter", type=int, help="Number of batches.", cls=Shown, shown=_payload_default("n_iter"))
@click.option("--model", help="Checkpoint name from the model store.",
              cls=Shown, shown="the default model (sdengine models default; the bundled demo model until set)")
@click.option("--backend", help="openvino, onnxruntime, torch or tensorrt.", cls=Shown, shown=BACKEND_DEFAULT)
@click.option("--device", help="cpu or cuda[:N].", cls=Shown, shown="cpu")
@click.option("--precision", help="fp32, fp16, bf16 or int8 (openvino: INT8 UNet).", cls=Shown, shown=PRECISION_DEFAULT)
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), help="Model store folder.",
              cls=Shown, shown=f"$SDENGINE_MODELS_DIR or {dirs_help()[0]}")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where task records and PNGs are kept.",
              cls=Shown, shown=f"$SDENGINE_RESULTS_DIR or {dirs_help()[1]}")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Copy the image here (several images: NAME-1.png, NAME-2.png, ...).",
              cls=Shown, shown="no copy; the PNG stays in the results folder")
@click.option("--allow-url-fetch", is_flag=True, help="Fetch http(s) ControlNet images.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), cls=Shown, shown="none",
              help="Write the live preview PNG here while the task runs (turns on override_settings."
                   "live_previews_enable; show_progress_type and show_progress_every_n_steps come from the payload).")
@click.option("--controlnet-image", type=click.Path(dir_okay=False, exists=True, path_type=Path), cls=Shown,
              shown="none", help="A ControlNet unit's image (PNG, JPEG, WEBP ...): adds a unit to "
                                 "alwayson_scripts.controlnet.args, after the payload's own.")
@click.option("--controlnet-module", help='The unit\'s preprocessor ("canny", "none", ...; sdengine models info '
                                          'lists what fits the model).', cls=Shown,
              shown=json.dumps(default("controlnet_units.module")))
@click.option("--controlnet-model", help="The unit's ControlNet model (a name from the model store, e.g. "
                                         "sdengine-demo-canny).", cls=Shown, shown="none: needed unless the "
                                                                                   "module is reference_*")
@click.option("--controlnet-weight", type=float, help="The unit's weight (0..2).", cls=Shown,
              shown=json.dumps(default("controlnet_units.weight")))
@click.option("--engine-factory", hidden=True, help="module:attr of an engine factory (benchmarks, plugins).")
def txt2img(payload, backend, device, precision, models_dir, results_dir, output, allow_url_fetch, engine_factory,
            **flags):
    """Generate images from a sd_txt2img JSON payload (a file, or - for stdin) and/or flags.

    Flags override the payload's fields (every field: docs/API.md). Prints the absolute paths of the PNGs
    (each carries the webui infotext); progress and warnings go to stderr. Ctrl-C cancels the task (exit 130).
    """
    preview = flags.pop("preview", None)
    _run(_with_flags(_read_payload(payload), flags, preview), "sd_txt2img", backend, device, precision, models_dir,
         results_dir, output, allow_url_fetch, engine_factory, preview)


CONTROLNET_FLAGS = {"controlnet_module": "module", "controlnet_model": "model", "controlnet_weight": "weight"}


def _controlnet_unit(body: dict[str, Any], flags: dict[str, Any]) -> None:
    """``--controlnet-image FILE`` (+ module, model, weight) as one more enabled unit of the payload."""
    image = flags.pop("controlnet_image", None)
    given = {field: flags.pop(option) for option, field in CONTROLNET_FLAGS.items() if flags.get(option) is not None}
    for option in CONTROLNET_FLAGS:
        flags.pop(option, None)
    if image is None:
        if given:
            raise click.BadParameter("--controlnet-module/--controlnet-model/--controlnet-weight need "
                                     "--controlnet-image FILE", param_hint="--controlnet-image")
        return
    scripts = body.get("alwayson_scripts")
    scripts = dict(scripts) if isinstance(scripts, dict) else {}
    controlnet = scripts.get("controlnet")
    controlnet = dict(controlnet) if isinstance(controlnet, dict) else {}
    key = "units" if controlnet.get("units") is not None else "args"  # the payload's own spelling
    units = list(controlnet.get(key) or [])
    units.append({"enabled": True, "input_image": _image_b64(image), **given})
    controlnet[key] = units
    scripts["controlnet"] = controlnet
    body["alwayson_scripts"] = scripts


def _flag_hint(field: str | None, body: dict[str, Any]) -> str:
    """The flag that set a payload field of an error (the --controlnet-* unit), or ""."""
    controlnet = (body.get("alwayson_scripts") or {}).get("controlnet") or {}
    key = "units" if controlnet.get("units") is not None else "args"
    units = controlnet.get(key) or []
    prefix = f"alwayson_scripts.controlnet.{key}[{len(units) - 1}]"
    if not field or not units or not field.startswith(prefix):
        return ""
    rest = field[len(prefix) + 1:]
    flag = {"module": "--controlnet-module", "model": "--controlnet-model", "weight": "--controlnet-weight",
            "input_image": "--controlnet-image"}.get(rest.split(".")[0].split("[")[0])
    return f" (set by {flag})" if flag else ""


def _with_flags(body: dict[str, Any], flags: dict[str, Any], preview: Path | None = None) -> dict[str, Any]:
    _controlnet_unit(body, flags)
    for option, field in FLAG_FIELDS.items():
        if flags.get(option) is not None:
            if field == "negative_prompt":
                body.pop("negtive_prompt", None)
            body[field] = flags[option]
    if preview is not None:
        overrides = body.get("override_settings")
        body["override_settings"] = {**(overrides if isinstance(overrides, dict) else {}), "live_previews_enable": True}
    return body


def _image_b64(path: Path) -> str:
    import base64

    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from None


def _img2img(payload, backend, device, precision, models_dir, results_dir, output, allow_url_fetch, engine_factory,
             init_image, mask, denoising_strength, resize_mode, **flags):
    """Generate images from a sd_img2img JSON payload (a file, or - for stdin) and/or flags: --init-image (or
    the payload's init_images), --mask for inpainting.

    Flags override the payload's fields (every field: docs/API.md). Prints the absolute paths of the PNGs
    (each carries the webui infotext); progress and warnings go to stderr. Ctrl-C cancels the task (exit 130).
    """
    preview = flags.pop("preview", None)
    body = _with_flags(_read_payload(payload), flags, preview)
    if init_image is not None:
        body["init_images"] = [_image_b64(init_image)]
    if mask is not None:
        body["mask"] = _image_b64(mask)
    if denoising_strength is not None:
        body["denoising_strength"] = denoising_strength
    if resize_mode is not None:
        body["resize_mode"] = int(resize_mode) if resize_mode.isdigit() else resize_mode
    _run(body, "sd_img2img", backend, device, precision, models_dir, results_dir, output, allow_url_fetch,
         engine_factory, preview)


def _run(body: dict[str, Any], method: str, backend, device, precision, models_dir, results_dir, output,
         allow_url_fetch, engine_factory, preview: Path | None = None) -> None:
    from api_compat.errors import ApiError

    local_only = backend or device or precision or models_dir or engine_factory or allow_url_fetch
    service = None if local_only else _running_server(results_dir)
    if service is None:
        service = _local_service(results_dir, models_dir=models_dir, engine_factory=load_factory(engine_factory),
                                 allow_url_fetch=allow_url_fetch, allow_private_urls=True,  # the user's own payload
                                 **engine_options(backend, device, precision))
    with service:
        try:
            task_id = getattr(service, method)(body)["taskId"]
        except ApiError as exc:
            raise click.ClickException(str(exc) + _flag_hint(exc.field, body)) from None
        result = _follow(service, task_id, preview)
    if result["status"] != "succeeded":
        error = result.get("error") or {}
        raise click.ClickException(f"task {task_id} failed ({error.get('code')}): {error.get('message')}")
    for warning in result.get("info", {}).get("warnings") or []:
        click.echo(f"warning: {warning}", err=True)
    images = [Path(p).absolute() for p in result["images"]]
    if output is not None and images:
        output.absolute().parent.mkdir(parents=True, exist_ok=True)
        targets = _outputs(output.absolute(), len(images))
        for src, dst in zip(images, targets):
            shutil.copyfile(src, dst)
        images = targets
    for path in images:
        click.echo(str(path))
    seeds = result.get("info", {}).get("all_seeds")
    click.echo(f"task {task_id}: {len(images)} image(s), seeds {seeds}; results in {service.results_dir}", err=True)


def _running_server(results_dir: Path | None):
    """The ``sdengine serve`` running on this results folder (the CLI then sends its task there), or None."""
    from cli.remote import running_server
    from engine.config import default_results_dir

    server = running_server(Path(results_dir).absolute() if results_dir else default_results_dir())
    if server is not None:
        click.echo(f"sending the task to the running server at {server.url} (pid {server.pid})", err=True)
    return server


def _local_service(results_dir: Path | None, *, models_dir, **options):
    """A TaskService of this process. When another process (a server that did not answer, another CLI) holds
    the results folder, this run keeps its results in ``{results}/cli`` instead, and says so."""
    from api_compat.service import TaskService
    from api_compat.tasks.store import StoreLocked
    from engine.config import default_results_dir

    try:
        return TaskService(models_dir, results_dir=results_dir, **options)
    except StoreLocked as exc:
        own = (Path(results_dir).absolute() if results_dir else default_results_dir()) / "cli"
        click.echo(f"note: {exc}\nthis run keeps its results in {own}", err=True)
        try:
            return TaskService(models_dir, results_dir=own, **options)
        except (ValueError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from None
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None


img2img = click.Command(
    "img2img", callback=_img2img, help=_img2img.__doc__,
    params=[p for p in txt2img.params] + [
        Shown(["--init-image"], type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The init image (PNG, JPEG, WEBP ...); sets init_images.", shown="the payload's init_images"),
        Shown(["--mask"], type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Inpainting mask (white: repaint).", shown="none: img2img without inpainting"),
        Shown(["--denoising-strength"], type=float, help="0..1: how much of the init image is replaced.",
              shown="0.75"),
        Shown(["--resize-mode"], help='0 "Just resize", 1 "Crop and resize", 2 "Resize and fill", '
                                      '3 "Just resize (latent upscale)".', shown='0 "Just resize"'),
    ],
    context_settings=txt2img.context_settings)


class _PhaseBars:
    """Progress on stderr from the task's ``progress`` object: a line per phase, a bar of its own for each
    export and for sampling (step i/n with the engine's ETA, measured from sampling steps only)."""

    def __init__(self, file=None):
        self.file = file or sys.stderr
        self.key = None
        self.bar = None
        self.shown = 0

    def update(self, progress: dict[str, Any]) -> None:
        phase = progress.get("phase") or "sampling"
        if phase == "sampling":
            key, total, done = ("sampling",), max(int(progress.get("steps") or 1), 1), int(progress.get("step") or 0)
        elif phase == "exporting":
            detail = str(progress.get("detail") or "")
            component = detail.split(" (")[0]
            key, total, done = ("exporting", component), max(int(progress.get("phase_total") or 1), 1), int(
                progress.get("phase_done") or 0)
        else:
            key, total, done = (phase,), 0, 0
        if key != self.key:
            self.close(complete=True)  # a later phase began: the bar's phase is done (polls miss its last steps)
            self.key = key
            if total:
                label = "sampling" if phase == "sampling" else f"exporting {key[1]}"
                self.bar = click.progressbar(length=total, label=label, file=self.file, show_eta=False,
                                             show_pos=True, item_show_func=lambda eta: eta)
                self.bar.__enter__()
                self.shown = 0
            else:
                detail = progress.get("detail")
                click.echo(f"{phase}{': ' + str(detail) if detail else ''} ...", file=self.file)
        if self.bar is not None and done > self.shown:
            eta = progress.get("eta_seconds")
            text = f"ETA {_clock(eta)}" if phase == "sampling" and eta is not None else None
            self.bar.update(done - self.shown, text)
            self.shown = done

    def close(self, complete: bool = False) -> None:
        """Ends the current bar; ``complete``: its phase finished, so it ends at n/n whatever the polls saw."""
        if self.bar is not None:
            if complete and self.shown < self.bar.length:
                self.bar.update(self.bar.length - self.shown)
                self.shown = self.bar.length
            self.bar.__exit__(None, None, None)
            self.bar = None


def _write_preview(path: Path, image_b64: str) -> None:
    import base64

    from core.atomic import atomic_file

    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(base64.b64decode(image_b64))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _follow(service, task_id: str, preview: Path | None = None) -> dict[str, Any]:
    """Poll the task, showing its phases (on stderr); with ``preview``, each new live preview is written there
    (atomically: a viewer never reads half a PNG). Ctrl-C cancels the task, waits until it is recorded as
    cancelled, and raises KeyboardInterrupt (the command group exits 130).

    While polling, SIGINT only sets an event that the loop checks: the interrupt never lands inside the
    service's code (a lock held, a store write half done), which under load could leave the process hung."""
    bars = _PhaseBars()
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    shown_step = None
    try:
        while not stop.is_set():
            result = service.sd_get_result({"taskId": task_id, "current_image": preview is not None})
            if result["status"] in ("succeeded", "failed"):
                bars.close(complete=result["status"] == "succeeded")
                return result
            if result.get("progress"):
                bars.update(result["progress"])
            if preview is not None and result.get("current_image") and result.get("current_image_step") != shown_step:
                shown_step = result.get("current_image_step")
                _write_preview(preview, result["current_image"])
            stop.wait(0.05)
    except KeyboardInterrupt:  # before the handler was installed, or not on the main thread
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        bars.close()
    service.cancel(task_id)
    try:
        final = service.wait(task_id, timeout=60)
        click.echo(f"task {task_id} cancelled ({final['status']}: "
                   f"{(final.get('error') or {}).get('code', '')})", err=True)
    except TimeoutError:
        click.echo(f"task {task_id}: cancel requested, still stopping", err=True)
    raise KeyboardInterrupt



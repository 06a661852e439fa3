"""``sdengine serve`` (the HTTP API) and ``sdengine worker`` (a Celery worker for ``serve --queue``)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Callable

import click

from cli.options import BACKEND_DEFAULT, PRECISION_DEFAULT, Shown, dirs_help, engine_options, load_factory


def _budget(gb: float | None):
    if gb is None:
        return "auto"
    return int(gb * 2**30) if gb > 0 else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), help="Model store folder.",
              cls=Shown, shown=f"$SDENGINE_MODELS_DIR or {dirs_help()[0]}")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where task records and PNGs are kept.", cls=Shown,
              shown=f"$SDENGINE_RESULTS_DIR or {dirs_help()[1]}")
@click.option("--api-key", envvar="SDENGINE_API_KEY", help="Require this key (Authorization: Bearer / X-API-Key).",
              cls=Shown, shown="$SDENGINE_API_KEY, else no key (loopback only)")
@click.option("--api-auth", envvar="SDENGINE_API_AUTH", metavar="USER:PASS[,USER:PASS]",
              help="HTTP Basic credentials, as the webui's --api-auth; with --api-key, either admits.",
              cls=Shown, shown="$SDENGINE_API_AUTH, else none")
@click.option("--backend", help="openvino, onnxruntime, torch or tensorrt.", cls=Shown, shown=BACKEND_DEFAULT)
@click.option("--device", help="cpu or cuda[:N].", cls=Shown, shown="cpu")
@click.option("--precision", help="fp32, fp16, bf16 or int8 (openvino: INT8 UNet).", cls=Shown, shown=PRECISION_DEFAULT)
@click.option("--configs", "configs_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help='JSON file {"config-id": {engine options}} selected by the X-SP-RESOURCE-CONFIG-ID header.',
              cls=Shown, shown="only the default configuration")
@click.option("--max-queue", default=256, show_default=True, type=int)
@click.option("--max-queue-mb", default=512, show_default=True, type=int,
              help="Bound on the compressed ControlNet images held by waiting tasks.")
@click.option("--max-body-mb", default=32, show_default=True, type=int)
@click.option("--allow-url-fetch", is_flag=True,
              help="Fetch http(s) request images (at most the image size limit, within --url-fetch-seconds; "
                   "public addresses only).")
@click.option("--url-fetch-seconds", type=click.FloatRange(min=0.1, max=300), default=15.0, show_default=True,
              help="With --allow-url-fetch: seconds one image URL may take in all (lookup, connect, answer).")
@click.option("--allow-private-urls", is_flag=True,
              help="With --allow-url-fetch: also fetch URLs on private, loopback and link-local addresses.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A host name clients use for this server (the Host header); the bound address and, on a "
                   "loopback bind, localhost are always allowed. '*' allows any (e.g. behind a proxy that checks).",
              cls=Shown, shown="the bound address (and localhost on loopback)")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (https://app.example) allowed to call the API from a browser; others are refused.",
              cls=Shown, shown="none")
@click.option("--insecure-no-auth", is_flag=True,
              help="Allow a non-loopback bind without --api-key (anyone who can reach it can submit tasks).")
@click.option("--header-timeout", default=10.0, show_default=True, type=float,
              help="Seconds a connection may take to send its request line and headers.")
@click.option("--read-timeout", default=60.0, show_default=True, type=float,
              help="Seconds a request body may take to arrive.")
@click.option("--queue", envvar="SDENGINE_QUEUE", metavar="redis://[:PASSWORD@]HOST:PORT/DB",
              help="Send the tasks to 'sdengine worker' processes over Celery + Redis (this server then runs no "
                   "engine and needs no GPU).", cls=Shown, shown="$SDENGINE_QUEUE, else run them in this process")
@click.option("--results-ttl", type=float, default=7 * 86400, show_default=True,
              help="Seconds a finished task's result (record and PNGs) is kept; then it answers 'expired'.")
@click.option("--visibility-timeout", type=float, default=3600, show_default=True,
              help="(--queue) Seconds before Redis hands out again a message whose worker vanished before it "
                   "started the task (a running task of a lost worker is published again within 24 s by the "
                   "lease rule); give every worker and server the same value, longer than the longest task.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Starts of one task that may die with this server (killed, out of memory) or, with --queue, with "
                   "its worker before the task is failed (worker_lost); the server's other accepted tasks run "
                   "again when it is restarted on the same --results-dir.")
@click.option("--max-task-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop a task that runs longer (within one sampling step or VAE tile); it fails timed_out. With "
                   "--queue it travels with each task and the workers apply the smaller of it and their own.",
              cls=Shown, shown="no limit")
@click.option("--memory-budget-gb", type=float, default=None,
              help="Refuse requests whose estimated peak memory is larger (default: half the machine's memory; "
                   "with --queue: off unless given, as the workers' memory; 0 turns the check off).")
@click.option("--freeze-settings", is_flag=True,
              help="The webui options are read-only (POST /sdapi/v1/options answers 403), as the webui's flag.")
@click.option("--strict", is_flag=True,
              help="Refuse unknown payload fields (422 unknown_field) instead of ignoring them as the webui does "
                   "(then they are named in the result's info.warnings and the log).")
@click.option("--allow-pickle", is_flag=True,
              help="Load pickle model files (.ckpt/.pt/.pth/.bin) that requests name; a pickle can run code: only "
                   "for files you trust (refused at submit otherwise, naming the file).")
@click.option("--engine-factory", hidden=True)
def serve(host, port, models_dir, results_dir, api_key, api_auth, backend, device, precision, configs_file, max_queue,
          max_queue_mb, max_body_mb, allow_url_fetch, allowed_hosts, cors_origins, insecure_no_auth, header_timeout,
          read_timeout, queue, results_ttl, visibility_timeout, max_attempts, max_task_seconds, memory_budget_gb,
          freeze_settings, strict, engine_factory, allow_private_urls, url_fetch_seconds, allow_pickle):
    """Serve POST /scc/sd_txt2img and /scc/sd_get_result, and the webui's /sdapi/v1/... API, over HTTP (needs the
    'server' extra).

    Safe by default on a machine with a browser: loopback bind, JSON-only POST bodies, Host and Origin
    checked (DNS rebinding, cross-site submits), header and body deadlines. A non-loopback bind needs
    --api-key (or --insecure-no-auth)."""
    from core.lazy import require

    from api_compat.http import allowed_hosts_for, create_app, parse_api_auth, uvicorn_config

    uvicorn = require("uvicorn", "server", "sdengine serve")
    try:
        basic = parse_api_auth(api_auth)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--api-auth") from None
    if not _is_loopback(host) and not api_key and not basic:
        if not insecure_no_auth:
            raise click.UsageError(f"refusing to serve on {host} (not loopback) without an API key: give --api-key "
                                   "(or SDENGINE_API_KEY) or --api-auth, bind 127.0.0.1, or pass --insecure-no-auth")
        click.echo(f"warning: serving on {host} without an API key (--insecure-no-auth); anyone who can reach it "
                   "can submit tasks", err=True)
    configs = json.loads(configs_file.read_text()) if configs_file else None
    from api_compat.service import TaskService

    queue_options = {"visibility_timeout": visibility_timeout} if queue else None
    try:
        service = TaskService(models_dir, results_dir=results_dir, configs=configs, max_queue=max_queue,
                              max_queue_bytes=max_queue_mb * 1024 * 1024, memory_budget=_budget(memory_budget_gb),
                              engine_factory=load_factory(engine_factory), allow_url_fetch=allow_url_fetch,
                              max_age_s=results_ttl or None, queue=queue, queue_options=queue_options,
                              strict=strict, max_attempts=max_attempts, max_task_seconds=max_task_seconds,
                              allow_private_urls=allow_private_urls, url_fetch_seconds=url_fetch_seconds,
                              **engine_options(backend, device, precision),
                              **({"allow_pickle": True} if allow_pickle else {}))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    app = create_app(service, api_key=api_key, max_body_bytes=max_body_mb * 1024 * 1024, close_service=True,
                     allowed_hosts=allowed_hosts_for(host, allowed_hosts), cors_origins=cors_origins,
                     read_timeout=read_timeout, api_auth=basic, freeze_settings=freeze_settings)
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port, header_timeout=header_timeout))
    record = _write_server_record(service.results_dir, host, port, "key" if api_key else "basic" if basic else "none")
    restore = _remove_record_on_exit(record, server)
    try:
        server.run()
    finally:
        _remove_server_record(record)
        restore()


def _write_server_record(results_dir: Path, host: str, port: int, auth: str) -> Path | None:
    """``{results}/server.json`` ({pid, url, auth}): how a CLI on the same home finds this server and sends its
    task here instead of stopping at the results folder's lock (cli.generate)."""
    import os

    from api_compat.tasks.store import SERVER_RECORD
    from core.atomic import atomic_file

    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{'[' + local + ']' if ':' in local else local}:{port}"
    path = Path(results_dir) / SERVER_RECORD
    try:
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "url": url, "auth": auth}) + "\n")
    except OSError:  # information only
        return None
    return path


def _remove_record_on_exit(record: Path | None, server) -> Callable[[], None]:
    """Remove the server record on every exit but SIGKILL's (the CLI's reader removes what that leaves:
    cli.remote.running_server): at interpreter exit (atexit), and on SIGTERM and SIGHUP. uvicorn shuts down
    on SIGTERM and then raises it again with the handler it found, which by default ends the process before
    any ``finally`` runs; this handler removes the record, then ends the process by the same signal (the exit
    status stays -SIGTERM). A SIGHUP while serving shuts down gracefully first, as SIGTERM does. Returns what
    restores the previous handlers."""
    import atexit
    import signal
    import threading

    atexit.register(_remove_server_record, record)

    def on_signal(sig, frame):
        if server.started and not server.should_exit:  # serving: shut down first; uvicorn raises it again
            server.handle_exit(sig, frame)
            return
        _remove_server_record(record)
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)

    signals = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        atexit.unregister(_remove_server_record)

    return restore


def _remove_server_record(path: Path | None) -> None:
    import os

    if path is None:
        return
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


@click.command()
@click.option("--queue", envvar="SDENGINE_QUEUE", required=True, metavar="redis://[:PASSWORD@]HOST:PORT/DB",
              help="The Redis the API servers send tasks to.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (one worker per GPU).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), help="Model store folder.",
              cls=Shown, shown=f"$SDENGINE_MODELS_DIR or {dirs_help()[0]}")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the PNGs are written: the same folder the API servers read (shared storage).")
@click.option("--models", help="Serve only these checkpoints (comma-separated names from the model store); "
                               "default: every checkpoint in the store, and tasks that name none.")
@click.option("--backend", help="openvino, onnxruntime, torch or tensorrt.", cls=Shown, shown=BACKEND_DEFAULT)
@click.option("--precision", help="fp32, fp16, bf16 or int8 (openvino: INT8 UNet).", cls=Shown, shown=PRECISION_DEFAULT)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Exported ONNX / engine cache (default: MODELS_DIR/cache).")
@click.option("--threads", type=int, help="CPU threads of the engine (default: all cores).")
@click.option("--name", help="Worker name (default: sdengine-DEVICE-PID), shown by /health.")
@click.option("--visibility-timeout", type=float, default=3600, show_default=True,
              help="Seconds before Redis hands out again a message whose worker vanished before it started the "
                   "task (same value everywhere; longer than the longest task).")
@click.option("--restore-interval", type=float, default=10, show_default=True, hidden=True)
@click.option("--lease-ttl", type=float, default=15, show_default=True,
              help="Seconds a running task's lease lives without a refresh (its worker refreshes it every third).")
@click.option("--worker-timeout", type=float, default=20, show_default=True,
              help="Seconds without a heartbeat after which a worker counts as lost: its task, once its lease "
                   "lapsed, is published again by the other workers.")
@click.option("--reap-interval", type=float, default=2, show_default=True, hidden=True)
@click.option("--heartbeat-interval", type=float, default=2, show_default=True, hidden=True)
@click.option("--max-attempts", type=int, default=3, show_default=True,
              help="Deliveries whose worker died before a task is failed (worker_lost).")
@click.option("--max-task-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop a task that runs longer (within one sampling step or VAE tile); it fails timed_out (a "
                   "server's own --max-task-seconds, when smaller, applies too).", cls=Shown, shown="no limit")
@click.option("--allow-pickle", is_flag=True,
              help="Load pickle model files (.ckpt/.pt/.pth/.bin) that requests name; a pickle can run code: only "
                   "for files you trust (refused at submit otherwise, naming the file).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--engine-factory", hidden=True, help="module:attr of an engine factory (tests, plugins).")
def worker(queue, device, models_dir, results_dir, models, backend, precision, cache_dir, threads, name,
           visibility_timeout, restore_interval, lease_ttl, worker_timeout, reap_interval, heartbeat_interval,
           max_attempts, max_task_seconds, allow_pickle, loglevel, engine_factory):
    """Run the engine for 'sdengine serve --queue' servers: a Celery worker on one device that loads the
    engine once and runs one task at a time (needs the 'queue' extra)."""
    from api_compat.tasks.celery_app import QueueOptions, redact
    from api_compat.tasks.worker import WorkerSettings, run_worker
    from core.errors import SdEngineError
    from core.lazy import require

    require("celery", "queue", "sdengine worker")
    options = {"device": device, **engine_options(backend, None, precision)}
    if models_dir is not None:
        options["models_dir"] = models_dir
    if cache_dir is not None:
        options["cache_dir"] = cache_dir
    if threads:
        options["num_threads"] = threads
    if allow_pickle:
        options["allow_pickle"] = True
    try:
        queue_options = QueueOptions(visibility_timeout=visibility_timeout, restore_interval=restore_interval,
                                     max_attempts=max_attempts, lease_ttl=lease_ttl, worker_timeout=worker_timeout,
                                     reap_interval=reap_interval, heartbeat_interval=heartbeat_interval,
                                     max_task_seconds=max_task_seconds)
    except ValueError as exc:
        raise click.BadParameter(str(exc).replace("_", "-")) from None
    settings = WorkerSettings(
        url=queue, results_dir=results_dir, engine_options=options,
        models=tuple(m.strip() for m in (models or "").split(",") if m.strip()), engine_factory=engine_factory,
        options=queue_options, name=name)
    try:
        run_worker(settings, loglevel=loglevel)
    except SdEngineError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{redact(queue)}: {exc}") from None

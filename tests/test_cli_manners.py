"""CLI manners: -h and --help everywhere, --version, a default shown for every option in every --help, and
Ctrl-C (SIGINT to a real `sdengine txt2img` process on the tiny model) exits 130 with the task recorded as
cancelled."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
from click.testing import CliRunner

from cli import COMMANDS, EXIT_INTERRUPTED, main

ROOT = Path(__file__).resolve().parent.parent


def _all_commands():
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                yield f"{name} {sub}", command.get_command(ctx, sub)
        else:
            yield name, command


def test_version_and_short_help():
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and re.match(r"sdengine, version \S+", version.output)
    for name, _ in [("", None), *_all_commands()]:
        args = name.split() + ["-h"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Usage:" in result.output, (args, result.output)
        assert result.output == runner.invoke(main, name.split() + ["--help"]).output


def test_every_option_shows_its_default():
    runner = CliRunner()
    missing = []
    for name, command in _all_commands():
        text = runner.invoke(main, name.split() + ["--help"]).output
        options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden and not p.is_flag
                   and p.name != "help"]
        for param in options:
            record = param.get_help_record(click.Context(command, show_default=True))
            if record is None or ("default" not in record[1] and not param.required):
                missing.append(f"{name} {param.opts[0]}")
        assert "default" in text or not options, name
    assert missing == [], "options without a default in --help"
    assert set(COMMANDS) >= {"txt2img", "export", "models", "serve", "paths"}


def test_ctrl_c_cancels_the_task_and_exits_130(tiny_store, tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "txt2img", "--model", "tiny-sd1", "--steps", "150", "--n-iter", "50",
         "--sampler", "Euler", "--seed", "1", "--backend", "torch", "--models-dir", str(tiny_store),
         "--results-dir", str(results)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    sampling = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "sampling" in line:
                sampling.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert sampling.wait(180), "".join(lines)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == EXIT_INTERRUPTED, err
    match = re.search(r"task ([0-9a-f]{32}) cancelled", err)
    assert match, err
    from api_compat.service import TaskService

    with TaskService(tiny_store, results_dir=results, check_models=False) as service:
        record = service.sd_get_result({"taskId": match[1]})
    assert record["status"] == "failed" and record["error"]["code"] == "cancelled", record


def test_preview_flag_writes_the_live_preview(tiny_store, tmp_path):
    """``--preview PATH``: the task's live previews (turned on in its override_settings) written there while it
    runs; the payload's preview options apply (every step, "Approx cheap": the latent's own size)."""
    import json

    from PIL import Image

    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"override_settings": {"show_progress_every_n_steps": 1,
                                                         "show_progress_type": "Approx cheap"}}))
    preview = tmp_path / "out" / "preview.png"
    result = CliRunner().invoke(main, [
        "txt2img", str(payload), "--model", "tiny-sd1", "--steps", "150", "--n-iter", "4", "--seed", "1",
        "--width", "64", "--height", "64", "--backend", "torch", "--models-dir", str(tiny_store),
        "--results-dir", str(tmp_path / "results"), "--preview", str(preview)])
    assert result.exit_code == 0, result.output
    with Image.open(preview) as img:
        assert img.format == "PNG" and img.size == (8, 8)

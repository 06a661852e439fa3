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


def test_doctor_says_which_backend_and_what_is_missing():
    from cli.doctor import EXTRAS
    from engine.config import default_backend, default_precision

    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    backend = default_backend("cpu")
    line = next(ln for ln in result.output.splitlines() if ln.startswith("device cpu -> "))
    assert line.startswith(f"device cpu -> backend {backend.value}, precision {default_precision(backend, 'cpu').value}")
    assert "openvino" in line  # why: whether openvino is installed
    extras = {ln.split()[0]: ln for ln in result.output.splitlines() if ln.startswith("  ")}
    assert set(EXTRAS) <= set(extras)
    for name, text in extras.items():
        assert ("installed" in text) != ("pip install 'sdengine[" in text), text


def test_a_missing_extra_is_one_line():
    """`serve` without the server extra (uvicorn made unimportable): one line naming the extra, no traceback."""
    code = ("import sys; sys.modules['uvicorn'] = None; sys.argv = ['sdengine', 'serve', '--port', '1']; "
            "from cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "Error: sdengine serve needs the Python module 'uvicorn', which is not installed. "
        "Install it with: pip install 'sdengine[server]'"], run.stderr


def test_controlnet_flags_add_a_unit(tmp_path):
    """--controlnet-image FILE (+ module, model, weight) becomes one more enabled unit after the payload's own,
    in the payload's spelling (units or args); an error about it names the flag; the other flags need the image."""
    import base64

    from cli.generate import _with_flags

    image = tmp_path / "edges.png"
    image.write_bytes(b"\x89PNG fake")  # only carried here; the submit-time checks are the schema's
    body = _with_flags({"alwayson_scripts": {"controlnet": {"units": [{"enabled": False}]}}},
                       {"controlnet_image": image, "controlnet_module": "canny",
                        "controlnet_model": "sdengine-demo-canny", "controlnet_weight": 0.5, "prompt": "x"})
    units = body["alwayson_scripts"]["controlnet"]["units"]
    assert units[1] == {"enabled": True, "input_image": base64.b64encode(image.read_bytes()).decode(),
                        "module": "canny", "model": "sdengine-demo-canny", "weight": 0.5}
    assert body["prompt"] == "x"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    result = CliRunner().invoke(main, ["txt2img", "--results-dir", str(tmp_path / "r"), "--backend", "onnxruntime",
                                       "--prompt", "a", "--controlnet-image", str(image), "--controlnet-module",
                                       "canny", "--controlnet-model", "no-such-controlnet"])
    assert result.exit_code == 1 and "(set by --controlnet-model)" in result.output, result.output
    result = CliRunner().invoke(main, ["txt2img", "--prompt", "a", "--controlnet-model", "x"])
    assert result.exit_code == 2 and "--controlnet-image" in result.output


def test_progress_bar_ends_at_n_of_n():
    """The polls saw sampling step 18 of 20, then the decoding phase: the sampling bar ends at 20/20 (the
    phase is done); a cancelled task's bar stays where it was."""
    import io

    from cli.generate import _PhaseBars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bars = _PhaseBars(out)
    bars.update({"phase": "sampling", "step": 18, "steps": 20})
    bars.update({"phase": "decoding"})
    bars.close()
    assert "20/20" in out.getvalue() and "18/20" in out.getvalue(), out.getvalue()
    out = Terminal()
    bars = _PhaseBars(out)
    bars.update({"phase": "sampling", "step": 7, "steps": 20})
    bars.close()
    assert "20/20" not in out.getvalue() and "7/20" in out.getvalue()

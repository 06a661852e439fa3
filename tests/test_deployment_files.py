"""compose.yaml (docs/DEPLOYMENT.md) against the CLI it starts: every sdengine command in it parses with the
real click commands (options, types, required values), and the settings the deployment recipe promises are
there (Redis persistence and password, no public Redis port, one GPU per worker, API key, loopback publish).
No container runtime runs in CI; this checks the file, the tests of test_queue_celery run the same commands."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_commands_parse_with_the_real_cli(compose, monkeypatch):
    from cli import COMMANDS, LazyGroup, main

    monkeypatch.setenv("SDENGINE_QUEUE", "redis://:pw@redis:6379/0")
    group = LazyGroup()
    commands = {}
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[0] == "sdengine":
            sub = command[1]
            assert sub in COMMANDS, (name, sub)
            cmd = group.get_command(None, sub)
            ctx = cmd.make_context(sub, list(command[2:]), parent=main.make_context("sdengine", [sub]))
            commands[name] = (sub, ctx.params)
    assert sorted(s for s, _ in commands.values()) == ["serve", "worker", "worker"]
    workers = [p for s, p in commands.values() if s == "worker"]
    assert all(p["queue"] == "redis://:pw@redis:6379/0" and str(p["results_dir"]) == "/results" for p in workers)
    (api,) = [p for s, p in commands.values() if s == "serve"]
    assert api["queue"] == "redis://:pw@redis:6379/0" and str(api["results_dir"]) == "/results"


def test_recipe_settings(compose):
    services = compose["services"]
    redis = services["redis"]
    assert "ports" not in redis, "Redis must not be published"
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction", "--requirepass"):
        assert setting in redis["command"], setting
    gpus = sorted(s["environment"]["CUDA_VISIBLE_DEVICES"] for n, s in services.items() if n.startswith("worker"))
    assert gpus == ["0", "1"]
    api = services["api"]
    assert api["environment"]["SDENGINE_API_KEY"].startswith("${SDENGINE_API_KEY")
    assert all(p.startswith("127.0.0.1:") for p in api["ports"])
    assert all(any(v.endswith(":/results") for v in s["volumes"]) for n, s in services.items() if n != "redis")

"""The ``server.json`` that ``sdengine serve`` writes in its results folder so the CLI finds it (cli.remote): a
real server process, killed with SIGKILL (nothing of it runs: the record stays), is not talked to and its record
is removed by the reader with a log line; a record whose PID now belongs to another process is removed the same
way; SIGHUP and SIGTERM (tests/test_api_http.py) remove it on the way out. No engine is built: no task is queued.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from api_compat.tasks.store import SERVER_RECORD
from cli.remote import running_server
from tests.api_support import wait_healthy
from tests.queue_support import free_port

ROOT = Path(__file__).resolve().parents[1]


def _serve(tmp_path: Path, results: Path):
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SDENGINE_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir",
                                 str(tmp_path / "models"), "--results-dir", str(results)],
                                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, lambda: log.read_text(errors="replace")[-3000:], timeout=60)
    return proc, url


def test_a_killed_servers_record_is_removed_by_the_reader(tmp_path, caplog):
    results = tmp_path / "results"
    (tmp_path / "models").mkdir()
    proc, url = _serve(tmp_path, results)
    record = results / SERVER_RECORD
    try:
        assert json.loads(record.read_text())["pid"] == proc.pid
        found = running_server(results)
        assert found is not None and found.url == url and found.pid == proc.pid
    finally:
        proc.kill()  # SIGKILL: no handler, no finally, no atexit runs
        proc.wait(30)
    assert record.is_file(), "SIGKILL leaves the record (what the reader must cope with)"
    with caplog.at_level(logging.WARNING, logger="cli.remote"):
        assert running_server(results) is None
    assert not record.exists()
    assert any(SERVER_RECORD in r.getMessage() and f"process {proc.pid}" in r.getMessage()
               and "stale" in r.getMessage() for r in caplog.records), caplog.text

    # a new server on the same folder writes its own; SIGHUP (a closed terminal) removes it
    proc, url = _serve(tmp_path, results)
    try:
        assert running_server(results).pid == proc.pid
        proc.send_signal(signal.SIGHUP)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGHUP, proc.returncode
    assert not record.exists(), "SIGHUP: the server removes its record"


def test_a_record_whose_pid_is_another_process_is_removed(tmp_path, caplog):
    """The recorded PID is alive but the process started after the record was written (the server died and the
    PID was given to another process): stale, removed; the URL is never asked."""
    results = tmp_path / "results"
    results.mkdir()
    record = results / SERVER_RECORD
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record.write_text(json.dumps({"pid": other.pid, "url": f"http://127.0.0.1:{free_port()}", "auth": "none"}))
        past = time.time() - 3600
        os.utime(record, (past, past))
        with caplog.at_level(logging.WARNING, logger="cli.remote"):
            assert running_server(results) is None
        assert not record.exists()
        assert any("another process has that PID" in r.getMessage() for r in caplog.records), caplog.text
        # the same record written after that process started: its server may be starting, so it is kept (ignored)
        record.write_text(json.dumps({"pid": other.pid, "url": f"http://127.0.0.1:{free_port()}", "auth": "none"}))
        assert running_server(results) is None and record.is_file()
        record.write_text("{not json")  # a broken record: removed
        assert running_server(results) is None and not record.exists()
    finally:
        other.kill()
        other.wait(10)

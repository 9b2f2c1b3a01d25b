"""One command tree: `longmem` lists every command, and the memory service's commands run
without importing the model code or transformers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from memory_service.cli import MODEL_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
# Runs `longmem ARGS` through the entry point, then reports which heavy modules it loaded.
WRAPPER = """
import sys
from memory_service.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "model_worker"))
print("LOADED", heavy, flush=True)
sys.exit(code)
"""
ENV = os.environ | {"RAY_AUTH_MODE": "disabled"}


def longmem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )


def test_help_lists_every_command_without_the_model_code():
    proc = longmem("--help")
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^ {4}(\S+)", proc.stdout, re.MULTILINE)
    assert listed == [*MODEL_COMMANDS, "serve", "keygen", "memory-demo", "bench"]
    for summary in MODEL_COMMANDS.values():
        assert summary in proc.stdout
    assert "LOADED []" in proc.stdout


def test_serve_help_imports_neither_transformers_nor_model_worker():
    proc = longmem("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--shard-endpoints" in proc.stdout
    assert "LOADED []" in proc.stdout


def test_model_commands_are_handed_to_the_model_cli():
    proc = longmem("train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: longmem train") and "--segment-len" in proc.stdout
    assert "model_worker.cli" in proc.stdout  # loaded only now
    proc = longmem("eval", "--no-such-flag")
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr


def test_serving_imports_neither_transformers_nor_model_worker():
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "serve", "--port", "0", "--shards", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        listening = False
        while not listening and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"serve exited early with {proc.poll()}"
            listening = "listening on 127.0.0.1:" in line
        assert listening, "serve did not print its address within 120 s"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "LOADED []" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

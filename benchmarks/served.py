"""`longmem serve` in a child process on 127.0.0.1, for the fuzz and load harnesses: the
server they measure is the real command, and its memory is read from outside."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ACTORS = ("ray::ShardActor", "ray::CoordinatorActor")


@contextmanager
def served(tenants_yaml: str, shards: int = 2, *flags: str) -> Iterator[tuple[str, int]]:
    """Run `longmem serve` with this tenant file on a free loopback port; yields its
    address and pid, and stops it (SIGTERM) on exit."""
    with tempfile.TemporaryDirectory() as folder:
        tenants = Path(folder) / "tenants.yaml"
        tenants.write_text(tenants_yaml)
        command = [sys.executable, "-m", "memory_service.cli", "serve", "--port", "0"]
        command += ["--shards", str(shards), "--tenants", str(tenants), "--log-level", "warning"]
        proc = subprocess.Popen(
            [*command, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=os.environ | {"RAY_AUTH_MODE": "disabled"},
        )
        try:
            line = proc.stdout.readline()
            found = re.search(r"listening on (\S+)", line)
            if not found:
                raise RuntimeError(f"longmem serve did not start: {line!r}")
            yield found.group(1), proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of the serving process and of its shard and coordinator actors."""
    server = psutil.Process(pid)
    actors = 0
    for child in server.children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(ACTORS):
                actors += child.memory_info().rss
        except psutil.Error:
            continue
    return {"server": server.memory_info().rss / 2**20, "actors": actors / 2**20}

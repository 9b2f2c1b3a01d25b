"""`longmem serve` as a user runs it: prints its address, serves, stops on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.client import MemoryClient


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_address_and_stops_cleanly(tmp_path, sig):
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - name: team\n    api_keys: [team-key]\n")
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "memory_service.cli",
        "serve",
        "--port",
        "0",
        "--shards",
        "2",
        "--tenants",
        str(tenants),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"serve exited early with {proc.poll()}"
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            address = m and m.group(1)
        assert address, "serve did not print its address within 120 s"
        channel = grpc.insecure_channel(address)
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        client = MemoryClient(address, "team-key")
        client.create_bank("b", kv_heads=1, head_dim=8)
        client.append("b", torch.randn(8, 1, 8), torch.randn(8, 1, 8))
        assert client.search(["b"], torch.randn(1, 1, 1, 8), 2).valid.all()
        client.close()
        channel.close()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_bad_tenant_file(tmp_path):
    bad = tmp_path / "tenants.yaml"
    bad.write_text("tenants: nope\n")
    proc = subprocess.run(
        [sys.executable, "-m", "memory_service.cli", "serve", "--tenants", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "needs a top-level 'tenants' list" in proc.stderr
    assert "Traceback" not in proc.stderr

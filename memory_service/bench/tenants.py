"""`tenants`: search latency and throughput against the number of concurrent tenants.

`longmem serve` runs in a child process on 127.0.0.1 (2 shards; on the Ray cluster at
`address`, else on a Ray of its own) with a tenant file of as many tenants as the largest
count, each with its own API key (stored hashed) and the default quotas: one concurrent
search per tenant, which never binds since each tenant has one client. Each tenant gets one
bank of `tokens` Gaussian tokens (SmolLM2's shape, float16). For each count n, n clients
(threads here, each with its own gRPC channel, tenant and bank) search 16 queries x 9 heads
for the top 16 chunks (a decoding batch) once to warm up, then `requests` times each, all
starting together. Every call has a deadline of `timeout_s`; a failed call counts as an
error and is not retried. A row: p50/p99 latency of the searches that succeeded and the
aggregate searches/s (successes over the time from the start until the last client ends).

Writes `tenants.json` and `tenants.png` (searches/s, p50 and p99 against tenants).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from memory_service.bench.common import HQ, TOP_K, D, fill, latency_ms, markdown, plot_panels
from memory_service.client import MemoryClient
from memory_service.tenancy import new_key

SHARDS, N_QUERIES, BANK = 2, 16, "bench"


@contextmanager
def serve(tenant_file: Path, address: str | None) -> Iterator[str]:
    """`longmem serve` with this tenant file in a child process on a free loopback port;
    yields its address and stops it (SIGTERM) on exit."""
    command = [sys.executable, "-m", "memory_service.cli", "serve", "--port", "0"]
    command += ["--shards", str(SHARDS), "--tenants", str(tenant_file), "--log-level", "warning"]
    command += ["--address", address] if address else []
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            found = re.search(r"listening on (\S+)", proc.stdout.readline())
            if not found:  # it exited: its stderr says why
                log.seek(0)
                raise RuntimeError(f"longmem serve did not start: {log.read()[-2000:]}")
            yield found.group(1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure(address: str, keys: list[str], requests: int, timeout_s: float) -> dict:
    """One row: `len(keys)` clients, one per tenant, `requests` searches each at once."""
    queries = torch.randn(1, N_QUERIES, HQ, D, generator=torch.Generator().manual_seed(1))
    clients = [MemoryClient(address, key, timeout=timeout_s, retries=0) for key in keys]
    for client in clients:  # warm-up, not counted: the channel is up, the bank's pages in
        client.search([BANK], queries, TOP_K)
    start = threading.Barrier(len(clients) + 1)
    times: list[list[float]] = [[] for _ in clients]  # seconds of each successful search
    errors: list[str] = []

    def loop(client: MemoryClient, out: list[float]) -> None:
        start.wait()
        for _ in range(requests):
            started = time.perf_counter()
            try:
                client.search([BANK], queries, TOP_K)
            except Exception as e:  # every failure counts, whatever it is
                errors.append(f"{type(e).__name__}: {e}"[:200])
            else:
                out.append(time.perf_counter() - started)

    pairs = zip(clients, times, strict=True)
    threads = [threading.Thread(target=loop, args=pair) for pair in pairs]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    for client in clients:
        client.close()
    done = [t for out in times for t in out]
    if not done:
        raise RuntimeError(f"every search of {len(keys)} tenants failed; first: {errors[0]}")
    return {
        "tenants": len(keys),
        "searches": len(done),
        "errors": len(errors),
        **latency_ms(done),
        "searches_per_s": round(len(done) / wall, 2),
        "queries_per_s": round(len(done) * N_QUERIES / wall, 1),
        "first_error": errors[0] if errors else None,
    }


def run(
    out: Path,
    tenant_counts: list[int],
    tokens: int,
    requests: int = 32,
    timeout_s: float = 60.0,
    address: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per tenant count (see the module doc); writes the JSON and the plot."""
    keys, hashes = zip(*(new_key() for _ in range(max(tenant_counts))), strict=True)
    entries = [{"name": f"bench-{i}", "api_keys": [h]} for i, h in enumerate(hashes)]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=len(keys) + len(tenant_counts), desc="tenants", disable=not progress)
    with tempfile.TemporaryDirectory() as folder:
        tenant_file = Path(folder) / "tenants.yaml"
        tenant_file.write_text(yaml.safe_dump({"tenants": entries}))
        with serve(tenant_file, address) as served:
            bar.set_postfix_str("filling banks")
            for i, key in enumerate(keys):
                client = MemoryClient(served, key, timeout=timeout_s)
                fill(client, BANK, tokens, seed=i)
                client.close()
                bar.update()
            for n in tenant_counts:
                bar.set_postfix_str(f"{n} tenants")
                rows.append(measure(served, list(keys[:n]), requests, timeout_s))
                bar.update()
    bar.close()
    config = {"tokens": tokens, "requests": requests, "timeout_s": timeout_s, "shards": SHARDS}
    config |= {"queries": N_QUERIES, "q_heads": HQ, "top_k": TOP_K}
    (out / "tenants.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    plot_panels(
        out / "tenants.png",
        [r["tenants"] for r in rows],
        "concurrent tenants (one client each)",
        [
            (
                f"searches/s, all tenants ({N_QUERIES} x {HQ} heads)",
                {"": [r["searches_per_s"] for r in rows]},
            ),
            ("search ms", {"p50": [r["p50_ms"] for r in rows], "p99": [r["p99_ms"] for r in rows]}),
        ],
    )
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    return markdown(
        ["tenants", "searches", "errors", "p50 ms", "p99 ms", "searches/s", "queries/s"],
        [
            [
                str(r["tenants"]),
                str(r["searches"]),
                str(r["errors"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['searches_per_s']:.1f}",
                f"{r['queries_per_s']:.0f}",
            ]
            for r in rows
        ],
    )

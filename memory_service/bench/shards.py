"""`shards`: search and append throughput against the number of shards.

For each shard count, a service with that many shards (spread placement: one per node when
there are enough) gets one bank of `tokens` Gaussian tokens (SmolLM2's shape, float16,
chunks of 4), appended over gRPC in parts of 16,384 tokens, then answers 128 queries x 9
heads (top 16) once to warm up and `iters` times measured, one search at a time. The gRPC
server runs in this process on 127.0.0.1; the shards run on a `ray.cluster_utils.Cluster`
with one one-CPU node per shard of the largest count on this machine, or on the Ray cluster
at `address` (GPU shards where it has a GPU per shard). Queries/s is 128 / p50.

Writes `shards.json` (the rows; bytes per token and the largest bank 80% of this machine's
memory holds) and `shards.png` (queries/s, p50 and append tokens/s against shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from memory_service.bench.common import (
    HQ,
    TOP_K,
    D,
    fill,
    latency_ms,
    markdown,
    plot_panels,
    ray_session,
    timed,
)

N_QUERIES = 128


def measure(shards: int, tokens: int, iters: int, queries: torch.Tensor) -> dict:
    """One row: a fresh service of `shards` shards, its bank filled and searched."""
    from memory_service.client import MemoryClient
    from memory_service.service import start_service

    service = start_service(shards=shards, name=f"bench-shards-{shards}")
    client = MemoryClient(service.address)
    try:
        fill_s = fill(client, "bench", tokens)
        info = client.describe_bank("bench")
        times = timed(lambda: client.search(["bench"], queries, TOP_K), iters)
        latency, shard_map = latency_ms(times), client.shard_map()
        return {
            "shards": shards,
            "nodes": len({s.node_id for s in shard_map}),
            "devices": sorted({s.device for s in shard_map}),
            "bank_tokens": info.size_tokens,
            **latency,
            "queries_per_s": round(N_QUERIES / (latency["p50_ms"] / 1e3), 1),
            "append_tokens_per_s": round(tokens / fill_s),
            "bank_bytes": info.bytes,
            "bytes_per_token": info.bytes / info.size_tokens,
        }
    finally:
        client.close()
        service.stop()


def run(
    out: Path,
    shard_counts: list[int],
    tokens: int,
    address: str | None = None,
    iters: int = 5,
    progress: bool = True,
) -> list[dict]:
    """One row per shard count (see the module doc); writes the JSON and the plot."""
    queries = torch.randn(1, N_QUERIES, HQ, D, generator=torch.Generator().manual_seed(1))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with ray_session(address, nodes=max(shard_counts)):
        for shards in tqdm(shard_counts, desc="shards", disable=not progress):
            rows.append(measure(shards, tokens, iters, queries))
    total = psutil.virtual_memory().total
    bytes_per_token = rows[0]["bytes_per_token"]
    (out / "shards.json").write_text(
        json.dumps(
            {
                "config": {"tokens": tokens, "queries": N_QUERIES, "iters": iters},
                "rows": rows,
                "bytes_per_token": bytes_per_token,
                "machine_bytes": total,
                "largest_bank_tokens": int(0.8 * total / bytes_per_token),
            },
            indent=1,
        )
    )
    x = [r["shards"] for r in rows]
    plot_panels(
        out / "shards.png",
        x,
        "shards",
        [
            (f"queries/s ({N_QUERIES} x {HQ} heads)", {"": [r["queries_per_s"] for r in rows]}),
            ("search ms", {"p50": [r["p50_ms"] for r in rows], "p99": [r["p99_ms"] for r in rows]}),
            ("append tokens/s", {"": [r["append_tokens_per_s"] for r in rows]}),
        ],
    )
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    return markdown(
        ["shards", "nodes", "p50 ms", "p99 ms", "queries/s", "append tokens/s", "bank GB"],
        [
            [
                str(r["shards"]),
                str(r["nodes"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['queries_per_s']:.1f}",
                f"{r['append_tokens_per_s']:,}",
                f"{r['bank_bytes'] / 1e9:.2f}",
            ]
            for r in rows
        ],
    )

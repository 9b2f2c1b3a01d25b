"""Search throughput against the number of shards, on a several-node Ray cluster on this
machine (`ray.cluster_utils.Cluster`), for a bank of 1M tokens of SmolLM2's key/value shape
(3 kv heads, head dim 64, float16, chunks of 4); and the bytes per token, from which the
largest bank this machine holds follows.

Prints a table and writes benchmarks/results/shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import psutil
import ray
import torch
from ray.cluster_utils import Cluster

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from memory_service.client import MemoryClient  # noqa: E402
from memory_service.service import start_service  # noqa: E402

KV_HEADS, Q_HEADS, HEAD_DIM, TOP_K = 3, 9, 64, 16
APPEND_TOKENS = 16384


def fill(client: MemoryClient, tokens: int) -> float:
    client.create_bank("big", kv_heads=KV_HEADS, head_dim=HEAD_DIM, capacity_tokens=tokens)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(tokens // APPEND_TOKENS):
        keys = torch.randn(APPEND_TOKENS, KV_HEADS, HEAD_DIM, generator=g).half()
        client.append("big", keys, keys)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="benchmarks/results/shards.json")
    args = parser.parse_args()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(max(args.shards) - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    queries = torch.randn(1, args.queries, Q_HEADS, HEAD_DIM)
    rows = []
    for shards in args.shards:
        service = start_service(shards=shards, name=f"bench-{shards}")
        client = MemoryClient(service.address)
        fill_s = fill(client, args.tokens)
        info = client.describe_bank("big")
        client.search(["big"], queries, TOP_K)  # warm-up
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            client.search(["big"], queries, TOP_K)
            times.append(time.perf_counter() - t)
        p50 = statistics.median(times)
        nodes = len({s.node_id for s in client.shard_map()})
        rows.append({
            "shards": shards, "nodes": nodes, "bank_tokens": info.size_tokens,
            "p50_ms": 1e3 * p50, "queries_per_s": args.queries / p50,
            "append_tokens_per_s": args.tokens / fill_s, "bank_bytes": info.bytes,
            "bytes_per_token": info.bytes / info.size_tokens,
        })
        client.delete_bank("big")
        client.close()
        service.stop()
    ray.shutdown()
    cluster.shutdown()

    bytes_per_token = rows[0]["bytes_per_token"]
    total = psutil.virtual_memory().total
    usable = 0.8 * total  # leave a fifth for the OS, Ray and the gRPC buffers
    largest = int(usable / bytes_per_token)
    print(f"bank {args.tokens:,} tokens (3 kv heads x 64, float16, chunk 4); "
          f"{args.queries} queries x {Q_HEADS} heads, top {TOP_K} chunks; "
          f"{os.cpu_count()} cores; one node per shard")
    header = (
        f"{'shards':>6} {'nodes':>5} {'p50 ms':>9} {'queries/s':>10} {'append tok/s':>13} {'GB':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shards']:>6} {r['nodes']:>5} {r['p50_ms']:9.1f} {r['queries_per_s']:10.1f} "
              f"{r['append_tokens_per_s']:13,.0f} {r['bank_bytes'] / 1e9:6.2f}")
    print(f"bytes per token (measured): {bytes_per_token:.1f}; this machine: "
          f"{total / 2**30:.1f} GiB, 80% usable -> largest bank ~{largest / 1e6:.1f}M tokens")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "config": vars(args), "rows": rows, "bytes_per_token": bytes_per_token,
        "machine_bytes": total, "largest_bank_tokens": largest}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

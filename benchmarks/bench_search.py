"""Training-shaped search: the original in-process design vs the bank vs the gRPC service.

512 queries x 9 query heads over 3 kv heads, head dim 64, top 16 chunks of 4 tokens, a bank
of 65,536 tokens in float16 (SmolLM2-135M's attention shape, LongMem's bank size).

Rows, all measured in this run:
- baseline: the original LongMem design: a faiss IndexFlatIP per kv head over the chunk
  means, searched per query head, then a gather of the chunks' keys/values, in the model's
  own process;
- bank in-process: `InProcessClient` (this project's bank, no Ray, no gRPC);
- gRPC, 1 and 2 shards: `MemoryClient` against the service (Ray actors) on loopback.

Prints a table and writes benchmarks/results/search.json. The baseline needs faiss, in the
project's `bench` extra (`pip install -e '.[bench]'`; `make bench` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from memory_service.client import InProcessClient, MemoryClient  # noqa: E402
from memory_service.service import start_service  # noqa: E402
from memory_service.wire import encode, search_messages  # noqa: E402

N_QUERIES, Q_HEADS, KV_HEADS, HEAD_DIM, TOP_K, CHUNK = 512, 9, 3, 64, 16, 4
BANK_TOKENS = 65536


class FaissBaseline:
    """LongMem's original retrieval: per-head faiss flat IP index, gather in-process."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        T, H, D = keys.shape
        self.keys = keys.half().view(T // CHUNK, CHUNK, H, D)  # (C, csz, H, D)
        self.values = values.half().view(T // CHUNK, CHUNK, H, D)
        means = self.keys.float().mean(1)  # (C, H, D)
        self.indexes = []
        for h in range(H):
            index = faiss.IndexFlatIP(D)
            index.add(np.ascontiguousarray(means[:, h].numpy()))
            self.indexes.append(index)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, Hq, D = queries.shape
        g = Hq // len(self.indexes)
        keys = torch.empty(n, Hq, TOP_K * CHUNK, D, dtype=torch.float16)
        values = torch.empty_like(keys)
        for qh in range(Hq):
            h = qh // g
            _, ids = self.indexes[h].search(np.ascontiguousarray(queries[:, qh].numpy()), TOP_K)
            ids = torch.from_numpy(ids)  # (n, k)
            keys[:, qh] = self.keys[ids, :, h].reshape(n, TOP_K * CHUNK, D)
            values[:, qh] = self.values[ids, :, h].reshape(n, TOP_K * CHUNK, D)
        return keys, values


def timed(fn, iters: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def row(name: str, times: list[float], wire_bytes: int, dense_bytes: int) -> dict:
    times = sorted(times)
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return {
        "path": name,
        "p50_ms": 1e3 * p50,
        "p99_ms": 1e3 * p99,
        "queries_per_s": N_QUERIES / p50,
        "retrieved_tokens_per_s": N_QUERIES * Q_HEADS * TOP_K * CHUNK / p50,
        "wire_bytes": wire_bytes,
        "dense_result_bytes": dense_bytes,
        "iters": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument(
        "--queries",
        choices=["local", "random"],
        default="local",
        help="local: queries near recent bank tokens (like a model's segment); "
        "random: independent queries (worst case for the chunk table)",
    )
    parser.add_argument("--out", default="benchmarks/results/search.json")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(BANK_TOKENS, KV_HEADS, HEAD_DIM, generator=g)
    values = torch.randn(BANK_TOKENS, KV_HEADS, HEAD_DIM, generator=g)
    if args.queries == "random":
        queries = torch.randn(N_QUERIES, Q_HEADS, HEAD_DIM, generator=g)
    else:  # a segment that re-reads a stretch of the bank, with noise: like real retrieval
        start = BANK_TOKENS // 2
        base = keys[start : start + N_QUERIES].repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
        queries = base + 0.5 * torch.randn(N_QUERIES, Q_HEADS, HEAD_DIM, generator=g)
    dense = 2 * N_QUERIES * Q_HEADS * TOP_K * CHUNK * HEAD_DIM * 2  # keys + values, float16

    rows = []
    print(
        f"bank {BANK_TOKENS} tokens, {N_QUERIES} queries ({args.queries}) x {Q_HEADS} heads "
        f"over {KV_HEADS} kv heads, top {TOP_K} chunks of {CHUNK}, head dim {HEAD_DIM}, "
        f"float16; torch threads {torch.get_num_threads()}"
    )

    baseline = FaissBaseline(keys, values)
    rows.append(
        row(
            "baseline: faiss flat per head + gather, in-process",
            timed(lambda: baseline.search(queries), args.iters),
            0,
            dense,
        )
    )

    local = InProcessClient()
    local.create_bank("bench", kv_heads=KV_HEADS, head_dim=HEAD_DIM, capacity_tokens=BANK_TOKENS)
    local.append("bench", keys, values)
    rows.append(
        row(
            "bank, in-process",
            timed(lambda: local.search(["bench"], queries[None], TOP_K), args.iters),
            0,
            dense,
        )
    )
    reference = local.search(["bench"], queries[None], TOP_K)
    compact = local.engine.search(local.tenant, ["bench"], queries[None], TOP_K)
    wire = len(encode(queries[None]).SerializeToString()) + sum(
        len(m.SerializeToString()) for m in search_messages(compact)
    )

    for shards in (1, 2):
        service = start_service(shards=shards)
        client = MemoryClient(service.address)
        client.create_bank(
            "bench", kv_heads=KV_HEADS, head_dim=HEAD_DIM, capacity_tokens=BANK_TOKENS
        )
        for part in torch.split(torch.arange(BANK_TOKENS), 8192):
            client.append("bench", keys[part], values[part])
        result = client.search(["bench"], queries[None], TOP_K)
        assert torch.equal(result.chunk_ids, reference.chunk_ids), "service differs from bank"
        rows.append(
            row(
                f"gRPC service, {shards} shard{'s' * (shards > 1)}",
                timed(lambda c=client: c.search(["bench"], queries[None], TOP_K), args.iters),
                wire,
                dense,
            )
        )
        client.close()
        service.stop()

    base = rows[0]["p50_ms"]
    for r in rows:
        r["p50_vs_baseline"] = r["p50_ms"] / base
    header = (
        f"{'path':<52} {'p50 ms':>8} {'p99 ms':>8} {'x base':>7} {'queries/s':>10} {'wire MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['path']:<52} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['p50_vs_baseline']:7.2f} "
            f"{r['queries_per_s']:10.0f} {r['wire_bytes'] / 1e6:8.1f}"
        )
    print(f"dense keys+values per search: {dense / 1e6:.1f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "config": vars(args)
                | {
                    "bank_tokens": BANK_TOKENS,
                    "n_queries": N_QUERIES,
                    "q_heads": Q_HEADS,
                    "kv_heads": KV_HEADS,
                    "head_dim": HEAD_DIM,
                    "top_k": TOP_K,
                    "chunk_size": CHUNK,
                },
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`search`: the training-shaped search, LongMem's original design against this service.

512 queries x 9 query heads over 3 kv heads, head dim 64, top 16 chunks of 4 tokens, a bank
of `tokens` (LongMem's 65,536 by default) in float16: SmolLM2-135M's attention shape. Paths,
all measured in one run (the median and p99 of `iters` searches after 2 not counted):
- baseline: the original LongMem design: a faiss IndexFlatIP per kv head over the chunk
  means, searched per query head, then a gather of the chunks' keys/values, in process;
- bank in-process: `InProcessClient` (this project's bank, no Ray, no gRPC);
- gRPC, 1 and 2 shards: `MemoryClient` against the service (Ray actors: a local Ray, or the
  cluster at `address`) on 127.0.0.1; each must return the bank's chunk ids.
Queries are `local` (a stretch of the bank re-read with noise, like a model's segment) or
`random` (independent: the worst case for the compact chunk table on the wire). Each row's
`p50_vs_baseline` is its p50 over the baseline's.

Writes `search.json` and `search.png` (p50 per path, with its ratio to the baseline).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memory_service.bench.common import (
    CSZ,
    HQ,
    TOP_K,
    D,
    H,
    latency_ms,
    markdown,
    ray_session,
    save_figure,
    timed,
)
from memory_service.client import InProcessClient, MemoryClient
from memory_service.wire import encode, search_messages

N_QUERIES = 512
QUERIES = ("local", "random")


class FaissBaseline:
    """LongMem's original retrieval: a faiss flat inner-product index per kv head over the
    chunk means, and a gather of the chunks, in process."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        import faiss

        T = keys.shape[0]
        self.keys = keys.half().view(T // CSZ, CSZ, H, D)  # (C, csz, H, D)
        self.values = values.half().view(T // CSZ, CSZ, H, D)
        means = self.keys.float().mean(1)  # (C, H, D)
        self.indexes = []
        for h in range(H):
            index = faiss.IndexFlatIP(D)
            index.add(np.ascontiguousarray(means[:, h].numpy()))
            self.indexes.append(index)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(n, Hq, top_k * csz, D)` of the top chunks of queries `(n, Hq, D)`."""
        n, Hq, _ = queries.shape
        keys = torch.empty(n, Hq, TOP_K * CSZ, D, dtype=torch.float16)
        values = torch.empty_like(keys)
        for qh in range(Hq):
            h = qh // (Hq // H)
            _, ids = self.indexes[h].search(np.ascontiguousarray(queries[:, qh].numpy()), TOP_K)
            ids = torch.from_numpy(ids)  # (n, k)
            keys[:, qh] = self.keys[ids, :, h].reshape(n, TOP_K * CSZ, D)
            values[:, qh] = self.values[ids, :, h].reshape(n, TOP_K * CSZ, D)
        return keys, values


def make_data(tokens: int, queries: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values `(tokens, H, D)` and queries `(N_QUERIES, HQ, D)`."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(tokens, H, D, generator=g)
    values = torch.randn(tokens, H, D, generator=g)
    if queries == "random":
        return keys, values, torch.randn(N_QUERIES, HQ, D, generator=g)
    start = tokens // 2  # a segment that re-reads a stretch of the bank, with noise
    base = keys[start : start + N_QUERIES].repeat_interleave(HQ // H, dim=1)
    return keys, values, base + 0.5 * torch.randn(N_QUERIES, HQ, D, generator=g)


def row(path: str, times: list[float], wire_bytes: int) -> dict:
    latency = latency_ms(times)
    p50_s = latency["p50_ms"] / 1e3
    return {
        "path": path,
        **latency,
        "queries_per_s": round(N_QUERIES / p50_s, 1),
        "retrieved_tokens_per_s": round(N_QUERIES * HQ * TOP_K * CSZ / p50_s),
        "wire_bytes": wire_bytes,
        "iters": len(times),
    }


def run(
    out: Path,
    tokens: int = 65536,
    iters: int = 30,
    queries: str = "local",
    address: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per path (see the module doc); writes the JSON and the plot."""
    from memory_service.service import start_service

    keys, values, q = make_data(tokens, queries)
    q = q[None]  # (1, n, HQ, D): one bank row
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=4, desc="search", disable=not progress)
    baseline = FaissBaseline(keys, values)
    times = timed(lambda: baseline.search(q[0]), iters, warmup=2)
    rows = [row("baseline: faiss flat per head + gather, in-process", times, 0)]
    bar.update()
    local = InProcessClient()
    local.create_bank("bench", kv_heads=H, head_dim=D, chunk_size=CSZ, capacity_tokens=tokens)
    local.append("bench", keys, values)
    times = timed(lambda: local.search(["bench"], q, TOP_K), iters, warmup=2)
    rows.append(row("bank, in-process", times, 0))
    bar.update()
    reference = local.search(["bench"], q, TOP_K).chunk_ids
    compact = local.engine.search(local.tenant, ["bench"], q, TOP_K)
    wire = len(encode(q).SerializeToString())
    wire += sum(len(m.SerializeToString()) for m in search_messages(compact))
    with ray_session(address):
        for shards in (1, 2):
            service = start_service(shards=shards, name=f"bench-search-{shards}")
            client = MemoryClient(service.address)
            try:
                client.create_bank(
                    "bench", kv_heads=H, head_dim=D, chunk_size=CSZ, capacity_tokens=tokens
                )
                for part in torch.split(torch.arange(tokens), 8192):
                    client.append("bench", keys[part], values[part])
                if not torch.equal(client.search(["bench"], q, TOP_K).chunk_ids, reference):
                    raise RuntimeError(f"the service with {shards} shards differs from the bank")
                times = timed(lambda c=client: c.search(["bench"], q, TOP_K), iters, warmup=2)
                rows.append(row(f"gRPC service, {shards} shard{'s' * (shards > 1)}", times, wire))
            finally:
                client.close()
                service.stop()
            bar.update()
    bar.close()
    for r in rows:
        r["p50_vs_baseline"] = round(r["p50_ms"] / rows[0]["p50_ms"], 3)
    dense = 2 * N_QUERIES * HQ * TOP_K * CSZ * D * 2  # keys + values of the answer, float16
    config = {"tokens": tokens, "iters": iters, "queries": queries, "n_queries": N_QUERIES}
    config |= {"q_heads": HQ, "kv_heads": H, "head_dim": D, "top_k": TOP_K, "chunk_size": CSZ}
    (out / "search.json").write_text(
        json.dumps({"config": config, "dense_result_bytes": dense, "rows": rows}, indent=1)
    )
    plot(rows, out / "search.png")
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    """Horizontal bars: p50 ms per path, labelled with the ratio to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    names = [r["path"].split(":")[0] for r in rows][::-1]
    bars = ax.barh(names, [r["p50_ms"] for r in rows][::-1])
    ax.bar_label(bars, [f"{r['p50_vs_baseline']:.2f}x" for r in rows][::-1], padding=3)
    ax.set_xlabel(f"p50 ms per search ({N_QUERIES} queries x {HQ} heads, top {TOP_K})")
    ax.margins(x=0.15)
    return save_figure(fig, path)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    return markdown(
        ["path", "p50 ms", "p99 ms", "x baseline", "queries/s", "wire MB"],
        [
            [
                r["path"],
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['p50_vs_baseline']:.2f}",
                f"{r['queries_per_s']:.0f}",
                f"{r['wire_bytes'] / 1e6:.1f}",
            ]
            for r in rows
        ],
    )

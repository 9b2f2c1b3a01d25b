"""Approximate indexes against exact search: recall@16 and search speed-up, by bank size.

One in-process shard (`InProcessClient`), SmolLM2's attention shape (3 kv heads x 64, 9
query heads, chunks of 4, float16), banks of 65,536 to 1,048,576 tokens (at most 1M here:
the machine is shared). Keys, values and queries are Gaussian (no cluster structure: the
hard case for IVF; real keys are clustered). For each size the exact bank and each index
get the same tokens; `recall` is the share of the exact top-16 chunk ids that the index
returns, over 128 queries x 9 heads; latency is the median of 3 searches of those queries.
IVF uses `nlist = min(1024, chunks // 64)` and `nprobe = nlist // 32` (`--nprobe-div`);
HNSW `m` 16 and `ef_search` 64 (up to 262,144 tokens: its build is the slowest). One thread
for torch and faiss (`--threads`), so the figures are per core.

Writes benchmarks/results/ann.json (rows of earlier runs stay unless measured again) and
prints a table; `--sizes` and `--kinds` choose what to measure. Needs faiss
(`pip install -e '.[ann]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import faiss
import torch

from memory_service.client import InProcessClient

H, HQ, D, CSZ, TOP_K, N_QUERIES = 3, 9, 64, 4, 16, 128
RESULTS = Path(__file__).parent / "results"


def fill(client: InProcessClient, tokens: int, seed: int, **spec) -> float:
    """Create bank "b" with `spec` and append `tokens` Gaussian tokens; seconds taken."""
    client.create_bank("b", kv_heads=H, head_dim=D, chunk_size=CSZ, capacity_tokens=tokens, **spec)
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(0, tokens, 65536):
        keys = torch.randn(65536, H, D, generator=g)
        client.append("b", keys, keys)
    return time.perf_counter() - started


def search_s(client: InProcessClient, queries: torch.Tensor) -> tuple[float, torch.Tensor]:
    times, ids = [], None
    for _ in range(3):
        started = time.perf_counter()
        ids = client.search(["b"], queries, TOP_K).chunk_ids
        times.append(time.perf_counter() - started)
    return statistics.median(times), ids


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(
        len(set(a.tolist()) & set(b.tolist()))
        for a, b in zip(found.view(-1, TOP_K), exact.view(-1, TOP_K), strict=True)
    )
    return hits / exact.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="65536,262144,1048576")
    ap.add_argument("--kinds", default="ivf_flat,ivf_pq,hnsw")
    ap.add_argument("--nprobe-div", type=int, default=32, help="IVF nprobe = nlist // this")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    queries = torch.randn(1, N_QUERIES, HQ, D, generator=torch.Generator().manual_seed(1))
    rows = []
    for tokens in map(int, args.sizes.split(",")):
        if tokens > 1 << 20:
            raise SystemExit("at most 1,048,576 tokens on this machine")
        chunks = tokens // CSZ
        nlist = min(1024, chunks // 64)
        kinds = {
            "ivf_flat": dict(nlist=nlist, nprobe=max(1, nlist // args.nprobe_div)),
            "ivf_pq": dict(nlist=nlist, nprobe=max(1, nlist // args.nprobe_div), m=16),
        }
        if tokens <= 1 << 18:
            kinds["hnsw"] = dict(m=16, ef_search=64)
        kinds = {k: v for k, v in kinds.items() if k in args.kinds.split(",")}
        exact = InProcessClient()
        fill(exact, tokens, seed=0)
        exact_s, exact_ids = search_s(exact, queries)
        for kind, params in kinds.items():
            client = InProcessClient()
            build_s = fill(client, tokens, seed=0, index=kind, **params)
            latency, ids = search_s(client, queries)
            row = {
                "tokens": tokens,
                "index": kind,
                **params,
                "recall_at_16": round(recall(ids, exact_ids), 4),
                "search_s": round(latency, 4),
                "exact_search_s": round(exact_s, 4),
                "speedup": round(exact_s / latency, 2),
                "append_and_build_s": round(build_s, 2),
                "bytes_per_token": client.describe_bank("b").bytes / tokens,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del client
        del exact
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "ann.json"  # rows of earlier runs stay unless measured again
    key = lambda r: (r["tokens"], r["index"], r.get("nprobe", 0))  # noqa: E731
    done = {key(r) for r in rows}
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = sorted([r for r in old if key(r) not in done] + rows, key=key)
    path.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
    print("| tokens | index | params | recall@16 | search s | exact s | speed-up | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        params = ", ".join(f"{k} {r[k]}" for k in ("nlist", "nprobe", "m", "ef_search") if k in r)
        print(
            f"| {r['tokens']:,} | {r['index']} | {params} | {r['recall_at_16']:.3f} | "
            f"{r['search_s']:.3f} | {r['exact_search_s']:.3f} | {r['speedup']:.1f}x | "
            f"{r['append_and_build_s']:.1f} |"
        )


if __name__ == "__main__":
    main()

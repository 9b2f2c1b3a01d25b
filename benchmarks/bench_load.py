"""Mixed load on the memory service: C clients for S seconds against a real
`longmem serve` on 127.0.0.1 (2 shards), after a warm-up: errors, p50/p99 latency per
method, and the resident memory of the server and its actors at the start and the end.

Each client has its own bank of 4,096 tokens, filled before the load starts (so its memory
is all in use, and appends wrap around it and evict) and, in a loop: append 64 tokens
(30%), search 16 queries x 9 heads for the top 16 chunks (50%), describe its bank (10%),
list its tenant's banks (10%). The clients are spread over 4 tenants and run as threads
in 4 processes. Targets: 0 errors, memory growth under 5%.

    python benchmarks/bench_load.py [--clients 32] [--seconds 60] [--warmup 30]

Prints a table and writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from served import rss_mib, served

TENANTS = 4
CAPACITY = 4096  # tokens per client's bank
PROCESSES = 4
RESULTS = Path(__file__).parent / "results"


def key(tenant: int) -> str:
    return f"load-key-{tenant}-0123456789abcdef"


def tenant_file(clients: int) -> str:
    per_tenant = -(-clients // TENANTS)
    lines = ["tenants:"]
    for t in range(TENANTS):
        lines += [
            f"  - name: load-{t}",
            f"    api_keys: [{key(t)}]",
            f"    max_concurrent_searches: {per_tenant}",
        ]
    return "\n".join(lines) + "\n"


def client_loop(address: str, index: int, start: float, warm_until: float, end: float,
                out: dict) -> None:
    """One client: its bank, then the mix until `end`; latencies after `warm_until`."""
    import torch

    from memory_service.client import MemoryClient

    client = MemoryClient(address, key(index % TENANTS))
    bank, rng = f"c{index}", random.Random(index)
    g = torch.Generator().manual_seed(index)
    client.create_bank(bank, kv_heads=3, head_dim=64, capacity_tokens=CAPACITY)
    keys = torch.randn(CAPACITY, 3, 64, generator=g)
    client.append(bank, keys, keys)
    queries = torch.randn(1, 16, 9, 64, generator=g)
    time.sleep(max(0.0, start - time.time()))
    while (now := time.time()) < end:
        r = rng.random()
        method = "Append" if r < 0.3 else "Search" if r < 0.8 else (
            "DescribeBank" if r < 0.9 else "ListBanks")
        t = time.perf_counter()
        try:
            if method == "Append":
                keys = torch.randn(64, 3, 64, generator=g)
                client.append(bank, keys, keys)
            elif method == "Search":
                client.search([bank], queries, top_k=16)
            elif method == "DescribeBank":
                client.describe_bank(bank)
            else:
                client.list_banks()
            error = None
        except Exception as e:  # every failure counts, whatever it is
            error = f"{method}: {type(e).__name__}: {str(e)[:120]}"
        if now >= warm_until:
            out["latency"][method].append(time.perf_counter() - t)
            if error:
                out["errors"][error] += 1
    client.delete_bank(bank)
    client.close()


def process_main(address: str, indices: list[int], start: float, warm_until: float,
                 end: float, results: mp.Queue) -> None:
    out = {"latency": defaultdict(list), "errors": Counter()}
    threads = [
        threading.Thread(target=client_loop, args=(address, i, start, warm_until, end, out))
        for i in indices
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put({"latency": dict(out["latency"]), "errors": dict(out["errors"])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=30, help="seconds of load not measured")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    with served(tenant_file(args.clients)) as (address, pid):
        start = time.time() + 30  # time for the client processes to start and make banks
        warm_until, end = start + args.warmup, start + args.warmup + args.seconds
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=process_main,
                args=(address, list(range(p, args.clients, PROCESSES)), start, warm_until, end,
                      results),
            )
            for p in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        time.sleep(max(0.0, warm_until - time.time()))
        rss_start = rss_mib(pid)
        parts = [results.get(timeout=args.warmup + args.seconds + 600) for _ in procs]
        for p in procs:
            p.join()
        rss_end = rss_mib(pid)
    latency, errors = defaultdict(list), Counter()
    for part in parts:
        for method, times in part["latency"].items():
            latency[method] += times
        errors.update(part["errors"])
    rows = {}
    for method in ("Append", "Search", "DescribeBank", "ListBanks"):
        times = sorted(latency[method])
        rows[method] = {
            "calls": len(times),
            "per_s": round(len(times) / args.seconds, 1),
            "p50_ms": round(1e3 * statistics.median(times), 1) if times else None,
            "p99_ms": round(1e3 * times[int(0.99 * (len(times) - 1))], 1) if times else None,
        }
    total_start, total_end = sum(rss_start.values()), sum(rss_end.values())
    growth = total_end / total_start - 1
    print(f"{args.clients} clients x {args.seconds:.0f} s after {args.warmup:.0f} s warm-up; "
          f"errors: {sum(errors.values())}")
    print("| method | calls | calls/s | p50 ms | p99 ms |\n| --- | --- | --- | --- | --- |")
    for method, r in rows.items():
        print(f"| {method} | {r['calls']} | {r['per_s']} | {r['p50_ms']} | {r['p99_ms']} |")
    print("| RSS MiB | start | end |\n| --- | --- | --- |")
    for part in ("server", "actors"):
        print(f"| {part} | {rss_start[part]:.0f} | {rss_end[part]:.0f} |")
    print(f"| total | {total_start:.0f} | {total_end:.0f} ({100 * growth:+.1f}%) |")
    for error, n in errors.most_common(10):
        print(f"error x{n}: {error}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps({
        "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
        "methods": rows, "errors": dict(errors), "rss_mib_start": rss_start,
        "rss_mib_end": rss_end, "rss_growth": round(growth, 4),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()

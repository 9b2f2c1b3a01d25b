"""`longmem bench`: scaling suites run on the machine (or Ray cluster) it is on, each writing
JSON and PNG plots to one folder and printing a markdown table. One module per suite:

- `index`: search latency, recall@16 and the generation step against bank size, for exact
  search and each approximate index (in process);
- `shards`: search and append throughput against the number of shards;
- `tenants`: latency and throughput against concurrent tenants, each with its own bank;
- `search`: the training-shaped search against LongMem's original faiss design;
- `capacity`: one bank as large as asked (32M int4 tokens by default), filled and searched,
  refused up front if it would not fit in memory; run only when named.

They need the `bench` extra (faiss, matplotlib): `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SUITES = ("index", "shards", "tenants", "search", "capacity")


def checked(flag: str, value: int, multiple_of: int = 1, least: int = 1) -> int:
    """`value` if it is at least `least` and a multiple of `multiple_of`; else ValueError
    naming the flag."""
    if value < least or value % multiple_of:
        rule = f"a multiple of {multiple_of}, " if multiple_of > 1 else ""
        raise ValueError(f"{flag}: {value} must be {rule}at least {least}")
    return value


def int_list(flag: str, text: str, multiple_of: int = 1, least: int = 1) -> list[int]:
    """`--flag 1,2,4` as `checked` integers; else ValueError naming the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    return [checked(flag, v, multiple_of, least) for v in values]


def suites(text: str) -> list[str]:
    """`--suites index,shards` as suite names, in the order given; else ValueError."""
    chosen = [s.strip() for s in text.split(",")]
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; choose from {', '.join(SUITES)}")
    return list(dict.fromkeys(chosen))


def main(args: argparse.Namespace) -> int:
    """Check every flag and what the chosen suites need, then run them in order."""
    import torch

    from memory_service.bench import capacity, common, index, search, shards, tenants

    chosen = suites(args.suites)
    sizes = int_list("--sizes", args.sizes, common.CSZ, common.CSZ)
    shard_counts = int_list("--shards", args.shards)
    tenant_counts = int_list("--tenants", args.tenants)
    checked("--shard-tokens", args.shard_tokens, common.CSZ)
    checked("--tenant-tokens", args.tenant_tokens, common.CSZ)
    checked("--search-tokens", args.search_tokens, common.CSZ, 2 * search.N_QUERIES)
    for flag in ("nprobe_div", "max_nlist", "threads", "requests", "search_iters"):
        checked(f"--{flag.replace('_', '-')}", getattr(args, flag))
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: choose cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA GPU (torch sees none)")
    kinds = [k for k in args.kinds.split(",") if k]  # none: exact search alone
    index.check(kinds)  # the kinds, and matplotlib
    keys = index.Keys.load(Path(args.index_keys)) if args.index_keys else index.Keys()
    if "index" in chosen:
        keys.check(sizes)
    if "capacity" in chosen:
        capacity.check(
            checked("--capacity-tokens", args.capacity_tokens, common.CSZ), args.capacity_dtype,
            args.capacity_search_dtype,
        )
    torch.set_num_threads(args.threads)
    if ("index" in chosen and kinds) or "search" in chosen:
        from memory_service.ann import faiss_module

        faiss_module().omp_set_num_threads(args.threads)

    out = Path(args.out)
    for suite in chosen:
        print(f"## {suite}")
        if suite == "index":
            rows = index.run(
                out, sizes, kinds, args.nprobe_div, keys=keys, device=args.device,
                max_nlist=args.max_nlist,
            )
            print(index.table(rows))
        elif suite == "shards":
            rows = shards.run(out, shard_counts, args.shard_tokens, args.address)
            print(shards.table(rows))
        elif suite == "tenants":
            rows = tenants.run(
                out, tenant_counts, args.tenant_tokens, args.requests, args.timeout, args.address
            )
            print(tenants.table(rows))
        elif suite == "search":
            rows = search.run(
                out, args.search_tokens, args.search_iters, args.search_queries, args.address
            )
            print(search.table(rows))
        else:
            rows = capacity.run(
                out, args.capacity_tokens, args.capacity_dtype,
                search_dtype=args.capacity_search_dtype,
            )
            print(capacity.table(rows))
    print(f"wrote the JSON and PNG files of {', '.join(chosen)} to {out}")
    return 0

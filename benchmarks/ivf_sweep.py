"""Recall@16 against search time for IVF over nprobe, on one kv head of SmolLM2's keys.

`longmem bench --suites index` builds each bank once per (size, index) and measures one
`nprobe`; this sweeps many on one trained index, to show the trade-off behind that choice.
It reads a `benchmarks/real_keys.py` folder, takes kv head `--head`'s chunk means (chunks of
4, as the index suite's banks) of the first `--rows` key rows and the 384 queries of that
head's 3 query heads, builds an `ann.AnnIndex` (the banks' own index: lifted, trained on
`ann.MAX_TRAIN_PER_LIST` means per list, seed 0; IVF-PQ with `m` = head_dim) for each of
`--kinds` and `--nlist`, and times a search of all queries (top 16, exact rescoring
included; median of 3 after one) at each `--nprobe`, against an exact flat search of the
whole head and of its first 16,384 means (a 65,536-token bank). Writes `ivf_sweep.json`
and `ivf_sweep.png` (recall@16 against time as a multiple of the 65,536-token flat search)
to `--out`.

    python benchmarks/ivf_sweep.py --keys bench-keys16 --head 2 --kinds ivf_flat,ivf_pq \\
        --nlist 8192 --nprobe 64,128,192,256,384,512 --threads 2 --out docs/bench/ivf-sweep-16m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from memory_service.ann import AnnIndex
from memory_service.bank import BankSpec
from memory_service.bench.common import CSZ, TOP_K, save_figure, timed
from memory_service.bench.index import recall

FLAT_TOKENS = 65536  # the reference bank


def head_means(keys: np.ndarray, rows: int, head: int) -> np.ndarray:
    """Chunk means `(rows // CSZ, D)` float32 of kv head `head`, read in blocks."""
    D = keys.shape[-1]
    means = np.empty((rows // CSZ, D), np.float32)
    block = 1 << 20  # rows per read
    for start in range(0, rows, block):
        part = np.asarray(keys[start : min(rows, start + block), head], dtype=np.float32)
        first = start // CSZ
        means[first : first + len(part) // CSZ] = part.reshape(-1, CSZ, D).mean(1)
    return means


def search(top: Callable[[], Any], repeats: int) -> tuple[float, torch.Tensor]:
    """The ids `(Q, TOP_K)` that `top()` finds, and the median seconds of `repeats` more
    calls (after this first one)."""
    found = torch.as_tensor(top())
    return statistics.median(timed(top, repeats, 0)), found


def sweep(
    means: np.ndarray, queries: np.ndarray, kinds: list[str], nlists: list[int], nprobes: list[int]
) -> dict:
    """The exact and 65k-flat times, and one row per (kind, nlist, nprobe)."""
    D = means.shape[1]

    def flat(vectors: np.ndarray):
        index = faiss.IndexFlatIP(D)
        index.add(vectors)
        return index

    exact_s, exact = search(lambda: flat(means).search(queries, TOP_K)[1], repeats=1)
    reference = flat(means[: FLAT_TOKENS // CSZ])
    flat_65k_s, _ = search(lambda: reference.search(queries, TOP_K)[1], repeats=3)
    rows = []
    x, q = torch.from_numpy(means)[None], torch.from_numpy(queries)[None]  # (1, N, D), (1, Q, D)
    live = torch.ones(len(means), dtype=torch.bool)
    for kind, nlist in ((k, n) for k in kinds for n in nlists):
        spec = BankSpec(
            kv_heads=1,
            head_dim=D,
            chunk_size=CSZ,
            capacity_tokens=CSZ * len(means),
            index=kind,
            nlist=nlist,
            nprobe=1,
        )  # IVF-PQ's default m: head_dim
        index = AnnIndex(spec, slots=len(means))
        started = time.perf_counter()
        index.update(x, len(means), torch.arange(len(means)))  # trains and adds them all
        build_s = time.perf_counter() - started
        for nprobe in (p for p in nprobes if p <= nlist):
            index.spec = dataclasses.replace(spec, nprobe=nprobe)
            search_s, found = search(
                lambda index=index: index.search(q, x, live, TOP_K)[1][0], repeats=3
            )
            rows.append(
                {
                    "index": kind,
                    "nlist": nlist,
                    "nprobe": nprobe,
                    "recall_at_16": round(recall(found, exact), 4),
                    "search_s": round(search_s, 4),
                    "x_flat_65k": round(search_s / flat_65k_s, 2),
                    "build_s": round(build_s, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {"exact_s": round(exact_s, 3), "flat_65k_s": round(flat_65k_s, 4), "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, nlist in sorted({(r["index"], r["nlist"]) for r in result["rows"]}):
        points = [
            (r["x_flat_65k"], r["recall_at_16"], r["nprobe"])
            for r in result["rows"]
            if (r["index"], r["nlist"]) == (kind, nlist)
        ]
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=f"{kind}, nlist {nlist}")
        for x, y, nprobe in points:
            ax.annotate(
                str(nprobe), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7
            )
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.axvline(10, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("search time / exact search of a 65,536-token bank")
    ax.set_ylabel("recall@16 (labels: nprobe)")
    ax.set_title(f"IVF, {result['rows_read']:,} key rows, kv head {result['head']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keys", default="bench-keys", help="a benchmarks/real_keys.py folder")
    p.add_argument("--rows", type=int, default=None, help="key rows to index (default: all)")
    p.add_argument("--head", type=int, default=0, help="kv head")
    p.add_argument("--kinds", default="ivf_flat,ivf_pq")
    p.add_argument("--nlist", default="8192")
    p.add_argument("--nprobe", default="64,128,192,256,384,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/ivf-sweep")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    keys = np.load(Path(args.keys) / "keys.npy", mmap_mode="r")  # (N, H, D)
    rows = min(args.rows or len(keys), len(keys)) // CSZ * CSZ
    queries = np.load(Path(args.keys) / "queries.npy")  # (Q, Hq, D)
    g = queries.shape[1] // keys.shape[1]  # query heads per kv head
    q = np.ascontiguousarray(queries[:, args.head * g : (args.head + 1) * g], dtype=np.float32)
    result = sweep(
        head_means(keys, rows, args.head),
        q.reshape(-1, q.shape[-1]),
        args.kinds.split(","),
        [int(v) for v in args.nlist.split(",")],
        [int(v) for v in args.nprobe.split(",")],
    )
    result |= {"keys": args.keys, "rows_read": rows, "head": args.head, "threads": args.threads}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ivf_sweep.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "ivf_sweep.png")
    print(f"wrote {out / 'ivf_sweep.json'} and ivf_sweep.png")


if __name__ == "__main__":
    main()

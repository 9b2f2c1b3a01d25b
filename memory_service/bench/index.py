"""`index`: exact search against each approximate index by bank size, in process.

For each bank size, an exact bank and one bank per approximate index get the same tokens in
one in-process shard (SmolLM2's attention shape: 3 kv heads x 64, 9 query heads, chunks of
4, float16); each answers the same 128 queries (top 16) three times, then runs
`GEN_STEPS` generation steps (a search for one token's queries, then that token's append:
the memory round trip per generated token). A row records the median search latency, the
exact bank's, the speed-up, recall@16 (the share of the exact top-16 chunk ids the index
returns), the median generation step of both, the time to append and build, and bytes per
token. Keys and queries are Gaussian (no cluster structure: the hard case for IVF), or, with
`keys`, a folder written by `benchmarks/real_keys.py`: SmolLM2's own memory keys
(`keys.npy`, (N, 3, 64)) and retrieval queries (`queries.npy`, (128, 9, 64)).

IVF uses `nlist = min(max_nlist, chunks // 64)` (`max_nlist` 1024 unless told) and
`nprobe = nlist // nprobe_div`, IVF-PQ `m` 64 (one 4-bit code per dimension); HNSW `m` 32 and
`ef_search` 64. Writes `index_scaling.json`, `search_latency.png`, `recall.png` and
`generation_step.png` to the output folder (the plots need matplotlib: `pip install -e '.[bench]'`).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memory_service.bank import HNSW_M
from memory_service.bench.common import CSZ, HQ, TOP_K, D, H, markdown, save_figure
from memory_service.client import InProcessClient

N_QUERIES = 128
KINDS = ("ivf_flat", "ivf_pq", "hnsw")
APPEND_TOKENS = 65536  # tokens per append while filling a bank
GEN_STEPS = 32


def index_params(kind: str, tokens: int, nprobe_div: int, max_nlist: int = 1024) -> dict:
    """The spec parameters of index `kind` for a bank of `tokens`."""
    if kind == "hnsw":
        return {"m": HNSW_M, "ef_search": 64}
    nlist = max(1, min(max_nlist, tokens // CSZ // 64))
    params = {"nlist": nlist, "nprobe": max(1, nlist // nprobe_div)}
    return params | ({"m": D} if kind == "ivf_pq" else {})  # a 4-bit code per dimension


class Keys:
    """The bank's tokens (each its key, also as value) and the queries: Gaussian, or read
    from a `benchmarks/real_keys.py` folder (`load`)."""

    def __init__(
        self, rows: np.ndarray | None = None, queries: torch.Tensor | None = None,
        name: str = "gaussian",
    ):
        self.rows, self.name = rows, name  # rows (N, H, D) float16, memory-mapped; None: Gaussian
        self.queries = queries if queries is not None else torch.randn(
            1, N_QUERIES, HQ, D, generator=torch.Generator().manual_seed(1))  # (1, Q, HQ, D)

    @classmethod
    def load(cls, folder: Path) -> Keys:
        """The keys and queries in `folder`; ValueError if missing or of another shape."""
        try:
            rows = np.load(folder / "keys.npy", mmap_mode="r")
            queries = torch.from_numpy(np.load(folder / "queries.npy")).float()
        except (OSError, ValueError) as e:
            raise ValueError(f"--index-keys {folder}: {e} (write it with "
                             "benchmarks/real_keys.py)") from None
        if rows.shape[1:] != (H, D) or queries.shape[1:] != (HQ, D):
            raise ValueError(f"--index-keys {folder}: keys {rows.shape} / queries "
                             f"{tuple(queries.shape)}, need (N, {H}, {D}) / (Q, {HQ}, {D})")
        return cls(rows, queries[None], name=str(folder))

    def check(self, sizes: list[int]) -> None:
        if self.rows is not None and max(sizes) > len(self.rows):
            raise ValueError(f"--sizes up to {max(sizes):,} tokens, but --index-keys holds "
                             f"{len(self.rows):,}")

    def block(self, start: int, n: int, g: torch.Generator) -> torch.Tensor:
        """Tokens start .. start + n: (n, H, D) float32."""
        if self.rows is None:
            return torch.randn(n, H, D, generator=g)
        return torch.from_numpy(np.asarray(self.rows[start: start + n], dtype=np.float32))


def fill(client: InProcessClient, tokens: int, keys: Keys, **spec) -> float:
    """Create bank "b" holding the first `tokens` of `keys` (the same ones for every bank)."""
    client.create_bank("b", kv_heads=H, head_dim=D, chunk_size=CSZ, capacity_tokens=tokens, **spec)
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for start in range(0, tokens, APPEND_TOKENS):
        rows = keys.block(start, min(APPEND_TOKENS, tokens - start), g)
        client.append("b", rows, rows)
    return time.perf_counter() - started


def timed_search(client: InProcessClient, queries: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Median seconds of 3 searches, and the chunk ids found."""
    times, ids = [], torch.empty(0)
    for _ in range(3):
        started = time.perf_counter()
        ids = client.search(["b"], queries, TOP_K).chunk_ids  # shards answer on the CPU
        times.append(time.perf_counter() - started)
    return statistics.median(times), ids


def step_ms(client: InProcessClient) -> float:
    """Median milliseconds of a generation step: search one token's queries, append it."""
    g = torch.Generator().manual_seed(2)
    queries, kv = torch.randn(1, 1, HQ, D, generator=g), torch.randn(1, H, D, generator=g)
    times = []
    for _ in range(GEN_STEPS):
        started = time.perf_counter()
        client.search(["b"], queries, TOP_K)
        client.append("b", kv, kv)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 3)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    pairs = zip(found.view(-1, TOP_K), exact.view(-1, TOP_K), strict=True)
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in pairs) / exact.numel()


def run_index_suite(
    sizes: list[int], kinds: list[str], nprobe_div: int, progress: bool, keys: Keys,
    device: str = "cpu", max_nlist: int = 1024,
) -> list[dict]:
    """One row per (size, index), or per size with no `kinds` (exact search alone), with
    the banks on `device` (see the module doc)."""
    queries = keys.queries
    rows = []
    bar = tqdm(total=len(sizes) * (1 + len(kinds)), desc="index", disable=not progress)
    for tokens in sizes:
        exact = InProcessClient(device=device)
        bar.set_postfix_str(f"{tokens:,} tokens, exact")
        fill_s = fill(exact, tokens, keys)
        exact_s, exact_ids = timed_search(exact, queries)
        exact_step = step_ms(exact)
        if not kinds:  # exact search alone: its own row
            rows.append({
                "tokens": tokens, "keys": keys.name, "device": device, "index": "exact",
                "recall_at_16": 1.0, "search_s": round(exact_s, 4),
                "exact_search_s": round(exact_s, 4), "speedup": 1.0, "step_ms": exact_step,
                "exact_step_ms": exact_step, "append_and_build_s": round(fill_s, 2),
                "bytes_per_token": exact.describe_bank("b").bytes / tokens,
            })
        del exact  # one bank in memory at a time
        bar.update()
        for kind in kinds:
            bar.set_postfix_str(f"{tokens:,} tokens, {kind}")
            params = index_params(kind, tokens, nprobe_div, max_nlist)
            client = InProcessClient(device=device)
            build_s = fill(client, tokens, keys, index=kind, **params)
            latency, ids = timed_search(client, queries)
            rows.append(
                {
                    "tokens": tokens,
                    "keys": keys.name,
                    "device": device,
                    "index": kind,
                    **params,
                    "recall_at_16": round(recall(ids, exact_ids), 4),
                    "search_s": round(latency, 4),
                    "exact_search_s": round(exact_s, 4),
                    "speedup": round(exact_s / latency, 2),
                    "step_ms": step_ms(client),
                    "exact_step_ms": exact_step,
                    "append_and_build_s": round(build_s, 2),
                    "bytes_per_token": client.describe_bank("b").bytes / tokens,
                }
            )
            bar.update()
    bar.close()
    return rows


def plot(rows: list[dict], out: Path) -> list[Path]:
    """`search_latency.png`, `recall.png` and `generation_step.png` (exact and each index
    against bank size)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    kinds = sorted({r["index"] for r in rows} - {"exact"})
    paths = []
    for name, field, label in (
        ("search_latency.png", "search_s", f"search s ({N_QUERIES} queries x {HQ} heads)"),
        ("recall.png", "recall_at_16", "recall@16 against exact search"),
        ("generation_step.png", "step_ms", "ms per generated token (search + append)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        if field == "recall_at_16":
            ax.set_ylim(0, 1.02)
        else:
            exact = sorted({(r["tokens"], r[f"exact_{field}"]) for r in rows})
            ax.plot(*zip(*exact, strict=True), marker="o", label="exact")
            ax.set_yscale("log")
        for kind in kinds:
            points = sorted((r["tokens"], r[field]) for r in rows if r["index"] == kind)
            ax.plot(*zip(*points, strict=True), marker="o", label=kind)
        ax.set_xscale("log")
        ax.set_xlabel("bank tokens")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # recall has no line without indexes
            ax.legend()
        save_figure(fig, out / name)
        paths.append(out / name)
    return paths


def check(kinds: list[str]) -> None:
    """ValueError unless every kind is an approximate index and matplotlib is there."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown index kinds {sorted(unknown)}; choose from {KINDS}")
    try:
        import matplotlib  # noqa: F401  (checked before the suite, not after it)
    except ImportError:
        raise ValueError("the plots need matplotlib: pip install -e '.[bench]'") from None


def run(
    out: Path, sizes: list[int], kinds: list[str], nprobe_div: int = 32, progress: bool = True,
    keys: Keys | None = None, device: str = "cpu", max_nlist: int = 1024,
) -> list[dict]:
    """Run the suite, write `index_scaling.json` and the plots to `out`; the rows."""
    check(kinds)
    keys = keys or Keys()
    keys.check(sizes)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_index_suite(sizes, kinds, nprobe_div, progress, keys, device, max_nlist)
    (out / "index_scaling.json").write_text(json.dumps({"rows": rows}, indent=1))
    plot(rows, out)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    header = ["tokens", "index", "recall@16", "search s", "exact s", "speed-up", "step ms"]
    return markdown(
        [*header, "exact step ms", "append + build s"],
        [
            [
                f"{r['tokens']:,}",
                r["index"],
                f"{r['recall_at_16']:.3f}",
                f"{r['search_s']:.3f}",
                f"{r['exact_search_s']:.3f}",
                f"{r['speedup']:.1f}x",
                f"{r['step_ms']:.1f}",
                f"{r['exact_step_ms']:.1f}",
                f"{r['append_and_build_s']:.1f}",
            ]
            for r in rows
        ],
    )

"""`capacity`: one bank as large as asked, filled and searched on this machine.

One bank of SmolLM2's shape (3 kv heads x 64, chunks of 4) and `dtype` (int4 by default; its
chunk means in `search_dtype`, float32 by default), with a capacity of `tokens`, lives in
one in-process shard (`InProcessClient`). It gets `tokens` Gaussian tokens (each token's
keys are also its values) in appends of 65,536, under a progress bar that shows the process
RSS, then answers 128 queries x 9 heads (top 16) three times; the median is recorded. Before
any work, the bytes it needs (`estimate_bytes`) are compared with 85% of the memory
available now, and a bank that does not fit is refused.

Writes `capacity.json` (one row: tokens, bytes per token, bank GB, process RSS, search and
append times) and `capacity.png` (the bank, the process and the machine's memory in GB).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from memory_service.bank import BankSpec
from memory_service.bench.common import CSZ, HQ, TOP_K, D, H, markdown, save_figure, timed
from memory_service.client import InProcessClient

APPEND_TOKENS = 65536
N_QUERIES = 128
MEMORY_SHARE = 0.85  # of the memory available at the start, at most
WORKING_BYTES = 1 << 30  # an append's float32 tensors and codes; a search's score blocks
SLOT_BYTES = 9  # per chunk: its id (int64) and deleted flag, beside the stored bytes


def bank_spec(tokens: int, dtype: str, search_dtype: str = "float32") -> BankSpec:
    return BankSpec(
        kv_heads=H, head_dim=D, chunk_size=CSZ, capacity_tokens=tokens, dtype=dtype,
        search_dtype=search_dtype,
    )


def estimate_bytes(spec: BankSpec) -> int:
    """Memory the suite needs: the full bank (`bytes_per_token`), its slot bookkeeping, and
    `WORKING_BYTES`."""
    return int(spec.capacity_tokens * spec.bytes_per_token) + (
        SLOT_BYTES * spec.capacity_chunks + WORKING_BYTES
    )


def check(tokens: int, dtype: str, search_dtype: str = "float32") -> BankSpec:
    """The bank's spec; InvalidArgument for a bad spec, ValueError (one line) if its
    estimated bytes exceed `MEMORY_SHARE` of the memory available now."""
    spec = bank_spec(tokens, dtype, search_dtype)
    need, available = estimate_bytes(spec), psutil.virtual_memory().available
    if need > MEMORY_SHARE * available:
        raise ValueError(
            f"--capacity-tokens {tokens:,} of {dtype} needs about {need / 1e9:.1f} GB "
            f"({spec.bytes_per_token:g} B/token and {WORKING_BYTES / 1e9:.1f} GB working memory); "
            f"{MEMORY_SHARE:.0%} of the {available / 1e9:.1f} GB available now is "
            f"{MEMORY_SHARE * available / 1e9:.1f} GB"
        )
    return spec


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def fill(client: InProcessClient, spec: BankSpec, progress: bool) -> float:
    """Create bank "b" of `spec` and fill it with Gaussian tokens; seconds the appends took."""
    client.create_bank("b", **spec.to_dict())
    g = torch.Generator().manual_seed(0)
    tokens, elapsed = spec.capacity_tokens, 0.0
    with tqdm(
        total=tokens, desc="capacity", unit="tok", unit_scale=True, disable=not progress
    ) as bar:
        for start in range(0, tokens, APPEND_TOKENS):
            keys = torch.randn(min(APPEND_TOKENS, tokens - start), H, D, generator=g)  # (n, H, D)
            started = time.perf_counter()
            client.append("b", keys, keys)
            elapsed += time.perf_counter() - started
            bar.update(keys.shape[0])
            bar.set_postfix_str(f"RSS {rss_bytes() / 1e9:.2f} GB")
    return elapsed


def run(
    out: Path, tokens: int, dtype: str = "int4", progress: bool = True,
    search_dtype: str = "float32",
) -> list[dict]:
    """One row (see the module doc); writes `capacity.json` and `capacity.png`."""
    spec = check(tokens, dtype, search_dtype)
    available = psutil.virtual_memory().available
    out.mkdir(parents=True, exist_ok=True)
    client = InProcessClient()
    fill_s = fill(client, spec, progress)
    queries = torch.randn(1, N_QUERIES, HQ, D, generator=torch.Generator().manual_seed(1))
    search_s = statistics.median(timed(lambda: client.search(["b"], queries, TOP_K), 3, warmup=0))
    info = client.describe_bank("b")
    row = {
        "tokens": info.size_tokens,
        "dtype": dtype,
        "search_dtype": search_dtype,
        "bytes_per_token": info.bytes / info.size_tokens,
        "bank_gb": round(info.bytes / 1e9, 3),
        "rss_gb": round(rss_bytes() / 1e9, 3),
        "estimated_gb": round(estimate_bytes(spec) / 1e9, 3),
        "search_s": round(search_s, 3),
        "append_tokens_per_s": round(tokens / fill_s),
    }
    machine = {"total_gb": psutil.virtual_memory().total / 1e9, "available_gb": available / 1e9}
    config = {
        "queries": N_QUERIES,
        "query_heads": HQ,
        "top_k": TOP_K,
        "threads": torch.get_num_threads(),
    }
    (out / "capacity.json").write_text(
        json.dumps({"config": config, "machine": machine, "rows": [row]}, indent=1)
    )
    plot(out / "capacity.png", row, machine)
    return [row]


def plot(path: Path, row: dict, machine: dict) -> Path:
    """One bar chart in GB: the bank, the process RSS, the memory available at the start and
    the machine's."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    bars = {
        "bank": row["bank_gb"],
        "process RSS": row["rss_gb"],
        "available at start": machine["available_gb"],
        "machine": machine["total_gb"],
    }
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(list(bars), list(bars.values()), color=["C0", "C1", "C2", "C7"])
    ax.set_ylabel("GB")
    ax.set_title(f"{row['tokens']:,} tokens of {row['dtype']}: search {row['search_s']:.2f} s")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    return markdown(
        ["tokens", "dtype", "means", "B/token", "bank GB", "RSS GB", "search s",
         "append tokens/s"],
        [
            [
                f"{r['tokens']:,}",
                r["dtype"],
                r.get("search_dtype", "float32"),
                f"{r['bytes_per_token']:g}",
                f"{r['bank_gb']:.2f}",
                f"{r['rss_gb']:.2f}",
                f"{r['search_s']:.2f}",
                f"{r['append_tokens_per_s']:,}",
            ]
            for r in rows
        ],
    )

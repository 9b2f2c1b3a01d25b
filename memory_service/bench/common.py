"""What the suites share: SmolLM2's attention shape, Gaussian banks over any client, Ray for
a suite, latency statistics, and line plots."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

H, HQ, D, CSZ, TOP_K = 3, 9, 64, 4, 16  # kv heads, query heads, head dim, chunk, top chunks
APPEND_TOKENS = 16384  # tokens per append when filling a bank over gRPC


def fill(client, bank: str, tokens: int, seed: int = 0) -> float:
    """Create `bank` (float16, chunks of 4, capacity `tokens`) on `client` and append `tokens`
    Gaussian tokens, sent as float16; seconds the appends took."""
    client.create_bank(bank, kv_heads=H, head_dim=D, chunk_size=CSZ, capacity_tokens=tokens)
    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for start in range(0, tokens, APPEND_TOKENS):
        keys = torch.randn(min(APPEND_TOKENS, tokens - start), H, D, generator=g).half()
        client.append(bank, keys, keys)  # (n, H, D)
    return time.perf_counter() - started


def timed(fn, iters: int, warmup: int = 1) -> list[float]:
    """Seconds of `iters` calls of `fn`, after `warmup` calls not counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def latency_ms(times: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) of `times` in seconds, as milliseconds."""
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": round(1e3 * statistics.median(ordered), 3), "p99_ms": round(1e3 * p99, 3)}


@contextmanager
def ray_session(address: str | None, nodes: int = 1) -> Iterator[None]:
    """Ray for a suite: the one this process already runs, else the cluster at `address`,
    else a `ray.cluster_utils.Cluster` of `nodes` one-CPU nodes on this machine (a plain
    local Ray for one node). Shuts down what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    cluster = None
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local processes, on loopback
        if nodes > 1:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            address = cluster.address
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def plot_panels(
    path: Path, x: list[int], xlabel: str, panels: list[tuple[str, dict[str, list[float]]]]
) -> Path:
    """Side-by-side line plots over the same `x` (log 2), one per (y label, {line: ys})."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels, strict=True):
        for label, ys in lines.items():
            ax.plot(x, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    save_figure(fig, path)
    return path


def save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` as a PNG (80 dpi) and free it."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

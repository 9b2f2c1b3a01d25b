"""Durability: what each setting costs and whether anything acknowledged is lost.

1. Append throughput and latency (p50, p99) with durability none, group and fsync, in one
   run: a local Ray, 2 shards, C clients each appending segments of SmolLM2's key/value
   shape (3 kv heads, head dim 64, float16) to its own bank over gRPC; ratios against none.
2. Restart time of a shard holding 1M tokens: snapshot load + log replay (in process, the
   code a restarted shard actor runs), half in the snapshot and half in the log, and all
   in the log.
3. Crash run: N kill -9 cycles of a shard actor while 2 clients append and search; then
   every acknowledged token is searched for, and the lost ones counted (with the default
   durability, and with none for contrast).

Prints tables and writes benchmarks/results/durability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from memory_service.actor_calls import NAMESPACE, shard_name  # noqa: E402
from memory_service.bank import BankSpec  # noqa: E402
from memory_service.client import MemoryClient  # noqa: E402
from memory_service.errors import ServiceError  # noqa: E402
from memory_service.service import start_service  # noqa: E402
from memory_service.shard import Shard  # noqa: E402
from memory_service.wal import DEFAULT_DURABILITY, DURABILITY  # noqa: E402

KV_HEADS, HEAD_DIM = 3, 64
CRASH_BATCH, CRASH_DIM = 6, 32


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def throughput(durability: str, clients: int, tokens: int, seconds: float, root: Path) -> dict:
    """C clients appending `tokens` per call for `seconds` (after a 1 s warm-up)."""
    name = f"bench-{durability}-{clients}"
    service = start_service(
        shards=2, snapshot_dir=str(root / name), name=name, durability=durability
    )
    lat: list[list[float]] = [[] for _ in range(clients)]
    start, stop = threading.Event(), threading.Event()

    def run(i: int) -> None:
        client = MemoryClient(service.address, retries=0)
        bank = f"b{i}"
        client.create_bank(bank, kv_heads=KV_HEADS, head_dim=HEAD_DIM, capacity_tokens=1 << 20)
        keys = torch.randn(tokens, KV_HEADS, HEAD_DIM).half()
        warm = time.monotonic() + 1.0
        while not stop.is_set():
            t = time.perf_counter()
            client.append(bank, keys, keys)
            if time.monotonic() > warm and start.is_set():
                lat[i].append(time.perf_counter() - t)
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    start.set()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    service.stop()
    every = [x for xs in lat for x in xs]
    return {
        "durability": durability,
        "clients": clients,
        "tokens_per_append": tokens,
        "appends_per_s": len(every) / elapsed,
        "tokens_per_s": len(every) * tokens / elapsed,
        "p50_ms": 1e3 * statistics.median(every),
        "p99_ms": 1e3 * percentile(every, 0.99),
    }


def restart(tokens: int, in_log: float, root: Path) -> dict:
    """Restart a 1-shard-of-1 bank of `tokens` tokens, `in_log` of them only in the log."""
    directory = root / f"restart-{in_log}"
    spec = BankSpec(kv_heads=KV_HEADS, head_dim=HEAD_DIM, chunk_size=4, capacity_tokens=tokens)
    shard = Shard(0, 1)
    shard.restore(directory, DEFAULT_DURABILITY)
    step = 16384
    g = torch.Generator().manual_seed(0)
    snapshot_at = int(tokens * (1 - in_log)) // step * step
    for start in range(0, tokens, step):
        if start == snapshot_at and start:
            shard.save_snapshot(directory)
        keys = torch.randn(step // 4, 4, KV_HEADS, HEAD_DIM, generator=g).half()
        ids = torch.arange(start // 4, (start + step) // 4)
        shard.add("bank", spec, ids, keys, keys, 0)
    log_bytes = shard.wal.size_bytes
    shard.wal.close()
    t = time.perf_counter()
    Shard(0, 1).load_snapshot(directory)
    load_s = time.perf_counter() - t
    back = Shard(0, 1)
    t = time.perf_counter()
    back.restore(directory, DEFAULT_DURABILITY)
    total_s = time.perf_counter() - t
    assert back.stores["bank"].n_chunks == tokens // 4
    back.wal.close()
    snap = shard.snapshot_path(directory)
    return {
        "tokens": tokens,
        "tokens_in_log": tokens - snapshot_at,
        "snapshot_mb": (snap.stat().st_size if snap.exists() else 0) / 2**20,
        "log_mb": log_bytes / 2**20,
        "snapshot_load_s": load_s if snapshot_at else 0.0,
        "log_replay_s": total_s - (load_s if snapshot_at else 0.0),
        "restart_s": total_s,
    }


def crash_run(durability: str, cycles: int, root: Path) -> dict:
    """kill -9 a shard actor `cycles` times (alternating) while 2 clients append and search;
    then search every acknowledged token and count the ones that are not there exactly."""
    name = f"crash-{durability}"
    service = start_service(
        shards=2, snapshot_dir=str(root / name), name=name, durability=durability
    )
    stop = threading.Event()
    acked: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[], []]
    refused = [0, 0]
    wrong: list[int] = [0]

    def write(i: int) -> None:
        client = MemoryClient(service.address, retries=0)
        client.create_bank(
            f"w{i}", kv_heads=1, head_dim=CRASH_DIM, chunk_size=1, capacity_tokens=1 << 20
        )
        g = torch.Generator().manual_seed(i)
        while not stop.is_set():
            keys = torch.nn.functional.normalize(
                torch.randn(CRASH_BATCH, 1, CRASH_DIM, generator=g), dim=-1
            )
            values = torch.randn(CRASH_BATCH, 1, CRASH_DIM, generator=g)
            try:
                end = client.append(f"w{i}", keys, values).appended_chunks
                acked[i].append((torch.arange(end - CRASH_BATCH, end), keys, values))
            except ServiceError:
                refused[i] += 1
                time.sleep(0.02)
        client.close()

    def search() -> None:  # a wrong answer is one that is neither exact nor refused
        client = MemoryClient(service.address, retries=0)
        while not stop.is_set():
            i = len(acked[0]) % 2
            if not acked[i]:
                time.sleep(0.05)
                continue
            ids, keys, _ = acked[i][-1]
            try:
                r = client.search([f"w{i}"], keys[None], 1)
            except ServiceError:
                continue
            if not torch.equal(r.chunk_ids[0, :, 0, 0], ids) and durability != "none":
                wrong[0] += 1
        client.close()

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    threads.append(threading.Thread(target=search))
    for t in threads:
        t.start()
    acks = lambda: min(len(a) for a in acked)  # noqa: E731
    while acks() < 20:
        time.sleep(0.05)
    client = MemoryClient(service.address, retries=0)
    client.snapshot()
    resume = []
    for cycle in range(cycles):
        before = acks()
        while acks() < before + 10:
            time.sleep(0.02)
        actor = ray.get_actor(shard_name(name, cycle % 2), namespace=NAMESPACE)
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        killed, t = acks(), time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while acks() < killed + 10:
            time.sleep(0.02)
        resume.append(time.perf_counter() - t)
    stop.set()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 120  # the last shard killed comes back
    while not all(s.available for s in client.shard_map()) and time.monotonic() < deadline:
        time.sleep(0.2)
    lost = tokens = 0
    for i in (0, 1):
        ids = torch.cat([x for x, _, _ in acked[i]])
        keys = torch.cat([k for _, k, _ in acked[i]])
        values = torch.cat([v for _, _, v in acked[i]])
        found = MemoryClient(service.address, retries=8).search([f"w{i}"], keys[None], 1)
        exact = (found.chunk_ids[0, :, 0, 0] == ids) & (
            found.keys[0, :, 0, 0] == keys[:, 0].half()
        ).all(-1)
        exact &= (found.values[0, :, 0, 0] == values[:, 0].half()).all(-1)
        tokens += len(ids)
        lost += int((~exact).sum())
    client.close()
    service.stop()
    return {
        "durability": durability,
        "kill9_cycles": cycles,
        "acknowledged_tokens": tokens,
        "acknowledged_tokens_lost": lost,
        "appends_refused": sum(refused),
        "wrong_answers_during_run": wrong[0] if durability != "none" else None,
        "appends_resume_after_kill_s": statistics.median(resume) if resume else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens-per-append", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--restart-tokens", type=int, default=1 << 20)
    parser.add_argument("--cycles", type=int, default=20, help="kill -9 cycles, default durability")
    parser.add_argument("--none-cycles", type=int, default=3, help="kill -9 cycles with none")
    parser.add_argument("--out", default="benchmarks/results/durability.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="longmem-durability-"))
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    rows = [
        throughput(d, c, args.tokens_per_append, args.seconds, root)
        for c in args.clients
        for d in DURABILITY
    ]
    for row in rows:
        base = next(r for r in rows if r["durability"] == "none" and r["clients"] == row["clients"])
        row["throughput_vs_none"] = row["tokens_per_s"] / base["tokens_per_s"]
    print("| durability | clients | appends/s | tokens/s | p50 ms | p99 ms | throughput vs none |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['durability']} | {r['clients']} | {r['appends_per_s']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['throughput_vs_none']:.2f}x |"
        )
    restarts = [restart(args.restart_tokens, f, root) for f in (0.5, 1.0)]
    print(
        "\n| tokens | in log | snapshot MB | log MB | snapshot load s | log replay s | restart s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in restarts:
        print(
            f"| {r['tokens']:,} | {r['tokens_in_log']:,} | {r['snapshot_mb']:.0f} | "
            f"{r['log_mb']:.0f} | {r['snapshot_load_s']:.2f} | {r['log_replay_s']:.2f} | "
            f"{r['restart_s']:.2f} |"
        )
    crashes = [crash_run(DEFAULT_DURABILITY, args.cycles, root)]
    if args.none_cycles:
        crashes.append(crash_run("none", args.none_cycles, root))
    print(
        "\n| durability | kill -9 cycles | acknowledged tokens | lost | appends refused | "
        "wrong answers | appends resume after (median s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in crashes:
        print(
            f"| {r['durability']} | {r['kill9_cycles']} | {r['acknowledged_tokens']:,} | "
            f"{r['acknowledged_tokens_lost']:,} | {r['appends_refused']} | "
            f"{'n/a' if r['wrong_answers_during_run'] is None else r['wrong_answers_during_run']}"
            f" | {r['appends_resume_after_kill_s']:.1f} |"
        )
    ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__}
    result = {
        "machine": machine,
        "args": vars(args),
        "append": rows,
        "restart": restarts,
        "crash": crashes,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

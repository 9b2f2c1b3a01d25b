"""`longmem`: the command line, one command tree rooted here.

`serve`, `keygen`, `memory-demo` and `bench` are built in this module and need the memory
service alone. The
model's commands (`demo`, `train`, `eval`, `generate`) live in `model_worker.cli`, which is
imported only when one of them runs (or shows its --help): a memory-only node never loads
the model code or transformers.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import torch

from memory_service import logs
from memory_service.errors import ServiceError
from memory_service.tenancy import TenantTable, new_key
from memory_service.tls import server_tls
from memory_service.wal import DEFAULT_DURABILITY, DURABILITY
from memory_service.wire import MAX_MESSAGE_BYTES


def cmd_serve(args: argparse.Namespace) -> int:
    from memory_service.service import start_service

    logs.configure(args.log_level)
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca)
    tenants = TenantTable.load(args.tenants) if args.tenants else TenantTable.single()
    service = start_service(
        shards=args.shards,
        host=args.host,
        port=args.port,
        tenants=tenants,
        ray_address=args.address,
        gpus_per_shard=args.gpus_per_shard,
        max_message_bytes=args.max_message_mb << 20,
        placement=args.placement,
        snapshot_dir=args.snapshot_dir,
        snapshot_every_s=args.snapshot_every,
        durability=args.durability,
        allow_partial=args.allow_partial,
        name=args.name,
        shard_endpoints=args.shard_endpoints,
        tls=tls,
        metrics_port=args.metrics_port,
    )
    stop = threading.Event()  # handled before the address is out: a client may stop us then
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    devices = ", ".join(service.devices)
    metrics_at = "" if args.metrics_port is None else f"; metrics on port {service.metrics_port}"
    print(
        f"longmem memory service listening on {service.address}{' (TLS)' if tls else ''} "
        f"({args.shards} shards: {devices}; tenants: {', '.join(tenants.tenants)}{metrics_at})",
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    print("longmem: shutting down", flush=True)
    service.stop()
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Print a new API key and the hash that goes into the tenant file."""
    key, digest = new_key()
    print(f"key:  {key}\nhash: {digest}")
    print(
        "Give the key to the tenant; put the hash in its api_keys in the tenant file. "
        "The key is not stored anywhere.",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the embedded service, then create a bank, append to it and search it over gRPC."""
    from memory_service.client import MemoryClient
    from memory_service.service import start_service

    t0 = time.perf_counter()
    service = start_service(shards=args.shards)
    print(
        f"[{time.perf_counter() - t0:5.1f}s] memory service up at {service.address} "
        f"with {args.shards} shards"
    )
    client = MemoryClient(service.address)
    try:
        kv_heads, head_dim, q_heads = 3, 64, 9  # SmolLM2-135M's attention shape
        info = client.create_bank(
            "book", kv_heads=kv_heads, head_dim=head_dim, capacity_tokens=8192
        )
        print(f"created bank 'book': {info.spec.to_dict()}")
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            keys = torch.randn(1000, kv_heads, head_dim, generator=g)
            r = client.append("book", keys, torch.randn_like(keys))
            print(
                f"appended 1000 tokens: {r.appended_chunks} chunks so far, "
                f"{r.pending_tokens} tokens pending"
            )
        queries = keys[-8:].repeat_interleave(q_heads // kv_heads, dim=1)[None]  # (1, 8, 9, 64)
        t = time.perf_counter()
        result = client.search(["book"], queries, top_k=16)
        print(
            f"searched 8 queries x {q_heads} heads, top 16 chunks, in "
            f"{1e3 * (time.perf_counter() - t):.1f} ms: keys {tuple(result.keys.shape)}"
        )
        newest = client.describe_bank("book").appended_chunks - 1
        print(
            f"the best chunk for the last query is chunk {int(result.chunk_ids[0, -1, 0, 0])} "
            f"(the newest chunk is {newest}); score {float(result.scores[0, -1, 0, 0]):.1f}"
        )
        info = client.describe_bank("book")
        print(
            f"bank 'book': {info.size_tokens} tokens in {info.chunks} chunks on "
            f"{info.shards} shards, {info.bytes / 2**20:.1f} MiB"
        )
    finally:
        client.close()
        service.stop()
    print(f"[{time.perf_counter() - t0:5.1f}s] done")
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the memory service (gRPC over Ray actors)")
    serve.add_argument("--shards", type=int, default=1, help="shard actors (default 1)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    serve.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. 'auto'); default: an embedded local Ray",
    )
    serve.add_argument("--tenants", default=None, help="tenant config file (YAML/JSON)")
    serve.add_argument(
        "--gpus-per-shard",
        type=float,
        default=None,
        help="GPUs per shard (default: 1 when the cluster has one per shard)",
    )
    serve.add_argument(
        "--max-message-mb",
        type=int,
        default=MAX_MESSAGE_BYTES >> 20,
        help="largest accepted request in MiB (default 64)",
    )
    serve.add_argument(
        "--placement",
        choices=("spread", "pack"),
        default="spread",
        help="spread shards over nodes (default) or pack them onto few",
    )
    serve.add_argument(
        "--snapshot-dir",
        default=None,
        help="durable path every node can reach; restarted shards reload from it",
    )
    serve.add_argument(
        "--snapshot-every",
        type=float,
        default=300.0,
        help="seconds between automatic snapshots with --snapshot-dir (0: only on demand "
        "and at shutdown; default 300)",
    )
    serve.add_argument(
        "--durability",
        choices=DURABILITY,
        default=DEFAULT_DURABILITY,
        help="with --snapshot-dir, a write-ahead log there makes every acknowledged append "
        "survive a crash: 'group' (default) shares an fsync among appends arriving within "
        "a few ms, 'fsync' syncs each append, 'none' keeps no log (appends after the last "
        "snapshot are lost with their shard)",
    )
    serve.add_argument(
        "--allow-partial",
        action="store_true",
        help="while a shard is down, answer searches from the others (marked partial) "
        "instead of failing with UNAVAILABLE",
    )
    serve.add_argument(
        "--name",
        default="default",
        help="service name on the Ray cluster; workers find it with find_service(name)",
    )
    serve.add_argument(
        "--shard-endpoints",
        action="store_true",
        help="every shard also serves the API on its own node (bound to --host, with the "
        "same --tls-* files, read on each node); the shard map lists their addresses",
    )
    serve.add_argument("--tls-cert", default=None, help="serve TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    serve.add_argument(
        "--tls-client-ca",
        default=None,
        help="require client certificates signed by this CA (PEM); needs --tls-cert",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST is --host)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="JSON log lines to stderr at this level and above (default info)",
    )
    serve.set_defaults(run=cmd_serve)


def add_keygen_parser(sub: argparse._SubParsersAction) -> None:
    keygen = sub.add_parser("keygen", help="print a new API key and its hash for a tenant file")
    keygen.set_defaults(run=cmd_keygen)


def add_memory_demo_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "memory-demo", help="start an embedded service and run a short client session"
    )
    demo.add_argument("--shards", type=int, default=2)
    demo.set_defaults(run=cmd_demo)


def cmd_bench(args: argparse.Namespace) -> int:
    from memory_service import bench

    return bench.main(args)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="scaling suites (indexes, shards, tenants, training-shaped search, capacity): "
        "JSON and plots",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument(
        "--suites", default="index,shards,tenants,search", help="suites to run, in this order"
    )
    bench.add_argument("--out", default="bench", help="folder for the JSON and PNG files")
    bench.add_argument("--threads", type=int, default=1, help="torch and faiss threads here")
    bench.add_argument(
        "--address", help="Ray cluster for shards, tenants and search (none: this machine)"
    )
    index = bench.add_argument_group("index")
    index.add_argument("--sizes", default="65536,262144,1048576", help="bank sizes in tokens")
    bench.add_argument(
        "--device", default="cpu",
        help="where the index suite keeps its in-process banks (cpu or cuda: GPU shards)",
    )
    index.add_argument(
        "--kinds", default="ivf_flat,ivf_pq,hnsw",
        help="approximate indexes ('': exact search alone)",
    )
    index.add_argument("--nprobe-div", type=int, default=32, help="IVF nprobe = nlist // this")
    index.add_argument(
        "--max-nlist", type=int, default=1024,
        help="IVF nlist = min(this, chunks // 64): raise it with the bank",
    )
    index.add_argument(
        "--index-keys", default=None, metavar="FOLDER",
        help="SmolLM2's own keys and queries (benchmarks/real_keys.py) instead of Gaussian ones",
    )
    shards = bench.add_argument_group("shards")
    shards.add_argument("--shards", default="1,2,4", help="shard counts")
    shards.add_argument("--shard-tokens", type=int, default=1 << 20, help="bank tokens")
    tenants = bench.add_argument_group("tenants")
    tenants.add_argument("--tenants", default="1,4,16,64", help="concurrent tenant counts")
    tenants.add_argument("--tenant-tokens", type=int, default=16384, help="tokens per bank")
    tenants.add_argument("--requests", type=int, default=32, help="searches per client")
    tenants.add_argument("--timeout", type=float, default=60.0, help="seconds per search")
    search = bench.add_argument_group("search")
    search.add_argument("--search-tokens", type=int, default=65536, help="bank tokens")
    search.add_argument("--search-iters", type=int, default=30, help="searches timed per path")
    search.add_argument(
        "--search-queries",
        choices=["local", "random"],
        default="local",
        help="local: a stretch of the bank re-read with noise; random: independent queries",
    )
    capacity = bench.add_argument_group("capacity (only when named in --suites)")
    capacity.add_argument("--capacity-tokens", type=int, default=1 << 25, help="bank tokens")
    capacity.add_argument("--capacity-dtype", default="int4", help="the bank's dtype")
    capacity.add_argument(
        "--capacity-search-dtype", default="float32", help="its chunk means' dtype (float16: 2 B)"
    )
    bench.set_defaults(run=cmd_bench)


# The model's commands and their one-line help (`model_worker.cli` builds their parsers).
MODEL_COMMANDS = {
    "demo": "the main job: adapt briefly, then evaluate memory on/off",
    "train": "memory-augmented adaptation of the SideNet",
    "eval": "perplexity, passkey and ICL with memory on and off",
    "generate": "read a document into a bank, then generate with memory",
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree. The model's commands appear by name and help only: `main`
    hands them to `model_worker.cli` before this parser sees their flags."""
    parser = argparse.ArgumentParser(
        prog="longmem",
        description="LongMem: a frozen language model with a SideNet that retrieves from a "
        "sharded long-term memory service. `longmem COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in MODEL_COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    add_serve_parser(sub)
    add_keygen_parser(sub)
    add_memory_demo_parser(sub)
    add_bench_parser(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run a command; a refused request ends with one line, not a traceback."""
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ServiceError, ValueError, OSError) as e:
        print(f"longmem {args.command}: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MODEL_COMMANDS:
        from model_worker import cli as model_cli

        return model_cli.main(argv)
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

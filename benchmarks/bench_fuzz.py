"""Fuzz the memory service: N mutated requests spread over every method of
`longmem.v1.MemoryService` and `grpc.health.v1.Health`, sent as raw bytes to a real
`longmem serve` on 127.0.0.1 (2 shards), counting the status codes that come back.

A server error is INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE or DEADLINE_EXCEEDED: the
server failed to answer the request with a status that says what was wrong with it. The
target is none. Afterwards the server must still serve, and another tenant's bank must be
exactly as before (mutated requests carry the fuzzing tenant's key, a wrong one or none).

Mutations: of the serialized bytes (bit flips, overwritten, inserted, duplicated or dropped
bytes, truncation, random bytes) and of the message's fields (extreme integers, odd
strings, shapes and dtypes that do not fit the data). Bounded by --requests and --seconds.

    python benchmarks/bench_fuzz.py [--requests 10000] [--seconds 900] [--seed 0]

Prints a table and writes benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2
from served import served

from memory_service.client import MemoryClient
from memory_service.wire import encode
from protos.longmem.v1 import memory_pb2 as pb

KEY, WITNESS = "fuzz-key-0123456789abcdef", "witness-key-0123456789abcdef"
TENANTS = f"""tenants:
  - name: fuzz
    api_keys: ["{KEY}"]
    max_banks: 32
    max_tokens: 4000000
  - name: witness
    api_keys: ["{WITNESS}"]
"""
SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
INTS = [0, 1, -1, 2, 3, 4, 7, 64, 4096, 4097, 2**31 - 1, -(2**31), 2**32, 2**62, -(2**62)]
STRINGS = ["", "f0", "w", "../f0", "a" * 300, "\x00", "bank\n", "ü" * 10, "f0/../w", " "]
RESULTS = Path(__file__).parent / "results"


def seeds() -> dict[str, tuple[str, object]]:
    """One valid request per method: (gRPC path, message)."""
    keys = torch.randn(9, 3, 64)
    queries = torch.randn(1, 4, 9, 64)
    spec = pb.BankSpec(kv_heads=3, head_dim=64, chunk_size=4, capacity_tokens=4096)
    memory = {
        "CreateBank": pb.CreateBankRequest(name="f1", spec=spec),
        "DeleteBank": pb.BankRef(name="f1"),
        "ResetBank": pb.BankRef(name="f0"),
        "ListBanks": pb.ListBanksRequest(),
        "DescribeBank": pb.BankRef(name="f0"),
        "Append": pb.AppendRequest(bank="f0", keys=encode(keys), values=encode(keys)),
        "Search": pb.SearchRequest(banks=["f0"], queries=encode(queries), top_k=4),
        "DeleteDocument": pb.DeleteDocumentRequest(bank="f0", document="d0"),
        "Snapshot": pb.SnapshotRequest(),
        "DescribeService": pb.DescribeServiceRequest(),
    }
    out = {m: (f"/longmem.v1.MemoryService/{m}", msg) for m, msg in memory.items()}
    out["Health.Check"] = ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest())
    return out


def mutate_fields(msg, rng: random.Random) -> bytes:
    """Set one field somewhere in the message (or a nested one) to an odd value."""
    msg = type(msg).FromString(msg.SerializeToString())
    target = msg
    for _ in range(3):
        nested = [f for f in target.DESCRIPTOR.fields if f.message_type and not f.is_repeated]
        if nested and rng.random() < 0.5:
            target = getattr(target, rng.choice(nested).name)
    fields = list(target.DESCRIPTOR.fields)
    if not fields:
        return msg.SerializeToString() + bytes([rng.randrange(256) for _ in range(4)])
    f = rng.choice(fields)
    value = getattr(target, f.name)
    try:
        if f.is_repeated and f.type in (f.TYPE_INT64, f.TYPE_INT32, f.TYPE_UINT64):  # shape
            del value[:]
            value.extend(rng.choice(INTS) % 2**31 for _ in range(rng.randrange(10)))
        elif f.is_repeated and f.type == f.TYPE_STRING:
            value.extend(rng.choice(STRINGS) for _ in range(rng.randrange(1, 40)))
        elif f.type == f.TYPE_STRING:
            setattr(target, f.name, rng.choice(STRINGS))
        elif f.type == f.TYPE_BYTES:
            cut = rng.randrange(len(value) + 1)
            setattr(target, f.name, value[:cut] + bytes(rng.randrange(64)))
        elif f.type == f.TYPE_ENUM:
            setattr(target, f.name, rng.choice([0, 1, 2, 3, 4, 5, 99]))
        elif f.type == f.TYPE_BOOL:
            setattr(target, f.name, not value)
        elif f.message_type is None:
            setattr(target, f.name, rng.choice(INTS))
    except (ValueError, TypeError):  # out of the field's range: the byte mutations cover it
        pass
    return msg.SerializeToString()


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0 and b:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:  # overwritten bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:  # truncation
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 3:  # inserted bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 4 and b:  # a slice duplicated
        i = rng.randrange(len(b))
        j = rng.randrange(i, len(b) + 1)
        b[j:j] = b[i:j]
    elif kind == 5 and b:  # a slice dropped
        i = rng.randrange(len(b))
        del b[i : rng.randrange(i, len(b) + 1)]
    else:  # random bytes
        b = bytearray(rng.randrange(256) for _ in range(rng.randrange(64)))
    return bytes(b)


def fuzz(address: str, requests: int, seconds: float, seed: int, threads: int = 4) -> dict:
    channel = grpc.insecure_channel(address)
    methods = seeds()
    counts: dict[str, Counter] = {m: Counter() for m in methods}
    lock, next_i = threading.Lock(), iter(range(requests))
    deadline = time.monotonic() + seconds

    def work(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            method = list(methods)[i % len(methods)]
            path, msg = methods[method]
            if rng.random() < 0.5:
                data = mutate_fields(msg, rng)
            else:
                data = mutate_bytes(msg.SerializeToString(), rng)
            r = rng.random()
            metadata = (("x-api-key", KEY),) if r < 0.9 else (
                (("x-api-key", "wrong-" + KEY),) if r < 0.95 else ()
            )
            streaming = method == "Search"
            kind = channel.unary_stream if streaming else channel.unary_unary
            try:
                answer = kind(path)(data, metadata=metadata, timeout=60)
                list(answer) if streaming else answer
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                counts[method][code] += 1

    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    channel.close()
    return {m: dict(c) for m, c in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=900, help="stop sending after this long")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with served(TENANTS) as (address, _):
        fuzzer, witness = MemoryClient(address, KEY), MemoryClient(address, WITNESS)
        g = torch.Generator().manual_seed(args.seed)
        for client, bank in ((fuzzer, "f0"), (witness, "w")):
            client.create_bank(bank, kv_heads=3, head_dim=64, capacity_tokens=4096)
            keys = torch.randn(400, 3, 64, generator=g)
            client.append(bank, keys, keys)
        probe = torch.randn(1, 4, 9, 64, generator=g)
        before = (witness.describe_bank("w"), witness.search(["w"], probe, top_k=8))
        t = time.perf_counter()
        counts = fuzz(address, args.requests, args.seconds, args.seed)
        elapsed = time.perf_counter() - t
        after = (witness.describe_bank("w"), witness.search(["w"], probe, top_k=8))
        witness_unchanged = before[0] == after[0] and all(
            torch.equal(getattr(before[1], f), getattr(after[1], f))
            for f in ("chunk_ids", "keys", "values", "valid")
        )
        still_serving = isinstance(fuzzer.list_banks(), list)  # raises if not
        fuzzer.close(), witness.close()
    codes = sorted({c for per in counts.values() for c in per})
    print(f"{sum(sum(c.values()) for c in counts.values())} mutated requests in {elapsed:.0f} s")
    print("| method | " + " | ".join(codes) + " | server errors |")
    print("|" + " --- |" * (len(codes) + 2))
    total_errors = 0
    for method, per in counts.items():
        errors = sum(n for c, n in per.items() if c in SERVER_ERRORS)
        total_errors += errors
        print(f"| {method} | " + " | ".join(str(per.get(c, 0)) for c in codes) + f" | {errors} |")
    print(f"server errors: {total_errors}; still serving: {still_serving}; "
          f"other tenant's bank unchanged: {witness_unchanged}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps({
        "requests": args.requests, "seed": args.seed, "seconds": round(elapsed, 1),
        "counts": counts, "server_errors": total_errors, "still_serving": still_serving,
        "witness_unchanged": witness_unchanged,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The memory service for real: Ray actors behind a gRPC server on 127.0.0.1."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memory_service import wire
from memory_service.client import InProcessClient, MemoryClient
from memory_service.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from memory_service.search import CompactResult
from memory_service.service import start_service
from memory_service.tenancy import Tenant, TenantTable
from memory_service.wire import read_search_stream, search_messages

ALICE, BOB, READER = "alice-key", "bob-key", "reader-key"
TENANTS = TenantTable(
    [
        Tenant("alice", (ALICE,)),
        Tenant("bob", (BOB,), max_banks=3, max_tokens=1 << 20),
        Tenant("reader", (READER,), read_only=True),
    ]
)


@pytest.fixture(scope="module")
def services(ray_local):
    """Two services on the same Ray: 1 shard and 3 shards."""
    started = {
        n: start_service(shards=n, tenants=TENANTS, name=f"test-{n}", shard_endpoints=n == 3)
        for n in (1, 3)
    }
    yield started
    for s in started.values():
        s.stop()


def fill(client, name: str, tokens: int, seed: int, **spec) -> tuple[torch.Tensor, torch.Tensor]:
    spec = {"kv_heads": 3, "head_dim": 64, "capacity_tokens": 4096} | spec
    client.create_bank(name, **spec)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(tokens, spec["kv_heads"], spec["head_dim"], generator=g)
    values = torch.randn(tokens, spec["kv_heads"], spec["head_dim"], generator=g)
    for part in torch.split(torch.arange(tokens), 501):
        client.append(name, keys[part], values[part])
    return keys, values


def assert_same(a, b) -> None:
    assert torch.equal(a.chunk_ids, b.chunk_ids)
    assert torch.equal(a.valid, b.valid)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    torch.testing.assert_close(a.scores, b.scores)


def test_round_trip_equals_in_process(services):
    local = InProcessClient()
    remote = MemoryClient(services[3].address, ALICE)
    for c in (local, remote):
        fill(c, "rt", 5003, seed=0)  # wraps capacity 4096: eviction too
    queries = torch.randn(2, 33, 9, 64)
    for c in (local, remote):
        c.create_bank("rt2", kv_heads=3, head_dim=64)
        c.append(
            "rt2",
            torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(5)),
            torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(6)),
        )
    a = local.search(["rt", "rt2"], queries, top_k=16)
    b = remote.search(["rt", "rt2"], queries, top_k=16)
    assert_same(a, b)
    assert b.valid[0].all() and b.valid[1, ..., :12].all() and not b.valid[1, ..., 12:].any()
    info_local, info_remote = local.describe_bank("rt"), remote.describe_bank("rt")
    for field in ("chunks", "size_tokens", "pending_tokens", "appended_chunks", "evicted_chunks"):
        assert getattr(info_local, field) == getattr(info_remote, field)
    assert info_remote.shards == 3 and info_remote.bytes > 0
    remote.delete_bank("rt"), remote.delete_bank("rt2")
    remote.close()


def test_one_and_three_shards_identical(services):
    results = []
    queries = torch.randn(1, 64, 9, 64, dtype=torch.bfloat16)
    for n in (1, 3):
        c = MemoryClient(services[n].address, ALICE)
        fill(c, "same", 6000, seed=1, capacity_tokens=1 << 13, dtype="bfloat16")
        results.append(c.search(["same"], queries, top_k=16))
        c.delete_bank("same")
        c.close()
    assert_same(*results)


def test_large_answer_streams_in_parts(services):
    """An answer bigger than one message (16 MiB parts) arrives whole."""
    c = MemoryClient(services[3].address, ALICE)
    keys, _ = fill(c, "big", 65536, seed=2, kv_heads=1, capacity_tokens=65536)
    queries = torch.randn(1, 1024, 16, 64)
    r = c.search(["big"], queries, top_k=16)
    assert r.keys.shape == (1, 1024, 16, 64, 64)
    ref = keys.half().float().view(-1, 4, 64).mean(1)  # (C, D)
    scores = queries[0] @ ref.T  # (n, Hq, C); at this size near-ties may swap ranks, so
    got = scores.gather(-1, r.chunk_ids[0])  # compare the scores of what was found
    torch.testing.assert_close(got, scores.topk(16, -1).values, rtol=0, atol=1e-4)
    torch.testing.assert_close(r.scores[0], got, rtol=0, atol=1e-4)
    c.delete_bank("big")
    c.close()


def test_search_with_a_header_over_the_message_limit_is_sent_in_parts(services):
    """4.3M found chunks make a 69 MB answer header, over the 64 MiB message limit: the
    client asks for consecutive ranges of the queries and joins the answers."""
    local, remote = InProcessClient(), MemoryClient(services[3].address, ALICE)
    for c in (local, remote):
        keys, _ = fill(c, "many", 512, seed=3, kv_heads=1, head_dim=8, chunk_size=1)
    queries = torch.randn(2, 4200, 8, 8)
    assert 2 * 4200 * 8 * 64 * wire.SEARCH_ENTRY_BYTES > wire.MAX_MESSAGE_BYTES
    a, b = (c.search(["many", "many"], queries, 64) for c in (local, remote))
    assert b.valid.all() and b.keys.shape == (2, 4200, 8, 64, 8)
    assert torch.equal(b.keys, keys[:, 0].half()[b.chunk_ids])  # each query's own chunks
    torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-4)
    # ranks of near-equal scores may swap between 3 shards and 1
    assert (a.chunk_ids == b.chunk_ids).float().mean() > 0.999
    remote.delete_bank("many")
    remote.close()


def test_search_stream_reassembles_across_many_parts():
    U, csz, D = 37, 4, 8
    result = CompactResult(
        scores=torch.randn(1, 2, 3, 5),
        chunk_ids=torch.randint(0, 9, (1, 2, 3, 5)),
        slots=torch.randint(0, U, (1, 2, 3, 5)),
        table_keys=torch.randn(U, csz, D).half(),
        table_values=torch.randn(U, csz, D).half(),
    )
    messages = list(search_messages(result, part_bytes=300))  # 2 rows per part
    assert len(messages) == 19
    back = read_search_stream(iter(messages))
    for f in ("scores", "chunk_ids", "slots", "table_keys", "table_values"):
        assert torch.equal(getattr(back, f), getattr(result, f))


def test_delete_document_and_int8_over_grpc_equal_in_process(services):
    """Documents are forgotten through the service as in process, on an int8 bank; the
    same refusals on both clients."""
    local = InProcessClient(n_shards=3)
    remote = MemoryClient(services[3].address, ALICE)
    g = torch.Generator().manual_seed(11)
    parts = [(torch.randn(n, 3, 64, generator=g), d) for n, d in [(6, "a"), (10, "b"), (7, "a")]]
    queries = torch.randn(1, 16, 9, 64, generator=g)
    deleted, found = [], []
    for c in (local, remote):
        c.create_bank("docs", kv_heads=3, head_dim=64, dtype="int8")
        for keys, doc in parts:
            c.append("docs", keys, -keys, document=doc)
        before = c.search(["docs"], queries, top_k=8)
        deleted.append(c.delete_document("docs", "a"))
        found.append(c.search(["docs"], queries, top_k=8))
        hit = set(before.chunk_ids[before.valid].tolist()) & {0, 1, 4}  # chunks with "a"
        assert hit and not set(found[-1].chunk_ids[found[-1].valid].tolist()) & {0, 1, 4}
        assert c.describe_bank("docs").deleted_chunks == 3
        for call, error in (
            (lambda c=c: c.delete_document("docs", ""), InvalidArgument),
            (lambda c=c: c.delete_document("docs", "x" * 2000), InvalidArgument),
            (lambda c=c: c.delete_document("nope", "a"), NotFound),
        ):
            with pytest.raises(error):
                call()
    assert deleted[0] == deleted[1] and deleted[0].deleted_chunks == 3
    assert_same(*found)
    with pytest.raises(PermissionDenied):
        MemoryClient(services[3].address, READER).delete_document("docs", "b")
    remote.delete_bank("docs")
    remote.close()


def test_tenant_isolation(services):
    alice = MemoryClient(services[1].address, ALICE)
    bob = MemoryClient(services[1].address, BOB)
    fill(alice, "secret", 100, seed=3)
    assert [b.name for b in bob.list_banks()] == []
    for call in (
        lambda: bob.describe_bank("secret"),
        lambda: bob.search(["secret"], torch.randn(1, 1, 3, 64), 4),
        lambda: bob.append("secret", torch.randn(4, 3, 64), torch.randn(4, 3, 64)),
        lambda: bob.reset_bank("secret"),
        lambda: bob.delete_bank("secret"),
    ):
        with pytest.raises(NotFound, match="bank 'secret' not found"):
            call()
    # bob's own 'secret' is another bank; alice's is untouched by anything bob does
    bob.create_bank("secret", kv_heads=1, head_dim=8)
    bob.append("secret", torch.randn(8, 1, 8), torch.randn(8, 1, 8))
    assert alice.describe_bank("secret").size_tokens == 100
    assert alice.describe_bank("secret").spec.kv_heads == 3
    bob.delete_bank("secret")
    assert alice.describe_bank("secret").size_tokens == 100
    alice.delete_bank("secret")
    alice.close(), bob.close()


def test_workers_find_the_service_through_the_coordinator(services):
    from memory_service.service import find_service

    assert find_service("test-3") == services[3].address
    with pytest.raises(Unavailable, match="no longmem memory service 'nope'"):
        find_service("nope")


def test_every_shard_endpoint_serves_the_api(services):
    """With shard endpoints, each shard's node answers like the front door (same auth)."""
    front = MemoryClient(services[3].address, ALICE)
    keys, _ = fill(front, "everywhere", 777, seed=4)
    queries = torch.randn(1, 9, 9, 64)
    expected = front.search(["everywhere"], queries, 8)
    shard_map = front.shard_map()
    assert [s.index for s in shard_map] == [0, 1, 2]
    endpoints = {s.endpoint for s in shard_map}
    assert len(endpoints) == 3 and services[3].address not in endpoints
    for address in endpoints:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        via_shard = MemoryClient(address, ALICE)
        assert_same(expected, via_shard.search(["everywhere"], queries, 8))
        with pytest.raises(NotFound):
            MemoryClient(address, BOB).describe_bank("everywhere")
        via_shard.close()
    via_shard = MemoryClient(min(endpoints), ALICE)
    via_shard.append("everywhere", keys[:3], keys[:3])  # writes go through the catalog too
    assert front.describe_bank("everywhere").size_tokens == 780
    via_shard.close()
    front.delete_bank("everywhere")
    front.close()


def test_health_and_reflection(services):
    channel = grpc.insecure_channel(services[1].address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "longmem.v1.MemoryService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = {
        s.name
        for r in stub.ServerReflectionInfo(iter([request]), timeout=10)
        for s in r.list_services_response.service
    }
    assert {"longmem.v1.MemoryService", "grpc.health.v1.Health"} <= names
    channel.close()

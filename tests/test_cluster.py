"""The service on a several-node Ray cluster (`ray.cluster_utils.Cluster`, one machine):
shards spread over nodes, a node lost mid-run, its shard back from its snapshot (without a
log: what came after the snapshot is lost) or from its snapshot and write-ahead log."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from memory_service.bank import BankSpec
from memory_service.client import InProcessClient, MemoryClient
from memory_service.errors import Unavailable
from memory_service.search import CompactResult, sharded_search
from memory_service.shard import Shard

SHARDS, TOKENS, LATE = 3, 300, 30  # chunk size 1: every token is a chunk


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING")
    yield c, workers
    ray.shutdown()
    c.shutdown()


def reference(keys: torch.Tensor, queries: torch.Tensor, exclude: set[int], top_k: int):
    """Brute-force top-k chunk ids (chunk size 1) over the chunks not in `exclude`."""
    scores = queries[0].float() @ keys[:, 0].half().float().T  # (n, Hq, C)
    if exclude:
        scores[..., sorted(exclude)] = -torch.inf
    return scores.topk(top_k, -1).indices


def test_node_loss_restores_the_shard_from_its_snapshot(cluster, tmp_path):
    from memory_service.service import start_service

    c, workers = cluster
    service = start_service(
        shards=SHARDS, snapshot_dir=str(tmp_path), snapshot_every_s=0, durability="none"
    )
    client = MemoryClient(service.address, retries=0)
    try:
        shard_map = client.shard_map()
        nodes = {s.node_id for s in shard_map}
        assert len(nodes) == SHARDS, f"spread placement put shards on {len(nodes)} nodes"

        g = torch.Generator().manual_seed(0)
        keys = torch.randn(TOKENS + LATE, 1, 16, generator=g)
        values = torch.randn(TOKENS + LATE, 1, 16, generator=g)
        client.create_bank("b", kv_heads=1, head_dim=16, chunk_size=1, capacity_tokens=4096)
        client.append("b", keys[:TOKENS], values[:TOKENS])
        client.snapshot()
        client.append("b", keys[TOKENS:], values[TOKENS:])  # after the snapshot

        # the cluster answers exactly as one process does
        local = InProcessClient()
        local.create_bank("b", kv_heads=1, head_dim=16, chunk_size=1, capacity_tokens=4096)
        local.append("b", keys, values)
        queries = torch.randn(1, 8, 2, 16, generator=g)
        a, b = local.search(["b"], queries, 8), client.search(["b"], queries, 8)
        assert torch.equal(a.chunk_ids, b.chunk_ids) and torch.equal(a.keys, b.keys)

        head = ray.get_runtime_context().get_node_id()
        victim = next(s for s in shard_map if s.node_id != head)
        node = next(w for w in workers if w.node_id == victim.node_id)
        lost = {i for i in range(TOKENS, TOKENS + LATE) if i % SHARDS == victim.index}
        full = reference(keys, queries, set(), 8)
        after = reference(keys, queries, lost, 8)

        outcomes: list[str] = []
        stop = threading.Event()

        def search_throughout() -> None:
            searcher = MemoryClient(service.address, retries=0)
            deadline = time.monotonic() + 90
            while not stop.is_set() and time.monotonic() < deadline and len(outcomes) < 2000:
                try:
                    r = searcher.search(["b"], queries, 8)
                except Unavailable:
                    outcomes.append("UNAVAILABLE")
                    continue
                ids = r.chunk_ids[0]
                right = torch.equal(ids, full) or torch.equal(ids, after)
                right &= torch.equal(r.keys[0], keys[ids, 0].half())  # (n, Hq, k, D)
                outcomes.append("OK" if right else f"WRONG {ids.tolist()}")
                time.sleep(0.05)
            searcher.close()

        thread = threading.Thread(target=search_throughout)
        thread.start()
        time.sleep(1.0)
        c.remove_node(node)

        deadline = time.monotonic() + 60  # the shard restarts on a surviving node
        info = None
        while time.monotonic() < deadline:
            try:
                shard = client.shard_map()[victim.index]
                if shard.available and shard.restored_from_snapshot:
                    info = client.describe_bank("b")
                    break
            except Unavailable:
                pass
            time.sleep(0.5)
        restored_at = len(outcomes)  # searches succeed again once the health check sees it
        while time.monotonic() < deadline + 30 and "OK" not in outcomes[restored_at:]:
            time.sleep(0.2)
        stop.set()
        thread.join(timeout=30)

        assert info is not None, "the shard did not come back within 60 s"
        assert shard.node_id != victim.node_id
        assert info.lost_chunks == len(lost) and info.chunks == TOKENS + LATE - len(lost)
        assert outcomes and set(outcomes) <= {"OK", "UNAVAILABLE"}, set(outcomes)
        assert "OK" in outcomes[restored_at:], "no search succeeded after the restart"
        r = client.search(["b"], queries, 8)  # lost chunks are never served
        assert torch.equal(r.chunk_ids[0], after)
    finally:
        client.close()
        service.stop()


def test_node_loss_with_a_log_loses_nothing_acknowledged(cluster, tmp_path):
    """Durability `group` (the default): the shard of a removed node comes back on another
    node with everything acknowledged, replayed from its log after the snapshot."""
    from memory_service.service import start_service

    c, _ = cluster
    extra = c.add_node(num_cpus=1)  # the first test removed a node
    c.wait_for_nodes()
    service = start_service(shards=2, snapshot_dir=str(tmp_path), name="logged")
    client = MemoryClient(service.address, retries=0)
    try:
        g = torch.Generator().manual_seed(1)
        keys = torch.randn(TOKENS + LATE, 1, 16, generator=g)
        client.create_bank("b", kv_heads=1, head_dim=16, chunk_size=1, capacity_tokens=4096)
        client.append("b", keys[:TOKENS], keys[:TOKENS])
        client.snapshot()
        for part in keys[TOKENS:].split(7):  # after the snapshot: only in the logs
            client.append("b", part, part)
        queries = torch.randn(1, 8, 2, 16, generator=g)
        full = reference(keys, queries, set(), 8)
        head = ray.get_runtime_context().get_node_id()
        shard_map = client.shard_map()
        victim = next((s for s in shard_map if s.node_id == extra.node_id), None)
        victim = victim or next(s for s in shard_map if s.node_id != head)
        node = next(n for n in c.list_all_nodes() if n.node_id == victim.node_id)
        c.remove_node(node)

        deadline = time.monotonic() + 60
        info = None
        while time.monotonic() < deadline and info is None:
            try:
                shard = client.shard_map()[victim.index]
                if shard.available and shard.restored_from_snapshot:
                    info = client.describe_bank("b")
            except Unavailable:
                pass
            time.sleep(0.5)
        assert info is not None, "the shard did not come back within 60 s"
        assert shard.node_id != victim.node_id
        assert info.lost_chunks == 0 and info.chunks == TOKENS + LATE
        deadline = time.monotonic() + 30  # until the health check sees the shard back
        while True:
            try:
                r = client.search(["b"], queries, 8)
                break
            except Unavailable:
                assert time.monotonic() < deadline, "searches still fail 30 s after the restart"
                time.sleep(0.2)
        assert torch.equal(r.chunk_ids[0], full)
        assert torch.equal(r.keys[0], keys[full, 0].half())
    finally:
        client.close()
        service.stop()


def test_partial_answer_leaves_out_the_missing_shard():
    """With allow_partial, a shard that does not answer is named, the rest still merge."""
    spec = BankSpec(kv_heads=1, head_dim=8, chunk_size=1)
    shards = [Shard(i, 3) for i in range(3)]
    keys = torch.randn(30, 1, 1, 8)
    for s, shard in enumerate(shards):
        ids = torch.arange(s, 30, 3)
        shard.add("k", spec, ids, keys[ids].half(), keys[ids].half(), 0)

    def call(method, args, partial=False):
        if 1 in args and not partial:
            raise Unavailable("shard 1 is unavailable")
        return {s: getattr(shards[s], method)(*a) for s, a in args.items() if s != 1}

    queries = torch.randn(1, 4, 1, 8)
    with pytest.raises(Unavailable):
        sharded_search(call, 3, ["k"], [(0, 30)], spec, queries, 5)
    result: CompactResult = sharded_search(call, 3, ["k"], [(0, 30)], spec, queries, 5, True)
    assert result.missing_shards == (1,)
    assert not bool((result.chunk_ids % 3 == 1).any())
    scores = queries[0, :, 0] @ keys[:, 0, 0].half().float().T  # (4, 30)
    scores[:, 1::3] = -torch.inf
    assert torch.equal(result.chunk_ids[0, :, 0], scores.topk(5, -1).indices)

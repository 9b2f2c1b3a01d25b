"""The bank on its own: no Ray, no gRPC. Exact search against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from memory_service import bank
from memory_service.bank import BankSpec, Chunker, ChunkStore
from memory_service.client import InProcessClient
from memory_service.errors import AlreadyExists, InvalidArgument, NotFound


def brute_force(keys: torch.Tensor, queries: torch.Tensor, chunk_size: int, dtype, top_k: int):
    """Reference: chunk means of the stored keys, inner product, top-k per (query, head).

    keys (T, H, D) as appended (T a multiple of chunk_size); queries (n, Hq, D).
    Returns scores and chunk ids (n, Hq, k).
    """
    T, H, D = keys.shape
    stored = keys.to(dtype).float()
    means = stored.view(T // chunk_size, chunk_size, H, D).mean(1)  # (C, H, D)
    g = queries.shape[1] // H
    per_q_head = means.repeat_interleave(g, dim=1)  # (C, Hq, D)
    scores = torch.einsum("nhd,chd->nhc", queries.float(), per_q_head)
    k = min(top_k, scores.shape[-1])
    top = scores.topk(k, dim=-1)
    return top.values, top.indices


def kv(T: int, H: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)


@pytest.mark.parametrize(
    "H,Hq,D,csz,dtype,shards",
    [
        (1, 1, 16, 4, "float32", 1),
        (3, 9, 64, 4, "float16", 1),  # SmolLM2's grouped-query shape
        (2, 8, 32, 2, "bfloat16", 3),
        (4, 4, 64, 8, "float16", 2),
    ],
)
def test_exact_search_equals_brute_force(H, Hq, D, csz, dtype, shards):
    client = InProcessClient(n_shards=shards)
    client.create_bank(
        "b", kv_heads=H, head_dim=D, chunk_size=csz, capacity_tokens=1 << 16, dtype=dtype
    )
    keys, values = kv(csz * 300, H, D)
    for part in torch.split(torch.arange(keys.shape[0]), 173):  # several appends
        client.append("b", keys[part], values[part])
    queries = torch.randn(37, Hq, D)
    r = client.search(["b"], queries[None], top_k=16)
    ref_scores, ref_ids = brute_force(keys, queries, csz, getattr(torch, dtype), 16)
    assert torch.equal(r.chunk_ids[0], ref_ids)
    torch.testing.assert_close(r.scores[0], ref_scores, rtol=1e-5, atol=1e-4)
    # unrolled keys/values are exactly the stored chunks, for the right kv head
    stored_k = keys.to(getattr(torch, dtype)).view(-1, csz, H, D)
    stored_v = values.to(getattr(torch, dtype)).view(-1, csz, H, D)
    for qh in (0, Hq - 1):
        h = qh // (Hq // H)
        expect_k = stored_k[ref_ids[:, qh], :, h].reshape(37, 16 * csz, D)
        expect_v = stored_v[ref_ids[:, qh], :, h].reshape(37, 16 * csz, D)
        assert torch.equal(r.keys[0, :, qh], expect_k)
        assert torch.equal(r.values[0, :, qh], expect_v)
    assert r.valid.all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "spec",
    [
        {"dtype": "float16"},
        {"dtype": "int8", "eviction": "lra"},
        {"dtype": "int4", "index": "ivf_pq", "nlist": 16, "nprobe": 4},  # a CPU index
        {"dtype": "int8", "search_dtype": "float16"},
    ],
)
def test_cuda_bank_finds_and_returns_what_the_cpu_bank_does(spec):
    """A bank on a GPU shard (exact scan or IVF-PQ, quantized storage, float16 search keys,
    FIFO or LRA eviction past its capacity) answers as the same bank on the CPU: the same
    chunk ids, the same scores and pairs within float rounding. (IVF-flat may be faiss'
    GPU index there, trained apart: `test_approximate_index_serves_live_chunks_...`.)"""
    keys, values = kv(4 * 5000, 3, 64)
    queries = torch.randn(1, 64, 9, 64)
    found = []
    for device in ("cpu", "cuda"):
        client = InProcessClient(n_shards=2, device=device)
        client.create_bank(
            "b", kv_heads=3, head_dim=64, chunk_size=4, capacity_tokens=1 << 14, **spec
        )
        for part in torch.split(torch.arange(keys.shape[0]), 3001):
            client.append("b", keys[part], values[part])
            client.search(["b"], queries[:, :4], top_k=16)  # LRA: retrievals decide survivors
        found.append(client.search(["b"], queries, top_k=16))
    cpu, gpu = found
    assert (cpu.chunk_ids == gpu.chunk_ids).float().mean() > 0.999  # ties may order apart
    torch.testing.assert_close(gpu.scores, cpu.scores, rtol=1e-4, atol=1e-3)
    same = (cpu.chunk_ids == gpu.chunk_ids)[..., None, None]
    for a, b in ((cpu.keys, gpu.keys), (cpu.values, gpu.values)):
        a, b = a.view(*cpu.chunk_ids.shape, 4, 64), b.view(*cpu.chunk_ids.shape, 4, 64)
        torch.testing.assert_close(
            (b.cpu().float() * same), (a.float() * same), rtol=1e-3, atol=1e-3
        )


def test_one_and_three_shards_identical():
    results = []
    for shards in (1, 3):
        client = InProcessClient(n_shards=shards)
        client.create_bank("b", kv_heads=3, head_dim=64, capacity_tokens=2048)
        keys, values = kv(3001, 3, 64, seed=1)  # wraps the capacity: eviction on every shard
        client.append("b", keys, values)
        results.append(
            client.search(
                ["b"], torch.randn(1, 20, 9, 64, generator=torch.Generator().manual_seed(2)), 16
            )
        )
    a, b = results
    assert torch.equal(a.chunk_ids, b.chunk_ids)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    torch.testing.assert_close(a.scores, b.scores)


def test_partial_chunks_across_appends():
    client = InProcessClient()
    client.create_bank("b", kv_heads=2, head_dim=8, chunk_size=4)
    keys, values = kv(10, 2, 8)
    assert client.append("b", keys[:3], values[:3]).pending_tokens == 3
    assert client.describe_bank("b").chunks == 0  # nothing searchable yet
    info = client.append("b", keys[3:10], values[3:10])
    assert (info.appended_chunks, info.pending_tokens) == (2, 2)
    r = client.search(["b"], torch.randn(1, 5, 2, 8), top_k=4)
    # two chunks, each found once per (query, head); tokens 8, 9 wait for the next append
    assert r.valid[..., :2].all() and not r.valid[..., 2:].any()
    assert sorted(r.chunk_ids[0, 0, 0, :2].tolist()) == [0, 1]
    chunk1 = r.chunk_ids[0, 0, 0, :2].tolist().index(1)
    got = r.keys[0, 0, 0, chunk1 * 4 : chunk1 * 4 + 4]
    assert torch.equal(got, keys[4:8, 0].half())
    client.append("b", keys[:2], values[:2])  # completes chunk 2 from pending 8, 9 + two more
    r = client.search(["b"], torch.randn(1, 1, 2, 8), top_k=4)
    c2 = r.chunk_ids[0, 0, 0].tolist().index(2)
    expect = torch.cat([keys[8:10, 0], keys[:2, 0]]).half()
    assert torch.equal(r.keys[0, 0, 0, c2 * 4 : c2 * 4 + 4], expect)


def test_fewer_chunks_than_top_k_masks_the_rest():
    client = InProcessClient(n_shards=2)
    client.create_bank("b", kv_heads=1, head_dim=4, chunk_size=2)
    keys, values = kv(6, 1, 4)
    client.append("b", keys, values)
    r = client.search(["b"], torch.randn(1, 3, 2, 4), top_k=5)
    assert r.valid.sum(-1).eq(3).all()  # the three chunks there are, first
    assert r.valid[..., :3].all()
    assert (r.chunk_ids[~r.valid] == -1).all()
    assert torch.isinf(r.scores[~r.valid]).all()
    mask = r.token_mask()
    assert mask.shape == (1, 3, 2, 10) and mask[..., :6].all() and not mask[..., 6:].any()
    assert (r.keys[..., 6:, :] == 0).all()


def test_empty_bank_returns_all_invalid():
    client = InProcessClient()
    client.create_bank("b", kv_heads=1, head_dim=4)
    r = client.search(["b"], torch.randn(1, 2, 1, 4), top_k=3)
    assert not r.valid.any() and r.keys.shape == (1, 2, 1, 12, 4)


def test_fifo_eviction_keeps_the_newest_chunks():
    client = InProcessClient(n_shards=3)
    client.create_bank("b", kv_heads=1, head_dim=4, chunk_size=2, capacity_tokens=10)  # 5 chunks
    keys, values = kv(2 * 12, 1, 4)
    for i in range(12):  # one chunk per append
        client.append("b", keys[2 * i : 2 * i + 2], values[2 * i : 2 * i + 2])
        info = client.describe_bank("b")
        assert info.chunks == min(i + 1, 5)
        assert info.evicted_chunks == max(0, i + 1 - 5)
        r = client.search(["b"], torch.randn(1, 1, 1, 4), top_k=8)
        live = sorted(r.chunk_ids[r.valid].tolist())
        assert live == list(range(max(0, i + 1 - 5), i + 1))  # oldest out first


def test_append_larger_than_capacity_keeps_its_tail():
    client = InProcessClient(n_shards=2)
    client.create_bank("b", kv_heads=1, head_dim=4, chunk_size=2, capacity_tokens=8)
    keys, values = kv(40, 1, 4)
    client.append("b", keys, values)
    r = client.search(["b"], torch.randn(1, 1, 1, 4), top_k=8)
    assert sorted(r.chunk_ids[r.valid].tolist()) == [16, 17, 18, 19]


def test_one_search_serves_several_banks():
    client = InProcessClient(n_shards=2)
    refs = []
    for b in range(3):
        client.create_bank(f"s{b}", kv_heads=2, head_dim=16)
        keys, values = kv(40 + 8 * b, 2, 16, seed=b)
        client.append(f"s{b}", keys, values)
        refs.append(keys)
    queries = torch.randn(3, 6, 4, 16)
    r = client.search(["s0", "s1", "s2"], queries, top_k=4)
    for b in range(3):
        _, ids = brute_force(refs[b], queries[b], 4, torch.float16, 4)
        assert torch.equal(r.chunk_ids[b], ids)


def test_reset_and_delete():
    client = InProcessClient()
    client.create_bank("b", kv_heads=1, head_dim=4)
    with pytest.raises(AlreadyExists):
        client.create_bank("b", kv_heads=1, head_dim=4)
    client.append("b", *kv(9, 1, 4))
    assert client.reset_bank("b").chunks == 0
    assert client.describe_bank("b").pending_tokens == 0
    client.delete_bank("b")
    with pytest.raises(NotFound):
        client.describe_bank("b")
    assert client.list_banks() == []


@pytest.mark.parametrize(
    "spec",
    [
        dict(kv_heads=0, head_dim=4),
        dict(kv_heads=1, head_dim=-1),
        dict(kv_heads=1, head_dim=4, chunk_size=8, capacity_tokens=4),
        dict(kv_heads=1, head_dim=4, dtype="int2"),
        dict(kv_heads=1, head_dim=5, dtype="int4"),  # two codes per byte: head_dim even
        dict(kv_heads=1, head_dim=4, index="annoy"),
        dict(kv_heads=1, head_dim=6, index="ivf_pq", m=4),
        dict(kv_heads=1, head_dim=4, nlist=8, nprobe=9),
        dict(kv_heads=1, head_dim=4, index="hnsw", m=300),
        dict(kv_heads=1, head_dim=4, eviction="lru"),
    ],
)
def test_bad_specs_are_refused(spec):
    with pytest.raises(InvalidArgument):
        BankSpec(**spec)


def test_search_in_blocks_equals_one_block(monkeypatch):
    """A search cut into many blocks of query rows and slots (as in a bank of millions of
    chunks) finds what one block finds, deleted chunks included."""
    client = InProcessClient()
    client.create_bank("b", kv_heads=2, head_dim=8, chunk_size=2, capacity_tokens=600)
    keys, values = kv(700, 2, 8)  # wraps: the oldest chunks are evicted
    client.append("b", keys[:300], values[:300], document="gone")
    client.append("b", keys[300:], values[300:])
    client.delete_document("b", "gone")  # 150 chunks: 50 still in the live range
    queries = torch.randn(1, 13, 4, 8)
    whole = client.search(["b"], queries, 16)
    monkeypatch.setattr(bank, "SEARCH_MIN_SLOTS", 8)
    monkeypatch.setitem(bank.SEARCH_BLOCKS, "cpu", (2 * 5 * 8, 32))  # 5 rows x 8 slots a block
    blocks = client.search(["b"], queries, 16)
    assert torch.equal(blocks.chunk_ids, whole.chunk_ids) and whole.valid.all()
    torch.testing.assert_close(blocks.scores, whole.scores, rtol=1e-6, atol=1e-6)  # BLAS order
    assert int(whole.chunk_ids.min()) >= 150  # neither evicted (< 50) nor deleted (< 150)


def test_chunk_store_slots_never_collide():
    """Ring-buffer slots stay consistent across many wraps with several shards."""
    spec = BankSpec(kv_heads=1, head_dim=2, chunk_size=1, capacity_tokens=7)
    chunker = Chunker(spec)
    stores = [ChunkStore(spec, s, 3) for s in range(3)]
    for step in range(50):
        first, k, v, _ = chunker.push(torch.full((1, 1, 2), float(step)), torch.zeros(1, 1, 2))
        for s, store in enumerate(stores):
            ids = torch.arange(first, first + 1)
            mine = ids % 3 == s
            store.add(ids[mine], k[mine], v[mine], chunker.oldest_live_id)
        live = sorted(i for st in stores for i in st.ids[st.live].tolist())
        assert live == list(range(max(0, step + 1 - 7), step + 1))
        for st in stores:  # each live chunk holds its own keys
            for i in st.ids[st.live].tolist():
                slot = (i // 3) % st.slots
                assert float(st.keys[0, slot, 0, 0]) == float(i)


def test_in_process_snapshot_restores_and_shard_map(tmp_path):
    client = InProcessClient(n_shards=2, snapshot_dir=str(tmp_path))
    keys, values = kv(42, 2, 8)
    client.create_bank("b", kv_heads=2, head_dim=8, chunk_size=4)
    client.append("b", keys, values)
    saved = client.snapshot()
    assert [(s.shard, s.banks) for s in saved] == [(0, 1), (1, 1)]
    assert [(s.index, s.available, s.device, s.banks) for s in client.shard_map()] == [
        (0, True, "cpu", 1),
        (1, True, "cpu", 1),
    ]
    queries = torch.randn(1, 3, 4, 8)
    restored = InProcessClient(n_shards=2, snapshot_dir=str(tmp_path))
    before, after = client.describe_bank("b"), restored.describe_bank("b")
    assert after == before and after.lost_chunks == 0 and after.pending_tokens == 2
    a, b = client.search(["b"], queries, 4), restored.search(["b"], queries, 4)
    assert torch.equal(a.chunk_ids, b.chunk_ids) and torch.equal(a.keys, b.keys)
    with pytest.raises(InvalidArgument, match="without --snapshot-dir"):
        InProcessClient().snapshot()

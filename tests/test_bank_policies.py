"""Bank storage, retention and search policies, in process: int8 and int4 storage,
forgetting documents, least-recently-retrieved eviction, approximate indexes."""

from __future__ import annotations

import pytest
import torch

from memory_service.bank import (
    BankSpec,
    ChunkStore,
    DeleteInfo,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from memory_service.client import InProcessClient
from memory_service.engine import MemoryEngine
from memory_service.errors import InvalidArgument, NotFound
from memory_service.tenancy import Tenant

H, HQ, D, CSZ = 3, 9, 64, 4  # SmolLM2's grouped-query shape
QUANTIZED = {"int8": 8, "int4": 4}  # bank dtype: bits


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values with a different magnitude per head, exactly representable in float16."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.1, 1.0, 30.0]).view(1, H, 1)
    keys = (torch.randn(tokens, H, D, generator=g) * scale).half().float()
    values = (torch.randn(tokens, H, D, generator=g) * scale).half().float()
    return keys, values


def bound(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented error bound of `bits`-bit storage, per element of chunks
    `(C, csz, H, D)`: half of the (chunk, head) scale `absmax / (2**(bits - 1) - 1)`
    (127 for int8, 7 for int4), and float32 rounding."""
    return (x.abs().amax(dim=(1, 3), keepdim=True) / (2 ** (bits - 1) - 1) / 2).expand_as(x)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trip_within_half_a_scale(bits):
    """`|x - dequantize(quantize(x))| <= scale / 2` per element, `scale = absmax / L` per
    (chunk, head), L = 127 (int8) or 7 (int4); int4 codes are packed two per byte."""
    x = torch.randn(4, 50, CSZ, D) * torch.logspace(-3, 3, 50).view(1, 50, 1, 1)
    x[0, 0] = 0  # an all-zero chunk has scale 0 and comes back exact
    codes, scale = quantize(x, bits)
    assert scale.shape == (4, 50)
    stored = (torch.int8, D) if bits == 8 else (torch.uint8, D // 2)  # int4: two per byte
    assert (codes.dtype, codes.shape[-1]) == stored
    torch.testing.assert_close(scale, x.abs().amax(dim=(2, 3)) / (2 ** (bits - 1) - 1))
    err = (dequantize(codes, scale, bits) - x).abs()
    assert bool((err <= scale[..., None, None] / 2 * (1 + 1e-4)).all())
    assert float(err[0, 0].max()) == 0.0


def test_int4_packing_is_exact_for_every_level():
    codes = torch.arange(-7, 8, dtype=torch.int8).repeat(2)[:-2].view(2, 14)  # (2, 14)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 7)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("dtype", sorted(QUANTIZED))
@pytest.mark.parametrize("shards", [1, 3])
def test_quantized_bank_retrieves_within_the_bound_and_ranks_like_float16(dtype, shards):
    keys, values = kv(CSZ * 120 + 3)
    results = {}
    for kind in ("float16", dtype):
        client = InProcessClient(n_shards=shards)
        client.create_bank("b", kv_heads=H, head_dim=D, chunk_size=CSZ, dtype=kind)
        for part in torch.split(torch.arange(keys.shape[0]), 97):
            client.append("b", keys[part], values[part])
        queries = torch.randn(1, 8, HQ, D, generator=torch.Generator().manual_seed(1))
        results[kind] = client.search(["b"], queries, top_k=120)  # every chunk
    f16, q8 = results["float16"], results[dtype]
    assert torch.equal(q8.chunk_ids, f16.chunk_ids)  # search keys are the same float32 means
    torch.testing.assert_close(q8.scores, f16.scores, rtol=0, atol=0)
    assert q8.keys.dtype == torch.float32 and q8.valid.all()
    # every retrieved chunk is within half a scale of what was appended
    n = 120 * CSZ
    stored = {"keys": keys[:n], "values": values[:n]}
    for name, x in stored.items():
        chunks = x.view(120, CSZ, H, D)
        limit = bound(chunks, QUANTIZED[dtype])
        got = getattr(q8, name)[0].view(8, HQ, 120, CSZ, D)
        for qh in (0, 4, 8):
            h = qh // (HQ // H)
            ids = q8.chunk_ids[0, :, qh]  # (8, 120)
            err = (got[:, qh] - chunks[ids, :, h]).abs()
            assert bool((err <= limit[ids, :, h] * (1 + 1e-4)).all()), (name, qh)


@pytest.mark.parametrize("dtype, per_token", [("int8", 582), ("int4", 390)])
def test_quantized_size_and_snapshot(tmp_path, dtype, per_token):
    """Bytes per token: codes, float32 means and two float32 scales per (chunk, head)."""
    spec = BankSpec(kv_heads=H, head_dim=D, chunk_size=CSZ, dtype=dtype)
    bits = QUANTIZED[dtype]
    assert spec.bytes_per_token == H * (D * (2 * CSZ * bits / 8 + 4) + 8) / CSZ == per_token
    client = InProcessClient(n_shards=2, snapshot_dir=str(tmp_path))
    client.create_bank("b", kv_heads=H, head_dim=D, chunk_size=CSZ, dtype=dtype)
    keys, values = kv(CSZ * 40)
    client.append("b", keys, values)
    assert client.describe_bank("b").bytes == 40 * per_token * CSZ  # float16: 960
    client.snapshot()
    restored = InProcessClient(n_shards=2, snapshot_dir=str(tmp_path))
    queries = torch.randn(1, 5, HQ, D)
    a, b = client.search(["b"], queries, 8), restored.search(["b"], queries, 8)
    assert torch.equal(a.chunk_ids, b.chunk_ids) and torch.equal(a.values, b.values)


def test_float16_search_keys_halve_the_means_and_rank_within_their_rounding(tmp_path):
    """`search_dtype: float16` stores the chunk means in half precision (96 B per token
    fewer at SmolLM2's shape): an int8 bank then takes 486 B per token; its scores are
    the float32 bank's within float16 rounding of the means, the top chunks nearly the
    same, every retrieved pair exactly as in the float32-means bank; snapshots keep it,
    the wire carries it and an unknown search dtype is refused."""
    spec = BankSpec(kv_heads=H, head_dim=D, chunk_size=CSZ, dtype="int8", search_dtype="float16")
    assert spec.bytes_per_token == H * (D * (2 * CSZ + 2) + 8) / CSZ == 486
    keys, values = kv(CSZ * 2000)
    queries = torch.randn(1, 16, HQ, D, generator=torch.Generator().manual_seed(1))
    found = {}
    for search_dtype in ("float32", "float16"):
        client = InProcessClient(n_shards=2, snapshot_dir=str(tmp_path / search_dtype))
        client.create_bank("b", kv_heads=H, head_dim=D, chunk_size=CSZ, dtype="int8",
                           search_dtype=search_dtype)
        client.append("b", keys, values)
        found[search_dtype] = client.search(["b"], queries, top_k=16)
        per_token = 582 if search_dtype == "float32" else 486
        assert client.describe_bank("b").bytes == 2000 * CSZ * per_token
        client.snapshot()
        again = InProcessClient(n_shards=2, snapshot_dir=str(tmp_path / search_dtype))
        assert torch.equal(again.search(["b"], queries, 16).chunk_ids,
                           found[search_dtype].chunk_ids)
    f32, f16 = found["float32"], found["float16"]
    match = f16.chunk_ids == f32.chunk_ids  # near-ties may swap places
    assert match.float().mean() > 0.9
    torch.testing.assert_close(f16.scores[match], f32.scores[match], rtol=1e-3, atol=1e-2)
    same = match[..., None, None]
    shape = (*f32.chunk_ids.shape, CSZ, D)
    assert torch.equal(f16.keys.view(shape) * same, f32.keys.view(shape) * same)
    from memory_service.wire import spec_from_wire, spec_to_wire

    assert spec_from_wire(spec_to_wire(spec)) == spec
    with pytest.raises(InvalidArgument, match="search_dtype must be one of"):
        BankSpec(kv_heads=H, head_dim=D, search_dtype="int8")


@pytest.mark.parametrize("dtype", sorted(QUANTIZED))
def test_quantized_spec_travels_on_the_wire(dtype):
    from memory_service.wire import spec_from_wire, spec_to_wire

    spec = BankSpec(kv_heads=H, head_dim=D, dtype=dtype)
    assert spec_from_wire(spec_to_wire(spec)) == spec


def test_int4_over_grpc_equals_in_process():
    """An int4 bank through a gRPC server (in process, no Ray) answers as in process; an
    odd head_dim is refused at creation."""
    from memory_service.client import MemoryClient
    from memory_service.server import start_server
    from memory_service.tenancy import TenantTable

    server, address = start_server(MemoryEngine.local(2), TenantTable([Tenant("t", ("k",))]))
    remote, local = MemoryClient(address, "k"), InProcessClient(n_shards=2)
    keys, values = kv(CSZ * 50 + 1)
    queries = torch.randn(1, 6, HQ, D)
    try:
        found = []
        for c in (remote, local):
            c.create_bank("b", kv_heads=H, head_dim=D, chunk_size=CSZ, dtype="int4")
            c.append("b", keys, values, document="d")
            assert c.describe_bank("b").bytes == 50 * 390 * CSZ + 50 * 4 * CSZ  # and tags
            found.append(c.search(["b"], queries, 8))
            with pytest.raises(InvalidArgument, match="head_dim, which must be even; got 63"):
                c.create_bank("odd", kv_heads=H, head_dim=63, dtype="int4")
        assert torch.equal(found[0].chunk_ids, found[1].chunk_ids)
        assert torch.equal(found[0].keys, found[1].keys) and found[0].keys.dtype == torch.float32
        assert remote.delete_document("b", "d").deleted_chunks == 50
    finally:
        remote.close()
        server.stop(None)


# ------------------------------------------------------------------ forgetting documents


def small(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 2, 8, generator=g), torch.randn(tokens, 2, 8, generator=g)


def fill_documents(append) -> None:
    """Chunks of 4: 0 = aaaa, 1 = aabb, 2 = bbbb, 3-4 no document; pending: aa."""
    for seed, (n, doc) in enumerate([(6, "a"), (6, "b"), (8, ""), (2, "a")]):
        append(*small(n, seed), doc)


def searched_ids(search) -> set[int]:
    r = search(torch.randn(1, 5, 4, 8), 16)
    return set(r.chunk_ids[r.valid].tolist())


@pytest.mark.parametrize("dtype", ["float16", "int4"])
@pytest.mark.parametrize("shards", [1, 3])
def test_delete_document_removes_its_chunks_and_pending_tokens(shards, dtype):
    client = InProcessClient(n_shards=shards)
    client.create_bank("b", kv_heads=2, head_dim=8, chunk_size=4, dtype=dtype)
    fill_documents(lambda k, v, doc: client.append("b", k, v, document=doc))
    assert client.describe_bank("b").pending_tokens == 2
    assert client.delete_document("b", "a") == DeleteInfo(2, 2)  # chunks 0, 1 and "aa"
    assert searched_ids(lambda q, k: client.search(["b"], q, k)) == {2, 3, 4}
    info = client.describe_bank("b")
    assert (info.chunks, info.deleted_chunks, info.lost_chunks, info.pending_tokens) == (
        3,
        2,
        0,
        0,
    )
    # more deleted chunks than top_k: they are masked before the top-k, never returned
    r = client.search(["b"], torch.randn(1, 64, 4, 8), 1)
    assert r.valid.all() and not bool(torch.isin(r.chunk_ids, torch.tensor([0, 1])).any())
    client.append("b", *small(4, 9), document="a")  # the same id, appended again: kept
    assert searched_ids(lambda q, k: client.search(["b"], q, k)) == {2, 3, 4, 5}
    assert client.delete_document("b", "nobody") == DeleteInfo(0, 0)
    with pytest.raises(InvalidArgument, match="document"):
        client.delete_document("b", "")
    with pytest.raises(InvalidArgument, match="document"):
        client.append("b", *small(4, 9), document=7)
    with pytest.raises(NotFound):
        client.delete_document("missing", "a")


@pytest.mark.parametrize("dtype", ["float16", "int4"])
@pytest.mark.parametrize("durability", ["none", "group"])
def test_a_restart_does_not_bring_deleted_chunks_back(tmp_path, durability, dtype):
    tenant = Tenant("t", ())

    def engine() -> MemoryEngine:
        return MemoryEngine.local(2, snapshot_dir=str(tmp_path), durability=durability)

    first = engine()
    first.create_bank(tenant, "b", BankSpec(kv_heads=2, head_dim=8, chunk_size=4, dtype=dtype))
    fill_documents(lambda k, v, doc: first.append(tenant, "b", k, v, doc))
    first.snapshot()
    first.append(tenant, "b", *small(3, 7), "a")  # pending "aaaaa": chunk 5 = aaaa
    assert first.delete_document(tenant, "b", "a") == DeleteInfo(3, 1)
    again = engine()  # the log (or, without one, the snapshot the deletion took)
    info = again.describe_bank(tenant, "b")
    assert (info.chunks, info.deleted_chunks, info.lost_chunks, info.pending_tokens) == (
        3,
        3,
        0,
        0,
    )
    found = again.search(tenant, ["b"], torch.randn(1, 5, 4, 8), 16)
    assert set(found.chunk_ids[found.chunk_ids >= 0].tolist()) == {2, 3, 4}


# ------------------------------------------------------------------ LRA eviction


def one_hot(ids: list[int], dim: int = 32) -> torch.Tensor:
    """Chunk i (chunk_size 1, one head) has the key 10 * e_i: a query e_i retrieves it."""
    return torch.eye(dim)[ids].view(len(ids), 1, dim) * 10


def retrieve(client, i: int) -> None:
    r = client.search(["b"], one_hot([i])[None] / 10, top_k=1)
    assert r.chunk_ids.flatten().tolist() == [i]


def survivors(client) -> list[int]:
    r = client.search(["b"], torch.zeros(1, 1, 1, 32), top_k=16)
    return sorted(r.chunk_ids[r.valid].tolist())


def append(client, ids: list[int]) -> None:
    client.append("b", one_hot(ids), one_hot(ids))


@pytest.mark.parametrize("dtype", ["float16", "int4"])
@pytest.mark.parametrize("eviction", ["lra", "fifo"])
def test_lra_evicts_the_chunk_retrieved_least_recently(tmp_path, eviction, dtype):
    client = InProcessClient(snapshot_dir=str(tmp_path))
    spec = dict(kv_heads=1, head_dim=32, chunk_size=1, capacity_tokens=8, eviction=eviction)
    spec["dtype"] = dtype
    client.create_bank("b", **spec)
    append(client, list(range(8)))
    retrieve(client, 2)
    retrieve(client, 5)
    append(client, [8, 9, 10])  # LRA: evicts 0, 1, 3 (never retrieved, stored first)
    client.snapshot()  # the stamps survive a restart
    client = InProcessClient(snapshot_dir=str(tmp_path))
    retrieve(client, 4)
    append(client, [11, 12, 13, 14])  # LRA: 6, 7 (stored), then 2, then 5 (retrieved)
    info = client.describe_bank("b")
    assert (info.chunks, info.evicted_chunks, info.lost_chunks) == (8, 7, 0)
    if eviction == "lra":
        assert survivors(client) == [4, 8, 9, 10, 11, 12, 13, 14]
    else:
        assert survivors(client) == list(range(7, 15))


def test_lra_per_shard_keeps_retrieved_chunks_and_reuses_deleted_slots():
    client = InProcessClient(n_shards=2)
    spec = dict(kv_heads=1, head_dim=32, chunk_size=1, capacity_tokens=6, eviction="lra")
    client.create_bank("b", **spec)
    append(client, list(range(6)))  # shard 0: 0 2 4, shard 1: 1 3 5
    for i in (0, 1):
        retrieve(client, i)
    client.append("b", one_hot([6]), one_hot([6]), document="gone")  # shard 0: evicts 2
    assert client.delete_document("b", "gone").deleted_chunks == 1
    append(client, [7, 8, 9])  # 7 evicts 3, 8 takes 6's deleted slot, 9 evicts 5
    assert survivors(client) == [0, 1, 4, 7, 8, 9]
    assert client.describe_bank("b").evicted_chunks == 4  # 10 appended, 6 slots


# ------------------------------------------------------------------ approximate indexes

ANN = {
    "ivf_flat": dict(nlist=8, nprobe=4),
    "ivf_pq": dict(nlist=8, nprobe=4, m=8),
    "hnsw": dict(m=8, ef_search=32),
}


@pytest.mark.parametrize(
    "index, dtype, device",
    [(kind, "float16", "cpu") for kind in sorted(ANN)]
    + [("ivf_flat", "int4", "cpu")]
    + [
        pytest.param(
            "ivf_flat",
            "float16",
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        )
    ],
)
def test_approximate_index_serves_live_chunks_with_exact_scores(
    index, dtype, device, tmp_path, monkeypatch
):
    """On a GPU shard IVF-flat is faiss' GPU index where faiss has GPU support, else the CPU
    index with candidates rescored on the GPU: either way, the same guarantees."""
    faiss = pytest.importorskip("faiss")
    from memory_service import ann

    monkeypatch.setattr(ann, "HNSW_MIN_CHUNKS", 312)  # as IVF with 8 lists: 39 * 8
    monkeypatch.setattr(ann, "RESCORE_BYTES", 1 << 16)  # candidates rescored in many blocks
    builds, on_gpu = [], set()
    build = ann.AnnIndex._build
    monkeypatch.setattr(
        ann.AnnIndex,
        "_build",
        lambda self, means, used, train: builds.append(train)
        or on_gpu.add(self.gpu is not None)
        or build(self, means, used, train),
    )
    g = torch.Generator().manual_seed(3)
    n, D = 1500, 16
    keys = torch.randn(n, 1, D, generator=g).half().float()  # the same means in either dtype
    queries = torch.randn(1, 40, 2, D, generator=g)
    spec = dict(kv_heads=1, head_dim=D, chunk_size=1, capacity_tokens=n // 3)
    exact = InProcessClient(device=device)
    approx = InProcessClient(device=device, snapshot_dir=str(tmp_path))
    exact.create_bank("b", **spec, dtype=dtype)
    approx.create_bank("b", **spec, index=index, dtype=dtype, **ANN[index])
    for i, part in enumerate(torch.split(torch.arange(n), n // 6)):  # 6 appends
        for c in (exact, approx):
            c.append("b", keys[part], keys[part], document="gone" if i == 5 else "")
        if i == 0:  # too few chunks to build the index: exact search, no index bytes
            assert not builds
            assert approx.describe_bank("b").bytes == exact.describe_bank("b").bytes
            a = approx.search(["b"], queries, 16)
            assert torch.equal(a.chunk_ids, exact.search(["b"], queries, 16).chunk_ids)
    assert builds[0] is True and False in builds  # trained once, rebuilt as FIFO overwrote
    faiss_gpu = device == "cuda" and hasattr(faiss, "StandardGpuResources")
    assert on_gpu == {faiss_gpu and faiss.get_num_gpus() > 0}
    assert approx.describe_bank("b").bytes > exact.describe_bank("b").bytes
    for c in (exact, approx):
        c.delete_document("b", "gone")
    e = exact.search(["b"], queries, 16)
    means = keys[:, 0]  # chunk_size 1: a chunk's mean is its key
    approx.snapshot()  # the index is not saved: trained again from the means on restore
    restored = InProcessClient(device=device, snapshot_dir=str(tmp_path))
    for client in (approx, restored):
        a = client.search(["b"], queries, 16)
        # live: not evicted (the newest n/3), not deleted (the last append)
        ids = a.chunk_ids
        assert a.valid.all() and 2 * n // 3 <= int(ids.min()) <= int(ids.max()) < 5 * n // 6
        ref = torch.einsum("nqd,nqkd->nqk", queries[0], means[ids[0]])
        torch.testing.assert_close(a.scores[0], ref, rtol=1e-5, atol=1e-5)  # exact scores
        recall = (
            sum(
                len(set(x.tolist()) & set(y.tolist()))
                for x, y in zip(ids.view(-1, 16), e.chunk_ids.view(-1, 16), strict=True)
            )
            / e.chunk_ids.numel()
        )
        assert recall >= 0.6, recall


def test_the_lift_turns_inner_product_search_into_l2_search():
    """`[x, sqrt(M^2 - |x|^2)]` against `[q, 0]`: squared L2 = |q|^2 + M^2 - 2 q.x, so the
    L2-nearest means are the top inner products (ann's module doc)."""
    pytest.importorskip("faiss")
    from memory_service import ann

    g = torch.Generator().manual_seed(0)
    means = torch.randn(300, 15, generator=g) * torch.rand(300, 1, generator=g) * 4
    queries = torch.randn(20, 15, generator=g)
    spec = BankSpec(kv_heads=1, head_dim=15, index="ivf_pq", nlist=8, nprobe=4, m=5)
    dim = ann.AnnIndex(spec, slots=300).dim
    M2 = 2 * float(means.square().sum(1).max())
    x, q = torch.from_numpy(ann.lift(means, dim, M2)), torch.from_numpy(ann.lift(queries, dim))
    assert x.shape == (300, 18) and q.shape == (20, 18)  # 15 + a sub-vector of 3 for the lift
    l2 = torch.cdist(q.double(), x.double()).square()
    ip = queries.double() @ means.double().T
    expect = queries.double().square().sum(1, keepdim=True) + M2 - 2 * ip
    torch.testing.assert_close(l2, expect, rtol=1e-5, atol=1e-3)
    assert torch.equal(l2.topk(16, largest=False).indices, ip.topk(16).indices)


def test_ivf_pq_keeps_recall_where_a_few_dimensions_dominate():
    """Real keys have a few dimensions where queries and keys are both large; IVF-PQ's
    rotation spreads them, so its 4-bit codes still find the top chunks (without it: 0.87)."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    n, D = 20_000, 16
    scale = torch.ones(D)
    scale[:2] = 8
    keys = torch.randn(n, 1, 1, D, generator=g) * scale  # (C, csz, H, D)
    queries = torch.randn(40, 1, D, generator=g) * scale  # (n, Hq, D)
    spec = dict(kv_heads=1, head_dim=D, chunk_size=1, capacity_tokens=n)
    exact = ChunkStore(BankSpec(**spec))
    approx = ChunkStore(BankSpec(**spec, index="ivf_pq", nlist=16, nprobe=16, m=D))
    for store in (exact, approx):
        store.add(torch.arange(n), keys, keys, oldest_live_id=0)
    (_, ids), (_, exact_ids) = approx.search(queries, 16), exact.search(queries, 16)
    pairs = zip(ids.view(-1, 16), exact_ids.view(-1, 16), strict=True)
    assert sum(len(set(x.tolist()) & set(y.tolist())) for x, y in pairs) / ids.numel() >= 0.95


@pytest.mark.parametrize("index", ["ivf_flat", "ivf_pq"])
def test_excluded_chunks_never_crowd_out_live_ones(index):
    """98% of the bank evicted: IVF-flat drops their labels inside faiss' search; IVF-PQ
    (like faiss' GPU index, which takes no selector) fetches 50x the candidates and filters
    them. With every list probed, both find exactly the exact search's top 16."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    n, D = 4000, 16
    keys = torch.randn(n, 1, 1, D, generator=g)  # (C, csz, H, D)
    queries = torch.randn(30, 2, D, generator=g)  # (n, Hq, D)
    spec = dict(kv_heads=1, head_dim=D, chunk_size=1, capacity_tokens=n)
    exact = ChunkStore(BankSpec(**spec))
    approx = ChunkStore(BankSpec(**spec, index=index, nlist=8, nprobe=8, m=8))
    for store in (exact, approx):
        store.add(torch.arange(n), keys, keys, oldest_live_id=0)
        store.evict_below(n - 80)  # 80 live chunks
    assert approx.ann.ready and approx.ann.takes_selector == (index == "ivf_flat")
    (scores, ids), (exact_scores, exact_ids) = approx.search(queries, 16), exact.search(queries, 16)
    assert int(ids.min()) >= n - 80
    assert torch.equal(ids.sort(-1).values, exact_ids.sort(-1).values)
    torch.testing.assert_close(scores, exact_scores, rtol=1e-5, atol=1e-5)


def test_a_growing_index_is_trained_again_and_searched_without_a_selector(monkeypatch):
    """Trained at the build threshold and again from scratch at `RETRAIN_GROWTH` times
    that; faiss gets a label bitmap only while some label is excluded; scores stay exact."""
    pytest.importorskip("faiss")
    from memory_service import ann

    builds = []
    build = ann.AnnIndex._build
    monkeypatch.setattr(
        ann.AnnIndex,
        "_build",
        lambda self, means, used, train: builds.append((used, train))
        or build(self, means, used, train),
    )
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1600, 1, 1, 16, generator=g)  # (C, csz, H, D)
    queries = torch.randn(30, 2, 16, generator=g)  # (n, Hq, D)
    spec = dict(kv_heads=1, head_dim=16, chunk_size=1, capacity_tokens=4096)
    exact = ChunkStore(BankSpec(**spec))
    approx = ChunkStore(BankSpec(**spec, index="ivf_flat", nlist=8, nprobe=4))  # built at 312
    for part in torch.split(torch.arange(1600), 400):
        for store in (exact, approx):
            store.add(part, keys[part], keys[part], oldest_live_id=0)
    assert builds == [(400, True), (1600, True)]  # 1600 = 4 x 400: trained again
    assert approx.ann.allowed(approx.live[: approx.used]) is None
    (scores, ids), (_, exact_ids) = approx.search(queries, 16), exact.search(queries, 16)
    ref = torch.einsum("qhd,qhkd->qhk", queries, keys[ids, 0, 0])
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-5)  # exact scores
    pairs = zip(ids.view(-1, 16), exact_ids.view(-1, 16), strict=True)
    assert sum(len(set(x.tolist()) & set(y.tolist())) for x, y in pairs) / ids.numel() >= 0.6
    approx.evict_below(100)  # the first 100 chunks go: their labels are excluded
    allowed = approx.ann.allowed(approx.live[: approx.used])
    assert allowed is not None and (~allowed).sum() == 100
    assert int(approx.search(queries, 16)[1].min()) >= 100


def test_approximate_index_specs():
    with pytest.raises(InvalidArgument, match="ivf_pq needs m"):
        BankSpec(kv_heads=1, head_dim=12, index="ivf_pq", m=8)
    spec = BankSpec(kv_heads=3, head_dim=64, index="ivf_pq")  # m 64: label + 65 4-bit codes
    assert spec.m == 64 and spec.bytes_per_token == 960 + 3 * (8 + 33) / 4
    assert BankSpec(kv_heads=3, head_dim=64, index="hnsw").m == 32


def test_quantized_logs_replay_the_stored_form(tmp_path):
    """An int8 or int4 bank's log holds codes, scales and means (smaller than a float16
    bank's log) and replays to the same store."""
    tenant, keys = Tenant("t", ()), kv(CSZ * 64)[0]
    sizes, found = {}, {}
    queries = torch.randn(1, 4, HQ, D)
    for dtype in ("float16", "int8", "int4"):
        folder = tmp_path / dtype
        engine = MemoryEngine.local(1, snapshot_dir=str(folder))
        engine.create_bank(tenant, "b", BankSpec(kv_heads=H, head_dim=D, dtype=dtype))
        engine.append(tenant, "b", keys, -keys, "doc")
        sizes[dtype] = (folder / "shard-0-of-1.wal").stat().st_size
        before = engine.search(tenant, ["b"], queries, 8)
        found[dtype] = MemoryEngine.local(1, snapshot_dir=str(folder)).search(
            tenant, ["b"], queries, 8
        )
        assert torch.equal(found[dtype].chunk_ids, before.chunk_ids)
        assert torch.equal(found[dtype].table_keys, before.table_keys)
        assert torch.equal(found[dtype].table_values, before.table_values)
    assert sizes["int8"] < 0.8 * sizes["float16"]  # 3 bytes per element against 4
    assert sizes["int4"] < 0.55 * sizes["float16"]  # 2 bytes per element against 4
    for dtype in QUANTIZED:
        assert torch.equal(found[dtype].chunk_ids, found["float16"].chunk_ids)

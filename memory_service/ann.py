"""Approximate search over one store's chunk means: a faiss index per kv head.

A `ChunkStore` whose bank has `index: ivf_flat | ivf_pq | hnsw` holds an `AnnIndex`. Until
the store has `min_chunks` written slots it searches exactly; then the index is built
(IVF trained on the chunk means there are) and kept up to date as chunks are stored. When
the written slots have grown `RETRAIN_GROWTH` times since the last training, the index is
built again from scratch, so a growing bank's lists follow what it holds now.

Search is by inner product (attention scores), but faiss clusters and links the means in L2
after lifting every mean `x` to `[x, sqrt(M^2 - |x|^2)]` and every query `q` to `[q, 0]`:
then `|q' - x'|^2 = |q|^2 + M^2 - 2 q.x`, so the nearest lifted means are the highest-scoring
ones. k-means on the lifted means clusters them by where they are, not only by direction
(which is all inner-product clustering sees), and HNSW's graph gets a metric. On SmolLM2's
keys (1,048,576 rows, kv head 2, plain faiss) recall@16 rises: IVF-flat (nprobe 64 of 1024;
head 1 alike) from 0.93 to 0.95, HNSW (m 16, ef_search 64) from 0.16 to 0.39. `M^2` is
`NORM_MARGIN` times the largest squared norm when the index is built; a later mean that is
longer gets 0 as its last coordinate (its candidates may be missed, never mis-scored).

IVF-PQ is faiss' fast scan: 4-bit codes for `m` sub-vectors of each mean's residual to its
list centroid, scanned with SIMD table lookups (at 16M tokens, 3.5-4x faster than IVF-flat at
the same nprobe). Its lists are the lifted L2 lists above, but it scores by inner product:
the lift coordinate gets a sub-vector of its own, which a query's 0 there leaves out, so
codes spend nothing on it. Keys have a few dimensions where queries and keys are both large;
4-bit codes there lost most of the recall (kv head 2 at 16M tokens: 0.69), so the means
and queries are first turned by a fixed random rotation (`q.x = qR.xR`), which spreads them
over all dimensions (0.95). faiss' fast scan takes no label selector and would rank lists
by L2 distances as if they were inner products, so the shard picks each query's lists
itself (`nprobe` nearest centroids in L2, their inner products as the lists' base scores).

Vectors are labelled in insertion order and `label_slot` maps a label to the slot it was
added for. Removal is the same for every kind: a slot that is overwritten (FIFO, LRA) gets
a new label and its old one goes stale; stale labels, and those of deleted, evicted or
not-yet-committed chunks, are excluded: inside the faiss search by an `IDSelectorBitmap`
(IVF-flat and HNSW on the CPU; passed only when some label is excluded: it slows the scan
by 30-60%), else (IVF-PQ, faiss' GPU index) from the candidates before they are rescored,
after fetching more of them: as many more as there are labels per allowed label. Either
way they never take a place in the top-k. When stale labels outnumber the slots, the
index is rebuilt from the current means (IVF keeps its training). The candidates faiss
returns are rescored exactly from the bank's means, on the bank's device (IVF-PQ fetches
`PQ_REFINE` times `top_k` of them first), in blocks of queries, so scores are exact inner
products and only recall is approximate.

On a GPU shard, IVF-flat is faiss' `GpuIndexIVFFlat` on the shard's GPU where the
installed faiss has GPU support (conda's `faiss-gpu`, or PyPI's `faiss-gpu-cu12` for
compute capability 7.0-8.9, in place of faiss-cpu) and `nprobe` is at most `GPU_MAX_K`; it
holds a second, lifted copy of the means there. Otherwise, and for IVF-PQ (fast scan is a
CPU kernel) and HNSW (faiss' GPU graph, CAGRA, needs a cuVS build), the index is on the CPU
and the rescoring on the GPU.

faiss is imported on first use: `pip install 'longmem[ann]'` (faiss-cpu).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memory_service.errors import FailedPrecondition

if TYPE_CHECKING:
    from memory_service.bank import BankSpec

# IVF-PQ: candidates per wanted chunk, rescored exactly. On SmolLM2's keys (16M tokens, kv
# head 2, nlist 8192, nprobe 256, m 64) recall@16 was 0.946 at 16, 0.955 at 32 and 0.961 at
# 64 (IVF-flat: 0.961), searching in 0.18, 0.30 and 0.38 s (IVF-flat: 0.74 s).
PQ_REFINE = 16
PQ_BITS = 4  # fast scan's code width
ROTATION_SEED = 0
RESCORE_BYTES = 64 << 20  # candidate vectors gathered at once while rescoring
HNSW_MIN_CHUNKS = 4096  # below this, exact search is as fast
MAX_TRAIN_PER_LIST = 64  # IVF training sample: at most this many means per list
RETRAIN_GROWTH = 4  # build from scratch when the written slots have grown this much
NORM_MARGIN = 2.0  # M^2 of the lift over the largest squared norm at build
GPU_MAX_K = 2048  # faiss' GPU IVF returns and probes at most this many
_gpu_resources: dict[int, Any] = {}  # CUDA device -> faiss' resources, shared by its banks


def faiss_module() -> Any:
    """faiss, or FailedPrecondition saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise FailedPrecondition(
            "approximate indexes need faiss on the memory service: pip install 'longmem[ann]'"
        ) from None
    return faiss


def faiss_gpu(faiss: Any, device: torch.device) -> int | None:
    """`device`'s CUDA index where faiss can build GPU indexes there (faiss with GPU
    support, a GPU it sees), else None."""
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return None
    if faiss.get_num_gpus() == 0:
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def gpu_resources(faiss: Any, gpu: int) -> Any:
    """faiss' resources on CUDA device `gpu`: one per device, shared by its banks (a shard
    runs one bank call at a time)."""
    if gpu not in _gpu_resources:
        _gpu_resources[gpu] = faiss.StandardGpuResources()
    return _gpu_resources[gpu]


def lift_norm2(means: torch.Tensor) -> torch.Tensor:
    """`M^2` of the lift for means `(..., n, D)`: `NORM_MARGIN` times their largest squared
    norm, `(...)`."""
    norms = torch.linalg.vector_norm(means, dim=-1, dtype=torch.float32)
    return NORM_MARGIN * norms.amax(-1).square()


def lift(x: torch.Tensor, dim: int, max_norm2: float | None = None) -> np.ndarray:
    """Means `(n, D)` -> `(n, dim)` float32 `[x, sqrt(M^2 - |x|^2), 0...]` with `M^2 =
    max_norm2`; queries (no `max_norm2`) -> `[q, 0...]` (see the module doc)."""
    x = x.float().cpu()
    lifted = torch.zeros(len(x), dim)
    lifted[:, : x.shape[1]] = x
    if max_norm2 is not None:
        norm2 = torch.linalg.vector_norm(x, dim=1).square()
        lifted[:, x.shape[1]] = (float(max_norm2) - norm2).clamp(min=0).sqrt()
    return lifted.numpy()


def random_rotation(dim: int) -> torch.Tensor:
    """A fixed random orthogonal `(dim, dim)` matrix (seed `ROTATION_SEED`)."""
    g = torch.Generator().manual_seed(ROTATION_SEED)
    return torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]


class AnnIndex:
    """One faiss index per kv head over a store's `(H, S, D)` means (see the module doc)."""

    def __init__(self, spec: BankSpec, slots: int, device: str | torch.device = "cpu"):
        self.spec, self.slots = spec, slots
        self.faiss = faiss_module()
        on_gpu = spec.index == "ivf_flat" and spec.nprobe <= GPU_MAX_K
        self.gpu = faiss_gpu(self.faiss, torch.device(device)) if on_gpu else None  # its CUDA index
        self.indexes: list[Any] | None = None  # None: not built yet, search exactly
        self.trained_on = 0  # written slots at the last build from scratch
        self.max_norm2 = np.zeros(spec.kv_heads, dtype=np.float32)  # M^2 per head
        self.pq = spec.index == "ivf_pq"
        # lifted vectors' width: IVF-PQ gives the lift coordinate a sub-vector of its own
        self.dim = spec.head_dim + (spec.head_dim // spec.m if self.pq else 1)
        self.rotation = random_rotation(spec.head_dim) if self.pq else None  # (D, D)
        self.centroids: list[torch.Tensor] = []  # IVF-PQ: per head (nlist, dim), lifted
        self.label_slot = np.empty(0, dtype=np.int64)  # label -> slot
        self.slot_label = np.full(slots, -1, dtype=np.int64)  # slot -> its current label
        self.current = np.empty(0, dtype=bool)  # label -> is it its slot's current label

    @property
    def min_chunks(self) -> int:
        """Written slots needed before the index is built (IVF: 39 training means per list)."""
        return HNSW_MIN_CHUNKS if self.spec.index == "hnsw" else 39 * self.spec.nlist

    @property
    def ready(self) -> bool:
        return self.indexes is not None

    @property
    def takes_selector(self) -> bool:
        """Does faiss drop excluded labels inside the search (else they are filtered after)?"""
        return not self.pq and self.gpu is None

    def can_search(self, top_k: int) -> bool:
        """Built, and able to return `top_k` (twice that on faiss' GPU index, which leaves
        room to fetch past excluded labels); else the store searches exactly."""
        return self.ready and (self.gpu is None or 2 * top_k <= GPU_MAX_K)

    def _new_index(self) -> Any:
        f, d, spec = self.faiss, self.dim, self.spec
        if spec.index == "hnsw":
            index = f.IndexHNSWFlat(d, spec.m, f.METRIC_L2)
            index.hnsw.efSearch = spec.ef_search
            return index
        if self.gpu is not None:  # IVF-flat on the shard's GPU
            config = f.GpuIndexIVFFlatConfig()
            config.device = self.gpu
            if hasattr(config, "use_cuvs"):  # faiss >= 1.10 may be built with cuVS
                config.use_cuvs = False  # the classic GPU IVF, in every build
            return f.GpuIndexIVFFlat(gpu_resources(f, self.gpu), d, spec.nlist, f.METRIC_L2, config)
        quantizer = f.IndexFlatL2(d)
        if spec.index == "ivf_flat":
            return f.IndexIVFFlat(quantizer, d, spec.nlist, f.METRIC_L2)
        index = f.IndexIVFPQFastScan(
            quantizer, d, spec.nlist, spec.m + 1, PQ_BITS, f.METRIC_INNER_PRODUCT
        )
        index.cp.spherical = False  # k-means in L2 on the lifted means, as IVF-flat
        return index

    def _lift(self, x: torch.Tensor, max_norm2: float | None = None) -> np.ndarray:
        """`lift`, after IVF-PQ's rotation."""
        if self.rotation is not None:
            x = x.float().cpu() @ self.rotation
        return lift(x, self.dim, max_norm2)

    def update(self, means: torch.Tensor, used: int, slots: torch.Tensor) -> None:
        """After slots `slots` of `means` `(H, S, D)` were written (`used` written in all):
        build the index once there are enough, else add their new vectors."""
        if self.indexes is None or used >= RETRAIN_GROWTH * self.trained_on:
            if used >= self.min_chunks:
                self._build(means, used, train=True)
            return
        if len(self.label_slot) + len(slots) > 2 * max(used, 1):  # mostly stale: rebuild
            self._build(means, used, train=False)
            return
        self._add(means, slots.cpu().numpy().astype(np.int64))

    def _build(self, means: torch.Tensor, used: int, train: bool) -> None:
        H = self.spec.kv_heads
        if train:
            self.trained_on = used
            self.indexes = [self._new_index() for _ in range(H)]
            self.max_norm2 = lift_norm2(means[:, :used]).cpu().numpy()  # (H,)
            if self.spec.index != "hnsw":
                n = min(used, max(MAX_TRAIN_PER_LIST * self.spec.nlist, self.min_chunks))
                pick = torch.randperm(used, generator=torch.Generator().manual_seed(0))[:n]
                for h, index in enumerate(self.indexes):
                    index.train(self._lift(means[h, pick], self.max_norm2[h]))
            if self.pq:
                self.centroids = [
                    torch.from_numpy(index.quantizer.reconstruct_n(0, self.spec.nlist))
                    for index in self.indexes
                ]
        else:
            for index in self.indexes:
                index.reset()  # IVF keeps its training; HNSW has none
        self.label_slot = np.empty(0, dtype=np.int64)
        self.current = np.empty(0, dtype=bool)
        self.slot_label[:] = -1
        self._add(means, np.arange(used, dtype=np.int64))

    def _add(self, means: torch.Tensor, slots: np.ndarray) -> None:
        first = len(self.label_slot)
        old = self.slot_label[slots]
        self.current[old[old >= 0]] = False  # the slots' earlier labels go stale
        labels = np.arange(first, first + len(slots))
        self.slot_label[slots] = labels
        self.label_slot = np.concatenate([self.label_slot, slots])
        self.current = np.concatenate([self.current, self.slot_label[slots] == labels])
        for h, index in enumerate(self.indexes):
            index.add(self._lift(means[h, torch.from_numpy(slots)], self.max_norm2[h]))

    def allowed(self, live: torch.Tensor) -> np.ndarray | None:
        """Per label: is it its slot's current label, and is that slot live? None when every
        label is: no label is stale and every slot is live (then faiss searches without a
        selector). `current` itself, kept up to date by `_add`, when every slot is live."""
        live = live.cpu().numpy()
        if live.all():  # a full FIFO bank's common case: only stale labels are excluded
            return None if self.current.all() else self.current
        return self.current & live[self.label_slot]

    def _search_head(self, h: int, queries: torch.Tensor, fetch: int, selector: Any) -> np.ndarray:
        """Labels `(b, fetch)` (-1 where fewer were found) for kv head `h`'s queries `(b, D)`."""
        f, spec, index = self.faiss, self.spec, self.indexes[h]
        lifted = self._lift(queries)  # (b, dim)
        if self.pq:  # the lists nearest in L2, |c|^2 - 2 q.c; their scores q.c
            c = self.centroids[h]  # (nlist, dim)
            ip = torch.from_numpy(lifted) @ c.T  # (b, nlist)
            lists = (c.square().sum(1) - 2 * ip).topk(spec.nprobe, largest=False).indices
            base = ip.gather(1, lists)  # (b, nprobe)
            index.nprobe = spec.nprobe  # the width of `lists`: the fast scan takes no params
            return index.search_preassigned(lifted, fetch, lists.numpy(), base.numpy())[1]
        if spec.index == "hnsw":
            params = f.SearchParametersHNSW(sel=selector, efSearch=max(spec.ef_search, fetch))
        else:
            params = f.SearchParametersIVF(sel=selector, nprobe=spec.nprobe)
        return index.search(lifted, fetch, params=params)[1]

    def search(
        self, queries: torch.Tensor, means: torch.Tensor, live: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k live slots for queries `(H, b, D)` float32 on the means' device: exact scores
        `(H, b, k)` (-inf where fewer were found) and slots `(H, b, k)` (-1 there), best
        first, on that device."""
        H, b, D = queries.shape
        allowed, selector = self.allowed(live), None
        fetch = top_k * (PQ_REFINE if self.pq else 1)
        if allowed is not None and self.takes_selector:
            bitmap = np.packbits(allowed, bitorder="little")
            selector = self.faiss.IDSelectorBitmap(len(allowed), self.faiss.swig_ptr(bitmap))
        elif allowed is not None:  # filtered below: fetch past the excluded labels
            fetch = math.ceil(fetch * len(allowed) / max(1, np.count_nonzero(allowed)))
        if self.gpu is not None:
            fetch = min(fetch, GPU_MAX_K)
        slots = torch.full((H, b, fetch), -1, dtype=torch.int64)
        for h in range(H):
            labels = self._search_head(h, queries[h], fetch, selector)
            found = labels >= 0
            if allowed is not None:
                found &= allowed[labels.clip(min=0)]
            slots[h][torch.from_numpy(found)] = torch.from_numpy(self.label_slot[labels[found]])
        slots = slots.to(means.device)
        heads = torch.arange(H, device=means.device)[:, None, None]
        scores, best = [], []
        step = max(1, RESCORE_BYTES // (H * fetch * D * 4))  # queries per block
        for lo in range(0, b, step):
            cand = slots[:, lo : lo + step]  # (H, b', f)
            vectors = means[heads, cand.clamp(min=0)].float()  # (H, b', f, D)
            exact = torch.einsum("hbd,hbfd->hbf", queries[:, lo : lo + step], vectors)
            top = exact.masked_fill(cand < 0, -math.inf).topk(min(top_k, fetch), dim=-1)
            scores.append(top.values)
            best.append(cand.gather(-1, top.indices).masked_fill(~torch.isfinite(top.values), -1))
        return torch.cat(scores, dim=1), torch.cat(best, dim=1)

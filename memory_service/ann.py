"""Approximate search over one store's chunk means: a faiss index per kv head, on the CPU.

A `ChunkStore` whose bank has `index: ivf_flat | ivf_pq | hnsw` holds an `AnnIndex`. Until
the store has `min_chunks` written slots it searches exactly; then the index is built
(IVF trained on the chunk means there are) and kept up to date as chunks are stored. When
the written slots have grown `RETRAIN_GROWTH` times since the last training, the index is
built again from scratch, so a growing bank's lists follow what it holds now.

Search is by inner product (attention scores), but faiss indexes it as a nearest-neighbour
search in L2 after lifting every mean `x` to `[x, sqrt(M^2 - |x|^2)]` and every query `q` to
`[q, 0]`: then `|q' - x'|^2 = |q|^2 + M^2 - 2 q.x`, so the nearest lifted means are the
highest-scoring ones. k-means on the lifted means clusters them by where they are, not only
by direction (which is all inner-product clustering sees), and HNSW's graph gets a metric.
On SmolLM2's keys (1,048,576 rows, kv head 2, plain faiss) recall@16 rises: IVF-flat (nprobe
64 of 1024; head 1 alike) from 0.93 to 0.95, IVF-PQ (the same, `PQ_REFINE` 16) from 0.73 to 0.86
with m 16 and from 0.89 to 0.93 with m 32, HNSW (m 16, ef_search 64) from 0.16 to 0.39. `M^2` is
`NORM_MARGIN` times the largest squared norm when the index is built; a later mean that is
longer gets 0 as its last coordinate (its candidates may be missed, never mis-scored).
IVF-PQ pads the lifted vectors with zeros to a multiple of `m`.

Vectors are labelled in insertion order and `label_slot` maps a label to the slot it was
added for. Removal is the same for every kind: a slot that is overwritten (FIFO, LRA) gets
a new label and its old one goes stale; stale labels, and those of deleted, evicted or
not-yet-committed chunks, are excluded during the faiss search by an `IDSelectorBitmap`
(passed only when some label is excluded: it slows the scan by 30-60%), so they
never take a place in the top-k. When stale labels outnumber the slots, the index is
rebuilt from the current means (IVF keeps its training). The candidates faiss returns are
rescored exactly from the float32 means (IVF-PQ fetches `PQ_REFINE` times `top_k` of them
first), in blocks of queries, so scores are exact inner products and only recall is
approximate.

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

# IVF-PQ: candidates per wanted chunk, rescored exactly. On SmolLM2's keys (1M tokens, nlist
# 1024, nprobe 64, m 16, clustered by inner product before the lift) recall@16 was 0.50 at 4,
# 0.77 at 16 and 0.92 at 64; IVF-flat 0.97.
PQ_REFINE = 16
RESCORE_BYTES = 64 << 20  # candidate vectors gathered at once while rescoring
HNSW_MIN_CHUNKS = 4096  # below this, exact search is as fast
MAX_TRAIN_PER_LIST = 64  # IVF training sample: at most this many means per list
RETRAIN_GROWTH = 4  # build from scratch when the written slots have grown this much
NORM_MARGIN = 2.0  # M^2 of the lift over the largest squared norm at build


def faiss_module() -> Any:
    """faiss, or FailedPrecondition saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise FailedPrecondition(
            "approximate indexes need faiss on the memory service: pip install 'longmem[ann]'"
        ) from None
    return faiss


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


class AnnIndex:
    """One faiss index per kv head over a store's `(H, S, D)` means (see the module doc)."""

    def __init__(self, spec: BankSpec, slots: int):
        self.spec, self.slots = spec, slots
        self.faiss = faiss_module()
        self.indexes: list[Any] | None = None  # None: not built yet, search exactly
        self.trained_on = 0  # written slots at the last build from scratch
        self.max_norm2 = np.zeros(spec.kv_heads, dtype=np.float32)  # M^2 per head
        pad = -(spec.head_dim + 1) % spec.m if spec.index == "ivf_pq" else 0
        self.dim = spec.head_dim + 1 + pad  # lifted vectors' width
        self.label_slot = np.empty(0, dtype=np.int64)  # label -> slot
        self.slot_label = np.full(slots, -1, dtype=np.int64)  # slot -> its current label

    @property
    def min_chunks(self) -> int:
        """Written slots needed before the index is built (IVF: 39 training means per list,
        and per PQ centroid)."""
        if self.spec.index == "hnsw":
            return HNSW_MIN_CHUNKS
        return 39 * max(self.spec.nlist, 256 if self.spec.index == "ivf_pq" else 0)

    @property
    def ready(self) -> bool:
        return self.indexes is not None

    def _new_index(self) -> Any:
        f, d, spec = self.faiss, self.dim, self.spec
        if spec.index == "hnsw":
            index = f.IndexHNSWFlat(d, spec.m, f.METRIC_L2)
            index.hnsw.efSearch = spec.ef_search
            return index
        quantizer = f.IndexFlatL2(d)
        if spec.index == "ivf_flat":
            return f.IndexIVFFlat(quantizer, d, spec.nlist, f.METRIC_L2)
        return f.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, 8, f.METRIC_L2)

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
                    index.train(lift(means[h, pick], self.dim, self.max_norm2[h]))
        else:
            for index in self.indexes:
                index.reset()  # IVF keeps its training; HNSW has none
        self.label_slot = np.empty(0, dtype=np.int64)
        self.slot_label[:] = -1
        self._add(means, np.arange(used, dtype=np.int64))

    def _add(self, means: torch.Tensor, slots: np.ndarray) -> None:
        first = len(self.label_slot)
        self.label_slot = np.concatenate([self.label_slot, slots])
        self.slot_label[slots] = np.arange(first, first + len(slots))
        for h, index in enumerate(self.indexes):
            index.add(lift(means[h, torch.from_numpy(slots)], self.dim, self.max_norm2[h]))

    def allowed(self, live: torch.Tensor) -> np.ndarray | None:
        """Per label: is it its slot's current label, and is that slot live? None when every
        label is: no label is stale and every slot is live (then faiss searches without a
        selector, and no per-label array is made)."""
        stale = len(self.label_slot) > int((self.slot_label >= 0).sum())
        if not stale and bool(live.all()):
            return None
        current = self.slot_label[self.label_slot] == np.arange(len(self.label_slot))
        return current & live.cpu().numpy()[self.label_slot]

    def search(
        self, queries: torch.Tensor, means: torch.Tensor, live: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k live slots for queries `(H, b, D)` float32: exact scores `(H, b, k)` (-inf
        where fewer were found) and slots `(H, b, k)` (-1 there), best first."""
        f, spec = self.faiss, self.spec
        H, b, D = queries.shape
        allowed, selector = self.allowed(live), None
        if allowed is not None:
            bitmap = np.packbits(allowed, bitorder="little")
            selector = f.IDSelectorBitmap(len(allowed), f.swig_ptr(bitmap))
        if spec.index == "hnsw":
            params = f.SearchParametersHNSW(sel=selector, efSearch=max(spec.ef_search, top_k))
        else:
            params = f.SearchParametersIVF(sel=selector, nprobe=spec.nprobe)
        fetch = top_k * (PQ_REFINE if spec.index == "ivf_pq" else 1)
        slots = torch.full((H, b, fetch), -1, dtype=torch.int64)
        for h, index in enumerate(self.indexes):
            _, labels = index.search(lift(queries[h], self.dim), fetch, params=params)
            found = labels >= 0
            slots[h][torch.from_numpy(found)] = torch.from_numpy(self.label_slot[labels[found]])
        heads = torch.arange(H, device=means.device)[:, None, None]
        scores, best = [], []
        step = max(1, RESCORE_BYTES // (H * fetch * D * 4))  # queries per block
        for lo in range(0, b, step):
            cand = slots[:, lo : lo + step]  # (H, b', f)
            vectors = means[heads, cand.to(means.device).clamp(min=0)].float().cpu()  # (H,b',f,D)
            exact = torch.einsum("hbd,hbfd->hbf", queries[:, lo : lo + step], vectors)
            top = exact.masked_fill(cand < 0, -math.inf).topk(min(top_k, fetch), dim=-1)
            scores.append(top.values)
            best.append(cand.gather(-1, top.indices).masked_fill(~torch.isfinite(top.values), -1))
        return torch.cat(scores, dim=1), torch.cat(best, dim=1)

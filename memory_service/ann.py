"""Approximate search over one store's chunk means: a faiss index per kv head, on the CPU.

A `ChunkStore` whose bank has `index: ivf_flat | ivf_pq | hnsw` holds an `AnnIndex`. Until
the store has `min_chunks` written slots it searches exactly; then the index is built
(IVF trained on the chunk means there are) and kept up to date as chunks are stored.

Vectors are labelled in insertion order and `label_slot` maps a label to the slot it was
added for. Removal is the same for every kind: a slot that is overwritten (FIFO, LRA) gets
a new label and its old one goes stale; stale labels, and those of deleted, evicted or
not-yet-committed chunks, are excluded during the faiss search by an `IDSelectorBitmap`,
so they never take a place in the top-k. When stale labels outnumber the slots, the index
is rebuilt from the current means (IVF keeps its training). The candidates faiss returns
are rescored exactly from the float32 means (IVF-PQ fetches `PQ_REFINE` times `top_k` of
them first), in blocks of queries, so scores are exact inner products and only recall is
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
# 1024, nprobe 64, m 16) recall@16 is 0.50 at 4, 0.77 at 16 and 0.92 at 64; IVF-flat 0.97.
PQ_REFINE = 16
RESCORE_BYTES = 64 << 20  # candidate vectors gathered at once while rescoring
HNSW_MIN_CHUNKS = 4096  # below this, exact search is as fast
MAX_TRAIN_PER_LIST = 64  # IVF training sample: at most this many means per list


def faiss_module() -> Any:
    """faiss, or FailedPrecondition saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise FailedPrecondition(
            "approximate indexes need faiss on the memory service: pip install 'longmem[ann]'"
        ) from None
    return faiss


class AnnIndex:
    """One faiss index per kv head over a store's `(H, S, D)` means (see the module doc)."""

    def __init__(self, spec: BankSpec, slots: int):
        self.spec, self.slots = spec, slots
        self.faiss = faiss_module()
        self.indexes: list[Any] | None = None  # None: not built yet, search exactly
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
        f, D, spec = self.faiss, self.spec.head_dim, self.spec
        ip = f.METRIC_INNER_PRODUCT
        if spec.index == "hnsw":
            index = f.IndexHNSWFlat(D, spec.m, ip)
            index.hnsw.efSearch = spec.ef_search
            return index
        quantizer = f.IndexFlatIP(D)
        if spec.index == "ivf_flat":
            return f.IndexIVFFlat(quantizer, D, spec.nlist, ip)
        return f.IndexIVFPQ(quantizer, D, spec.nlist, spec.m, 8, ip)

    def update(self, means: torch.Tensor, used: int, slots: torch.Tensor) -> None:
        """After slots `slots` of `means` `(H, S, D)` were written (`used` written in all):
        build the index once there are enough, else add their new vectors."""
        if self.indexes is None:
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
            self.indexes = [self._new_index() for _ in range(H)]
            if self.spec.index != "hnsw":
                n = min(used, max(MAX_TRAIN_PER_LIST * self.spec.nlist, self.min_chunks))
                pick = torch.randperm(used, generator=torch.Generator().manual_seed(0))[:n]
                for h, index in enumerate(self.indexes):
                    index.train(np.ascontiguousarray(means[h, pick].float().cpu().numpy()))
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
            index.add(np.ascontiguousarray(means[h, torch.from_numpy(slots)].float().cpu().numpy()))

    def search(
        self, queries: torch.Tensor, means: torch.Tensor, live: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k live slots for queries `(H, b, D)` float32: exact scores `(H, b, k)` (-inf
        where fewer were found) and slots `(H, b, k)` (-1 there), best first."""
        f, spec = self.faiss, self.spec
        H, b, D = queries.shape
        current = self.slot_label[self.label_slot] == np.arange(len(self.label_slot))
        allowed = current & live.cpu().numpy()[self.label_slot]
        bitmap = np.packbits(allowed, bitorder="little")
        selector = f.IDSelectorBitmap(len(allowed), f.swig_ptr(bitmap))
        if spec.index == "hnsw":
            params = f.SearchParametersHNSW(sel=selector, efSearch=max(spec.ef_search, top_k))
        else:
            params = f.SearchParametersIVF(sel=selector, nprobe=spec.nprobe)
        fetch = top_k * (PQ_REFINE if spec.index == "ivf_pq" else 1)
        slots = torch.full((H, b, fetch), -1, dtype=torch.int64)
        for h, index in enumerate(self.indexes):
            _, labels = index.search(np.ascontiguousarray(queries[h].numpy()), fetch, params=params)
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

"""One shard: its part of every bank, searched and gathered locally. Plain Python, no Ray.

The Ray shard actor (`memory_service.actors.ShardActor`) is this class run in an actor
process; the in-process client holds instances of it directly.
"""

from __future__ import annotations

import torch

from memory_service.bank import BankSpec, ChunkStore
from memory_service.errors import NotFound


def split_chunks(
    first_id: int, keys: torch.Tensor, values: torch.Tensor, n_shards: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Deal chunks `first_id..` `(C, csz, H, D)` to shards: `[(ids, keys, values)]` per shard."""
    ids = torch.arange(first_id, first_id + keys.shape[0])
    out = []
    for shard in range(n_shards):
        mine = ids % n_shards == shard
        out.append((ids[mine], keys[mine], values[mine]))
    return out


class Shard:
    """Shard `index` of `n_shards`: a ChunkStore per bank, keyed by the bank's internal key."""

    def __init__(self, index: int, n_shards: int, device: str = "cpu"):
        self.index, self.n_shards, self.device = index, n_shards, device
        self.stores: dict[str, ChunkStore] = {}

    def _store(self, bank_key: str) -> ChunkStore:
        try:
            return self.stores[bank_key]
        except KeyError:
            raise NotFound(f"shard {self.index} holds no bank {bank_key!r}") from None

    def create_bank(self, bank_key: str, spec: BankSpec) -> None:
        self.stores[bank_key] = ChunkStore(spec, self.index, self.n_shards, self.device)

    def drop_bank(self, bank_key: str) -> None:
        self.stores.pop(bank_key, None)

    def reset_bank(self, bank_key: str) -> None:
        self._store(bank_key).reset()

    def add(
        self,
        bank_key: str,
        ids: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        oldest_live_id: int,
    ) -> None:
        self._store(bank_key).add(ids, keys, values, oldest_live_id)

    def search(
        self, bank_keys: list[str], queries: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local top-k for queries `(B, n, Hq, D)`, row b against bank `bank_keys[b]`.

        Returns scores and global chunk ids, each `(B, n, Hq, top_k)`, on the CPU.
        """
        stores = [self._store(key) for key in bank_keys]
        parts = [store.search(q, top_k) for store, q in zip(stores, queries, strict=True)]
        scores = torch.stack([s for s, _ in parts]).cpu()
        ids = torch.stack([i for _, i in parts]).cpu()
        return scores, ids

    def gather(self, bank_keys: list[str], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(U, csz, D)` for rows `(U, 3)` of (bank index, kv head, chunk id)."""
        stores = [self._store(key) for key in bank_keys]
        banks = rows[:, 0].unique().tolist()
        if len(banks) == 1:
            k, v = stores[banks[0]].gather(rows[:, 1], rows[:, 2])
            return k.cpu(), v.cpu()
        spec = stores[0].spec
        shape = (rows.shape[0], spec.chunk_size, spec.head_dim)
        keys = torch.empty(shape, dtype=spec.torch_dtype)
        values = torch.empty(shape, dtype=spec.torch_dtype)
        for b in banks:
            sel = rows[:, 0] == b
            k, v = stores[b].gather(rows[sel, 1], rows[sel, 2])
            keys[sel], values[sel] = k.cpu(), v.cpu()
        return keys, values

    def describe(self, bank_key: str) -> dict:
        store = self._store(bank_key)
        return {"chunks": store.n_chunks, "bytes": store.nbytes}

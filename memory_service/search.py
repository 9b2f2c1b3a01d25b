"""Search across shards: local top-k on every shard, exact merge, gather of the winners.

One algorithm serves the in-process client (shards are `Shard` objects) and the service
(shards are Ray actors): the caller passes `call`, which runs a `Shard` method on some
shards and returns their results.

A search result travels compactly (`CompactResult`): the distinct retrieved chunks once
each (`table_keys`/`table_values`, one row per (bank, kv head, chunk)) plus, per
(bank, query, query head, rank), the row it points to. `expand()` unrolls it into the dense
`(B, n, Hq, top_k * chunk_size, D)` tensors that attention reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from memory_service.bank import BankSpec, merge_topk
from memory_service.errors import Unavailable

# call(method, {shard: args}, partial=False) -> {shard: result}. A shard that cannot answer
# raises errors.Unavailable, or with partial=True is left out of the result.
ShardCall = Callable[..., dict[int, object]]

_ID_BITS = 40  # chunk ids below 2**40; (bank, kv head) pairs above


@dataclass
class SearchResult:
    """Retrieved memory for every (bank, query, query head), best chunk first.

    keys, values: `(B, n, Hq, top_k * chunk_size, D)` in the bank dtype (float32 for int8
    and int4 banks), zero where invalid.
    scores: `(B, n, Hq, top_k)` float32 inner products, -inf where invalid.
    chunk_ids: `(B, n, Hq, top_k)` int64 global chunk ids, -1 where invalid.
    valid: `(B, n, Hq, top_k)` bool. A bank with fewer than `top_k` live chunks returns all
    of them first and marks the remaining ranks invalid.
    """

    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    chunk_ids: torch.Tensor
    valid: torch.Tensor
    missing_shards: tuple[int, ...] = ()  # non-empty: a partial result (see allow_partial)

    def token_mask(self) -> torch.Tensor:
        """`(B, n, Hq, top_k * chunk_size)` bool: which retrieved tokens are real."""
        chunk_size = self.keys.shape[-2] // self.valid.shape[-1]
        return self.valid.repeat_interleave(chunk_size, dim=-1)

    @staticmethod
    def cat_queries(parts: list[SearchResult]) -> SearchResult:
        """The results of searches for consecutive ranges of queries, as one search's."""
        if len(parts) == 1:
            return parts[0]
        fields = ("keys", "values", "scores", "chunk_ids", "valid")
        missing = sorted({s for p in parts for s in p.missing_shards})
        return SearchResult(
            *(torch.cat([getattr(p, f) for p in parts], dim=1) for f in fields), tuple(missing)
        )


@dataclass
class CompactResult:
    """A search result with each retrieved (bank, kv head, chunk) stored once."""

    scores: torch.Tensor  # (B, n, Hq, k) float32
    chunk_ids: torch.Tensor  # (B, n, Hq, k) int64, -1 = none
    slots: torch.Tensor  # (B, n, Hq, k) int64 row of the table, -1 = none
    table_keys: torch.Tensor  # (U, csz, D)
    table_values: torch.Tensor  # (U, csz, D)
    missing_shards: tuple[int, ...] = ()  # shards that did not answer (a partial result)

    def expand(self) -> SearchResult:
        B, n, Hq, k = self.slots.shape
        U, csz, D = self.table_keys.shape
        valid = self.slots >= 0
        if U == 0:
            shape = (B, n, Hq, k * csz, D)
            keys = torch.zeros(shape, dtype=self.table_keys.dtype)
            return SearchResult(
                keys,
                torch.zeros_like(keys),
                self.scores,
                self.chunk_ids,
                valid,
                self.missing_shards,
            )
        index = self.slots.clamp(min=0).flatten()
        pad = ~valid.flatten()

        def unroll(table: torch.Tensor) -> torch.Tensor:
            out = table.index_select(0, index)  # (B*n*Hq*k, csz, D)
            if bool(pad.any()):
                out[pad] = 0
            return out.view(B, n, Hq, k * csz, D)

        return SearchResult(
            unroll(self.table_keys),
            unroll(self.table_values),
            self.scores,
            self.chunk_ids,
            valid,
            self.missing_shards,
        )


def chunk_table(ids: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (bank, kv head, chunk id) rows `(U, 3)` of ids `(B, n, Hq, k)`, and slots.

    `slots` `(B, n, Hq, k)` gives each retrieved chunk's row, -1 where the id is -1.
    """
    B, _, Hq, _ = ids.shape
    bank = torch.arange(B).view(B, 1, 1, 1)
    head = (torch.arange(Hq) // (Hq // kv_heads)).view(1, 1, Hq, 1)  # kv head per query head
    valid = ids >= 0
    pair = (bank * kv_heads + head).expand_as(ids)
    key = (pair[valid] << _ID_BITS) | ids[valid]
    unique, inverse = torch.unique(key, return_inverse=True)
    pair, chunk = unique >> _ID_BITS, unique & ((1 << _ID_BITS) - 1)
    rows = torch.stack([pair // kv_heads, pair % kv_heads, chunk], dim=1)
    slots = torch.full_like(ids, -1)
    slots[valid] = inverse
    return rows, slots


def sharded_search(
    call: ShardCall,
    n_shards: int,
    bank_keys: list[str],
    live: list[tuple[int, int]],
    spec: BankSpec,
    queries: torch.Tensor,
    top_k: int,
    allow_partial: bool = False,
) -> CompactResult:
    """Exact top-k over all shards for queries `(B, n, Hq, D)`, row b in bank `bank_keys[b]`
    (of which chunk ids in `[oldest, end)` = `live[b]` may be served).

    With `allow_partial`, shards that do not answer the search are left out and named in
    `missing_shards`; otherwise any such shard fails the search with Unavailable.
    """
    banks = (bank_keys, live, spec)
    args = {s: (*banks, queries, top_k) for s in range(n_shards)}
    local = call("search", args, partial=allow_partial)
    missing = tuple(s for s in range(n_shards) if s not in local)
    if not local:
        raise Unavailable("no shard answered the search")
    scores, ids = merge_topk(list(local.values()), top_k)  # (B, n, Hq, k)
    rows, slots = chunk_table(ids, spec.kv_heads)
    owner = rows[:, 2] % n_shards
    wanted = {s: owner == s for s in range(n_shards) if bool((owner == s).any())}
    gathered = call("gather", {s: (*banks, rows[mask]) for s, mask in wanted.items()})
    if len(wanted) == 1:  # one shard holds every winner: its answer is the table
        keys, values = gathered[next(iter(wanted))]
    else:
        shape = (rows.shape[0], spec.chunk_size, spec.head_dim)
        keys = torch.empty(shape, dtype=spec.value_dtype)
        values = torch.empty(shape, dtype=spec.value_dtype)
        for s, mask in wanted.items():
            keys[mask], values[mask] = gathered[s]
    return CompactResult(scores, ids, slots, keys, values, missing)

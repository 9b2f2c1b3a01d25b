"""The catalog: which banks exist, per tenant, with their specs and stream positions.

Plain Python. The coordinator actor runs one Catalog; the in-process client holds one too.
The catalog owns each bank's `Chunker` (the stream position and the trailing partial
chunk) and deals completed chunks to the shards through `call` (see `search.ShardCall`).
A bank's internal key is `tenant/name`: a tenant only ever names its own banks, so it can
neither reach nor learn of another tenant's.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from memory_service.bank import BankSpec, Chunker, check_kv
from memory_service.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from memory_service.search import ShardCall
from memory_service.shard import split_chunks
from memory_service.tenancy import Tenant

BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass
class BankEntry:
    name: str
    key: str
    spec: BankSpec
    chunker: Chunker
    created_at: float


class Catalog:
    def __init__(self, n_shards: int, call: ShardCall):
        self.n_shards = n_shards
        self.call = call
        self.banks: dict[str, BankEntry] = {}  # internal key -> entry

    def _all_shards(self, method: str, *args) -> dict[int, object]:
        return self.call(method, {s: args for s in range(self.n_shards)})

    def _entry(self, tenant: Tenant, name: str) -> BankEntry:
        entry = self.banks.get(f"{tenant.name}/{name}")
        if entry is None:
            raise NotFound(f"bank {name!r} not found")
        return entry

    def create_bank(self, tenant: Tenant, name: str, spec: BankSpec) -> dict:
        if not isinstance(name, str) or not BANK_NAME.match(name):
            raise InvalidArgument(f"bank name {name!r} must match {BANK_NAME.pattern}")
        key = f"{tenant.name}/{name}"
        if key in self.banks:
            raise AlreadyExists(f"bank {name!r} already exists")
        own = [e for e in self.banks.values() if e.key.startswith(f"{tenant.name}/")]
        if tenant.max_banks is not None and len(own) >= tenant.max_banks:
            raise ResourceExhausted(
                f"tenant {tenant.name!r} is at its quota of {tenant.max_banks} banks"
            )
        used = sum(e.spec.capacity_tokens for e in own)
        if tenant.max_tokens is not None and used + spec.capacity_tokens > tenant.max_tokens:
            raise ResourceExhausted(
                f"bank capacity {spec.capacity_tokens} would exceed tenant {tenant.name!r}'s quota "
                f"of {tenant.max_tokens} tokens ({used} in use)"
            )
        self._all_shards("create_bank", key, spec)
        self.banks[key] = BankEntry(name, key, spec, Chunker(spec), time.time())
        return self.describe_bank(tenant, name)

    def delete_bank(self, tenant: Tenant, name: str) -> None:
        entry = self._entry(tenant, name)
        self._all_shards("drop_bank", entry.key)
        del self.banks[entry.key]

    def reset_bank(self, tenant: Tenant, name: str) -> dict:
        entry = self._entry(tenant, name)
        self._all_shards("reset_bank", entry.key)
        entry.chunker.reset()
        return self.describe_bank(tenant, name)

    def list_banks(self, tenant: Tenant) -> list[dict]:
        prefix = f"{tenant.name}/"
        return [
            self.describe_bank(tenant, e.name)
            for k, e in sorted(self.banks.items())
            if k.startswith(prefix)
        ]

    def describe_bank(self, tenant: Tenant, name: str) -> dict:
        entry = self._entry(tenant, name)
        per_shard = self._all_shards("describe", entry.key)
        chunks = sum(d["chunks"] for d in per_shard.values())
        return {
            "name": entry.name,
            "spec": entry.spec.to_dict(),
            "chunks": chunks,
            "size_tokens": chunks * entry.spec.chunk_size,
            "pending_tokens": entry.chunker.pending_tokens,
            "appended_chunks": entry.chunker.next_chunk_id,
            "evicted_chunks": entry.chunker.oldest_live_id,
            "shards": self.n_shards,
            "bytes": sum(d["bytes"] for d in per_shard.values()),
            "created_at": entry.created_at,
        }

    def append(self, tenant: Tenant, name: str, keys: torch.Tensor, values: torch.Tensor) -> dict:
        """Append tokens `(n, kv_heads, head_dim)` in stream order to a bank."""
        entry = self._entry(tenant, name)
        check_kv(entry.spec, keys, values)
        first_id, k, v = entry.chunker.push(keys, values)
        if k.shape[0]:
            oldest = entry.chunker.oldest_live_id
            parts = split_chunks(first_id, k, v, self.n_shards)
            self.call("add", {s: (entry.key, *part, oldest) for s, part in enumerate(parts)})
        return {
            "appended_tokens": keys.shape[0],
            "pending_tokens": entry.chunker.pending_tokens,
            "appended_chunks": entry.chunker.next_chunk_id,
        }

    def resolve(self, tenant: Tenant, names: list[str]) -> tuple[list[str], BankSpec]:
        """Internal keys of the named banks and their common spec (for a search)."""
        if not names:
            raise InvalidArgument("name at least one bank to search")
        entries = [self._entry(tenant, n) for n in names]
        spec = entries[0].spec
        for e in entries[1:]:
            if (e.spec.kv_heads, e.spec.head_dim, e.spec.chunk_size, e.spec.dtype) != (
                spec.kv_heads,
                spec.head_dim,
                spec.chunk_size,
                spec.dtype,
            ):
                raise InvalidArgument(
                    f"banks {names[0]!r} and {e.name!r} differ in heads, head dim, chunk size or "
                    "dtype; one search can only serve banks of one shape"
                )
        return [e.key for e in entries], spec

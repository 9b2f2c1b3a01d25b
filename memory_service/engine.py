"""The memory service's operations: one engine, in one process or over Ray actors.

The split follows vLLM v1 (engine core, core client, workers):

- the core is a `Catalog` (which banks exist, their stream positions; it deals appended
  chunks to the shards). It runs in this process or in the coordinator actor;
- the workers are `Shard`s, each holding its part of every bank. They are objects in this
  process or shard actors, reached through a `search.ShardCall`;
- the engine (`MemoryEngine`) is what the gRPC server and the in-process client call. It
  sends bank operations to the core through a `CoreCall` and runs searches itself: the
  core resolves the banks, then every shard searches and the engine merges the answers.

`MemoryEngine.local` builds the core and the workers in this process;
`memory_service.actor_calls.ray_engine` reaches them as Ray actors (any process in the
cluster can hold one). `Engine` is the interface the server runs against. The whole picture:
docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from memory_service.bank import AppendInfo, BankInfo, BankSpec, DeleteInfo, check_queries
from memory_service.catalog import Catalog, LogTickets
from memory_service.errors import InvalidArgument, Unavailable
from memory_service.search import CompactResult, ShardCall, sharded_search
from memory_service.shard import Shard, ShardInfo, ShardSnapshot
from memory_service.tenancy import Tenant
from memory_service.wal import DEFAULT_DURABILITY

# core(method, *args) runs a `Catalog` method and returns its answer; a ServiceError it
# raises reaches the caller as itself.
CoreCall = Callable[..., Any]


class Engine(Protocol):
    """The service's operations, on behalf of a tenant (what the gRPC API offers)."""

    def create_bank(self, tenant: Tenant, name: str, spec: BankSpec) -> BankInfo: ...

    def delete_bank(self, tenant: Tenant, name: str) -> None: ...

    def reset_bank(self, tenant: Tenant, name: str) -> BankInfo: ...

    def list_banks(self, tenant: Tenant) -> list[BankInfo]: ...

    def describe_bank(self, tenant: Tenant, name: str) -> BankInfo: ...

    def append(
        self,
        tenant: Tenant,
        name: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        document: str = "",
    ) -> AppendInfo: ...

    def delete_document(self, tenant: Tenant, name: str, document: str) -> DeleteInfo: ...

    def search(
        self, tenant: Tenant, names: list[str], queries: torch.Tensor, top_k: int
    ) -> CompactResult: ...

    def snapshot(self) -> list[ShardSnapshot]: ...

    def shard_map(self) -> list[ShardInfo]: ...


def check_search(names: list[str], queries: torch.Tensor, spec: BankSpec, top_k: int) -> None:
    check_queries(spec, queries, top_k)
    if queries.shape[0] != len(names):
        raise InvalidArgument(
            f"queries have {queries.shape[0]} rows (dim 0) for {len(names)} banks; "
            "send one row per bank"
        )


class MemoryEngine:
    """An `Engine` over a catalog (`core`) and `n_shards` shards (`shards`).

    With `allow_partial`, a search that some shards cannot answer is answered from the
    others (`CompactResult.missing_shards` names the missing ones) instead of failing.
    """

    def __init__(
        self, n_shards: int, core: CoreCall, shards: ShardCall, allow_partial: bool = False
    ):
        self.n_shards, self.core, self.shards = n_shards, core, shards
        self.allow_partial = allow_partial

    @classmethod
    def local(
        cls,
        n_shards: int = 1,
        device: str = "cpu",
        snapshot_dir: str | None = None,
        durability: str = DEFAULT_DURABILITY,
    ) -> MemoryEngine:
        """The catalog and the shards as objects in this process; with `snapshot_dir` they
        start from the snapshot and logs there, if there are any, and log appends with
        `durability` (`memory_service.wal`)."""
        shards = [Shard(i, n_shards, device) for i in range(n_shards)]
        for shard in shards if snapshot_dir else ():
            shard.restore(snapshot_dir, durability)

        def call(method: str, args: dict[int, tuple], partial: bool = False) -> dict:
            return {s: getattr(shards[s], method)(*a) for s, a in args.items()}

        catalog = Catalog(n_shards, call, snapshot_dir, durability)
        return cls(n_shards, lambda method, *args: getattr(catalog, method)(*args), call)

    def create_bank(self, tenant: Tenant, name: str, spec: BankSpec) -> BankInfo:
        return self.core("create_bank", tenant, name, spec)

    def delete_bank(self, tenant: Tenant, name: str) -> None:
        self.core("delete_bank", tenant, name)

    def reset_bank(self, tenant: Tenant, name: str) -> BankInfo:
        return self.core("reset_bank", tenant, name)

    def list_banks(self, tenant: Tenant) -> list[BankInfo]:
        return self.core("list_banks", tenant)

    def describe_bank(self, tenant: Tenant, name: str) -> BankInfo:
        return self.core("describe_bank", tenant, name)

    def append(
        self,
        tenant: Tenant,
        name: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        document: str = "",
    ) -> AppendInfo:
        """Append (the tokens of `document`, "" for none), then wait until its log records
        are on disk (durability other than `none`) before acknowledging it."""
        info, tickets = self.core("append", tenant, name, keys, values, document)
        self._wait_durable(tickets, "append")
        return info

    def delete_document(self, tenant: Tenant, name: str, document: str) -> DeleteInfo:
        """Remove every chunk of bank `name` holding a token of `document`; acknowledged
        once logged (durability other than `none`)."""
        info, tickets = self.core("delete_document", tenant, name, document)
        self._wait_durable(tickets, "deletion")
        return info

    def _wait_durable(self, tickets: LogTickets, what: str) -> None:
        try:
            if tickets.shards:
                self.shards("wait_durable", {s: (q,) for s, q in tickets.shards.items()})
            if tickets.catalog is not None:
                self.core("wait_durable", tickets.catalog)
        except Unavailable as e:
            raise Unavailable(
                f"the {what} was applied but not confirmed on disk ({e.message}); it is "
                "replayed with the log if its record was written: see describe_bank"
            ) from None

    def search(
        self, tenant: Tenant, names: list[str], queries: torch.Tensor, top_k: int
    ) -> CompactResult:
        bank_keys, live, spec = self.core("resolve", tenant, names)
        check_search(names, queries, spec, top_k)
        return sharded_search(
            self.shards,
            self.n_shards,
            bank_keys,
            live,
            spec,
            queries,
            top_k,
            self.allow_partial,
        )

    def snapshot(self) -> list[ShardSnapshot]:
        """Save the catalog and every shard to the snapshot dir now."""
        return self.core("snapshot")

    def shard_map(self) -> list[ShardInfo]:
        """Where each shard runs, or that it is unavailable."""
        return self.core("shard_map")

"""The memory service's operations, in one process: a Catalog in front of local Shards.

`LocalEngine` is what `InProcessClient` runs and what the tests compare the service with.
`memory_service.actors.RayEngine` has the same methods with the catalog in a coordinator
actor and the shards in shard actors; the gRPC server runs either.
"""

from __future__ import annotations

import torch

from memory_service.bank import BankSpec, check_queries
from memory_service.catalog import Catalog
from memory_service.errors import InvalidArgument
from memory_service.search import CompactResult, sharded_search
from memory_service.shard import Shard
from memory_service.tenancy import Tenant


def check_search(names: list[str], queries: torch.Tensor, spec: BankSpec, top_k: int) -> None:
    check_queries(spec, queries, top_k)
    if queries.shape[0] != len(names):
        raise InvalidArgument(
            f"queries have {queries.shape[0]} rows (dim 0) for {len(names)} banks; "
            "send one row per bank"
        )


class LocalEngine:
    def __init__(self, n_shards: int = 1, device: str = "cpu"):
        self.n_shards = n_shards
        self.shards = [Shard(i, n_shards, device) for i in range(n_shards)]
        self.catalog = Catalog(n_shards, self._call)

    def _call(
        self, method: str, args: dict[int, tuple], partial: bool = False
    ) -> dict[int, object]:
        return {s: getattr(self.shards[s], method)(*a) for s, a in args.items()}

    def create_bank(self, tenant: Tenant, name: str, spec: BankSpec) -> dict:
        return self.catalog.create_bank(tenant, name, spec)

    def delete_bank(self, tenant: Tenant, name: str) -> None:
        self.catalog.delete_bank(tenant, name)

    def reset_bank(self, tenant: Tenant, name: str) -> dict:
        return self.catalog.reset_bank(tenant, name)

    def list_banks(self, tenant: Tenant) -> list[dict]:
        return self.catalog.list_banks(tenant)

    def describe_bank(self, tenant: Tenant, name: str) -> dict:
        return self.catalog.describe_bank(tenant, name)

    def append(self, tenant: Tenant, name: str, keys: torch.Tensor, values: torch.Tensor) -> dict:
        return self.catalog.append(tenant, name, keys, values)

    def search(
        self, tenant: Tenant, names: list[str], queries: torch.Tensor, top_k: int
    ) -> CompactResult:
        bank_keys, oldest, spec = self.catalog.resolve(tenant, names)
        check_search(names, queries, spec, top_k)
        return sharded_search(self._call, self.n_shards, bank_keys, oldest, spec, queries, top_k)

"""Ray actors: shards hold the banks' chunks, a coordinator holds the catalog.

`RayEngine` gives the server the same methods as `engine.LocalEngine`: catalog calls go to
the coordinator actor; a search resolves its banks there, then talks to the shards
directly (every shard searches, the engine merges and gathers: `search.sharded_search`).
"""

from __future__ import annotations

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from memory_service.bank import BankSpec
from memory_service.catalog import Catalog
from memory_service.engine import check_search
from memory_service.errors import ServiceError, Unavailable
from memory_service.search import CompactResult, sharded_search
from memory_service.shard import Shard
from memory_service.tenancy import Tenant


def get_all(refs: dict[int, ray.ObjectRef], what: str) -> dict[int, object]:
    """ray.get each ref; a ServiceError raised in an actor is re-raised as itself."""
    out = {}
    for s, ref in refs.items():
        try:
            out[s] = ray.get(ref)
        except RayTaskError as e:
            if isinstance(e.cause, ServiceError):
                raise e.cause from None
            raise
        except RayActorError:
            raise Unavailable(f"{what} {s} is unavailable") from None
    return out


@ray.remote
class ShardActor(Shard):
    """A `Shard` in its own process; on a GPU when Ray gave it one."""

    def __init__(self, index: int, n_shards: int):
        super().__init__(index, n_shards, "cuda" if torch.cuda.is_available() else "cpu")

    def device_name(self) -> str:
        return self.device


def call_shards(shards: list) -> callable:
    def call(method: str, args: dict[int, tuple]) -> dict[int, object]:
        refs = {s: getattr(shards[s], method).remote(*a) for s, a in args.items()}
        return get_all(refs, "shard")

    return call


@ray.remote
class CoordinatorActor(Catalog):
    """The catalog in its own process: bank metadata, stream positions, the shard map."""

    def __init__(self, shards: list):
        super().__init__(len(shards), call_shards(shards))
        self.shards = shards

    def shard_map(self) -> list:
        return self.shards


class RayEngine:
    """The memory service on Ray: `n_shards` shard actors and one coordinator actor."""

    def __init__(self, n_shards: int, gpus_per_shard: float | None = None):
        if gpus_per_shard is None:
            gpus_per_shard = 1.0 if ray.cluster_resources().get("GPU", 0) >= n_shards else 0.0
        self.n_shards = n_shards
        self.shards = [
            ShardActor.options(num_cpus=0, num_gpus=gpus_per_shard).remote(i, n_shards)
            for i in range(n_shards)
        ]
        self.coordinator = CoordinatorActor.options(num_cpus=0).remote(self.shards)
        self._call = call_shards(self.shards)
        self.devices = [d for d in ray.get([s.device_name.remote() for s in self.shards])]

    def _coordinator(self, method: str, *args):
        return get_all({0: getattr(self.coordinator, method).remote(*args)}, "coordinator")[0]

    def create_bank(self, tenant: Tenant, name: str, spec: BankSpec) -> dict:
        return self._coordinator("create_bank", tenant, name, spec)

    def delete_bank(self, tenant: Tenant, name: str) -> None:
        self._coordinator("delete_bank", tenant, name)

    def reset_bank(self, tenant: Tenant, name: str) -> dict:
        return self._coordinator("reset_bank", tenant, name)

    def list_banks(self, tenant: Tenant) -> list[dict]:
        return self._coordinator("list_banks", tenant)

    def describe_bank(self, tenant: Tenant, name: str) -> dict:
        return self._coordinator("describe_bank", tenant, name)

    def append(self, tenant: Tenant, name: str, keys: torch.Tensor, values: torch.Tensor) -> dict:
        return self._coordinator("append", tenant, name, keys, values)

    def search(
        self, tenant: Tenant, names: list[str], queries: torch.Tensor, top_k: int
    ) -> CompactResult:
        bank_keys, spec = self._coordinator("resolve", tenant, names)
        check_search(names, queries, spec, top_k)
        return sharded_search(self._call, self.n_shards, bank_keys, spec, queries, top_k)

    def shutdown(self) -> None:
        for actor in [self.coordinator, *self.shards]:
            ray.kill(actor)

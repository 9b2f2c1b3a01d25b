"""Ray actors: shards hold the banks' chunks, a coordinator holds the catalog.

`RayEngine` gives a gRPC server the same methods as `engine.LocalEngine`: catalog calls go
to the coordinator actor; a search resolves its banks there, then talks to the shards
directly (every shard searches, the engine merges and gathers: `search.sharded_search`).
It finds the actors by name, so any process in the cluster can hold one. `RayDeployment`
launches the actors and looks after them (health checks, snapshots, shutdown).

Placement: the shards are one Ray placement group, one bundle each, spread over the nodes
(`placement="spread"`, soft: several shards share a node when there are fewer nodes) or
packed. A bundle asks for `gpus_per_shard` GPUs when the cluster has them, and a nominal
amount of memory otherwise (it needs no CPU: searches are matrix products that use the
node's cores anyway, and leaving CPUs unclaimed keeps them for training workers).

Restarts: shard and coordinator actors restart without limit when their process or node
dies. A restarted shard reloads its banks from its last snapshot in `snapshot_dir`; the
restarted coordinator reloads the catalog (saved on every change). Calls to an actor that
is down fail with `errors.Unavailable` naming it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from memory_service.bank import BankSpec
from memory_service.catalog import Catalog
from memory_service.engine import check_search
from memory_service.errors import InvalidArgument, ServiceError, Unavailable
from memory_service.search import CompactResult, sharded_search
from memory_service.shard import Shard
from memory_service.tenancy import Tenant, TenantTable

log = logging.getLogger("longmem.actors")

SHARD_MEMORY = 64 << 20  # nominal bundle size when shards take no GPU
CALL_TIMEOUT_S = 120.0  # a shard slower than this counts as unavailable
HEALTH_EVERY_S = 0.5  # how often the engine pings its shards
NAMESPACE = "longmem"  # named actors: "coordinator-<service>", "shard-<service>-<index>"
PLACEMENT_TIMEOUT_S = 120.0
# torch tensors cross actor boundaries through shared memory, not pickled copies (10x faster
# for a search's chunk table)
ACTOR_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}
# such tensors arrive read-only; the service only ever reads them
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def get_all(refs: dict[int, ray.ObjectRef], what: str, partial: bool = False) -> dict[int, object]:
    """ray.get each ref. A ServiceError raised in an actor is re-raised as itself; an actor
    that is down raises Unavailable, or with `partial` is left out of the answer."""
    out = {}
    for s, ref in refs.items():
        try:
            out[s] = ray.get(ref, timeout=CALL_TIMEOUT_S)
        except RayTaskError as e:
            if isinstance(e.cause, ServiceError):
                raise e.cause from None
            raise
        except (RayActorError, GetTimeoutError):
            if not partial:
                raise Unavailable(
                    f"{what} {s} is unavailable (restarting, or its node is gone); retry shortly"
                ) from None
    return out


def call_shards(shards: list):
    """A `search.ShardCall` over shard actor handles."""

    def call(method: str, args: dict[int, tuple], partial: bool = False) -> dict[int, object]:
        refs = {s: getattr(shards[s], method).remote(*a) for s, a in args.items()}
        return get_all(refs, "shard", partial)

    return call


@ray.remote(concurrency_groups={"health": 1})
class ShardActor(Shard):
    """A `Shard` in its own process, on a GPU when Ray gave it one; restores its snapshot.

    Bank calls run one at a time; `ping` has its own thread, so a long search does not
    make a healthy shard look dead.
    """

    def __init__(
        self,
        index: int,
        n_shards: int,
        snapshot_dir: str | None,
        endpoint: ShardEndpoint | None = None,
    ):
        # Ray limits an actor that claims no CPU to one thread; a search wants the node's cores
        torch.set_num_threads(os.cpu_count() or 1)
        super().__init__(index, n_shards, "cuda" if torch.cuda.is_available() else "cpu")
        self.restored = bool(snapshot_dir) and self.load_snapshot(snapshot_dir)
        self.endpoint = None
        if endpoint is not None:  # the whole API, served from this shard's node too
            from memory_service.server import advertised, start_server

            engine = RayEngine(endpoint.service, n_shards, endpoint.allow_partial)
            self.server, address = start_server(engine, endpoint.tenants, endpoint.host, 0)
            self.endpoint = advertised(address)

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        return True

    def share_cores(self, shards_on_node: int) -> None:
        """Split the node's cores among the shards placed on it."""
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // shards_on_node))

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "index": self.index,
            "node_id": ctx.get_node_id(),
            "node_address": ray.util.get_node_ip_address(),
            "device": self.device,
            "endpoint": self.endpoint or "",
            "banks": len(self.stores),
            "restored_from_snapshot": self.restored,
        }


@ray.remote
class CoordinatorActor(Catalog):
    """The catalog in its own process: bank metadata, stream positions, the shard map."""

    def __init__(self, shard_names: list[str], snapshot_dir: str | None):
        shards = [ray.get_actor(n, namespace=NAMESPACE) for n in shard_names]
        super().__init__(len(shards), call_shards(shards), snapshot_dir)
        self.address: str | None = None

    def set_endpoint(self, address: str) -> None:
        self.address = address

    def endpoint(self) -> str | None:
        """The gRPC address (node IP:port) of the service, for workers in the cluster."""
        return self.address

    def shard_map(self) -> list[dict]:
        """Where each shard runs, or that it is unavailable."""
        args = {s: () for s in range(self.n_shards)}
        found = self.call("info", args, partial=True)
        return [found.get(s, {"index": s, "unavailable": True}) for s in range(self.n_shards)]


@dataclass(frozen=True)
class ShardEndpoint:
    """Asks every shard to serve the whole gRPC API on its own node as well."""

    host: str  # address to bind, e.g. 0.0.0.0 to be reachable from other nodes
    tenants: TenantTable
    service: str
    allow_partial: bool = False


class RayEngine:
    """The service's operations over its Ray actors, which it finds by name: the catalog in
    the coordinator; searches straight to the shards. Any process in the cluster can hold
    one (the front-door server, a shard's own endpoint)."""

    def __init__(self, name: str, n_shards: int, allow_partial: bool = False):
        self.name, self.n_shards, self.allow_partial = name, n_shards, allow_partial
        self.down: set[int] = set()  # shards known to be down (see RayDeployment)

    @functools.cached_property
    def coordinator(self) -> ray.actor.ActorHandle:
        return ray.get_actor(f"coordinator-{self.name}", namespace=NAMESPACE)

    @functools.cached_property
    def shards(self) -> list[ray.actor.ActorHandle]:
        names = [f"shard-{self.name}-{i}" for i in range(self.n_shards)]
        return [ray.get_actor(n, namespace=NAMESPACE) for n in names]

    def _call(self, method: str, args: dict[int, tuple], partial: bool = False) -> dict:
        return call_shards(self.shards)(method, args, partial)

    def _coordinator(self, method: str, *args):
        return get_all({0: getattr(self.coordinator, method).remote(*args)}, "coordinator")[0]

    def _search_call(self, method: str, args: dict[int, tuple], partial: bool = False) -> dict:
        """Shard calls for a search: shards known to be down fail fast (or, when partial
        answers are allowed, are skipped) instead of waiting for their restart."""
        down = self.down & set(args)
        if down and not partial:
            raise Unavailable(
                f"shard {min(down)} is unavailable (restarting, or its node is gone); retry shortly"
            )
        return self._call(method, {s: a for s, a in args.items() if s not in down}, partial)

    def shard_map(self) -> list[dict]:
        return self._coordinator("shard_map")

    def set_endpoint(self, address: str) -> None:
        self._coordinator("set_endpoint", address)

    def snapshot(self) -> list[dict]:
        return self._coordinator("snapshot")

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
        bank_keys, oldest, spec = self._coordinator("resolve", tenant, names)
        check_search(names, queries, spec, top_k)
        return sharded_search(
            self._search_call,
            self.n_shards,
            bank_keys,
            oldest,
            spec,
            queries,
            top_k,
            self.allow_partial,
        )


class RayDeployment(RayEngine):
    """Launches the service's actors and looks after them: `n_shards` shard actors in a
    placement group and a coordinator; a health loop (searches fail fast while a shard is
    down) and periodic snapshots. `shard_endpoint` makes every shard serve the gRPC API on
    its own node as well (their addresses are in the shard map)."""

    def __init__(
        self,
        n_shards: int,
        gpus_per_shard: float | None = None,
        placement: str = "spread",
        snapshot_dir: str | None = None,
        allow_partial: bool = False,
        snapshot_every_s: float = 0.0,
        name: str = "default",
        shard_endpoint: ShardEndpoint | None = None,
    ):
        if placement not in ("spread", "pack"):
            raise InvalidArgument(f"placement must be 'spread' or 'pack', got {placement!r}")
        if gpus_per_shard is None:
            gpus_per_shard = 1.0 if ray.cluster_resources().get("GPU", 0) >= n_shards else 0.0
        super().__init__(name, n_shards, allow_partial)
        self.snapshot_dir = snapshot_dir
        bundle = {"GPU": gpus_per_shard} if gpus_per_shard else {"memory": SHARD_MEMORY}
        self.placement_group = placement_group([bundle] * n_shards, strategy=placement.upper())
        try:
            ray.get(self.placement_group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            remove_placement_group(self.placement_group)
            raise InvalidArgument(
                f"cannot place {n_shards} shards with {bundle} each on this cluster "
                f"({ray.cluster_resources()}); lower --shards or --gpus-per-shard"
            ) from None
        shard_names = [f"shard-{name}-{i}" for i in range(n_shards)]
        self.shards = [
            ShardActor.options(
                name=shard_names[i],
                namespace=NAMESPACE,
                num_cpus=0,
                num_gpus=gpus_per_shard,
                memory=None if gpus_per_shard else SHARD_MEMORY,
                max_restarts=-1,
                runtime_env=ACTOR_ENV,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            ).remote(i, n_shards, snapshot_dir, shard_endpoint)
            for i in range(n_shards)
        ]
        here = ray.get_runtime_context().get_node_id()  # the coordinator stays with the server
        self.coordinator = CoordinatorActor.options(
            name=f"coordinator-{name}",
            namespace=NAMESPACE,
            num_cpus=0,
            max_restarts=-1,
            runtime_env=ACTOR_ENV,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote(shard_names, snapshot_dir)
        shard_map = self.shard_map()
        self.devices = [d["device"] for d in shard_map]
        nodes = [d["node_id"] for d in shard_map]
        share = zip(self.shards, nodes, strict=True)
        ray.get([s.share_cores.remote(nodes.count(n)) for s, n in share])
        self._stop = threading.Event()
        threading.Thread(target=self._health_loop, daemon=True).start()
        if snapshot_dir and snapshot_every_s > 0:
            threading.Thread(
                target=self._snapshot_loop, args=(snapshot_every_s,), daemon=True
            ).start()

    def _health_loop(self) -> None:
        """Ping every shard; a shard that does not answer in time is `down` until it does."""
        while not self._stop.wait(HEALTH_EVERY_S):
            pings = {s: shard.ping.remote() for s, shard in enumerate(self.shards)}
            ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=2.0)
            down = set()
            for s, ref in pings.items():
                try:
                    if ref not in ready:
                        raise GetTimeoutError
                    ray.get(ref)
                except (RayActorError, GetTimeoutError):
                    down.add(s)
            if down != self.down:
                log.warning("shards down: %s", sorted(down) or "none")
            self.down = down

    def _snapshot_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.snapshot()
            except ServiceError as e:
                log.warning("periodic snapshot failed: %s", e.message)

    def shutdown(self) -> None:
        """Stop the actors, saving a last snapshot first when there is a snapshot dir."""
        self._stop.set()
        if self.snapshot_dir:
            try:
                self.snapshot()
            except ServiceError as e:
                log.warning("final snapshot failed: %s", e.message)
        for actor in [self.coordinator, *self.shards]:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)


def find_service(name: str = "default") -> str:
    """The gRPC address of memory service `name` running on this Ray cluster (for code
    inside it: a training or inference worker), found through its coordinator actor."""
    try:
        coordinator = ray.get_actor(f"coordinator-{name}", namespace=NAMESPACE)
    except ValueError:
        raise Unavailable(f"no longmem memory service {name!r} runs on this Ray cluster") from None
    address = get_all({0: coordinator.endpoint.remote()}, "coordinator")[0]
    if address is None:
        raise Unavailable("the memory service on this Ray cluster is still starting")
    return address

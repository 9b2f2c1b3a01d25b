"""Deploy, find and stop the memory service on Ray: shard actors and a coordinator behind a
gRPC server.

`start_service` launches everything and returns the running `Service`; `Service.stop()`
ends it. `find_service` gives code elsewhere in the cluster the address of a running one.

Placement: the shards are one Ray placement group, one bundle each, spread over the nodes
(`placement="spread"`, soft: several shards share a node when there are fewer nodes) or
packed. A bundle asks for `gpus_per_shard` GPUs when the cluster has them, and a nominal
amount of memory otherwise (it needs no CPU: searches are matrix products that use the
node's cores anyway, and leaving CPUs unclaimed keeps them for training workers).

Restarts: shard and coordinator actors restart without limit when their process or node
dies (see `memory_service.actors`); with a snapshot dir and a durability other than `none`
(`memory_service.wal`, default `group`) they replay their write-ahead logs, so no
acknowledged append is lost. While a shard is down (the service pings every shard
twice a second) searches fail fast with Unavailable, or with `allow_partial` are answered
by the other shards.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from memory_service import metrics
from memory_service.actor_calls import (
    NAMESPACE,
    CoordinatorCall,
    ShardActors,
    coordinator_name,
    shard_name,
)
from memory_service.actors import CoordinatorActor, ShardActor
from memory_service.engine import MemoryEngine
from memory_service.errors import InvalidArgument, ServiceError, Unavailable
from memory_service.server import advertised, start_server
from memory_service.tenancy import TenantTable
from memory_service.tls import ServerTLS
from memory_service.wal import DEFAULT_DURABILITY, check_durability
from memory_service.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("longmem.service")

SHARD_MEMORY = 64 << 20  # nominal bundle size when shards take no GPU
HEALTH_EVERY_S = 0.5  # how often the service pings its shards
BANK_STATS_EVERY_S = 5.0  # how often the bank gauges of the metrics are refreshed
PLACEMENT_TIMEOUT_S = 120.0
# torch tensors cross actor boundaries through shared memory, not pickled copies (10x faster
# for a search's chunk table)
ACTOR_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}


@dataclass(frozen=True)
class ShardEndpoint:
    """Asks every shard to serve the whole gRPC API on its own node as well.

    With `tls`, each shard serves TLS with the same files, read on the shard's node: they
    must be at the same paths on every node (on KubeRay, mount the longmem-tls Secret in
    the worker pods too: the manifests, without shard endpoints, mount it on the head only),
    and the certificate must name the addresses clients dial (each node's, as the shard map
    lists them).
    """

    host: str  # address to bind, e.g. 0.0.0.0 to be reachable from other nodes
    tenants: TenantTable
    service: str
    allow_partial: bool = False
    tls: ServerTLS | None = None


class Service:
    """A running memory service (made by `start_service`): `n_shards` shard actors in a
    placement group, a coordinator, the engine over them and, once `serve` ran, a gRPC
    server at `address`. It checks the shards' health and takes periodic snapshots."""

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
        durability: str = DEFAULT_DURABILITY,
    ):
        if placement not in ("spread", "pack"):
            raise InvalidArgument(f"placement must be 'spread' or 'pack', got {placement!r}")
        check_durability(durability)
        if gpus_per_shard is None:
            gpus_per_shard = 1.0 if ray.cluster_resources().get("GPU", 0) >= n_shards else 0.0
        self.snapshot_dir = snapshot_dir
        self.server, self.address = None, ""
        self.metrics_server, self.metrics_port = None, None
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
        self.shards = [
            ShardActor.options(
                name=shard_name(name, i),
                namespace=NAMESPACE,
                num_cpus=0,
                num_gpus=gpus_per_shard,
                memory=None if gpus_per_shard else SHARD_MEMORY,
                max_restarts=-1,
                runtime_env=ACTOR_ENV,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            ).remote(i, n_shards, snapshot_dir, shard_endpoint, durability)
            for i in range(n_shards)
        ]
        here = ray.get_runtime_context().get_node_id()  # the coordinator stays with the server
        self.coordinator = CoordinatorActor.options(
            name=coordinator_name(name),
            namespace=NAMESPACE,
            num_cpus=0,
            max_restarts=-1,
            runtime_env=ACTOR_ENV,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote(name, n_shards, snapshot_dir, durability)
        self.shard_calls = ShardActors(name, n_shards)
        self.engine = MemoryEngine(n_shards, CoordinatorCall(name), self.shard_calls, allow_partial)
        shard_map = self.engine.shard_map()
        self.devices = [s.device for s in shard_map]
        nodes = [s.node_id for s in shard_map]
        share = zip(self.shards, nodes, strict=True)
        ray.get([s.share_cores.remote(nodes.count(n)) for s, n in share])
        self._stop = threading.Event()
        threading.Thread(target=self._health_loop, daemon=True).start()
        if snapshot_dir and snapshot_every_s > 0:
            threading.Thread(
                target=self._snapshot_loop, args=(snapshot_every_s,), daemon=True
            ).start()

    def serve(
        self,
        tenants: TenantTable,
        host: str,
        port: int,
        max_message_bytes: int,
        tls: ServerTLS | None = None,
    ) -> None:
        """Start the gRPC server on host:port (0: a free port) and publish its address."""
        self.server, address = start_server(
            self.engine, tenants, host, port, max_message_bytes, tls=tls
        )
        self.address = advertised(address)
        self.engine.core("set_endpoint", self.address)

    def serve_metrics(self, tenants: TenantTable, host: str, port: int) -> None:
        """Serve Prometheus metrics at http://host:port/metrics (0: a free port; the port
        is then `metrics_port`), refreshing the tenants' bank gauges every few seconds."""
        self.metrics_server = metrics.serve(host, port)
        self.metrics_port = self.metrics_server.server_port
        threading.Thread(target=self._bank_stats_loop, args=(tenants,), daemon=True).start()

    def _bank_stats_loop(self, tenants: TenantTable) -> None:
        while True:
            for tenant in tenants.tenants.values():
                try:
                    banks = self.engine.list_banks(tenant)
                except ServiceError:
                    continue  # the coordinator is restarting: keep the last figures
                metrics.set_banks(
                    tenant.name,
                    len(banks),
                    sum(b.size_tokens for b in banks),
                    sum(b.bytes for b in banks),
                )
            if self._stop.wait(BANK_STATS_EVERY_S):
                return

    def _health_loop(self) -> None:
        """Ping every shard; a shard that does not answer in time is down until it does.
        A shard's answer names its actor's start (a new one: it restarted) and carries its
        write-ahead log's size and last replay time (metrics)."""
        started: dict[int, str] = {}
        while not self._stop.wait(HEALTH_EVERY_S):
            pings = {s: shard.ping.remote() for s, shard in enumerate(self.shards)}
            ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=2.0)
            down = set()
            for s, ref in pings.items():
                try:
                    if ref not in ready:
                        raise GetTimeoutError
                    incarnation, wal_bytes, replay_seconds = ray.get(ref)
                except (RayActorError, GetTimeoutError):
                    down.add(s)
                else:
                    metrics.set_wal(s, wal_bytes, replay_seconds)
                    if started.setdefault(s, incarnation) != incarnation:
                        started[s] = incarnation
                        metrics.count_restart(s)
            was_down = self.shard_calls.down
            for s in pings:
                metrics.set_shard_up(s, s not in down)
                if (s in down) != (s in was_down):
                    event = "shard down" if s in down else "shard up"
                    (log.warning if s in down else log.info)(event, extra={"shard": s})
            self.shard_calls.down = down

    def _snapshot_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.engine.snapshot()
            except ServiceError as e:
                log.warning("periodic snapshot failed", extra={"reason": e.message})

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving, then stop the actors, saving a last snapshot first when there is a
        snapshot dir."""
        if self.server is not None:
            self.server.stop(grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self._stop.set()
        if self.snapshot_dir:
            try:
                self.engine.snapshot()
            except ServiceError as e:
                log.warning("final snapshot failed", extra={"reason": e.message})
        for actor in [self.coordinator, *self.shards]:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)


def start_service(
    shards: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
    tenants: TenantTable | None = None,
    ray_address: str | None = None,
    gpus_per_shard: float | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    placement: str = "spread",
    snapshot_dir: str | None = None,
    snapshot_every_s: float = 0.0,
    allow_partial: bool = False,
    name: str = "default",
    shard_endpoints: bool = False,
    tls: ServerTLS | None = None,
    metrics_port: int | None = None,
    durability: str = DEFAULT_DURABILITY,
) -> Service:
    """Start shard and coordinator actors (joining `ray_address`, or an embedded local Ray
    when Ray is not running yet) and a gRPC server on host:port (0: a free port).

    `name` identifies the service on the Ray cluster (`find_service(name)`).
    `shard_endpoints`: every shard also serves the whole API on its own node (bound to
    `host`), so clients can spread over them; the shard map lists their addresses (with
    `tls` they serve TLS too: `ShardEndpoint`).
    `snapshot_dir` (a path every node can reach) makes shards restartable from snapshots
    (on demand, every `snapshot_every_s` seconds when > 0, and on a clean stop) and holds
    the write-ahead logs of `durability` (`none`, `group` or `fsync`: `memory_service.wal`).
    `tls`: serve over TLS. `metrics_port`: serve Prometheus metrics on host:port (0: any
    free port, then `Service.metrics_port`).
    """
    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    check_durability(durability)
    if tls is not None:
        tls.credentials()  # unreadable files: InvalidArgument now, before any actor starts
    if not ray.is_initialized():
        # the embedded Ray serves this process alone, on loopback: no token authentication
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address=ray_address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
    tenants = tenants or TenantTable.single()
    endpoint = ShardEndpoint(host, tenants, name, allow_partial, tls) if shard_endpoints else None
    service = Service(
        shards,
        gpus_per_shard,
        placement,
        snapshot_dir,
        allow_partial,
        snapshot_every_s,
        name,
        endpoint,
        durability,
    )
    try:
        service.serve(tenants, host, port, max_message_bytes, tls)
        if metrics_port is not None:
            service.serve_metrics(tenants, host, metrics_port)
    except Exception:
        service.stop()
        raise
    return service


def find_service(name: str = "default") -> str:
    """The gRPC address of memory service `name` running on this Ray cluster (for code
    inside it: a training or inference worker), found through its coordinator actor."""
    coordinator = CoordinatorCall(name)
    try:
        coordinator.handle  # noqa: B018  (the lookup)
    except ValueError:
        raise Unavailable(f"no longmem memory service {name!r} runs on this Ray cluster") from None
    address = coordinator("endpoint")
    if address is None:
        raise Unavailable("the memory service on this Ray cluster is still starting")
    return address

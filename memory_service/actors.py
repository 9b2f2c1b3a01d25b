"""The service's Ray actors: shards hold the banks' chunks, a coordinator holds the catalog.

Both are the plain classes (`shard.Shard`, `catalog.Catalog`) run in an actor process, found
by name (`memory_service.actor_calls`). `memory_service.service` launches them and looks
after them; a `MemoryEngine` over Ray calls them.

Restarts: Ray restarts either actor when its process or node dies. A restarted shard
reloads its banks from its last snapshot in `snapshot_dir` and replays its write-ahead log
(durability other than `none`, `memory_service.wal`); the restarted coordinator reloads the
catalog (saved on every change, or logged).

Both actors run their bank calls one at a time; `wait_durable` (an append waiting for its
log record's fsync) has a pool of threads of its own, so waiting appends share fsyncs and
never hold up the next call.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import ray
import torch

from memory_service.actor_calls import ShardActors, ray_engine
from memory_service.catalog import Catalog
from memory_service.shard import Shard, ShardInfo
from memory_service.wal import DEFAULT_DURABILITY

if TYPE_CHECKING:
    from memory_service.service import ShardEndpoint


DURABLE_WAITS = 256  # appends that can wait for their log's fsync at once, per actor


@ray.remote(concurrency_groups={"health": 1, "durable": DURABLE_WAITS})
class ShardActor(Shard):
    """A `Shard` in its own process, on a GPU when Ray gave it one; restores its snapshot
    and replays its log.

    Bank calls run one at a time; `ping` has its own thread, so a long search does not
    make a healthy shard look dead.
    """

    def __init__(
        self,
        index: int,
        n_shards: int,
        snapshot_dir: str | None,
        endpoint: ShardEndpoint | None = None,
        durability: str = DEFAULT_DURABILITY,
    ):
        # Ray limits an actor that claims no CPU to one thread; a search wants the node's cores
        torch.set_num_threads(os.cpu_count() or 1)
        super().__init__(index, n_shards, "cuda" if torch.cuda.is_available() else "cpu")
        self.incarnation = uuid.uuid4().hex  # new in every process Ray (re)starts the actor in
        self.restored = bool(snapshot_dir) and self.restore(snapshot_dir, durability)
        self.endpoint = None
        if endpoint is not None:  # the whole API, served from this shard's node too
            from memory_service.server import advertised, start_server

            engine = ray_engine(endpoint.service, n_shards, endpoint.allow_partial)
            self.server, address = start_server(
                engine, endpoint.tenants, endpoint.host, 0, tls=endpoint.tls
            )
            self.endpoint = advertised(address)

    @ray.method(concurrency_group="health")
    def ping(self) -> tuple[str, int, float]:
        """Alive; answers which start of the actor this is and `wal_stats()` (log bytes, last
        replay seconds), for the metrics."""
        return self.incarnation, *self.wal_stats()

    @ray.method(concurrency_group="durable")
    def wait_durable(self, seq: int) -> None:
        super().wait_durable(seq)

    def share_cores(self, shards_on_node: int) -> None:
        """Split the node's cores among the shards placed on it."""
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // shards_on_node))

    def info(self) -> ShardInfo:
        return replace(
            super().info(),
            node_id=ray.get_runtime_context().get_node_id(),
            node_address=ray.util.get_node_ip_address(),
            endpoint=self.endpoint or "",
            restored_from_snapshot=self.restored,
        )


@ray.remote(concurrency_groups={"durable": DURABLE_WAITS})
class CoordinatorActor(Catalog):
    """The catalog of service `service` in its own process: bank metadata, stream
    positions, the shard map; and the service's gRPC address, for workers to find."""

    def __init__(
        self,
        service: str,
        n_shards: int,
        snapshot_dir: str | None,
        durability: str = DEFAULT_DURABILITY,
    ):
        super().__init__(n_shards, ShardActors(service, n_shards), snapshot_dir, durability)
        self.address: str | None = None

    @ray.method(concurrency_group="durable")
    def wait_durable(self, seq: int) -> None:
        super().wait_durable(seq)

    def set_endpoint(self, address: str) -> None:
        self.address = address

    def endpoint(self) -> str | None:
        """The gRPC address (node IP:port) of the service, for workers in the cluster."""
        return self.address

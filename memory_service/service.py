"""Start and stop the whole memory service: Ray actors behind a gRPC server."""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc
import ray

from memory_service.actors import RayEngine
from memory_service.server import MAX_MESSAGE_BYTES, start_server
from memory_service.tenancy import TenantTable


@dataclass
class Service:
    engine: RayEngine
    server: grpc.Server
    address: str  # host:port the gRPC server listens on

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace).wait()
        self.engine.shutdown()


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
) -> Service:
    """Start shard and coordinator actors (joining `ray_address`, or an embedded local Ray
    when Ray is not running yet) and a gRPC server on host:port (0: a free port).

    `name` identifies the service on the Ray cluster (`actors.find_service(name)`).
    `snapshot_dir` (a path every node can reach) makes shards restartable from snapshots
    (on demand, every `snapshot_every_s` seconds when > 0, and on a clean stop).
    """
    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    if not ray.is_initialized():
        # the embedded Ray serves this process alone, on loopback: no token authentication
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address=ray_address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
    engine = RayEngine(
        shards, gpus_per_shard, placement, snapshot_dir, allow_partial, snapshot_every_s, name
    )
    try:
        server, address = start_server(
            engine, tenants or TenantTable.single(), host, port, max_message_bytes
        )
    except Exception:
        engine.shutdown()
        raise
    if host in ("0.0.0.0", "::", "[::]"):  # advertise the node's address, not the wildcard
        address = f"{ray.util.get_node_ip_address()}:{address.rsplit(':', 1)[1]}"
    engine.set_endpoint(address)
    return Service(engine, server, address)

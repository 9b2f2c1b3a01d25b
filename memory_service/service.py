"""Start and stop the whole memory service: Ray actors behind a gRPC server."""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc
import ray

from memory_service.actors import RayDeployment, ShardEndpoint
from memory_service.server import MAX_MESSAGE_BYTES, advertised, start_server
from memory_service.tenancy import TenantTable


@dataclass
class Service:
    engine: RayDeployment
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
    shard_endpoints: bool = False,
) -> Service:
    """Start shard and coordinator actors (joining `ray_address`, or an embedded local Ray
    when Ray is not running yet) and a gRPC server on host:port (0: a free port).

    `name` identifies the service on the Ray cluster (`actors.find_service(name)`).
    `shard_endpoints`: every shard also serves the whole API on its own node (bound to
    `host`), so clients can spread over them; the shard map lists their addresses.
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
    tenants = tenants or TenantTable.single()
    endpoint = ShardEndpoint(host, tenants, name, allow_partial) if shard_endpoints else None
    engine = RayDeployment(
        shards,
        gpus_per_shard,
        placement,
        snapshot_dir,
        allow_partial,
        snapshot_every_s,
        name,
        endpoint,
    )
    try:
        server, address = start_server(engine, tenants, host, port, max_message_bytes)
    except Exception:
        engine.shutdown()
        raise
    address = advertised(address)
    engine.set_endpoint(address)
    return Service(engine, server, address)

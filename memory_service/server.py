"""The gRPC front door: authenticates each call, decodes tensors, runs an engine.

Serves `longmem.v1.MemoryService`, the standard `grpc.health.v1` health service and
server reflection. Every refused call gets a status code and a message; the engine's
state is unchanged by it and the server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memory_service.engine import Engine
from memory_service.errors import PermissionDenied, ServiceError
from memory_service.tenancy import Tenant, TenantTable
from memory_service.wire import (
    MAX_MESSAGE_BYTES,
    SEARCH_PART_BYTES,
    append_to_wire,
    decode,
    info_to_wire,
    search_messages,
    shard_map_to_wire,
    snapshot_to_wire,
    spec_from_wire,
)
from protos.longmem.v1 import memory_pb2 as pb
from protos.longmem.v1 import memory_pb2_grpc as pb_grpc

log = logging.getLogger("longmem.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    """`longmem.v1.MemoryService` over an engine, for the tenants in `tenants`."""

    def __init__(self, engine: Engine, tenants: TenantTable):
        self.engine = engine
        self.tenants = tenants

    def _tenant(self, context: grpc.ServicerContext, writes: bool) -> Tenant:
        key = dict(context.invocation_metadata()).get("x-api-key")
        tenant = self.tenants.authenticate(key)
        if writes and tenant.read_only:
            raise PermissionDenied(f"tenant {tenant.name!r} is read-only")
        return tenant

    def _run(self, context: grpc.ServicerContext, writes: bool, fn):
        try:
            return fn(self._tenant(context, writes))
        except ServiceError as e:
            context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except Exception:  # a bug, not the caller's fault: log it, keep serving
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    def CreateBank(self, request, context):
        return self._run(
            context,
            True,
            lambda t: info_to_wire(
                self.engine.create_bank(t, request.name, spec_from_wire(request.spec))
            ),
        )

    def DeleteBank(self, request, context):
        self._run(context, True, lambda t: self.engine.delete_bank(t, request.name))
        return pb.DeleteBankResponse()

    def ResetBank(self, request, context):
        return self._run(
            context, True, lambda t: info_to_wire(self.engine.reset_bank(t, request.name))
        )

    def ListBanks(self, request, context):
        return self._run(
            context,
            False,
            lambda t: pb.ListBanksResponse(
                banks=[info_to_wire(d) for d in self.engine.list_banks(t)]
            ),
        )

    def DescribeBank(self, request, context):
        return self._run(
            context, False, lambda t: info_to_wire(self.engine.describe_bank(t, request.name))
        )

    def Append(self, request, context):
        def append(tenant: Tenant) -> pb.AppendResponse:
            keys = decode(request.keys, "keys")
            values = decode(request.values, "values")
            return append_to_wire(self.engine.append(tenant, request.bank, keys, values))

        return self._run(context, True, append)

    def Search(self, request, context):
        def search(tenant: Tenant) -> Iterator[pb.SearchResponse]:
            queries = decode(request.queries, "queries")
            result = self.engine.search(tenant, list(request.banks), queries, request.top_k)
            return search_messages(result)

        yield from self._run(context, False, search)

    def Snapshot(self, request, context):
        return self._run(context, True, lambda t: snapshot_to_wire(self.engine.snapshot()))

    def DescribeService(self, request, context):
        return self._run(context, False, lambda t: shard_map_to_wire(self.engine.shard_map()))


def advertised(address: str) -> str:
    """The address others should dial: a wildcard bind is replaced by this node's IP."""
    host, port = address.rsplit(":", 1)
    if host in ("0.0.0.0", "::", "[::]"):
        import ray

        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"


def start_server(
    engine: Engine,
    tenants: TenantTable,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    workers: int = 8,
) -> tuple[grpc.Server, str]:
    """Start serving on host:port (0 picks a free port); returns the server and its address."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, 2 * SEARCH_PART_BYTES)),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    pb_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(engine, tenants), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, f"{host}:{bound}"

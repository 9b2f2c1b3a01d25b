"""The gRPC front door: authenticates each call, decodes tensors, runs an engine.

Serves `longmem.v1.MemoryService`, the standard `grpc.health.v1` health service and
server reflection, in plaintext or TLS. Every refused call gets a status code and a
message; the engine's state is unchanged by it and the server keeps serving. Every call
passes `interceptor.FrontDoor` (request parsing, metrics); the bank events and refusals
are logged as JSON lines (`memory_service.logs`) naming tenant and bank, never a key.

A tenant runs at most `max_concurrent_searches` searches at once on a server (the shards
run one bank call at a time, so this bounds how long another tenant's search queues
behind its searches); up to `MAX_WAITING_SEARCHES` more wait their turn, and beyond that
a search is refused with RESOURCE_EXHAUSTED and the trailing metadata `retry-after-ms`,
which `MemoryClient` honours. A waiting search holds a thread but no CPU, so a tenant that
floods the service cannot starve the others.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memory_service import metrics
from memory_service.engine import Engine
from memory_service.errors import PermissionDenied, ResourceExhausted, ServiceError
from memory_service.interceptor import FrontDoor
from memory_service.tenancy import Tenant, TenantTable
from memory_service.tls import ServerTLS
from memory_service.wire import (
    MAX_MESSAGE_BYTES,
    SEARCH_PART_BYTES,
    append_to_wire,
    decode,
    delete_to_wire,
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
RETRY_AFTER = "retry-after-ms"  # trailing metadata of a refusal worth retrying shortly
BUSY_RETRY_MS = 50
MAX_WAITING_SEARCHES = 8  # per tenant, beyond its running ones
MAX_WAIT_S = 30.0  # the longest a search waits for its turn (less when its deadline is closer)


class Busy(ResourceExhausted):
    """A tenant at its limit of concurrent searches; worth retrying shortly."""


class SearchSlots:
    """Searches running per tenant, each bounded by its `max_concurrent_searches`, and the
    searches waiting for a turn, at most `MAX_WAITING_SEARCHES` per tenant."""

    def __init__(self):
        self._turn = threading.Condition()
        self._running: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()

    @contextmanager
    def slot(self, tenant: Tenant, wait_s: float) -> Iterator[None]:
        """Run the body as one of `tenant`'s searches, after waiting up to `wait_s` for a
        turn; Busy when too many wait already or the turn does not come in time."""
        name, limit = tenant.name, tenant.max_concurrent_searches
        with self._turn:
            if self._running[name] >= limit and self._waiting[name] >= MAX_WAITING_SEARCHES:
                raise Busy(
                    f"tenant {name!r} already runs {limit} searches (its "
                    f"max_concurrent_searches) and {MAX_WAITING_SEARCHES} more wait; retry later"
                )
            self._waiting[name] += 1
            try:
                turn = self._turn.wait_for(lambda: self._running[name] < limit, wait_s)
            finally:
                self._waiting[name] -= 1
            if not turn:
                raise Busy(f"tenant {name!r}: no turn among its {limit} searches in {wait_s:.1f} s")
            self._running[name] += 1
        try:
            yield
        finally:
            with self._turn:
                self._running[name] -= 1
                self._turn.notify_all()


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    """`longmem.v1.MemoryService` over an engine, for the tenants in `tenants`."""

    def __init__(self, engine: Engine, tenants: TenantTable):
        self.engine = engine
        self.tenants = tenants
        self.searches = SearchSlots()

    @contextmanager
    def _answer(
        self, context: grpc.ServicerContext, method: str, writes: bool, bank: str = ""
    ) -> Iterator[Tenant]:
        """Authenticate the call and give its tenant; a refusal inside is logged and
        becomes the call's status."""
        tenant_name = "-"
        try:
            key = dict(context.invocation_metadata()).get("x-api-key")
            tenant = self.tenants.authenticate(key)
            tenant_name = tenant.name
            metrics.TENANT.set(tenant_name)
            if writes and tenant.read_only:
                raise PermissionDenied(f"tenant {tenant.name!r} is read-only")
            yield tenant
        except ServiceError as e:
            fields = {"method": method, "tenant": tenant_name, "bank": bank, "code": e.code}
            fields["reason"] = e.message
            busy = isinstance(e, Busy)  # may come in floods: logged at debug level
            (log.debug if busy else log.info)("request refused", extra=fields)
            if busy:
                context.set_trailing_metadata(((RETRY_AFTER, str(BUSY_RETRY_MS)),))
            context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except Exception:  # a bug, not the caller's fault: log it, keep serving
            log.exception(
                "internal error", extra={"method": method, "tenant": tenant_name, "bank": bank}
            )
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    def _bank_event(self, event: str, tenant: Tenant, bank: str) -> None:
        log.info(event, extra={"tenant": tenant.name, "bank": bank})

    def CreateBank(self, request, context):
        with self._answer(context, "CreateBank", True, request.name) as t:
            info = self.engine.create_bank(t, request.name, spec_from_wire(request.spec))
        self._bank_event("bank created", t, request.name)
        return info_to_wire(info)

    def DeleteBank(self, request, context):
        with self._answer(context, "DeleteBank", True, request.name) as t:
            self.engine.delete_bank(t, request.name)
        self._bank_event("bank deleted", t, request.name)
        return pb.DeleteBankResponse()

    def ResetBank(self, request, context):
        with self._answer(context, "ResetBank", True, request.name) as t:
            info = self.engine.reset_bank(t, request.name)
        self._bank_event("bank reset", t, request.name)
        return info_to_wire(info)

    def ListBanks(self, request, context):
        with self._answer(context, "ListBanks", False) as t:
            return pb.ListBanksResponse(banks=[info_to_wire(d) for d in self.engine.list_banks(t)])

    def DescribeBank(self, request, context):
        with self._answer(context, "DescribeBank", False, request.name) as t:
            return info_to_wire(self.engine.describe_bank(t, request.name))

    def Append(self, request, context):
        with self._answer(context, "Append", True, request.bank) as t:
            keys = decode(request.keys, "keys")
            values = decode(request.values, "values")
            info = self.engine.append(t, request.bank, keys, values, request.document)
            return append_to_wire(info)

    def DeleteDocument(self, request, context):
        with self._answer(context, "DeleteDocument", True, request.bank) as t:
            info = self.engine.delete_document(t, request.bank, request.document)
        log.info(
            "document deleted",
            extra={"tenant": t.name, "bank": request.bank, "chunks": info.deleted_chunks},
        )
        return delete_to_wire(info)

    def Search(self, request, context):
        banks = list(request.banks)
        bank = ",".join(dict.fromkeys(banks))
        wait_s = min(MAX_WAIT_S, context.time_remaining() or MAX_WAIT_S)
        with self._answer(context, "Search", False, bank) as t, self.searches.slot(t, wait_s):
            queries = decode(request.queries, "queries")
            yield from search_messages(self.engine.search(t, banks, queries, request.top_k))

    def Snapshot(self, request, context):
        with self._answer(context, "Snapshot", True):
            return snapshot_to_wire(self.engine.snapshot())

    def DescribeService(self, request, context):
        with self._answer(context, "DescribeService", False):
            return shard_map_to_wire(self.engine.shard_map())


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
    workers: int = 64,
    tls: ServerTLS | None = None,
) -> tuple[grpc.Server, str]:
    """Start serving on host:port (0 picks a free port), with TLS when `tls` is given;
    returns the server and its address."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, 2 * SEARCH_PART_BYTES)),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[FrontDoor()],
        options=options,
    )
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
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.credentials())
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, f"{host}:{bound}"

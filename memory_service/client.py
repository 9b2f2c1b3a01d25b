"""Clients of the memory service. Both have the same methods and return the same things.

- `InProcessClient`: the service's own code in this process (no Ray, no gRPC), for
  single-process use and tests.
- `MemoryClient`: a gRPC client of a running service (`longmem serve`).

Errors are raised as `memory_service.errors` exceptions (InvalidArgument, NotFound, ...)
by both, so callers handle one family of errors whichever client they hold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
import torch

from memory_service import errors, wire
from memory_service.bank import AppendInfo, BankInfo, BankSpec, DeleteInfo
from memory_service.engine import MemoryEngine
from memory_service.search import SearchResult
from memory_service.shard import ShardInfo, ShardSnapshot
from memory_service.tenancy import DEFAULT_API_KEY, Tenant
from memory_service.tls import ClientTLS
from protos.longmem.v1 import memory_pb2 as pb
from protos.longmem.v1 import memory_pb2_grpc as pb_grpc


class InProcessClient:
    """The memory service in this process, for one tenant. With `snapshot_dir`,
    `snapshot()` saves it there and a new client with the same folder starts from it."""

    def __init__(self, n_shards: int = 1, device: str = "cpu", snapshot_dir: str | None = None):
        self.engine = MemoryEngine.local(n_shards, device, snapshot_dir)
        self.tenant = Tenant("local", ())

    def create_bank(self, name: str, **spec) -> BankInfo:
        return self.engine.create_bank(self.tenant, name, BankSpec(**spec))

    def delete_bank(self, name: str) -> None:
        self.engine.delete_bank(self.tenant, name)

    def reset_bank(self, name: str) -> BankInfo:
        return self.engine.reset_bank(self.tenant, name)

    def list_banks(self) -> list[BankInfo]:
        return self.engine.list_banks(self.tenant)

    def describe_bank(self, name: str) -> BankInfo:
        return self.engine.describe_bank(self.tenant, name)

    def append(
        self, name: str, keys: torch.Tensor, values: torch.Tensor, document: str = ""
    ) -> AppendInfo:
        """Append `(n_tokens, kv_heads, head_dim)` keys and values in stream order, as
        tokens of `document` (an id for `delete_document`; "" for none)."""
        return self.engine.append(self.tenant, name, keys, values, document)

    def delete_document(self, name: str, document: str) -> DeleteInfo:
        """Remove every chunk of the bank holding a token of `document`."""
        return self.engine.delete_document(self.tenant, name, document)

    def search(self, names: Sequence[str], queries: torch.Tensor, top_k: int) -> SearchResult:
        """Top `top_k` chunks for queries `(B, n, q_heads, head_dim)`, row b in bank `names[b]`."""
        return self.engine.search(self.tenant, list(names), queries, top_k).expand()

    def snapshot(self) -> list[ShardSnapshot]:
        """Save the catalog and the shards to `snapshot_dir` now."""
        return self.engine.snapshot()

    def shard_map(self) -> list[ShardInfo]:
        """The shards (all in this process) and what they hold."""
        return self.engine.shard_map()

    def close(self) -> None:
        pass


def _raise_as_service_error(e: grpc.RpcError) -> None:
    cls = {c.code: c for c in errors.ServiceError.__subclasses__()}.get(e.code().name)
    if cls is None:
        raise e
    raise cls(e.details()) from None


def _retry_after_s(e: grpc.RpcError) -> float | None:
    """The pause the server asked for before a retry (a tenant at its search limit)."""
    for key, value in e.trailing_metadata() or ():
        if key == "retry-after-ms":
            return int(value) / 1e3
    return None


class MemoryClient:
    """gRPC client of a running memory service at `address` (host:port); over TLS with
    `tls` (the CA to trust, and a client certificate for a server that requires one)."""

    def __init__(
        self,
        address: str,
        api_key: str = DEFAULT_API_KEY,
        timeout: float = 120.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        tls: ClientTLS | None = None,
    ):
        options = [
            ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
        ]
        self.address, self.timeout = address, timeout
        self.retries, self.backoff_s = retries, backoff_s
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, tls.credentials(), options=options)
        self.stub = pb_grpc.MemoryServiceStub(self.channel)
        self.metadata = (("x-api-key", api_key),)

    def _rpc(self, method: str, request, retry: bool = False):
        """Call `method`. With `retry` (calls that only read), UNAVAILABLE (a shard or the
        coordinator restarting) is retried with exponential back-off, and so is a search
        refused because the tenant runs too many at once (after the pause the server asks
        for); writes are not retried, since a write the service half-did must not be done
        twice."""
        for attempt in range(self.retries + 1):
            try:
                answer = getattr(self.stub, method)(
                    request, metadata=self.metadata, timeout=self.timeout
                )
                return wire.read_search_stream(answer) if method == "Search" else answer
            except grpc.RpcError as e:
                asked = _retry_after_s(e)  # the tenant has too many searches waiting
                if asked is not None:
                    pause = asked * 2**attempt
                elif e.code() == grpc.StatusCode.UNAVAILABLE:
                    pause = min(self.backoff_s * 2**attempt, 5.0)
                else:
                    pause = None
                if not retry or pause is None or attempt == self.retries:
                    _raise_as_service_error(e)
                time.sleep(pause)

    def create_bank(self, name: str, **spec) -> BankInfo:
        request = pb.CreateBankRequest(name=name, spec=wire.spec_to_wire(BankSpec(**spec)))
        return wire.info_from_wire(self._rpc("CreateBank", request))

    def delete_bank(self, name: str) -> None:
        self._rpc("DeleteBank", pb.BankRef(name=name))

    def reset_bank(self, name: str) -> BankInfo:
        return wire.info_from_wire(self._rpc("ResetBank", pb.BankRef(name=name)))

    def list_banks(self) -> list[BankInfo]:
        answer = self._rpc("ListBanks", pb.ListBanksRequest(), retry=True)
        return [wire.info_from_wire(b) for b in answer.banks]

    def describe_bank(self, name: str) -> BankInfo:
        return wire.info_from_wire(self._rpc("DescribeBank", pb.BankRef(name=name), retry=True))

    def append(
        self, name: str, keys: torch.Tensor, values: torch.Tensor, document: str = ""
    ) -> AppendInfo:
        """Append `(n_tokens, kv_heads, head_dim)` keys and values in stream order, as
        tokens of `document` (an id for `delete_document`; "" for none)."""
        request = pb.AppendRequest(
            bank=name, keys=wire.encode(keys), values=wire.encode(values), document=document
        )
        return wire.append_from_wire(self._rpc("Append", request))

    def delete_document(self, name: str, document: str) -> DeleteInfo:
        """Remove every chunk of the bank holding a token of `document`."""
        request = pb.DeleteDocumentRequest(bank=name, document=document)
        return wire.delete_from_wire(self._rpc("DeleteDocument", request))

    def search(self, names: Sequence[str], queries: torch.Tensor, top_k: int) -> SearchResult:
        """Top `top_k` chunks for queries `(B, n, q_heads, head_dim)`, row b in bank `names[b]`.
        A search whose answer header (16 bytes per found chunk) would pass half the message
        limit is sent as several, over consecutive ranges of the n queries."""
        B, n, Hq, _ = queries.shape
        per_query = max(1, B * Hq * top_k * wire.SEARCH_ENTRY_BYTES)
        step = max(1, wire.MAX_MESSAGE_BYTES // 2 // per_query)
        parts = []
        for i in range(0, max(n, 1), step):
            request = pb.SearchRequest(
                banks=list(names), queries=wire.encode(queries[:, i : i + step]), top_k=top_k
            )
            parts.append(self._rpc("Search", request, retry=True).expand())
        return SearchResult.cat_queries(parts)

    def snapshot(self) -> list[ShardSnapshot]:
        """Save the service's catalog and shards to its --snapshot-dir now."""
        return wire.snapshot_from_wire(self._rpc("Snapshot", pb.SnapshotRequest(), retry=True))

    def shard_map(self) -> list[ShardInfo]:
        """Where each shard runs (node, address, device) and whether it is up."""
        answer = self._rpc("DescribeService", pb.DescribeServiceRequest(), retry=True)
        return wire.shard_map_from_wire(answer)

    def close(self) -> None:
        self.channel.close()


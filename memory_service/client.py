"""Clients of the memory service. Both have the same methods and return the same things.

- `InProcessClient`: the service's own code in this process (no Ray, no gRPC), for
  single-process use and tests.
- `MemoryClient`: a gRPC client of a running service (`longmem serve`).

Errors are raised as `memory_service.errors` exceptions (InvalidArgument, NotFound, ...)
by both, so callers handle one family of errors whichever client they hold.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import grpc
import torch

from memory_service import errors
from memory_service.bank import BankSpec
from memory_service.engine import MemoryEngine
from memory_service.search import CompactResult, SearchResult
from memory_service.tenancy import DEFAULT_API_KEY, Tenant
from memory_service.wire import NAME_OF, TORCH_OF, WIRE_OF, decode, encode
from protos.longmem.v1 import memory_pb2 as pb
from protos.longmem.v1 import memory_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 << 20  # one gRPC message; search answers stream in parts below it


class InProcessClient:
    """The memory service in this process, for one tenant. With `snapshot_dir`,
    `snapshot()` saves it there and a new client with the same folder starts from it."""

    def __init__(self, n_shards: int = 1, device: str = "cpu", snapshot_dir: str | None = None):
        self.engine = MemoryEngine.local(n_shards, device, snapshot_dir)
        self.tenant = Tenant("local", ())

    def create_bank(self, name: str, **spec) -> dict:
        return self.engine.create_bank(self.tenant, name, BankSpec(**spec))

    def delete_bank(self, name: str) -> None:
        self.engine.delete_bank(self.tenant, name)

    def reset_bank(self, name: str) -> dict:
        return self.engine.reset_bank(self.tenant, name)

    def list_banks(self) -> list[dict]:
        return self.engine.list_banks(self.tenant)

    def describe_bank(self, name: str) -> dict:
        return self.engine.describe_bank(self.tenant, name)

    def append(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> dict:
        """Append `(n_tokens, kv_heads, head_dim)` keys and values in stream order."""
        return self.engine.append(self.tenant, name, keys, values)

    def search(self, names: Sequence[str], queries: torch.Tensor, top_k: int) -> SearchResult:
        """Top `top_k` chunks for queries `(B, n, q_heads, head_dim)`, row b in bank `names[b]`."""
        return self.engine.search(self.tenant, list(names), queries, top_k).expand()

    def snapshot(self) -> list[dict]:
        """Save the catalog and the shards to `snapshot_dir` now."""
        return self.engine.snapshot()

    def shard_map(self) -> list[dict]:
        """The shards (all in this process) and what they hold."""
        return self.engine.shard_map()

    def close(self) -> None:
        pass


def info_dict(info: pb.BankInfo) -> dict:
    s = info.spec
    spec = BankSpec(
        s.kv_heads,
        s.head_dim,
        s.chunk_size,
        s.capacity_tokens,
        NAME_OF[s.dtype],
        s.index,
        s.eviction,
    )
    return {
        "name": info.name,
        "spec": spec.to_dict(),
        "chunks": info.chunks,
        "size_tokens": info.size_tokens,
        "pending_tokens": info.pending_tokens,
        "appended_chunks": info.appended_chunks,
        "evicted_chunks": info.evicted_chunks,
        "lost_chunks": info.lost_chunks,
        "shards": info.shards,
        "bytes": info.bytes,
        "created_at": info.created_at,
    }


def _raise_as_service_error(e: grpc.RpcError) -> None:
    cls = {c.code: c for c in errors.ServiceError.__subclasses__()}.get(e.code().name)
    if cls is None:
        raise e
    raise cls(e.details()) from None


class MemoryClient:
    """gRPC client of a running memory service at `address` (host:port)."""

    def __init__(
        self,
        address: str,
        api_key: str = DEFAULT_API_KEY,
        timeout: float = 120.0,
        retries: int = 4,
        backoff_s: float = 0.25,
    ):
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self.address, self.timeout = address, timeout
        self.retries, self.backoff_s = retries, backoff_s
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.MemoryServiceStub(self.channel)
        self.metadata = (("x-api-key", api_key),)

    def _rpc(self, method: str, request, retry: bool = False):
        """Call `method`. With `retry` (calls that only read), UNAVAILABLE (a shard or the
        coordinator restarting) is retried with exponential back-off; writes are not
        retried, since a write the service half-did must not be done twice."""
        for attempt in range(self.retries + 1):
            try:
                answer = getattr(self.stub, method)(
                    request, metadata=self.metadata, timeout=self.timeout
                )
                return read_search_stream(answer) if method == "Search" else answer
            except grpc.RpcError as e:
                if not (retry and e.code() == grpc.StatusCode.UNAVAILABLE) or (
                    attempt == self.retries
                ):
                    _raise_as_service_error(e)
                time.sleep(min(self.backoff_s * 2**attempt, 5.0))

    def create_bank(self, name: str, **spec) -> dict:
        s = BankSpec(**spec)
        wire = pb.BankSpec(
            kv_heads=s.kv_heads,
            head_dim=s.head_dim,
            chunk_size=s.chunk_size,
            capacity_tokens=s.capacity_tokens,
            dtype=WIRE_OF[s.torch_dtype],
            index=s.index,
            eviction=s.eviction,
        )
        return info_dict(self._rpc("CreateBank", pb.CreateBankRequest(name=name, spec=wire)))

    def delete_bank(self, name: str) -> None:
        self._rpc("DeleteBank", pb.BankRef(name=name))

    def reset_bank(self, name: str) -> dict:
        return info_dict(self._rpc("ResetBank", pb.BankRef(name=name)))

    def list_banks(self) -> list[dict]:
        answer = self._rpc("ListBanks", pb.ListBanksRequest(), retry=True)
        return [info_dict(b) for b in answer.banks]

    def describe_bank(self, name: str) -> dict:
        return info_dict(self._rpc("DescribeBank", pb.BankRef(name=name), retry=True))

    def append(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> dict:
        """Append `(n_tokens, kv_heads, head_dim)` keys and values in stream order."""
        request = pb.AppendRequest(bank=name, keys=encode(keys), values=encode(values))
        r = self._rpc("Append", request)
        return {
            "appended_tokens": r.appended_tokens,
            "pending_tokens": r.pending_tokens,
            "appended_chunks": r.appended_chunks,
            "lost_chunks": r.lost_chunks,
        }

    def search(self, names: Sequence[str], queries: torch.Tensor, top_k: int) -> SearchResult:
        """Top `top_k` chunks for queries `(B, n, q_heads, head_dim)`, row b in bank `names[b]`."""
        request = pb.SearchRequest(banks=list(names), queries=encode(queries), top_k=top_k)
        return self._rpc("Search", request, retry=True).expand()

    def snapshot(self) -> list[dict]:
        """Save the service's catalog and shards to its --snapshot-dir now."""
        answer = self._rpc("Snapshot", pb.SnapshotRequest(), retry=True)
        return [{"shard": s.shard, "banks": s.banks, "bytes": s.bytes} for s in answer.shards]

    def shard_map(self) -> list[dict]:
        """Where each shard runs (node, address, device) and whether it is up."""
        answer = self._rpc("DescribeService", pb.DescribeServiceRequest(), retry=True)
        fields = (
            "index",
            "available",
            "node_id",
            "node_address",
            "device",
            "endpoint",
            "banks",
            "restored_from_snapshot",
        )
        return [{f: getattr(s, f) for f in fields} for s in answer.shards]

    def close(self) -> None:
        self.channel.close()


def read_search_stream(stream) -> CompactResult:
    """Reassemble a CompactResult from the streamed SearchResponse messages."""
    first = next(stream)
    h = first.header
    shape = (h.table_rows, h.chunk_size, h.head_dim)
    keys = torch.empty(shape, dtype=TORCH_OF[h.dtype])
    values = torch.empty_like(keys)
    for msg in itertools.chain([first], stream):
        part = decode(msg.table_keys, "table_keys")
        rows = slice(msg.row_offset, msg.row_offset + part.shape[0])
        keys[rows], values[rows] = part, decode(msg.table_values, "table_values")
    return CompactResult(
        decode(h.scores, "scores"),
        decode(h.chunk_ids, "chunk_ids"),
        decode(h.slots, "slots").long(),
        keys,
        values,
        tuple(h.missing_shards),
    )

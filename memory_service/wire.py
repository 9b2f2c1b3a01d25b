"""Every conversion between the service's Python objects and its protobuf messages
(`protos/longmem/v1/memory.proto`); the gRPC server and client only call these.

Tensors travel as raw little-endian bytes with dtype and shape (`longmem.v1.Tensor`). A
message and the dataclass it carries (`BankSpec`, `BankInfo`, `AppendInfo`, `DeleteInfo`,
`ShardInfo`, `ShardSnapshot`) have fields of the same names, so each field is named once, in the
dataclass. A search answer streams as a header and then its chunk table in parts
(`search_messages`, `read_search_stream`).
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, fields

import torch

from memory_service.bank import DTYPES, AppendInfo, BankInfo, BankSpec, DeleteInfo
from memory_service.errors import InvalidArgument
from memory_service.search import CompactResult
from memory_service.shard import ShardInfo, ShardSnapshot
from protos.longmem.v1 import memory_pb2 as pb

MAX_MESSAGE_BYTES = 64 << 20  # largest request accepted; larger ones get RESOURCE_EXHAUSTED
SEARCH_PART_BYTES = 16 << 20  # chunk-table bytes per streamed search message
SEARCH_ENTRY_BYTES = 16  # a search answer's header per found chunk: score, chunk id, slot
MAX_DIMS = 8
TORCH_OF = {
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT32: torch.float32,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.INT8: torch.int8,
}
WIRE_OF = {v: k for k, v in TORCH_OF.items()}
BANK_WIRE_OF = {  # the bank dtypes (int4 is no tensor dtype: its codes never travel)
    "float16": pb.FLOAT16,
    "bfloat16": pb.BFLOAT16,
    "float32": pb.FLOAT32,
    "int8": pb.INT8,
    "int4": pb.INT4,
}
NAME_OF = {wire: name for name, wire in BANK_WIRE_OF.items()}
assert set(BANK_WIRE_OF) == set(DTYPES), "every bank dtype needs a wire value"

assert sys.byteorder == "little", "the wire format is little-endian; this host is not"


def encode(t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in WIRE_OF:
        raise InvalidArgument(f"dtype {t.dtype} cannot travel; use one of {list(WIRE_OF)}")
    t = t.detach().cpu().contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=WIRE_OF[t.dtype], shape=list(t.shape), data=data)


def decode(msg: pb.Tensor, name: str) -> torch.Tensor:
    """The tensor in `msg`; InvalidArgument if dtype, shape and byte length do not agree."""
    if msg.dtype not in TORCH_OF:
        names = ", ".join(pb.DType.Name(d) for d in TORCH_OF)
        raise InvalidArgument(f"{name}: dtype {msg.dtype} is not supported; use one of {names}")
    shape = list(msg.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: invalid shape {shape}")
    dtype = TORCH_OF[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"{name}: {len(msg.data)} bytes do not match shape {shape} of "
            f"{pb.DType.Name(msg.dtype)} ({expected} bytes)"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only buffer: we never write into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(msg.data, dtype=dtype).view(shape)


def _fields(obj, names_from=None) -> dict:
    """The fields of dataclass `names_from` (default: `obj`'s class), read from `obj`."""
    return {f.name: getattr(obj, f.name) for f in fields(names_from or obj)}


def spec_to_wire(spec: BankSpec) -> pb.BankSpec:
    return pb.BankSpec(**_fields(spec) | {"dtype": BANK_WIRE_OF[spec.dtype]})


def spec_from_wire(msg: pb.BankSpec) -> BankSpec:
    """The spec in `msg`; unset fields (0, "", DTYPE_UNSPECIFIED) take BankSpec's defaults."""
    if msg.dtype not in (pb.DTYPE_UNSPECIFIED, *NAME_OF):
        raise InvalidArgument(f"bank dtype must be one of {sorted(DTYPES)}")
    given = _fields(msg, BankSpec) | {"dtype": NAME_OF.get(msg.dtype)}
    required = {f.name for f in fields(BankSpec) if f.default is MISSING}
    return BankSpec(**{k: v for k, v in given.items() if v or k in required})


def info_to_wire(info: BankInfo) -> pb.BankInfo:
    return pb.BankInfo(**_fields(info) | {"spec": spec_to_wire(info.spec)})


def info_from_wire(msg: pb.BankInfo) -> BankInfo:
    return BankInfo(**_fields(msg, BankInfo) | {"spec": spec_from_wire(msg.spec)})


def append_to_wire(info: AppendInfo) -> pb.AppendResponse:
    return pb.AppendResponse(**_fields(info))


def append_from_wire(msg: pb.AppendResponse) -> AppendInfo:
    return AppendInfo(**_fields(msg, AppendInfo))


def delete_to_wire(info: DeleteInfo) -> pb.DeleteDocumentResponse:
    return pb.DeleteDocumentResponse(**_fields(info))


def delete_from_wire(msg: pb.DeleteDocumentResponse) -> DeleteInfo:
    return DeleteInfo(**_fields(msg, DeleteInfo))


def snapshot_to_wire(shards: Iterable[ShardSnapshot]) -> pb.SnapshotResponse:
    return pb.SnapshotResponse(shards=[pb.ShardSnapshot(**_fields(s)) for s in shards])


def snapshot_from_wire(msg: pb.SnapshotResponse) -> list[ShardSnapshot]:
    return [ShardSnapshot(**_fields(s, ShardSnapshot)) for s in msg.shards]


def shard_map_to_wire(shards: Iterable[ShardInfo]) -> pb.ServiceInfo:
    return pb.ServiceInfo(shards=[pb.ShardInfo(**_fields(s)) for s in shards])


def shard_map_from_wire(msg: pb.ServiceInfo) -> list[ShardInfo]:
    return [ShardInfo(**_fields(s, ShardInfo)) for s in msg.shards]


def search_messages(
    result: CompactResult, part_bytes: int = SEARCH_PART_BYTES
) -> Iterator[pb.SearchResponse]:
    """The streamed answer: header first, then the chunk table in row ranges."""
    U, csz, D = result.table_keys.shape
    header = pb.SearchHeader(
        scores=encode(result.scores),
        chunk_ids=encode(result.chunk_ids),
        slots=encode(result.slots.int()),
        table_rows=U,
        chunk_size=csz,
        head_dim=D,
        dtype=WIRE_OF[result.table_keys.dtype],
        missing_shards=result.missing_shards,
    )
    row_bytes = 2 * csz * D * result.table_keys.element_size()
    rows = max(1, part_bytes // row_bytes)
    for start in range(0, max(U, 1), rows):
        yield pb.SearchResponse(
            header=header if start == 0 else None,
            row_offset=start,
            table_keys=encode(result.table_keys[start : start + rows]),
            table_values=encode(result.table_values[start : start + rows]),
        )


def read_search_stream(stream: Iterator[pb.SearchResponse]) -> CompactResult:
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

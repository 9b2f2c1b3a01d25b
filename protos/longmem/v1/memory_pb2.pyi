from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT4: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
INT32: DType
INT64: DType
INT8: DType
INT4: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BankSpec(_message.Message):
    __slots__ = ("kv_heads", "head_dim", "chunk_size", "capacity_tokens", "dtype", "index", "eviction", "nlist", "nprobe", "m", "ef_search", "search_dtype")
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    NLIST_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    SEARCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    kv_heads: int
    head_dim: int
    chunk_size: int
    capacity_tokens: int
    dtype: DType
    index: str
    eviction: str
    nlist: int
    nprobe: int
    m: int
    ef_search: int
    search_dtype: str
    def __init__(self, kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., chunk_size: _Optional[int] = ..., capacity_tokens: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., index: _Optional[str] = ..., eviction: _Optional[str] = ..., nlist: _Optional[int] = ..., nprobe: _Optional[int] = ..., m: _Optional[int] = ..., ef_search: _Optional[int] = ..., search_dtype: _Optional[str] = ...) -> None: ...

class BankInfo(_message.Message):
    __slots__ = ("name", "spec", "size_tokens", "chunks", "pending_tokens", "appended_chunks", "evicted_chunks", "shards", "bytes", "created_at", "lost_chunks", "deleted_chunks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    APPENDED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOST_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DELETED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: BankSpec
    size_tokens: int
    chunks: int
    pending_tokens: int
    appended_chunks: int
    evicted_chunks: int
    shards: int
    bytes: int
    created_at: float
    lost_chunks: int
    deleted_chunks: int
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[BankSpec, _Mapping]] = ..., size_tokens: _Optional[int] = ..., chunks: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., appended_chunks: _Optional[int] = ..., evicted_chunks: _Optional[int] = ..., shards: _Optional[int] = ..., bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., lost_chunks: _Optional[int] = ..., deleted_chunks: _Optional[int] = ...) -> None: ...

class CreateBankRequest(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: BankSpec
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[BankSpec, _Mapping]] = ...) -> None: ...

class BankRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteBankResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBanksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBanksResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[BankInfo]
    def __init__(self, banks: _Optional[_Iterable[_Union[BankInfo, _Mapping]]] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("bank", "keys", "values", "document")
    BANK_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    bank: str
    keys: Tensor
    values: Tensor
    document: str
    def __init__(self, bank: _Optional[str] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., document: _Optional[str] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("appended_tokens", "pending_tokens", "appended_chunks", "lost_chunks")
    APPENDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    APPENDED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LOST_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    appended_tokens: int
    pending_tokens: int
    appended_chunks: int
    lost_chunks: int
    def __init__(self, appended_tokens: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., appended_chunks: _Optional[int] = ..., lost_chunks: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("banks", "queries", "top_k")
    BANKS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedScalarFieldContainer[str]
    queries: Tensor
    top_k: int
    def __init__(self, banks: _Optional[_Iterable[str]] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class SearchHeader(_message.Message):
    __slots__ = ("scores", "chunk_ids", "slots", "table_rows", "chunk_size", "head_dim", "dtype", "missing_shards")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TABLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    scores: Tensor
    chunk_ids: Tensor
    slots: Tensor
    table_rows: int
    chunk_size: int
    head_dim: int
    dtype: DType
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, scores: _Optional[_Union[Tensor, _Mapping]] = ..., chunk_ids: _Optional[_Union[Tensor, _Mapping]] = ..., slots: _Optional[_Union[Tensor, _Mapping]] = ..., table_rows: _Optional[int] = ..., chunk_size: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., missing_shards: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("header", "row_offset", "table_keys", "table_values")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TABLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    TABLE_VALUES_FIELD_NUMBER: _ClassVar[int]
    header: SearchHeader
    row_offset: int
    table_keys: Tensor
    table_values: Tensor
    def __init__(self, header: _Optional[_Union[SearchHeader, _Mapping]] = ..., row_offset: _Optional[int] = ..., table_keys: _Optional[_Union[Tensor, _Mapping]] = ..., table_values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DeleteDocumentRequest(_message.Message):
    __slots__ = ("bank", "document")
    BANK_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    bank: str
    document: str
    def __init__(self, bank: _Optional[str] = ..., document: _Optional[str] = ...) -> None: ...

class DeleteDocumentResponse(_message.Message):
    __slots__ = ("deleted_chunks", "deleted_pending_tokens")
    DELETED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DELETED_PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    deleted_chunks: int
    deleted_pending_tokens: int
    def __init__(self, deleted_chunks: _Optional[int] = ..., deleted_pending_tokens: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardSnapshot]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardSnapshot, _Mapping]]] = ...) -> None: ...

class ShardSnapshot(_message.Message):
    __slots__ = ("shard", "banks", "bytes")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    banks: int
    bytes: int
    def __init__(self, shard: _Optional[int] = ..., banks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class DescribeServiceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "available", "node_id", "node_address", "device", "banks", "restored_from_snapshot", "endpoint", "wal_bytes", "wal_replay_seconds")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WAL_REPLAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    available: bool
    node_id: str
    node_address: str
    device: str
    banks: int
    restored_from_snapshot: bool
    endpoint: str
    wal_bytes: int
    wal_replay_seconds: float
    def __init__(self, index: _Optional[int] = ..., available: _Optional[bool] = ..., node_id: _Optional[str] = ..., node_address: _Optional[str] = ..., device: _Optional[str] = ..., banks: _Optional[int] = ..., restored_from_snapshot: _Optional[bool] = ..., endpoint: _Optional[str] = ..., wal_bytes: _Optional[int] = ..., wal_replay_seconds: _Optional[float] = ...) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ...) -> None: ...

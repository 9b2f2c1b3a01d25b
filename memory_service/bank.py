"""The memory bank: a stream's keys/values in chunks, searched by inner product on chunk means.

This module is plain torch: no Ray, no gRPC. The pieces:

- `BankSpec`: the shape and policy of a bank (heads, head dim, chunk size, capacity, dtype).
- `quantize`/`dequantize`: int8 or int4 storage (two 4-bit codes per byte) with a scale per
  (chunk, head).
- `Chunker`: numbers a stream's tokens into chunks of `chunk_size` in arrival order and holds
  the trailing partial chunk until the next append; it also knows which chunks FIFO eviction
  keeps (the newest `capacity_chunks`). It tags each token with the document its append
  named, if any (`Documents`), so a document can be forgotten.
- `ChunkStore`: the chunks one shard holds (all of them when there is one shard): a ring
  buffer (FIFO eviction) or slots reused least-recently-retrieved first (LRA), with exact
  search over the chunk means and a gather of chunk keys/values.

Sharding rule: chunk `g` (global id, counted from 0 since the last reset) lives on shard
`g % n_shards`. Every shard searches every query; `merge_topk` combines the local top chunks
into the exact global top-k.

Search follows LongMem (Wang et al. 2023): the search key of a chunk is the mean of its keys
per head; query head `h` searches key/value head `h // (q_heads // kv_heads)`; scores are
unscaled inner products.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from memory_service.ann import AnnIndex
from memory_service.errors import InvalidArgument, NotFound

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int8": torch.int8,  # per-(chunk, head) scales; retrieved as float32
    "int4": torch.uint8,  # as int8, two 4-bit codes per byte along head_dim
}
SEARCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # of the chunk means
QUANT_BITS = {"int8": 8, "int4": 4}  # the quantized dtypes: bits per key/value element
INDEX_KINDS = ("exact", "ivf_flat", "ivf_pq", "hnsw")  # approximate ones: memory_service.ann
EVICTIONS = ("fifo", "lra")  # oldest first; least recently retrieved first (per shard)

MAX_TOP_K = 4096  # chunks per (query, head); more is a mistake, not a request
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CHUNK_SIZE = 1024
MAX_CAPACITY_TOKENS = 1 << 36
MAX_NLIST, MAX_M, MAX_EF_SEARCH = 1 << 16, 256, MAX_TOP_K  # approximate index parameters
# HNSW's default neighbours per node. On SmolLM2's keys (kv head 2, 1M tokens, lifted,
# ef_search 64) recall@16 was 0.40 at 16, 0.62 at 32 and 0.68 at 64, for 1, 1.26 and 2.3x
# the search time; 32 costs 128 more bytes per chunk and head.
HNSW_M = 32
MAX_DOCUMENT_CHARS = 1024
NO_END = 1 << 62  # a store's end mark until a call from the catalog sets one
SEARCH_MIN_SLOTS = 4096  # slots per score block: a multiple of this (an odd width ran 1.7x slower)
# Per device type: score-matrix entries computed at once, and the fewest query rows a block
# has when the bank is wide. On the CPU a 128 MiB block is a fresh mapping whose page faults
# cost as much as the product (65,536 tokens x 512 queries: 498 ms against 251 in 8 MiB
# blocks), and each block of rows reads the bank's means again, which costs a large bank more
# than small blocks save. Whole searches (2 threads, Gaussian keys, ms; 2^21 / 32, 2^22 / 64,
# 2^23 / 128): 65,536 tokens x 512 queries 245 / 222 / 274, x 128 69 / 60 / 57; 1,048,576 x
# 128 967 / 776 / 714; 8,388,608 x 128 7,204 / 6,039 / 5,657; 33,554,432 x 128 (int4) 27,880
# at 2^21 / 32, 22,200 at 2^23 / 128, 40,060 at 2^25 / 512. CUDA's caching allocator has no
# such cost, and larger blocks launch fewer kernels.
SEARCH_BLOCKS = {"cpu": (1 << 22, 64), "cuda": (1 << 25, 512)}


@dataclass(frozen=True)
class BankSpec:
    """What a bank holds: `kv_heads` heads of `head_dim`, in chunks of `chunk_size` tokens."""

    kv_heads: int
    head_dim: int
    chunk_size: int = 4
    capacity_tokens: int = 65536
    dtype: str = "float16"
    search_dtype: str = "float32"  # the chunk means that search reads: float32 or float16
    index: str = "exact"
    eviction: str = "fifo"
    nlist: int = 1024  # IVF: inverted lists
    nprobe: int = 32  # IVF: lists searched per query
    # IVF-PQ: 4-bit sub-quantizers (default head_dim: a code per dimension); HNSW: neighbours
    # per node (default `HNSW_M`)
    m: int | None = None
    ef_search: int = 64  # HNSW: candidate list length while searching

    def __post_init__(self) -> None:
        if self.m is None:  # the kind's default (frozen: set once, here)
            object.__setattr__(self, "m", self.head_dim if self.index == "ivf_pq" else HNSW_M)
        for name, value, limit in (
            ("kv_heads", self.kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("chunk_size", self.chunk_size, MAX_CHUNK_SIZE),
            ("capacity_tokens", self.capacity_tokens, MAX_CAPACITY_TOKENS),
            ("nlist", self.nlist, MAX_NLIST),
            ("nprobe", self.nprobe, self.nlist),
            ("m", self.m, MAX_HEAD_DIM if self.index == "ivf_pq" else MAX_M),
            ("ef_search", self.ef_search, MAX_EF_SEARCH),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise InvalidArgument(f"{name} must be an integer in [1, {limit}], got {value!r}")
        if self.capacity_tokens < self.chunk_size:
            raise InvalidArgument(
                f"capacity_tokens ({self.capacity_tokens}) must hold at least one chunk "
                f"of chunk_size {self.chunk_size}"
            )
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise InvalidArgument(
                f"search_dtype must be one of {sorted(SEARCH_DTYPES)}, got {self.search_dtype!r}"
            )
        if self.index not in INDEX_KINDS:
            raise InvalidArgument(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.eviction not in EVICTIONS:
            raise InvalidArgument(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if self.dtype == "int4" and self.head_dim % 2:
            raise InvalidArgument(
                f"int4 packs two codes per byte along head_dim, which must be even; "
                f"got {self.head_dim}"
            )
        if self.index == "ivf_pq" and self.head_dim % self.m:
            raise InvalidArgument(f"ivf_pq needs m ({self.m}) to divide head_dim ({self.head_dim})")

    @property
    def capacity_chunks(self) -> int:
        return self.capacity_tokens // self.chunk_size

    @property
    def torch_dtype(self) -> torch.dtype:
        """The storage dtype of keys and values."""
        return DTYPES[self.dtype]

    @property
    def search_torch_dtype(self) -> torch.dtype:
        """The dtype of the stored chunk means (search keys)."""
        return SEARCH_DTYPES[self.search_dtype]

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANT_BITS

    @property
    def bits(self) -> int:
        """Bits per stored key/value element (int4 codes are packed two per byte)."""
        return QUANT_BITS.get(self.dtype) or 8 * self.torch_dtype.itemsize

    @property
    def stored_dim(self) -> int:
        """The last dim of stored keys/values: `head_dim`, or its half in int4 bytes."""
        return self.head_dim * self.bits // (8 * self.torch_dtype.itemsize)

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype chunks travel in to the shards and come back in from a search."""
        return torch.float32 if self.quantized else self.torch_dtype

    @property
    def chunk_bytes(self) -> int:
        """Stored bytes per chunk: keys and values, the chunk means (`search_dtype`), with
        int8 and int4 the float32 scales of keys and values per head, and an approximate
        index's share."""
        kv = 2 * self.chunk_size * self.head_dim * self.bits // 8
        means = self.search_torch_dtype.itemsize * self.head_dim
        per_head = kv + means + (8 if self.quantized else 0)
        return self.kv_heads * (per_head + self.index_bytes)

    @property
    def index_bytes(self) -> int:
        """An approximate index's bytes per chunk and head (its label and lifted vector, one
        float wider than the mean (see `ann`), or its `m + 1` 4-bit codes, padded to whole
        bytes; HNSW's base-layer links), once built; 0 for exact search."""
        return {
            "exact": 0,
            "ivf_flat": 8 + 4 * (self.head_dim + 1),
            "ivf_pq": 8 + (self.m + 2) // 2,
            "hnsw": 4 * (self.head_dim + 1) + 8 * self.m + 8,
        }[self.index]

    @property
    def bytes_per_token(self) -> float:
        return self.chunk_bytes / self.chunk_size

    def to_dict(self) -> dict:
        return asdict(self)


# The documents of chunks `(C, csz)`: names, and per token the index of its document in them;
# names[0] is "", no document.
Documents = tuple[list[str], torch.Tensor]


def check_document(document: str, required: bool = False) -> str:
    """Raise InvalidArgument unless `document` is a string id ("" for none, unless required)."""
    if not isinstance(document, str) or len(document) > MAX_DOCUMENT_CHARS:
        raise InvalidArgument(f"a document id is a string of at most {MAX_DOCUMENT_CHARS} chars")
    if required and not document:
        raise InvalidArgument("name the document to delete")
    return document


@dataclass(frozen=True)
class BankInfo:
    """A bank's spec, size and state (`describe_bank`, and the answer to create and reset)."""

    name: str
    spec: BankSpec
    size_tokens: int  # tokens searchable now (whole chunks)
    chunks: int  # chunks searchable now
    pending_tokens: int  # the trailing partial chunk, waiting for the next append
    appended_chunks: int  # chunks appended since creation or the last reset
    evicted_chunks: int  # of those, dropped by eviction (FIFO or LRA)
    lost_chunks: int  # of those, gone with a shard that restarted from an older snapshot
    shards: int
    bytes: int  # memory held across all shards
    created_at: float  # unix seconds
    deleted_chunks: int = 0  # chunks in the live range removed by DeleteDocument


@dataclass(frozen=True)
class AppendInfo:
    """What an append did, and where the bank's stream stands after it."""

    appended_tokens: int
    pending_tokens: int  # the trailing partial chunk, waiting for the next append
    appended_chunks: int  # chunks appended since creation or the last reset
    lost_chunks: int  # of this append's chunks, those a down shard did not take


@dataclass(frozen=True)
class DeleteInfo:
    """What `delete_document` removed."""

    deleted_chunks: int  # searchable chunks holding any token of the document
    deleted_pending_tokens: int  # its tokens in the trailing partial chunk


def quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric `bits`-bit codes (8 or 4) with one scale per leading index: `x`
    `(H, C, csz, D)` gives scales `(H, C)` float32, `scale = absmax / L` with
    `L = 2**(bits - 1) - 1` levels each side (127; 7), and codes `round(x / scale)` in
    `[-L, L]`: int8 `(H, C, csz, D)` for 8 bits, packed uint8 `(H, C, csz, D / 2)` for 4
    (`pack_int4`). The dequantized `codes * scale` is within `scale / 2` of `x` in every
    element (up to float32 rounding)."""
    levels = 2 ** (bits - 1) - 1
    x = x.float()
    scale = x.abs().amax(dim=(-2, -1)) / levels  # (H, C)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None, None]
    codes = torch.round(x / safe).clamp_(-levels, levels).to(torch.int8)
    return (pack_int4(codes) if bits == 4 else codes), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """float32 `codes * scale`, for codes `(..., csz, D)` (4 bits: packed `(..., csz, D / 2)`)
    and scales `(...)`."""
    if bits == 4:
        codes = unpack_int4(codes)
    return codes.float() * scale[..., None, None]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] `(..., D)` as uint8 `(..., D / 2)`: element `2i` in the low
    nibble of byte `i`, `2i + 1` in the high one, each stored plus 8."""
    u = (codes + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 codes `(..., 2P)` of packed bytes `(..., P)` (`pack_int4`'s inverse)."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1)  # (..., P, 2)
    return nibbles.flatten(-2).to(torch.int8) - 8


def encode_chunks(
    spec: BankSpec, keys: torch.Tensor, values: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The stored form of chunks `(C, csz, H, D)`, each tensor `(H, C, ...)` as a
    `ChunkStore` keeps it: keys and values in the bank dtype (codes and their scales for
    int8 and int4), and the means of the keys as given (in `search_dtype`)."""
    keys, values = keys.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3)  # (H, C, csz, D)
    out = {"means": keys.float().mean(2).to(spec.search_torch_dtype)}  # (H, C, D)
    if spec.quantized:
        out["keys"], out["key_scales"] = quantize(keys, spec.bits)
        out["values"], out["value_scales"] = quantize(values, spec.bits)
    else:
        out["keys"], out["values"] = keys.to(spec.torch_dtype), values.to(spec.torch_dtype)
    return out


def check_kv(spec: BankSpec, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Raise InvalidArgument unless keys/values are finite `(n_tokens, kv_heads, head_dim)`."""
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise InvalidArgument(f"{name} must be a floating-point tensor")
        if t.dim() != 3:
            raise InvalidArgument(
                f"{name} must have shape (n_tokens, kv_heads, head_dim), got rank {t.dim()}"
            )
        if tuple(t.shape[1:]) != (spec.kv_heads, spec.head_dim):
            raise InvalidArgument(
                f"{name} have {tuple(t.shape[1:])} (kv_heads, head_dim) per token; "
                f"the bank holds ({spec.kv_heads}, {spec.head_dim})"
            )
        if t.shape[0] == 0:
            raise InvalidArgument(f"{name} are empty: append at least one token")
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"{name} contain NaN or Inf")
    if keys.shape != values.shape:
        raise InvalidArgument(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape"
        )


def check_queries(spec: BankSpec, queries: torch.Tensor, top_k: int) -> None:
    """Raise InvalidArgument unless queries are finite `(B, n, q_heads, head_dim)` for `spec`."""
    if not isinstance(top_k, int) or not 0 < top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    if not isinstance(queries, torch.Tensor) or not queries.is_floating_point():
        raise InvalidArgument("queries must be a floating-point tensor")
    if queries.dim() != 4:
        raise InvalidArgument(
            "queries must have shape (banks, n_queries, q_heads, head_dim), "
            f"got rank {queries.dim()}"
        )
    if queries.numel() == 0:
        raise InvalidArgument(f"queries are empty: shape {tuple(queries.shape)}")
    q_heads, head_dim = queries.shape[2:]
    if head_dim != spec.head_dim:
        raise InvalidArgument(f"queries have head_dim {head_dim}; the bank has {spec.head_dim}")
    if q_heads % spec.kv_heads:
        raise InvalidArgument(
            f"queries have {q_heads} heads, not a multiple of the bank's {spec.kv_heads} kv heads"
        )
    if not bool(torch.isfinite(queries).all()):
        raise InvalidArgument("queries contain NaN or Inf")


class Chunker:
    """Numbers a stream's tokens into chunks; the trailing partial chunk waits for more tokens."""

    def __init__(self, spec: BankSpec):
        self.spec = spec
        self.reset()

    def reset(self) -> None:
        self.next_chunk_id = 0  # global id of the next full chunk
        shape = (0, self.spec.kv_heads, self.spec.head_dim)
        self.pending_keys = torch.empty(shape, dtype=self.spec.value_dtype)
        self.pending_values = torch.empty(shape, dtype=self.spec.value_dtype)
        self.pending_docs: list[str] = []  # the document of each pending token ("" none)

    def state(self) -> dict:
        return {
            "next_chunk_id": self.next_chunk_id,
            "pending_keys": self.pending_keys,
            "pending_values": self.pending_values,
            "pending_docs": list(self.pending_docs),
        }

    def load_state(self, state: dict) -> None:
        self.next_chunk_id = state["next_chunk_id"]
        self.pending_keys, self.pending_values = state["pending_keys"], state["pending_values"]
        self.pending_docs = list(state.get("pending_docs") or [""] * self.pending_tokens)

    def forget(self, document: str) -> int:
        """Drop the pending tokens of `document`; return how many there were."""
        keep = [d != document for d in self.pending_docs]
        mask = torch.tensor(keep, dtype=torch.bool)
        self.pending_keys, self.pending_values = self.pending_keys[mask], self.pending_values[mask]
        self.pending_docs = [d for d in self.pending_docs if d != document]
        return len(keep) - len(self.pending_docs)

    def expected_chunks(self, shard: int, n_shards: int) -> int:
        """Live chunks that shard `shard` of `n_shards` should hold (ids g % n_shards == shard)."""

        def below(x: int) -> int:  # ids in [0, x) on this shard
            return max(0, (x - shard + n_shards - 1) // n_shards)

        if self.spec.eviction == "lra":  # a full shard evicts one chunk per chunk it takes
            return min(below(self.next_chunk_id), math.ceil(self.spec.capacity_chunks / n_shards))
        return below(self.next_chunk_id) - below(self.oldest_live_id)

    def evicted_chunks(self, n_shards: int) -> int:
        """Chunks appended so far that eviction has dropped."""
        kept = sum(self.expected_chunks(s, n_shards) for s in range(n_shards))
        return self.next_chunk_id - kept

    @property
    def pending_tokens(self) -> int:
        return self.pending_keys.shape[0]

    @property
    def oldest_live_id(self) -> int:
        """FIFO eviction: only the newest `capacity_chunks` chunks are kept (LRA: the shards
        choose, so every id may be live)."""
        if self.spec.eviction == "lra":
            return 0
        return max(0, self.next_chunk_id - self.spec.capacity_chunks)

    def push(
        self, keys: torch.Tensor, values: torch.Tensor, document: str = ""
    ) -> tuple[int, torch.Tensor, torch.Tensor, Documents | None]:
        """Add tokens `(n, H, D)` of `document` ("" for none); return `(first_id, keys,
        values, documents)` of the completed chunks (`documents` None when no token of
        them has one).

        The chunk tensors are `(C, chunk_size, H, D)` in `spec.value_dtype` (the bank dtype,
        float32 for int8 and int4 banks, which the shards quantize); C may be 0.
        """
        csz, dtype = self.spec.chunk_size, self.spec.value_dtype
        old_docs = self.pending_docs
        keys = torch.cat([self.pending_keys, keys.to("cpu", dtype)])  # (P+n, H, D)
        values = torch.cat([self.pending_values, values.to("cpu", dtype)])
        n_full = keys.shape[0] // csz * csz
        self.pending_keys, self.pending_values = keys[n_full:].clone(), values[n_full:].clone()
        head = old_docs[:n_full]  # documents of the completed tokens that were pending
        rest = keys.shape[0] - max(n_full, len(old_docs))  # new tokens left pending
        self.pending_docs = old_docs[n_full:] + [document] * rest
        first_id = self.next_chunk_id
        self.next_chunk_id += n_full // csz
        shape = (n_full // csz, csz, self.spec.kv_heads, self.spec.head_dim)
        documents = None
        if any(head) or (document and n_full > len(head)):
            names = ["", *dict.fromkeys(d for d in [*head, document] if d)]
            code = {name: i for i, name in enumerate(names)}
            codes = torch.full((n_full,), code[document], dtype=torch.int32)
            codes[: len(head)] = torch.tensor([code[d] for d in head], dtype=torch.int32)
            documents = names, codes.view(n_full // csz, csz)
        return first_id, keys[:n_full].view(shape), values[:n_full].view(shape), documents


class ChunkStore:
    """The chunks of one bank that live on shard `shard` of `n_shards`, on `device`.

    `ceil(capacity_chunks / n_shards)` slots. FIFO: a ring buffer, chunk `g` sits in slot
    `(g // n_shards) % slots`; two live chunks never share a slot because live ids span fewer
    than `capacity_chunks` consecutive ids. LRA (Attendre's least recently retrieved): every
    slot has a stamp from a counter that each stored chunk and each gather (a retrieval)
    advances; a new chunk takes a never-written slot, else that of a deleted or dead chunk,
    else that of the chunk with the oldest stamp (retrieved least recently, or never and
    stored first), and `slot_of` maps ids to slots. The buffers are reserved whole and never
    copied to grow (on the CPU, pages become resident only as slots are written; on a GPU the
    bank's full capacity is taken up front, like a KV cache). Only slots `[0, used)` are ever read.
    """

    def __init__(self, spec: BankSpec, shard: int = 0, n_shards: int = 1, device: str = "cpu"):
        self.spec, self.shard, self.n_shards = spec, shard, n_shards
        self.device = torch.device(device)
        self.slots = math.ceil(spec.capacity_chunks / n_shards)
        self.reset()

    def reset(self) -> None:
        H, D, csz = self.spec.kv_heads, self.spec.head_dim, self.spec.chunk_size
        S, kw, Ds = self.slots, {"device": self.device}, self.spec.stored_dim
        self.keys = torch.empty(H, S, csz, Ds, dtype=self.spec.torch_dtype, **kw)  # int4: Ds = D/2
        self.values = torch.empty_like(self.keys)
        self.means = torch.empty(H, S, D, dtype=self.spec.search_torch_dtype, **kw)  # (H, S, D)
        if self.spec.quantized:  # (H, S) scales of keys and values per (head, chunk)
            self.key_scales = torch.empty(H, S, dtype=torch.float32, **kw)
            self.value_scales = torch.empty_like(self.key_scales)
        self.ids = torch.full((S,), -1, dtype=torch.int64, **kw)  # (S,) global id per slot
        self.forgotten = torch.zeros(S, dtype=torch.bool, **kw)  # (S,) deleted documents
        self.docs: torch.Tensor | None = None  # (S, csz) int32 code per token, once tagged
        self.doc_codes: dict[str, int] = {"": 0}  # document id -> code (0: none)
        self.used = 0  # slots [0, used) have been written; the rest were never filled
        self.oldest_live_id = 0
        self.end_id = NO_END
        self.lra = self.spec.eviction == "lra"
        self.last_used = torch.zeros(S, dtype=torch.int64) if self.lra else None  # (S,) stamps
        self.clock = 0  # the next stamp
        self.slot_of: dict[int, int] = {}  # LRA: chunk id -> slot
        self.ann = AnnIndex(self.spec, S, self.device) if self.spec.index != "exact" else None

    def evict_below(self, oldest_live_id: int) -> None:
        """Drop chunks older than the id (the catalog's FIFO mark; it only moves forward)."""
        self.oldest_live_id = max(self.oldest_live_id, oldest_live_id)

    def mark(self, live: tuple[int, int]) -> None:
        """Serve only ids in `[oldest, end)` (the catalog's FIFO mark and stream end): chunks
        of an append that failed on another shard, at or past the end, are never served."""
        self.evict_below(live[0])
        self.end_id = live[1]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The per-(head, slot) tensors of this store."""
        scales = ("key_scales", "value_scales") if self.spec.quantized else ()
        return ("keys", "values", "means", *scales)

    def state(self) -> dict:
        """Everything needed to rebuild this store (for snapshots), on the CPU."""
        tensors = {k: getattr(self, k)[:, : self.used].cpu() for k in self.tensor_names}
        docs = {}
        if self.docs is not None:
            docs = {"docs": self.docs[: self.used].cpu(), "doc_names": list(self.doc_codes)}
        return {
            "spec": self.spec.to_dict(),
            "shard": self.shard,
            "n_shards": self.n_shards,
            "ids": self.ids[: self.used].cpu(),
            "forgotten": self.forgotten[: self.used].cpu(),
            "used": self.used,
            "oldest_live_id": self.oldest_live_id,
            **tensors,
            **docs,
            **({"last_used": self.last_used[: self.used], "clock": self.clock} if self.lra else {}),
        }

    @classmethod
    def from_state(cls, state: dict, device: str = "cpu") -> ChunkStore:
        store = cls(BankSpec(**state["spec"]), state["shard"], state["n_shards"], device)
        used = store.used = state["used"]
        for k in store.tensor_names:
            getattr(store, k)[:, :used] = state[k].to(device)
        store.ids[:used] = state["ids"].to(device)
        if "forgotten" in state:
            store.forgotten[:used] = state["forgotten"].to(device)
        if "docs" in state:
            store.doc_codes = {name: i for i, name in enumerate(state["doc_names"])}
            store._doc_codes()[:used] = state["docs"].to(device)
        store.oldest_live_id = state["oldest_live_id"]
        if store.lra:
            store.last_used[:used], store.clock = state["last_used"], state["clock"]
            held = store.ids[:used].tolist()
            store.slot_of = {i: slot for slot, i in enumerate(held) if i >= 0}
        if store.ann is not None:  # not saved: rebuilt from the means
            store.ann.update(store.means, used, torch.arange(used))
        return store

    @property
    def live(self) -> torch.Tensor:
        """(S,) bool: slots holding a chunk that eviction has not dropped, below the end."""
        return self.in_range & ~self.forgotten

    @property
    def in_range(self) -> torch.Tensor:
        """(S,) bool: slots holding an id in `[oldest, end)`, deleted or not."""
        return (self.ids >= self.oldest_live_id) & (self.ids < self.end_id)

    @property
    def n_chunks(self) -> int:
        return int(self.live.sum())

    @property
    def n_deleted(self) -> int:
        """Chunks in the live range that `forget` removed."""
        return int((self.in_range & self.forgotten).sum())

    def _doc_codes(self) -> torch.Tensor:
        if self.docs is None:  # the first tagged chunk: untagged ones so far have code 0
            shape = (self.slots, self.spec.chunk_size)
            self.docs = torch.zeros(shape, dtype=torch.int32, device=self.device)
        return self.docs

    def forget(self, document: str) -> int:
        """Delete every chunk holding a token of `document`; return how many were live."""
        code = self.doc_codes.get(document)
        if self.docs is None or code is None:
            return 0
        hit = (self.docs[: self.used] == code).any(1)
        removed = int((hit & self.live[: self.used]).sum())
        self.forgotten[: self.used] |= hit
        return removed

    @property
    def nbytes(self) -> int:
        """Bytes of keys, values, search keys (and scales, document tags, the approximate
        index once built) in the slots written so far."""
        tags = 0 if self.docs is None else 4 * self.spec.chunk_size
        unbuilt = self.ann is not None and not self.ann.ready
        index = self.spec.kv_heads * self.spec.index_bytes if unbuilt else 0
        return self.used * (self.spec.chunk_bytes + tags - index)

    def add(
        self,
        ids: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        oldest_live_id: int,
        documents: Documents | None = None,
    ) -> None:
        """Store chunks `ids` `(C,)` of this shard, `(C, csz, H, D)`, of `documents` (None:
        untagged); evict ids below the mark."""
        self.add_encoded(ids, encode_chunks(self.spec, keys, values), oldest_live_id, documents)

    def add_encoded(
        self,
        ids: torch.Tensor,
        encoded: dict[str, torch.Tensor],
        oldest_live_id: int,
        documents: Documents | None = None,
    ) -> None:
        """`add` for chunks already in their stored form (`encode_chunks`)."""
        if bool((ids % self.n_shards != self.shard).any()):
            raise InvalidArgument(f"chunks sent to shard {self.shard} belong to another shard")
        if set(encoded) != set(self.tensor_names):
            raise InvalidArgument(f"encoded chunks need {self.tensor_names}, got {sorted(encoded)}")
        keep = ids >= oldest_live_id  # an append larger than the bank keeps only its tail
        if self.lra:
            keep = torch.arange(len(ids)) >= len(ids) - self.slots
        ids = ids[keep]
        codes = None
        if documents is not None:
            names, tags = documents
            local = torch.tensor([self._doc_code(n) for n in names], dtype=torch.int32)
            codes = local[tags[keep].long()]  # (c, csz) this store's codes
        self.evict_below(oldest_live_id)
        if ids.numel() == 0:
            return
        if self.lra:
            slots = self._lra_slots(ids).to(self.device)
        else:
            slots = ((ids // self.n_shards) % self.slots).to(self.device)
        for name, t in encoded.items():
            getattr(self, name)[:, slots] = t[:, keep].to(self.device)
        self.ids[slots] = ids.to(self.device)
        self.forgotten[slots] = False
        if codes is not None:
            self._doc_codes()[slots] = codes.to(self.device)
        elif self.docs is not None:
            self.docs[slots] = 0
        self.used = max(self.used, int(slots.max()) + 1)
        if self.ann is not None:
            self.ann.update(self.means, self.used, slots)

    def _doc_code(self, name: str) -> int:
        return self.doc_codes.setdefault(name, len(self.doc_codes))

    def _lra_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """LRA slots for new chunks `ids` (at most `slots` of them), stamped in id order: a
        chunk already here (a replayed or retried append) keeps its slot; the others take
        never-written slots, then dead ones, then those retrieved least recently."""
        slots = [self.slot_of.get(i, -1) for i in ids.tolist()]
        need = slots.count(-1)
        free = list(range(self.used, min(self.slots, self.used + need)))
        if need > len(free):
            stamps = torch.where(self.live[: self.used].cpu(), self.last_used[: self.used], -1)
            stamps[[s for s in slots if s >= 0]] = NO_END  # overwritten in place, not evicted
            free += stamps.topk(need - len(free), largest=False).indices.tolist()
        spare = iter(free)
        slots = [s if s >= 0 else next(spare) for s in slots]
        for slot, new in zip(slots, ids.tolist(), strict=True):
            old = int(self.ids[slot])
            if self.slot_of.get(old) == slot:
                del self.slot_of[old]
            self.slot_of[new] = slot
        slots = torch.tensor(slots, dtype=torch.int64)
        self.last_used[slots] = torch.arange(self.clock, self.clock + len(slots))
        self.clock += len(slots)
        return slots

    def search(self, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local top-k chunks for queries `(n, Hq, D)`.

        Returns scores `(n, Hq, top_k)` float32 (-inf where fewer chunks exist) and global
        chunk ids `(n, Hq, top_k)` int64 (-1 there), best first.
        """
        n, Hq, D = queries.shape
        H = self.spec.kv_heads
        g = Hq // H  # query heads per kv head
        live = self.live[: self.used]  # search the written slots only
        q = queries.to(self.device, torch.float32).view(n, H, g, D)
        q = q.permute(1, 0, 2, 3).reshape(H, n * g, D)  # (H, n*g, D)
        if self.ann is not None and self.ann.can_search(top_k):  # candidates, then exact
            scores, slots = self.ann.search(q, self.means[:, : self.used], live, top_k)
        else:
            scores, slots = self._scan(q, live, top_k)
        ids = torch.where(slots >= 0, self.ids[slots.clamp(min=0)], -1)
        unflat = lambda t: t.view(H, n, g, top_k).permute(1, 0, 2, 3).reshape(n, Hq, top_k)  # noqa: E731
        return unflat(scores), unflat(ids)

    def _scan(
        self, q: torch.Tensor, live: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k live slots for queries `(H, R, D)`: scores `(H, R, top_k)` (-inf where
        fewer exist) and slots (-1 there), best first. Scores are computed in blocks of query
        rows and slots of at most `SEARCH_BLOCKS`' entries, each block's top-k merged into
        the running one. A block spans every slot when its fewest rows of them fit (one top-k
        per row block), else the widest multiple of `SEARCH_MIN_SLOTS` that does, so a row
        block reads the means once however large the bank."""
        H, R, _ = q.shape
        entries, min_rows = SEARCH_BLOCKS[self.means.device.type]
        wide = entries // (H * min(R, min_rows))
        cols = min(-(-live.shape[0] // SEARCH_MIN_SLOTS), max(1, wide // SEARCH_MIN_SLOTS))
        cols *= SEARCH_MIN_SLOTS
        rows = max(1, entries // (H * cols))
        dead = not bool(live.all())
        means = self.means[:, : live.shape[0]]  # (H, S, D) the written slots
        scores = torch.full((H, R, top_k), -math.inf, device=self.device)
        slots = torch.full((H, R, top_k), -1, dtype=torch.int64, device=self.device)
        for r in range(0, R, rows):
            best, best_slots = scores[:, r : r + rows], slots[:, r : r + rows]  # (H, b, top_k)
            for c in range(0, live.shape[0], cols):
                block = means[:, c : c + cols].float().transpose(1, 2)  # (H, D, c)
                s = torch.bmm(q[:, r : r + rows], block)  # (H, b, c)
                if dead:
                    s.masked_fill_(~live[c : c + cols], -math.inf)
                top = s.topk(min(top_k, s.shape[-1]), dim=-1)
                merged = torch.cat([best, top.values], -1).topk(top_k, dim=-1)
                best = merged.values
                best_slots = torch.cat([best_slots, top.indices + c], -1).gather(-1, merged.indices)
            scores[:, r : r + rows], slots[:, r : r + rows] = best, best_slots
        return scores, slots.masked_fill_(~torch.isfinite(scores), -1)

    def gather(self, heads: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(U, csz, D)` of chunks `ids` `(U,)` on kv heads `heads` `(U,)`, in
        `spec.value_dtype` (int8 and int4 banks dequantize). With LRA, stamps them retrieved
        now."""
        if self.lra:  # an id not here gets slot `slots`, which the check below refuses
            slots = torch.tensor([self.slot_of.get(i, self.slots) for i in ids.tolist()])
            slots = slots.to(torch.int64)
        else:
            slots = (ids // self.n_shards) % self.slots
        heads, slots, ids = (t.to(self.device) for t in (heads, slots, ids))
        if ids.numel() and (
            bool((ids % self.n_shards != self.shard).any())
            or int(slots.max()) >= self.used
            or bool((self.ids[slots] != ids).any())
            or bool(self.forgotten[slots].any())
            or int(ids.min()) < self.oldest_live_id
            or int(ids.max()) >= self.end_id
        ):
            raise NotFound("some requested chunks are not (or no longer) on this shard")
        if self.lra:
            self.last_used[slots.cpu()] = self.clock
            self.clock += 1
        keys, values = self.keys[heads, slots], self.values[heads, slots]
        if self.spec.quantized:
            keys = dequantize(keys, self.key_scales[heads, slots], self.spec.bits)
            values = dequantize(values, self.value_scales[heads, slots], self.spec.bits)
        return keys, values


def merge_topk(
    parts: list[tuple[torch.Tensor, torch.Tensor]], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard `(scores, ids)` `(..., top_k)` into the global top-k, best first."""
    if len(parts) == 1:
        return parts[0]
    scores = torch.cat([s for s, _ in parts], -1)  # (..., shards*top_k)
    ids = torch.cat([i for _, i in parts], -1)
    top = scores.topk(top_k, dim=-1)
    return top.values, ids.gather(-1, top.indices)

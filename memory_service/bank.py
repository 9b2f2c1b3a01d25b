"""The memory bank: a stream's keys/values in chunks, searched by inner product on chunk means.

This module is plain torch: no Ray, no gRPC. The pieces:

- `BankSpec`: the shape and policy of a bank (heads, head dim, chunk size, capacity, dtype).
- `quantize`/`dequantize`: int8 storage with a scale per (chunk, head).
- `Chunker`: numbers a stream's tokens into chunks of `chunk_size` in arrival order and holds
  the trailing partial chunk until the next append; it also knows which chunks FIFO eviction
  keeps (the newest `capacity_chunks`).
- `ChunkStore`: the chunks one shard holds (all of them when there is one shard): a ring
  buffer with exact search over the chunk means and a gather of chunk keys/values.

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

from memory_service.errors import InvalidArgument, NotFound

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int8": torch.int8,  # per-(chunk, head) scales; retrieved as float32
}
INDEX_KINDS = ("exact",)
EVICTIONS = ("fifo",)

MAX_TOP_K = 4096  # chunks per (query, head); more is a mistake, not a request
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CHUNK_SIZE = 1024
MAX_CAPACITY_TOKENS = 1 << 36
NO_END = 1 << 62  # a store's end mark until a call from the catalog sets one
SEARCH_BLOCK_SCORES = 1 << 25  # score-matrix entries computed at once (128 MiB of float32)


@dataclass(frozen=True)
class BankSpec:
    """What a bank holds: `kv_heads` heads of `head_dim`, in chunks of `chunk_size` tokens."""

    kv_heads: int
    head_dim: int
    chunk_size: int = 4
    capacity_tokens: int = 65536
    dtype: str = "float16"
    index: str = "exact"
    eviction: str = "fifo"

    def __post_init__(self) -> None:
        for name, value, limit in (
            ("kv_heads", self.kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("chunk_size", self.chunk_size, MAX_CHUNK_SIZE),
            ("capacity_tokens", self.capacity_tokens, MAX_CAPACITY_TOKENS),
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
        if self.index not in INDEX_KINDS:
            raise InvalidArgument(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.eviction not in EVICTIONS:
            raise InvalidArgument(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")

    @property
    def capacity_chunks(self) -> int:
        return self.capacity_tokens // self.chunk_size

    @property
    def torch_dtype(self) -> torch.dtype:
        """The storage dtype of keys and values."""
        return DTYPES[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.dtype == "int8"

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype chunks travel in to the shards and come back in from a search."""
        return torch.float32 if self.quantized else self.torch_dtype

    @property
    def chunk_bytes(self) -> int:
        """Stored bytes per chunk: keys and values, the float32 chunk means, and with int8
        the float32 scales of keys and values per head."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        per_head = self.head_dim * (2 * itemsize * self.chunk_size + 4)
        return self.kv_heads * (per_head + (8 if self.quantized else 0))

    @property
    def bytes_per_token(self) -> float:
        return self.chunk_bytes / self.chunk_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BankInfo:
    """A bank's spec, size and state (`describe_bank`, and the answer to create and reset)."""

    name: str
    spec: BankSpec
    size_tokens: int  # tokens searchable now (whole chunks)
    chunks: int  # chunks searchable now
    pending_tokens: int  # the trailing partial chunk, waiting for the next append
    appended_chunks: int  # chunks appended since creation or the last reset
    evicted_chunks: int  # of those, dropped by FIFO eviction
    lost_chunks: int  # of those, gone with a shard that restarted from an older snapshot
    shards: int
    bytes: int  # memory held across all shards
    created_at: float  # unix seconds


@dataclass(frozen=True)
class AppendInfo:
    """What an append did, and where the bank's stream stands after it."""

    appended_tokens: int
    pending_tokens: int  # the trailing partial chunk, waiting for the next append
    appended_chunks: int  # chunks appended since creation or the last reset
    lost_chunks: int  # of this append's chunks, those a down shard did not take


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per leading index: `x` `(H, C, csz, D)` gives codes
    `(H, C, csz, D)` int8 and scales `(H, C)` float32, `scale = absmax / 127`. The
    dequantized `codes * scale` is within `scale / 2` of `x` in every element (up to
    float32 rounding)."""
    x = x.float()
    scale = x.abs().amax(dim=(-2, -1)) / 127  # (H, C)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None, None]
    codes = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 `codes * scale`, for codes `(..., csz, D)` and scales `(...)`."""
    return codes.float() * scale[..., None, None]


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

    def state(self) -> dict:
        return {
            "next_chunk_id": self.next_chunk_id,
            "pending_keys": self.pending_keys,
            "pending_values": self.pending_values,
        }

    def load_state(self, state: dict) -> None:
        self.next_chunk_id = state["next_chunk_id"]
        self.pending_keys, self.pending_values = state["pending_keys"], state["pending_values"]

    def expected_chunks(self, shard: int, n_shards: int) -> int:
        """Live chunks that shard `shard` of `n_shards` should hold (ids g % n_shards == shard)."""

        def below(x: int) -> int:  # ids in [0, x) on this shard
            return max(0, (x - shard + n_shards - 1) // n_shards)

        return below(self.next_chunk_id) - below(self.oldest_live_id)

    @property
    def pending_tokens(self) -> int:
        return self.pending_keys.shape[0]

    @property
    def oldest_live_id(self) -> int:
        """FIFO eviction: only the newest `capacity_chunks` chunks are kept."""
        return max(0, self.next_chunk_id - self.spec.capacity_chunks)

    def push(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Add tokens `(n, H, D)`; return `(first_id, keys, values)` of the completed chunks.

        The chunk tensors are `(C, chunk_size, H, D)` in `spec.value_dtype` (the bank dtype,
        float32 for int8 banks, which the shards quantize); C may be 0.
        """
        csz, dtype = self.spec.chunk_size, self.spec.value_dtype
        keys = torch.cat([self.pending_keys, keys.to("cpu", dtype)])  # (P+n, H, D)
        values = torch.cat([self.pending_values, values.to("cpu", dtype)])
        n_full = keys.shape[0] // csz * csz
        self.pending_keys, self.pending_values = keys[n_full:].clone(), values[n_full:].clone()
        first_id = self.next_chunk_id
        self.next_chunk_id += n_full // csz
        shape = (n_full // csz, csz, self.spec.kv_heads, self.spec.head_dim)
        return first_id, keys[:n_full].view(shape), values[:n_full].view(shape)


class ChunkStore:
    """The chunks of one bank that live on shard `shard` of `n_shards`, on `device`.

    A ring buffer of `ceil(capacity_chunks / n_shards)` slots. Chunk `g` sits in slot
    `(g // n_shards) % slots`; two live chunks never share a slot because live ids span fewer
    than `capacity_chunks` consecutive ids. The buffers are reserved whole and never copied to
    grow (on the CPU, pages become resident only as slots are written; on a GPU the bank's
    full capacity is taken up front, like a KV cache). Only slots `[0, used)` are ever read.
    """

    def __init__(self, spec: BankSpec, shard: int = 0, n_shards: int = 1, device: str = "cpu"):
        self.spec, self.shard, self.n_shards = spec, shard, n_shards
        self.device = torch.device(device)
        self.slots = math.ceil(spec.capacity_chunks / n_shards)
        self.reset()

    def reset(self) -> None:
        H, D, csz = self.spec.kv_heads, self.spec.head_dim, self.spec.chunk_size
        S, kw = self.slots, {"device": self.device}
        self.keys = torch.empty(H, S, csz, D, dtype=self.spec.torch_dtype, **kw)  # (H, S, csz, D)
        self.values = torch.empty_like(self.keys)
        self.means = torch.empty(H, S, D, dtype=torch.float32, **kw)  # (H, S, D) search keys
        if self.spec.quantized:  # (H, S) int8 scales of keys and values per (head, chunk)
            self.key_scales = torch.empty(H, S, dtype=torch.float32, **kw)
            self.value_scales = torch.empty_like(self.key_scales)
        self.ids = torch.full((S,), -1, dtype=torch.int64, **kw)  # (S,) global id per slot
        self.used = 0  # slots [0, used) have been written; the rest were never filled
        self.oldest_live_id = 0
        self.end_id = NO_END

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
        return {
            "spec": self.spec.to_dict(),
            "shard": self.shard,
            "n_shards": self.n_shards,
            "ids": self.ids[: self.used].cpu(),
            "used": self.used,
            "oldest_live_id": self.oldest_live_id,
            **tensors,
        }

    @classmethod
    def from_state(cls, state: dict, device: str = "cpu") -> ChunkStore:
        store = cls(BankSpec(**state["spec"]), state["shard"], state["n_shards"], device)
        used = store.used = state["used"]
        for k in store.tensor_names:
            getattr(store, k)[:, :used] = state[k].to(device)
        store.ids[:used] = state["ids"].to(device)
        store.oldest_live_id = state["oldest_live_id"]
        return store

    @property
    def live(self) -> torch.Tensor:
        """(S,) bool: slots holding a chunk that eviction has not dropped, below the end."""
        return (self.ids >= self.oldest_live_id) & (self.ids < self.end_id)

    @property
    def n_chunks(self) -> int:
        return int(self.live.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of keys, values, search keys (and scales) in the slots written so far."""
        return self.used * self.spec.chunk_bytes

    def add(
        self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, oldest_live_id: int
    ) -> None:
        """Store chunks `ids` `(C,)` of this shard, `(C, csz, H, D)`; evict ids below the mark."""
        if bool((ids % self.n_shards != self.shard).any()):
            raise InvalidArgument(f"chunks sent to shard {self.shard} belong to another shard")
        keep = ids >= oldest_live_id  # an append larger than the bank keeps only its tail
        ids, keys, values = ids[keep], keys[keep], values[keep]
        self.evict_below(oldest_live_id)
        if ids.numel() == 0:
            return
        slots = ((ids // self.n_shards) % self.slots).to(self.device)
        keys = keys.to(self.device).permute(2, 0, 1, 3)  # (H, c, csz, D)
        values = values.to(self.device).permute(2, 0, 1, 3)
        self.means[:, slots] = keys.float().mean(2)  # (H, c, D), from the keys as given
        if self.spec.quantized:
            keys, self.key_scales[:, slots] = quantize(keys)
            values, self.value_scales[:, slots] = quantize(values)
        self.keys[:, slots] = keys.to(self.spec.torch_dtype)
        self.values[:, slots] = values.to(self.spec.torch_dtype)
        self.ids[slots] = ids.to(self.device)
        self.used = max(self.used, int(slots.max()) + 1)

    def search(self, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local top-k chunks for queries `(n, Hq, D)`.

        Returns scores `(n, Hq, top_k)` float32 (-inf where fewer chunks exist) and global
        chunk ids `(n, Hq, top_k)` int64 (-1 there), best first.
        """
        n, Hq, D = queries.shape
        H = self.spec.kv_heads
        g = Hq // H  # query heads per kv head
        S = self.used  # search the written slots only
        live = self.live[:S]
        n_dead = S - int(live.sum())  # evicted, not yet overwritten: at most ~1 per shard
        k = min(top_k + n_dead, S)  # enough candidates to keep top_k live ones
        q = queries.to(self.device, torch.float32).view(n, H, g, D)
        q = q.permute(1, 0, 2, 3).reshape(H, n * g, D)  # (H, n*g, D)
        scores = torch.full((H, n * g, top_k), -math.inf, device=self.device)
        ids = torch.full((H, n * g, top_k), -1, dtype=torch.int64, device=self.device)
        means_t = self.means[:, :S].transpose(1, 2)  # (H, D, S)
        block = max(1, SEARCH_BLOCK_SCORES // max(1, H * S))
        for start in range(0, n * g if k > 0 else 0, block):
            rows = slice(start, start + block)
            s = torch.bmm(q[:, rows], means_t)  # (H, b, S)
            top = s.topk(k, dim=-1)  # (H, b, k)
            top_scores = top.values.masked_fill(~live[top.indices], -math.inf)
            if n_dead:  # drop dead candidates, keep the best top_k live ones
                best = top_scores.topk(min(top_k, k), dim=-1)
                top_scores, slots = best.values, top.indices.gather(-1, best.indices)
            else:
                slots = top.indices
            kk = top_scores.shape[-1]
            scores[:, rows, :kk] = top_scores
            ids[:, rows, :kk] = torch.where(torch.isfinite(top_scores), self.ids[slots], -1)
        unflat = lambda t: t.view(H, n, g, top_k).permute(1, 0, 2, 3).reshape(n, Hq, top_k)  # noqa: E731
        return unflat(scores), unflat(ids)

    def gather(self, heads: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(U, csz, D)` of chunks `ids` `(U,)` on kv heads `heads` `(U,)`, in
        `spec.value_dtype` (int8 banks dequantize)."""
        slots = (ids // self.n_shards) % self.slots
        if ids.numel() and (
            bool((ids % self.n_shards != self.shard).any())
            or int(slots.max()) >= self.used
            or bool((self.ids[slots] != ids).any())
            or int(ids.min()) < self.oldest_live_id
            or int(ids.max()) >= self.end_id
        ):
            raise NotFound("some requested chunks are not (or no longer) on this shard")
        heads, slots = heads.to(self.device), slots.to(self.device)
        keys, values = self.keys[heads, slots], self.values[heads, slots]
        if self.spec.quantized:
            keys = dequantize(keys, self.key_scales[heads, slots])
            values = dequantize(values, self.value_scales[heads, slots])
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

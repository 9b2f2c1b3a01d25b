"""The catalog: which banks exist, per tenant, with their specs and stream positions.

Plain Python. The coordinator actor runs one Catalog; the in-process client holds one too.
The catalog owns each bank's `Chunker` (the stream position and the trailing partial
chunk) and deals completed chunks to the shards through `call` (see `search.ShardCall`).

A tenant only ever names its own banks (`tenant/name`), so it can neither reach nor learn
of another tenant's. On the shards a bank is stored under `tenant/name@generation`; a new
generation on every create and reset means chunks a shard kept from before (say, restored
from a snapshot) can never reappear in a newer bank of the same name.

With `snapshot_dir` the catalog is written there after every change and read back when
the catalog starts again (a restarted coordinator resumes every stream where it was). With
a durability other than `none` (`memory_service.wal`), an append logs the bank's new stream
position (`catalog.wal`) instead of rewriting the whole catalog, and is applied everywhere
or nowhere: if a shard does not take its chunks, the stream position goes back and the
append fails (chunks other shards took lie past the stream end, so they are never served,
and the next append overwrites them). Nothing is acknowledged before the shards' and the
catalog's records are on disk (`LogTickets`, waited for by the engine).

`delete_document` forgets a document: every shard deletes the chunks holding any of its
tokens (and logs that), and the catalog drops its tokens from the trailing partial chunk.
Without a log, the deletion is made durable by a snapshot of every shard, so a restart can
never bring the chunks back.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memory_service.ann import faiss_module
from memory_service.bank import (
    AppendInfo,
    BankInfo,
    BankSpec,
    Chunker,
    DeleteInfo,
    Documents,
    check_document,
    check_kv,
)
from memory_service.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from memory_service.files import atomic_write
from memory_service.search import ShardCall
from memory_service.shard import LiveRange, ShardInfo, ShardSnapshot, split_chunks
from memory_service.tenancy import Tenant
from memory_service.wal import WriteAheadLog, check_durability, read_records

log = logging.getLogger("longmem.catalog")

BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
CATALOG_FILE = "catalog.pt"
CATALOG_LOG = "catalog.wal"


@dataclass(frozen=True)
class LogTickets:
    """An append's log records, to wait for before it is acknowledged: the catalog's
    sequence number and each shard's (`wait_durable`). Empty with durability `none`."""

    catalog: int | None = None
    shards: dict[int, int] = field(default_factory=dict)


@dataclass
class BankEntry:
    tenant: str
    name: str
    spec: BankSpec
    chunker: Chunker
    generation: int
    created_at: float

    @property
    def key(self) -> str:
        """The bank's key on the shards."""
        return f"{self.tenant}/{self.name}@{self.generation}"


class Catalog:
    def __init__(
        self,
        n_shards: int,
        call: ShardCall,
        snapshot_dir: str | None = None,
        durability: str = "none",
    ):
        """`durability` (see `memory_service.wal`) takes effect with a `snapshot_dir`."""
        self.n_shards = n_shards
        self.call = call
        self.snapshot_dir = snapshot_dir
        self.banks: dict[tuple[str, str], BankEntry] = {}  # (tenant, name) -> entry
        self.generation = 0
        self.wal: WriteAheadLog | None = None
        if snapshot_dir:
            self._load(check_durability(durability))

    # --- persistence -----------------------------------------------------------------

    def _save(self) -> None:
        if not self.snapshot_dir:
            return
        state = {
            "n_shards": self.n_shards,
            "generation": self.generation,
            "banks": [
                {
                    "tenant": e.tenant,
                    "name": e.name,
                    "spec": e.spec.to_dict(),
                    "generation": e.generation,
                    "created_at": e.created_at,
                    "chunker": e.chunker.state(),
                }
                for e in self.banks.values()
            ],
        }
        directory = Path(self.snapshot_dir)
        write = lambda tmp: torch.save(state, tmp)  # noqa: E731
        atomic_write(directory / CATALOG_FILE, write, durable=self.wal is not None)
        if self.wal is not None:
            self.wal.truncate()
        else:  # a log left by an earlier run with durability: the file now holds it
            (directory / CATALOG_LOG).unlink(missing_ok=True)

    def _load(self, durability: str) -> None:
        """Read the catalog file, then replay the log after it (a log left by a run with
        durability is replayed whatever `durability` is now)."""
        path = Path(self.snapshot_dir) / CATALOG_FILE
        if path.exists():
            self._load_file(path)
        log_path = Path(self.snapshot_dir) / CATALOG_LOG
        if durability == "none":
            records = (r for r, _ in read_records(log_path))
        else:
            self.wal = WriteAheadLog(log_path, durability)
            records = self.wal.replay()
        for header, tensors in records:
            entry = self.banks.get((header.get("tenant"), header.get("name")))
            if entry is None or entry.generation != header.get("generation"):
                continue  # the bank was deleted or reset after this record
            keys, values = tensors
            entry.chunker.load_state(
                {
                    "next_chunk_id": header["next_chunk_id"],
                    "pending_keys": keys,
                    "pending_values": values,
                    "pending_docs": header.get("pending_docs"),
                }
            )

    def _load_file(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        if state["n_shards"] != self.n_shards:
            raise InvalidArgument(
                f"snapshot {path} is for {state['n_shards']} shards, not {self.n_shards}"
            )
        self.generation = state["generation"]
        for b in state["banks"]:
            spec = BankSpec(**b["spec"])
            chunker = Chunker(spec)
            chunker.load_state(b["chunker"])
            entry = BankEntry(
                b["tenant"], b["name"], spec, chunker, b["generation"], b["created_at"]
            )
            self.banks[(entry.tenant, entry.name)] = entry
        log.info("catalog restored from %s: %d banks", path, len(self.banks))

    # --- banks ---------------------------------------------------------------------------

    def _entry(self, tenant: Tenant, name: str) -> BankEntry:
        entry = self.banks.get((tenant.name, name))
        if entry is None:
            raise NotFound(f"bank {name!r} not found")
        return entry

    def _next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def _drop_everywhere(self, key: str) -> None:
        """Drop a bank's chunks on every shard that answers (a down shard's copy is
        unreachable anyway: its generation is never used again)."""
        args = {s: (key,) for s in range(self.n_shards)}
        self.call("drop_bank", args, partial=True)

    def create_bank(self, tenant: Tenant, name: str, spec: BankSpec) -> BankInfo:
        if not isinstance(name, str) or not BANK_NAME.match(name):
            raise InvalidArgument(f"bank name {name!r} must match {BANK_NAME.pattern}")
        if (tenant.name, name) in self.banks:
            raise AlreadyExists(f"bank {name!r} already exists")
        if spec.index != "exact":
            faiss_module()  # FailedPrecondition, saying how to install it, where it is missing
        own = [e for e in self.banks.values() if e.tenant == tenant.name]
        if tenant.max_banks is not None and len(own) >= tenant.max_banks:
            raise ResourceExhausted(
                f"tenant {tenant.name!r} is at its quota of {tenant.max_banks} banks"
            )
        used = sum(e.spec.capacity_tokens for e in own)
        if tenant.max_tokens is not None and used + spec.capacity_tokens > tenant.max_tokens:
            raise ResourceExhausted(
                f"bank capacity {spec.capacity_tokens} would exceed tenant {tenant.name!r}'s "
                f"quota of {tenant.max_tokens} tokens ({used} in use)"
            )
        entry = BankEntry(
            tenant.name, name, spec, Chunker(spec), self._next_generation(), time.time()
        )
        self.banks[(tenant.name, name)] = entry
        self._save()
        return self.describe_bank(tenant, name)

    def delete_bank(self, tenant: Tenant, name: str) -> None:
        entry = self._entry(tenant, name)
        del self.banks[(tenant.name, name)]
        self._save()
        self._drop_everywhere(entry.key)

    def reset_bank(self, tenant: Tenant, name: str) -> BankInfo:
        entry = self._entry(tenant, name)
        old_key = entry.key
        entry.generation = self._next_generation()
        entry.chunker.reset()
        self._save()
        self._drop_everywhere(old_key)
        return self.describe_bank(tenant, name)

    def list_banks(self, tenant: Tenant) -> list[BankInfo]:
        names = sorted(name for t, name in self.banks if t == tenant.name)
        return [self.describe_bank(tenant, name) for name in names]

    def describe_bank(self, tenant: Tenant, name: str) -> BankInfo:
        """Size and state of a bank. `lost_chunks`: chunks the bank should hold (appended,
        not evicted) that a shard no longer has, because it restarted from an older snapshot
        or was down when they were appended; they are never served."""
        entry = self._entry(tenant, name)
        live = self._live(entry)
        per_shard = self.call("describe", {s: (entry.key, live) for s in range(self.n_shards)})
        chunks = sum(d["chunks"] for d in per_shard.values())
        deleted = sum(d["deleted"] for d in per_shard.values())
        expected = sum(entry.chunker.expected_chunks(s, self.n_shards) for s in per_shard)
        return BankInfo(
            name=entry.name,
            spec=entry.spec,
            size_tokens=chunks * entry.spec.chunk_size,
            chunks=chunks,
            pending_tokens=entry.chunker.pending_tokens,
            appended_chunks=entry.chunker.next_chunk_id,
            evicted_chunks=entry.chunker.evicted_chunks(self.n_shards),
            lost_chunks=expected - chunks - deleted,
            shards=self.n_shards,
            bytes=sum(d["bytes"] for d in per_shard.values()),
            created_at=entry.created_at,
            deleted_chunks=deleted,
        )

    def append(
        self,
        tenant: Tenant,
        name: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        document: str = "",
    ) -> tuple[AppendInfo, LogTickets]:
        """Append tokens `(n, kv_heads, head_dim)` of `document` ("" for none) in stream
        order to a bank; also return the log records to wait for before acknowledging it."""
        entry = self._entry(tenant, name)
        check_kv(entry.spec, keys, values)
        check_document(document)
        if self.wal is None:
            return self._append_unlogged(entry, keys, values, document), LogTickets()
        before = entry.chunker.state()
        first_id, k, v, docs = entry.chunker.push(keys, values, document)
        try:
            _, shards = self._deal(entry, first_id, k, v, docs, partial=False)
            seq = self._log_position(entry)
        except BaseException:
            entry.chunker.load_state(before)  # applied nowhere: past the end on the shards
            raise
        info = AppendInfo(
            appended_tokens=keys.shape[0],
            pending_tokens=entry.chunker.pending_tokens,
            appended_chunks=entry.chunker.next_chunk_id,
            lost_chunks=0,
        )
        return info, LogTickets(seq, {s: q for s, q in shards.items() if q is not None})

    def _log_position(self, entry: BankEntry) -> int:
        """Log a bank's stream position and trailing partial chunk; the record's number."""
        position = {
            "op": "position",
            "tenant": entry.tenant,
            "name": entry.name,
            "generation": entry.generation,
            "next_chunk_id": entry.chunker.next_chunk_id,
            "pending_docs": entry.chunker.pending_docs,
        }
        pending = (entry.chunker.pending_keys, entry.chunker.pending_values)
        try:
            return self.wal.append(position, pending)
        except OSError as e:
            raise Unavailable(f"the catalog cannot write its log: {e}") from None

    def _append_unlogged(
        self, entry: BankEntry, keys: torch.Tensor, values: torch.Tensor, document: str
    ) -> AppendInfo:
        """Durability `none`: the stream position is saved before the chunks go out, so a
        chunk a shard did not take (it was down) shows as lost, never as present."""
        first_id, k, v, docs = entry.chunker.push(keys, values, document)
        self._save()
        sent, taken = self._deal(entry, first_id, k, v, docs, partial=True)
        lost = sum(n for s, n in sent.items() if s not in taken)
        if lost:
            log.warning(
                "%d chunks of bank %r lost: shards %s unavailable",
                lost,
                entry.name,
                sorted(set(sent) - set(taken)),
            )
        return AppendInfo(
            appended_tokens=keys.shape[0],
            pending_tokens=entry.chunker.pending_tokens,
            appended_chunks=entry.chunker.next_chunk_id,
            lost_chunks=lost,
        )

    def _deal(
        self,
        entry: BankEntry,
        first_id: int,
        k: torch.Tensor,
        v: torch.Tensor,
        docs: Documents | None,
        partial: bool,
    ) -> tuple[dict[int, int], dict[int, int | None]]:
        """Send each shard its chunks: how many each was sent, and the answers of those
        that took them (their log sequence numbers)."""
        oldest = entry.chunker.oldest_live_id
        parts = split_chunks(first_id, k, v, self.n_shards, docs)
        args = {
            s: (entry.key, entry.spec, ids, keys, values, oldest, docs)
            for s, (ids, keys, values, docs) in enumerate(parts)
            if len(ids)
        }
        taken = self.call("add", args, partial=partial) if args else {}
        return {s: len(a[2]) for s, a in args.items()}, taken

    def delete_document(
        self, tenant: Tenant, name: str, document: str
    ) -> tuple[DeleteInfo, LogTickets]:
        """Remove every chunk of a bank holding a token of `document`, and its pending
        tokens; also return the log records to wait for. Every shard must answer (a down
        shard fails the call with Unavailable; it is safe to retry)."""
        entry = self._entry(tenant, name)
        check_document(document, required=True)
        live = self._live(entry)
        args = {s: (entry.key, live, document) for s in range(self.n_shards)}
        answers = self.call("forget", args)
        pending = entry.chunker.forget(document)
        seq = None
        if self.wal is not None:
            seq = self._log_position(entry) if pending else None
        elif self.snapshot_dir:  # no log: only a snapshot keeps a restart from undoing it
            self.snapshot()
        info = DeleteInfo(sum(n for n, _ in answers.values()), pending)
        shards = {s: q for s, (_, q) in answers.items() if q is not None}
        return info, LogTickets(seq, shards)

    def wait_durable(self, seq: int) -> None:
        """Return once catalog log record `seq` is on disk."""
        if self.wal is not None:
            self.wal.wait(seq)

    def _live(self, entry: BankEntry) -> LiveRange:
        return entry.chunker.oldest_live_id, entry.chunker.next_chunk_id

    def resolve(
        self, tenant: Tenant, names: list[str]
    ) -> tuple[list[str], list[LiveRange], BankSpec]:
        """For a search: the banks' shard keys, live ranges and common spec."""
        if not names:
            raise InvalidArgument("name at least one bank to search")
        entries = [self._entry(tenant, n) for n in names]
        spec = entries[0].spec
        for e in entries[1:]:
            if (e.spec.kv_heads, e.spec.head_dim, e.spec.chunk_size, e.spec.dtype) != (
                spec.kv_heads,
                spec.head_dim,
                spec.chunk_size,
                spec.dtype,
            ):
                raise InvalidArgument(
                    f"banks {names[0]!r} and {e.name!r} differ in heads, head dim, chunk size or "
                    "dtype; one search can only serve banks of one shape"
                )
        return [e.key for e in entries], [self._live(e) for e in entries], spec

    def snapshot(self) -> list[ShardSnapshot]:
        """Save the catalog and every shard's banks to `snapshot_dir`."""
        if not self.snapshot_dir:
            raise InvalidArgument("the service runs without --snapshot-dir; nothing to save to")
        self._save()
        args = {s: (self.snapshot_dir,) for s in range(self.n_shards)}
        return list(self.call("save_snapshot", args).values())

    def shard_map(self) -> list[ShardInfo]:
        """Where each shard runs, or that it is unavailable."""
        found = self.call("info", {s: () for s in range(self.n_shards)}, partial=True)
        return [found.get(s, ShardInfo(s, available=False)) for s in range(self.n_shards)]

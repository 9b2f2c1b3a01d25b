"""One shard: its part of every bank, searched and gathered locally. Plain Python, no Ray.

The Ray shard actor (`memory_service.actors.ShardActor`) is this class run in an actor
process; the in-process client holds instances of it directly.

A shard learns of a bank when its first chunks arrive (`add` carries the spec), so it holds
no list of banks that could disagree with the catalog. Every read carries the catalog's
live range per bank (`LiveRange`: the FIFO mark and the stream end), so a shard restored
from an older snapshot never serves a chunk that has since been evicted, and chunks of an
append that failed elsewhere (past the end) are never served.

With a durability other than `none` (`memory_service.wal`), every `add`, `forget` and
`drop_bank` is logged beside the snapshot before it is acknowledged; `restore` loads the
snapshot and replays the log, and each snapshot truncates it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memory_service.bank import BankSpec, ChunkStore, Documents, encode_chunks
from memory_service.errors import InvalidArgument, NotFound, Unavailable
from memory_service.files import atomic_write
from memory_service.wal import WriteAheadLog, check_durability, read_records

log = logging.getLogger("longmem.shard")

LiveRange = tuple[int, int]  # chunk ids in [oldest, end) of a bank may be served


@dataclass(frozen=True)
class ShardInfo:
    """A shard's entry in the shard map: where it runs, what it holds, whether it is up."""

    index: int
    available: bool = True
    node_id: str = ""  # the Ray node, for a shard actor
    node_address: str = ""  # the node's IP address
    device: str = ""  # "cpu" or "cuda"
    endpoint: str = ""  # host:port where this shard serves the API too, if asked
    banks: int = 0  # banks with chunks on this shard (all tenants)
    restored_from_snapshot: bool = False
    wal_bytes: int = 0  # length of the shard's write-ahead log (0 without one)
    wal_replay_seconds: float = 0.0  # how long replaying it took when the shard last started


@dataclass(frozen=True)
class ShardSnapshot:
    """What one shard wrote to the snapshot dir."""

    shard: int
    banks: int
    bytes: int


def split_chunks(
    first_id: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    n_shards: int,
    documents: Documents | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Documents | None]]:
    """Deal chunks `first_id..` `(C, csz, H, D)` of `documents` to shards:
    `[(ids, keys, values, documents)]` per shard."""
    ids = torch.arange(first_id, first_id + keys.shape[0])
    out = []
    for shard in range(n_shards):
        mine = ids % n_shards == shard
        docs = None if documents is None else (documents[0], documents[1][mine])
        out.append((ids[mine], keys[mine], values[mine], docs))
    return out


class Shard:
    """Shard `index` of `n_shards`: a ChunkStore per bank, keyed by the bank's internal key."""

    def __init__(self, index: int, n_shards: int, device: str = "cpu"):
        self.index, self.n_shards, self.device = index, n_shards, device
        self.stores: dict[str, ChunkStore] = {}
        self.wal: WriteAheadLog | None = None
        self.wal_replay_seconds = 0.0

    def _store(self, bank_key: str, live: LiveRange) -> ChunkStore | None:
        store = self.stores.get(bank_key)
        if store is not None:
            store.mark(live)
        return store

    def drop_bank(self, bank_key: str) -> None:
        self.stores.pop(bank_key, None)
        if self.wal is not None:
            self.wal.append({"op": "drop", "bank": bank_key})

    def add(
        self,
        bank_key: str,
        spec: BankSpec,
        ids: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        oldest_live_id: int,
        documents: Documents | None = None,
    ) -> int | None:
        """Store chunks `ids` of a bank (tagged with `documents`); with a log, log them too
        and return the record's sequence number (`wait_durable` returns once it is on
        disk). An int8 or int4 bank's chunks are logged in their stored form (codes, scales
        and means: int8 3/8 of the float32 they arrive in, 3/4 of a float16 bank's log; int4
        1/4 and 1/2), others as they came."""
        encoded = encode_chunks(spec, keys, values)
        self._put(bank_key, spec, ids, encoded, oldest_live_id, documents)  # checks them first
        header = {"op": "add", "bank": bank_key, "spec": spec.to_dict(), "oldest": oldest_live_id}
        tensors = [ids, keys, values]
        if spec.quantized:
            header["encoded"] = list(encoded)
            tensors = [ids, *encoded.values()]
        if documents is not None:
            header["documents"] = documents[0]
            tensors.append(documents[1])
        # the catalog rolls a failed append back: its ids are never served
        return self._log(header, tensors)

    def _put(
        self,
        bank_key: str,
        spec: BankSpec,
        ids: torch.Tensor,
        encoded: dict[str, torch.Tensor],
        oldest_live_id: int,
        documents: Documents | None,
    ) -> None:
        store = self.stores.get(bank_key) or ChunkStore(
            spec, self.index, self.n_shards, self.device
        )
        store.add_encoded(ids, encoded, oldest_live_id, documents)
        self.stores[bank_key] = store

    def forget(self, bank_key: str, live: LiveRange, document: str) -> tuple[int, int | None]:
        """Delete every chunk of a bank holding a token of `document`: how many were live,
        and with a log the record's sequence number (see `add`)."""
        store = self._store(bank_key, live)
        removed = 0 if store is None else store.forget(document)
        return removed, self._log({"op": "forget", "bank": bank_key, "document": document})

    def _log(self, header: dict, tensors: list[torch.Tensor] | tuple = ()) -> int | None:
        if self.wal is None:
            return None
        try:
            return self.wal.append(header, tensors)
        except OSError as e:
            raise Unavailable(f"shard {self.index} cannot write its log: {e}") from None

    def wait_durable(self, seq: int) -> None:
        """Return once log record `seq` is on disk."""
        if self.wal is not None:
            self.wal.wait(seq)

    def search(
        self,
        bank_keys: list[str],
        live: list[LiveRange],
        spec: BankSpec,
        queries: torch.Tensor,
        top_k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local top-k for queries `(B, n, Hq, D)`, row b against bank `bank_keys[b]`.

        Returns scores and global chunk ids, each `(B, n, Hq, top_k)`, on the CPU.
        """
        B, n, Hq, _ = queries.shape
        scores = torch.full((B, n, Hq, top_k), -torch.inf)
        ids = torch.full((B, n, Hq, top_k), -1, dtype=torch.int64)
        for b, (key, bank_live) in enumerate(zip(bank_keys, live, strict=True)):
            store = self._store(key, bank_live)
            if store is not None:  # no chunks of this bank here yet
                s, i = store.search(queries[b], top_k)
                scores[b], ids[b] = s.cpu(), i.cpu()
        return scores, ids

    def gather(
        self, bank_keys: list[str], live: list[LiveRange], spec: BankSpec, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(U, csz, D)` for rows `(U, 3)` of (bank index, kv head, chunk id)."""
        banks = rows[:, 0].unique().tolist()
        stores = {b: self._store(bank_keys[b], live[b]) for b in banks}
        if any(s is None for s in stores.values()):
            raise NotFound(f"shard {self.index} holds none of the requested chunks")
        if len(banks) == 1:
            k, v = stores[banks[0]].gather(rows[:, 1], rows[:, 2])
            return k.cpu(), v.cpu()
        shape = (rows.shape[0], spec.chunk_size, spec.head_dim)
        keys = torch.empty(shape, dtype=spec.value_dtype)
        values = torch.empty(shape, dtype=spec.value_dtype)
        for b in banks:
            sel = rows[:, 0] == b
            k, v = stores[b].gather(rows[sel, 1], rows[sel, 2])
            keys[sel], values[sel] = k.cpu(), v.cpu()
        return keys, values

    def info(self) -> ShardInfo:
        """Where this shard runs and what it holds (its entry in the shard map)."""
        return ShardInfo(
            self.index,
            device=self.device,
            banks=len(self.stores),
            wal_bytes=self.wal_stats()[0],
            wal_replay_seconds=self.wal_replay_seconds,
        )

    def wal_stats(self) -> tuple[int, float]:
        """The write-ahead log's length in bytes (0 without one) and how long its replay
        took when this shard last started; cheap and safe from any thread (the metrics)."""
        return (self.wal.size_bytes if self.wal is not None else 0), self.wal_replay_seconds

    def describe(self, bank_key: str, live: LiveRange) -> dict:
        store = self._store(bank_key, live)
        if store is None:
            return {"chunks": 0, "bytes": 0, "deleted": 0}
        return {"chunks": store.n_chunks, "bytes": store.nbytes, "deleted": store.n_deleted}

    # --- snapshots and the log ----------------------------------------------------------

    def snapshot_path(self, directory: str | os.PathLike) -> Path:
        return Path(directory) / f"shard-{self.index}-of-{self.n_shards}.pt"

    def log_path(self, directory: str | os.PathLike) -> Path:
        return Path(directory) / f"shard-{self.index}-of-{self.n_shards}.wal"

    def save_snapshot(self, directory: str | os.PathLike) -> ShardSnapshot:
        """Write every bank of this shard to one file (temporary name, then rename), then
        truncate the log (with one, the snapshot is fsynced first)."""
        path = self.snapshot_path(directory)
        states = {key: s.state() for key, s in self.stores.items()}
        atomic_write(path, lambda tmp: torch.save(states, tmp), durable=self.wal is not None)
        if self.wal is not None:
            self.wal.truncate()
        else:  # a log left by an earlier run with durability: the snapshot now holds it
            self.log_path(directory).unlink(missing_ok=True)
        return ShardSnapshot(self.index, len(self.stores), path.stat().st_size)

    def load_snapshot(self, directory: str | os.PathLike) -> bool:
        """Restore the banks from this shard's snapshot, if there is one."""
        path = self.snapshot_path(directory)
        if not path.exists():
            return False
        states = torch.load(path, weights_only=True)
        for key, state in states.items():
            if (state["shard"], state["n_shards"]) != (self.index, self.n_shards):
                raise InvalidArgument(f"snapshot {path} was written by another shard layout")
            self.stores[key] = ChunkStore.from_state(state, self.device)
        return True

    def restore(self, directory: str | os.PathLike, durability: str) -> bool:
        """Load the snapshot, replay the log after it (a log left by a run with durability
        is replayed whatever `durability` is now), then log from here on unless
        `durability` is `none`. True when anything was restored."""
        restored = self.load_snapshot(directory)
        started = time.perf_counter()
        if check_durability(durability) == "none":
            records = (r for r, _ in read_records(self.log_path(directory)))
        else:
            self.wal = WriteAheadLog(self.log_path(directory), durability)
            records = self.wal.replay()
        replayed = 0
        for header, tensors in records:
            self._replay(header, tensors)
            replayed += 1
        self.wal_replay_seconds = time.perf_counter() - started
        if replayed:
            log.info(
                "shard %d replayed %d log records in %.3f s",
                self.index,
                replayed,
                self.wal_replay_seconds,
            )
        return restored or replayed > 0

    def _replay_add(self, header: dict, tensors: list[torch.Tensor]) -> None:
        spec, names = BankSpec(**header["spec"]), header.get("encoded", ["keys", "values"])
        n = 1 + len(names)  # ids, then the chunk tensors, then the document tags if any
        docs = (header["documents"], tensors[n]) if "documents" in header else None
        if "encoded" in header:
            encoded = dict(zip(names, tensors[1:n], strict=True))
            self._put(header["bank"], spec, tensors[0], encoded, header["oldest"], docs)
        else:
            self.add(header["bank"], spec, *tensors[:3], header["oldest"], docs)

    def _replay(self, header: dict, tensors: list[torch.Tensor]) -> None:
        wal, self.wal = self.wal, None  # replayed records are logged already
        try:
            if header["op"] == "drop":
                self.drop_bank(header["bank"])
            elif header["op"] == "forget":
                store = self.stores.get(header["bank"])
                if store is not None:
                    store.forget(header["document"])
            else:
                self._replay_add(header, tensors)
        except (InvalidArgument, KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            log.warning("shard %d skipped a log record it cannot apply: %s", self.index, e)
        finally:
            self.wal = wal

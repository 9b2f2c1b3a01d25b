"""A write-ahead log: records appended to one file, replayed after the last snapshot.

Plain Python and torch, no Ray. Each shard logs the chunks it takes and the catalog logs
each bank's new stream position, in files beside their snapshots (the snapshot dir, which
every node can reach), so a process restarted anywhere replays them. A snapshot truncates
the log: everything before it is in the snapshot.

A record is a small JSON header and tensors as raw bytes, in a frame
`[payload length: u32][CRC32 of payload: u32][payload]`. Replay stops at the first frame
that is cut short or fails its CRC (a write torn by a crash; it was never acknowledged) and
cuts the file there, so new records follow the last whole one.

Durability settings (`DURABILITY`), what an append waits for before it is acknowledged:

- `none`: no log. What was appended after a shard's last snapshot is lost when the shard
  restarts (counted in `lost_chunks`). Fastest; for banks that can be rebuilt.
- `group` (the default): the record is written, then the append waits for an fsync shared
  with every append that arrived meanwhile (one fsync per log at most every
  `GROUP_COMMIT_S`). Nothing acknowledged is lost when a process, or a node using network
  storage, dies, or when the machine loses power. Concurrent appends share fsyncs, so with
  many clients throughput stays near `none`; each append waits about one fsync longer.
- `fsync`: the record is fsynced before the call returns, one fsync per append and per log,
  in the actor's call order; the same guarantee as `group`, paying a whole fsync on every
  append while the next waits its turn. For hosts where a background thread must not
  delay the acknowledgement, or to compare.

`group` is the default: it keeps the `fsync` guarantee at near `none` throughput when many
clients append (0.89x with 8 clients in benchmarks/bench_durability.py; a lone client pays
one fsync per append whatever the setting).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger("longmem.wal")

DURABILITY = ("none", "group", "fsync")
DEFAULT_DURABILITY = "group"
GROUP_COMMIT_S = 0.002  # at most one fsync per log per this many seconds under load
FRAME = struct.Struct("<II")  # payload length, CRC32 of the payload
HEADER = struct.Struct("<I")  # JSON header length, at the start of the payload
MAX_RECORD_BYTES = (1 << 32) - 1
DTYPE_NAMES = {  # the dtypes a record's tensors may have, named as torch does (int4 codes: uint8)
    t: str(t).removeprefix("torch.")
    for t in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
    )
}
NAMED_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

Record = tuple[dict, list[torch.Tensor]]


class CorruptRecord(ValueError):
    """A frame whose payload passed its CRC but does not decode (never written by us)."""


def check_durability(durability: str) -> str:
    if durability not in DURABILITY:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, got {durability!r}")
    return durability


def encode(header: dict, tensors: Sequence[torch.Tensor]) -> bytes:
    """One framed record: the header (JSON) and the tensors' raw little-endian bytes."""
    meta = [(DTYPE_NAMES[t.dtype], list(t.shape)) for t in tensors]
    head = json.dumps({"h": header, "t": meta}).encode()
    body = [HEADER.pack(len(head)), head]
    body += [
        t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors
    ]
    payload = b"".join(body)
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"a log record of {len(payload)} bytes is over the 4 GiB frame limit")
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Record:
    """The header and tensors of one record's payload."""
    try:
        (n,) = HEADER.unpack_from(payload)
        meta = json.loads(payload[HEADER.size : HEADER.size + n])
        offset, tensors = HEADER.size + n, []
        for dtype_name, shape in meta["t"]:
            dtype = NAMED_DTYPES[dtype_name]
            count = 1
            for d in shape:
                count *= d
            size = count * torch.empty((), dtype=dtype).element_size()
            raw = bytearray(payload[offset : offset + size])
            if len(raw) != size:
                raise CorruptRecord("a tensor runs past the end of its record")
            tensors.append(
                torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)
                if size
                else torch.empty(shape, dtype=dtype)
            )
            offset += size
        return meta["h"], tensors
    except (KeyError, TypeError, ValueError, struct.error) as e:
        raise CorruptRecord(f"undecodable log record: {e}") from None


def read_records(path: str | os.PathLike) -> Iterator[tuple[Record, int]]:
    """The whole records of log `path` in order, each with the byte offset where it ends;
    stops before a torn or corrupt tail. A missing file has none."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        size, good = os.fstat(f.fileno()).st_size, 0
        while True:
            frame = f.read(FRAME.size)
            if len(frame) < FRAME.size:
                break
            length, crc = FRAME.unpack(frame)
            if length > size - good - FRAME.size:
                break  # cut short
            payload = f.read(length)
            if zlib.crc32(payload) != crc:
                break
            try:
                record = decode(payload)
            except CorruptRecord as e:
                log.warning("%s: %s; replay stops there", path, e)
                break
            good += FRAME.size + length
            yield record, good
        if good < size:
            log.warning("%s: dropped a torn or corrupt tail of %d bytes", path, size - good)


class WriteAheadLog:
    """An append-only log file with the durability setting `durability` (not `none`).

    `replay()` first (it reads the records and cuts a torn tail), then `append` and `wait`;
    `truncate` when a durable snapshot holds everything logged so far. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike, durability: str):
        if check_durability(durability) == "none":
            raise ValueError("durability 'none' keeps no log")
        self.path, self.durability = Path(path), durability
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.cond = threading.Condition()
        self.written = self.synced = 0  # sequence numbers of records
        self.size = os.fstat(self.fd).st_size  # bytes in the file, kept as records are written
        self.closed = False
        self.flusher: threading.Thread | None = None

    def replay(self) -> Iterator[Record]:
        """The records logged before this process, in order; once they are all read, a torn
        tail is cut off. Read them all before the first `append`."""
        good = 0
        for record, good in read_records(self.path):  # noqa: B007
            yield record
        with self.cond:
            if good < os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, good)
                os.fsync(self.fd)
            self.size = good

    @property
    def size_bytes(self) -> int:
        """The log's length in bytes (no system call: safe from any thread, even closed)."""
        return self.size

    def append(self, header: dict, tensors: Sequence[torch.Tensor] = ()) -> int:
        """Write one record; return its sequence number for `wait`. With `fsync` the record
        is on disk when this returns."""
        frame = memoryview(encode(header, tensors))
        with self.cond:
            if self.closed:
                raise OSError(f"write-ahead log {self.path} is closed")
            size = len(frame)
            while frame:
                frame = frame[os.write(self.fd, frame) :]
            self.size += size
            self.written += 1
            if self.durability == "fsync":
                os.fsync(self.fd)
                self.synced = self.written
            elif self.flusher is None:
                self.flusher = threading.Thread(target=self._flush_loop, daemon=True)
                self.flusher.start()
            self.cond.notify_all()
            return self.written

    def wait(self, seq: int) -> None:
        """Return once record `seq` is on disk (group commit: the next shared fsync)."""
        with self.cond:
            while self.synced < seq:
                if self.closed:
                    raise OSError(f"write-ahead log {self.path} closed before record {seq} synced")
                self.cond.wait()

    def _flush_loop(self) -> None:
        while True:
            with self.cond:
                while self.synced >= self.written and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                target = self.written
            os.fsync(self.fd)  # appends go on meanwhile; they share the next fsync
            with self.cond:
                self.synced = max(self.synced, target)
                self.cond.notify_all()
            time.sleep(GROUP_COMMIT_S)

    def truncate(self) -> None:
        """Empty the log: a durable snapshot now holds everything in it."""
        with self.cond:
            os.ftruncate(self.fd, 0)
            os.fsync(self.fd)
            self.size = 0
            self.synced = self.written
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            os.fsync(self.fd)
            self.synced = self.written
            self.closed = True
            self.cond.notify_all()
        if self.flusher is not None:
            self.flusher.join()
        os.close(self.fd)

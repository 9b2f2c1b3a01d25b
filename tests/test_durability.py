"""Durability: the write-ahead log on its own, a shard and the catalog replaying it, and a
real crash (kill -9 of shard actors on a local Ray while clients append and search)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

from memory_service.bank import BankSpec
from memory_service.catalog import Catalog
from memory_service.client import MemoryClient
from memory_service.engine import MemoryEngine
from memory_service.errors import ServiceError, Unavailable
from memory_service.shard import Shard
from memory_service.tenancy import Tenant
from memory_service.wal import FRAME, WriteAheadLog, check_durability, read_records

TENANT = Tenant("default", ("k",))


def records(n: int) -> list[tuple[dict, list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(n)
    return [
        (
            {"i": i, "bank": f"b{i}"},
            [
                torch.arange(i, i + 3),
                torch.randn(3, 2, 4, generator=g).half(),
                torch.randn(2, 5, generator=g).bfloat16(),
                torch.randn(0, 4),
            ],
        )
        for i in range(n)
    ]


def assert_records(got, expected) -> None:
    assert len(got) == len(expected)
    for (h1, t1), (h2, t2) in zip(got, expected, strict=True):
        assert h1 == h2 and len(t1) == len(t2)
        for a, b in zip(t1, t2, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("durability", ["group", "fsync"])
def test_replay_returns_the_records_in_order(tmp_path, durability):
    wal = WriteAheadLog(tmp_path / "x.wal", durability)
    assert list(wal.replay()) == []
    expected = records(5)
    seqs = [wal.append(h, t) for h, t in expected]
    assert seqs == [1, 2, 3, 4, 5]
    wal.wait(seqs[-1])  # returns once fsynced
    wal.close()
    assert_records(list(WriteAheadLog(tmp_path / "x.wal", durability).replay()), expected)


def test_a_torn_tail_is_dropped_and_cut_off(tmp_path):
    path = tmp_path / "x.wal"
    wal = WriteAheadLog(path, "fsync")
    expected = records(3)
    for h, t in expected:
        wal.append(h, t)
    wal.close()
    whole = path.read_bytes()
    ends = [end for _, end in read_records(path)]
    assert ends[-1] == len(whole)
    for cut in (len(whole) - 1, ends[1] + FRAME.size + 3, ends[1] + 5):  # torn mid-record
        path.write_bytes(whole[:cut])
        wal = WriteAheadLog(path, "group")
        assert_records(list(wal.replay()), expected[:2])
        assert path.stat().st_size == ends[1] == wal.size_bytes  # the torn tail is gone
        wal.append(*expected[2])  # a new record follows the last whole one
        assert wal.size_bytes == len(whole)
        wal.close()
        assert_records([r for r, _ in read_records(path)], expected)


def test_a_crc_mismatch_stops_replay_there(tmp_path):
    path = tmp_path / "x.wal"
    wal = WriteAheadLog(path, "fsync")
    expected = records(3)
    for h, t in expected:
        wal.append(h, t)
    wal.close()
    ends = [end for _, end in read_records(path)]
    data = bytearray(path.read_bytes())
    data[ends[0] + FRAME.size + 10] ^= 0xFF  # a flipped bit in record 2's payload
    path.write_bytes(bytes(data))
    assert_records([r for r, _ in read_records(path)], expected[:1])
    garbage = tmp_path / "g.wal"
    garbage.write_bytes(b"\xff" * 64)  # a length running past the end of the file
    assert list(read_records(garbage)) == []


def test_truncate_empties_the_log_and_releases_waiters(tmp_path):
    wal = WriteAheadLog(tmp_path / "x.wal", "group")
    for h, t in records(4):
        seq = wal.append(h, t)
    wal.truncate()
    wal.wait(seq)
    assert wal.size_bytes == 0 and list(read_records(tmp_path / "x.wal")) == []
    assert wal.append({"after": True}) == seq + 1
    wal.close()
    assert [h for (h, _), _ in read_records(tmp_path / "x.wal")] == [{"after": True}]


def test_durability_setting_is_checked(tmp_path):
    with pytest.raises(ValueError, match="durability must be one of none, group, fsync"):
        check_durability("always")
    with pytest.raises(ValueError, match="keeps no log"):
        WriteAheadLog(tmp_path / "x.wal", "none")


def fill_shard(shard: Shard, spec: BankSpec, bank: str, ids: range, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mine = torch.tensor([i for i in ids if i % shard.n_shards == shard.index])
    keys = torch.randn(len(mine), spec.chunk_size, spec.kv_heads, spec.head_dim, generator=g)
    shard.add(bank, spec, mine, keys.half(), (-keys).half(), 0)


def test_shard_restart_replays_its_log_after_the_snapshot(tmp_path):
    spec = BankSpec(kv_heads=2, head_dim=8, chunk_size=2)
    shard = Shard(1, 2)
    assert not shard.restore(tmp_path, "group")
    fill_shard(shard, spec, "a@1", range(0, 40), seed=0)
    fill_shard(shard, spec, "gone@2", range(0, 10), seed=1)
    shard.save_snapshot(tmp_path)  # truncates the log
    assert list(read_records(shard.log_path(tmp_path))) == []
    assert shard.info().wal_bytes == 0
    fill_shard(shard, spec, "a@1", range(40, 60), seed=2)
    fill_shard(shard, spec, "b@3", range(0, 7), seed=3)
    shard.drop_bank("gone@2")
    shard.wal.close()
    logged = shard.log_path(tmp_path).stat().st_size
    assert shard.wal_stats()[0] == logged > 0

    back = Shard(1, 2)
    assert back.restore(tmp_path, "fsync")
    assert sorted(back.stores) == ["a@1", "b@3"]
    for key, store in shard.stores.items():
        state, other = store.state(), back.stores[key].state()
        for field in ("ids", "keys", "values", "means"):
            assert torch.equal(state[field], other[field]), (key, field)
    assert len(list(read_records(shard.log_path(tmp_path)))) == 3  # replayed, kept
    info = back.info()  # what the shard map and the metrics report
    assert info.wal_bytes == logged and 0 < info.wal_replay_seconds < 10
    back.wal.close()


def local_engine(directory, fail: set[int]) -> MemoryEngine:
    """Two shards and a catalog in this process, logging with group commit; an `add` to a
    shard in `fail` raises Unavailable after the shards before it took their chunks."""
    shards = [Shard(i, 2) for i in range(2)]
    for shard in shards:
        shard.restore(directory, "group")

    def call(method: str, args: dict[int, tuple], partial: bool = False) -> dict:
        out = {}
        for s, a in args.items():
            if method == "add" and s in fail:
                raise Unavailable(f"shard {s} is unavailable")
            out[s] = getattr(shards[s], method)(*a)
        return out

    catalog = Catalog(2, call, str(directory), "group")
    return MemoryEngine(2, lambda method, *a: getattr(catalog, method)(*a), call)


def test_a_failed_append_is_applied_nowhere(tmp_path):
    """Shard 0 took its chunks, shard 1 refused: the append fails, the stream does not move,
    shard 0's chunks are never served, and the next append takes their ids."""
    fail: set[int] = set()
    engine = local_engine(tmp_path, fail)
    engine.create_bank(TENANT, "b", BankSpec(kv_heads=1, head_dim=16, chunk_size=1))
    keys = torch.nn.functional.normalize(torch.randn(30, 1, 16), dim=-1)
    engine.append(TENANT, "b", keys[:10], keys[:10])
    fail.add(1)
    with pytest.raises(Unavailable):
        engine.append(TENANT, "b", keys[10:20], keys[10:20])
    info = engine.describe_bank(TENANT, "b")
    assert (info.appended_chunks, info.chunks, info.lost_chunks) == (10, 10, 0)
    r = engine.search(TENANT, ["b"], keys[None, 10:20], 1)  # the failed append's own keys
    assert bool((r.chunk_ids < 10).all())  # only chunks 0..9 are served
    fail.clear()
    engine.append(TENANT, "b", keys[20:30], keys[20:30])  # takes ids 10..19
    for restarted in (engine, local_engine(tmp_path, fail)):
        info = restarted.describe_bank(TENANT, "b")
        assert (info.appended_chunks, info.chunks, info.lost_chunks) == (20, 20, 0)
        r = restarted.search(TENANT, ["b"], keys[None, 20:30], 1).expand()
        assert torch.equal(r.chunk_ids[0, :, 0, 0], torch.arange(10, 20))
        assert torch.equal(r.keys[0, :, 0, 0], keys[20:30, 0].half())


# --- a real crash: kill -9 of shard actors while clients append and search -----------------

WRITERS, BATCH, DIM = 2, 6, 32
MAX_BATCHES, DEADLINE_S = 600, 60.0


class Writer(threading.Thread):
    """Appends batches of fresh unit keys (chunk size 1) to its own bank; keeps what was
    acknowledged (with its chunk ids) and what failed."""

    def __init__(self, address: str, bank: str, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.client = MemoryClient(address, retries=0)
        self.client.create_bank(bank, kv_heads=1, head_dim=DIM, chunk_size=1)
        self.bank, self.stop = bank, stop
        self.g = torch.Generator().manual_seed(seed)
        self.acked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # ids, k, v
        self.failed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def run(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            if len(self.acked) + len(self.failed) >= MAX_BATCHES:
                break
            keys = torch.nn.functional.normalize(
                torch.randn(BATCH, 1, DIM, generator=self.g), dim=-1
            )
            values = torch.randn(BATCH, 1, DIM, generator=self.g)
            try:
                info = self.client.append(self.bank, keys, values)
            except ServiceError:
                self.failed.append((keys, values))
                time.sleep(0.02)
                continue
            end = info.appended_chunks
            self.acked.append((torch.arange(end - BATCH, end), keys, values))


def searcher(address: str, writers: list[Writer], stop: threading.Event, out: list[str]) -> None:
    """Search acknowledged keys throughout: each answer is exactly right or UNAVAILABLE."""
    client = MemoryClient(address, retries=0)
    deadline = time.monotonic() + DEADLINE_S
    g = torch.Generator().manual_seed(9)
    while not stop.is_set() and time.monotonic() < deadline:
        w = writers[int(torch.randint(len(writers), (1,), generator=g))]
        if not w.acked:
            time.sleep(0.05)
            continue
        ids, keys, values = w.acked[int(torch.randint(len(w.acked), (1,), generator=g))]
        try:
            r = client.search([w.bank], keys[None], 1)
        except Unavailable:
            out.append("UNAVAILABLE")
            continue
        right = torch.equal(r.chunk_ids[0, :, 0, 0], ids)
        right &= torch.equal(r.keys[0, :, 0, 0], keys[:, 0].half())
        right &= torch.equal(r.values[0, :, 0, 0], values[:, 0].half())
        out.append("OK" if right else f"WRONG {r.chunk_ids[0, :, 0, 0].tolist()} for {ids}")
    client.close()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill9(service_name: str, index: int) -> None:
    from memory_service.actor_calls import NAMESPACE, shard_name

    actor = ray.get_actor(shard_name(service_name, index), namespace=NAMESPACE)
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)


def test_kill9_of_shards_loses_no_acknowledged_append(ray_local, tmp_path):
    from memory_service.service import start_service

    service = start_service(shards=2, snapshot_dir=str(tmp_path), name="crash")
    stop = threading.Event()
    writers = [Writer(service.address, f"w{i}", seed=i, stop=stop) for i in range(WRITERS)]
    outcomes: list[str] = []
    search_thread = threading.Thread(
        target=searcher, args=(service.address, writers, stop, outcomes)
    )
    client = MemoryClient(service.address, retries=0)
    try:
        for t in (*writers, search_thread):
            t.start()
        acks = lambda: min(len(w.acked) for w in writers)  # noqa: E731
        wait_for(lambda: acks() >= 20, 30, "appends before the snapshot")
        client.snapshot()  # the rest is replayed from the logs
        for shard in (0, 1):
            before = acks()
            wait_for(lambda b=before: acks() >= b + 15, 30, "appends before the kill")
            kill9("crash", shard)
            killed_at = acks()
            wait_for(lambda k=killed_at: acks() >= k + 15, 45, f"appends after shard {shard} died")
        stop.set()
        for t in (*writers, search_thread):
            t.join(timeout=30)

        assert set(outcomes) <= {"OK", "UNAVAILABLE"}, [o for o in outcomes if o.startswith("W")]
        assert outcomes.count("OK") > 0
        assert all(s.restored_from_snapshot for s in client.shard_map())
        for w in writers:
            assert w.failed, "no append was refused: the shards were not killed mid-stream"
            ids = torch.cat([i for i, _, _ in w.acked])
            keys = torch.cat([k for _, k, _ in w.acked])
            values = torch.cat([v for _, _, v in w.acked])
            r = client.search([w.bank], keys[None], 1)  # every acknowledged token, exactly
            assert torch.equal(r.chunk_ids[0, :, 0, 0], ids)
            assert torch.equal(r.keys[0, :, 0, 0], keys[:, 0].half())
            assert torch.equal(r.values[0, :, 0, 0], values[:, 0].half())
            present = (
                0  # a failed append is there whole (applied, then not confirmed) or not at all
            )
            for keys, values in w.failed:
                r = client.search([w.bank], keys[None], 1)
                found = torch.equal(r.keys[0, :, 0, 0], keys[:, 0].half()) & torch.equal(
                    r.values[0, :, 0, 0], values[:, 0].half()
                )
                if found:
                    present += 1
                else:
                    assert not bool((r.scores[0, :, 0, 0] > 0.99).any()), "half an append"
            info = client.describe_bank(w.bank)
            assert info.lost_chunks == 0 and info.pending_tokens == 0
            assert info.appended_chunks == info.chunks == BATCH * (len(w.acked) + present)
    finally:
        stop.set()
        client.close()
        service.stop()

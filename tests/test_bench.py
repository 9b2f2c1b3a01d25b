"""`longmem bench` at tiny sizes: each suite writes sane JSON rows, its plots and a table.
The shards, tenants and search suites run for real on a 2-node `ray.cluster_utils.Cluster`
(passed as `--address`), the service on 127.0.0.1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from memory_service.cli import main

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING")
    yield c.address
    ray.shutdown()
    c.shutdown()


def bench(capsys, tmp_path, *flags: str) -> tuple[list[dict], str]:
    """Run `longmem bench` with `flags`; the rows of the one JSON it wrote, and stdout."""
    assert main(["bench", "--out", str(tmp_path), *flags]) == 0
    (found,) = tmp_path.glob("*.json")
    return json.loads(found.read_text())["rows"], capsys.readouterr().out


def test_index_suite_writes_json_and_plots(tmp_path):
    from memory_service.bench import index

    rows = index.run(tmp_path, [4096], ["ivf_flat"], nprobe_div=2, progress=False)
    (row,) = rows  # 1,024 chunks: 16 lists, built
    assert (row["tokens"], row["index"], row["nlist"], row["nprobe"]) == (4096, "ivf_flat", 16, 8)
    assert 0 < row["recall_at_16"] <= 1 and row["search_s"] > 0
    assert json.loads((tmp_path / "index_scaling.json").read_text())["rows"] == rows
    assert row["step_ms"] > 0 and row["exact_step_ms"] > 0
    for name in ("search_latency.png", "recall.png", "generation_step.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG
    with pytest.raises(ValueError, match="unknown index kinds"):
        index.run(tmp_path, [4096], ["flat"])
    assert index.index_params("ivf_flat", 1 << 24, 16, max_nlist=8192) == {
        "nlist": 8192, "nprobe": 512}


def test_index_suite_without_kinds_times_exact_search_alone(tmp_path):
    from memory_service.bench import index

    rows = index.run(tmp_path, [1024, 4096], [], progress=False)
    assert [(r["tokens"], r["index"], r["device"]) for r in rows] == [
        (1024, "exact", "cpu"), (4096, "exact", "cpu")]
    assert all(r["search_s"] > 0 and r["recall_at_16"] == 1.0 for r in rows)
    assert (tmp_path / "search_latency.png").read_bytes()[:4] == PNG


def write_keys(folder, rows: int, seed: int = 0):
    """A keys folder as `benchmarks/real_keys.py` writes one: clustered keys (N, 3, 64)
    float16 and queries (128, 9, 64) near some of them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, 3, 64))
    keys = centres[rng.integers(0, 64, rows)] + 0.3 * rng.standard_normal((rows, 3, 64))
    queries = keys[rng.integers(0, rows, 128)][:, [0, 0, 0, 1, 1, 1, 2, 2, 2]]
    folder.mkdir()
    np.save(folder / "keys.npy", keys.astype(np.float16))
    np.save(folder / "queries.npy", queries.astype(np.float16))
    return folder


def test_index_suite_on_keys_from_a_folder(tmp_path):
    from memory_service.bench import index

    keys = index.Keys.load(write_keys(tmp_path / "keys", 8192))
    (row,) = index.run(tmp_path / "out", [8192], ["ivf_flat"], nprobe_div=4, progress=False,
                       keys=keys)
    assert row["keys"] == str(tmp_path / "keys") and 0 < row["recall_at_16"] <= 1
    gaussian = index.run(tmp_path / "g", [8192], ["ivf_flat"], nprobe_div=4, progress=False)
    assert gaussian[0]["keys"] == "gaussian"
    assert row["recall_at_16"] > gaussian[0]["recall_at_16"]  # clusters: IVF's good case
    with pytest.raises(ValueError, match="--sizes up to 16,384 tokens, but --index-keys holds"):
        index.run(tmp_path / "out", [16384], ["ivf_flat"], keys=keys)
    np.save(tmp_path / "keys" / "queries.npy", np.zeros((4, 8, 64), np.float16))
    with pytest.raises(ValueError, match=r"need \(N, 3, 64\) / \(Q, 9, 64\)"):
        index.Keys.load(tmp_path / "keys")


def test_ivf_sweep_on_keys_from_a_folder(tmp_path, monkeypatch):
    """benchmarks/ivf_sweep.py: with IVF-flat, probing every list finds the exact top 16 and
    fewer lists find less; IVF-PQ finds more with more lists; the JSON and plot are written."""
    from benchmarks import ivf_sweep

    keys = write_keys(tmp_path / "keys", 8192)
    argv = ["ivf_sweep.py", "--keys", str(keys), "--head", "1", "--kinds", "ivf_flat,ivf_pq",
            "--nlist", "16", "--nprobe", "1,16,32", "--threads", "1",
            "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", argv)
    ivf_sweep.main()
    result = json.loads((tmp_path / "out" / "ivf_sweep.json").read_text())
    flat = {r["nprobe"]: r for r in result["rows"] if r["index"] == "ivf_flat"}
    pq = {r["nprobe"]: r for r in result["rows"] if r["index"] == "ivf_pq"}
    assert sorted(flat) == sorted(pq) == [1, 16]  # nprobe 32 > nlist 16 is skipped
    assert flat[16]["recall_at_16"] == 1.0 and flat[1]["recall_at_16"] < 1.0
    assert pq[16]["recall_at_16"] > pq[1]["recall_at_16"]
    assert result["rows_read"] == 8192 and result["head"] == 1
    assert (tmp_path / "out" / "ivf_sweep.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--suites", "index,gpu"], "unknown suites ['gpu']"),
        (["--shards", "1,0"], "--shards: 0 must be at least 1"),
        (["--sizes", "65536,1e6"], "--sizes takes comma-separated integers"),
        (["--tenant-tokens", "1001"], "--tenant-tokens: 1001 must be a multiple of 4"),
        (["--kinds", "flat"], "unknown index kinds"),
        (["--device", "tpu"], "--device 'tpu': choose cpu or cuda"),
        (["--max-nlist", "0"], "--max-nlist: 0 must be at least 1"),
        (["--suites", "capacity", "--capacity-dtype", "int3"], "dtype must be one of"),
        (["--suites", "capacity", "--capacity-tokens", str(1 << 36)], "85% of the"),
        (["--index-keys", "no-such-folder"], "write it with benchmarks/real_keys.py"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_work(capsys, tmp_path, flags, message):
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("longmem bench: ") and message in captured.err
    assert captured.err.count("\n") == 1 and not captured.out
    assert not out.exists()


def test_shards_suite(cluster, capsys, tmp_path):
    flags = ["--suites", "shards", "--shards", "1,2", "--shard-tokens", "8192"]
    rows, out = bench(capsys, tmp_path, *flags, "--address", cluster)
    assert [(r["shards"], r["nodes"]) for r in rows] == [(1, 1), (2, 2)]  # one node per shard
    for r in rows:
        assert r["bank_tokens"] == 8192 and r["devices"] == ["cpu"]
        assert r["queries_per_s"] > 0 and r["append_tokens_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["bytes_per_token"] > 0
    assert (tmp_path / "shards.png").read_bytes()[:4] == PNG
    assert "## shards\n| shards | nodes | p50 ms |" in out


def test_tenants_suite(cluster, capsys, tmp_path):
    flags = ["--suites", "tenants", "--tenants", "1,2", "--tenant-tokens", "8192"]
    rows, out = bench(capsys, tmp_path, *flags, "--requests", "4", "--address", cluster)
    assert [r["tenants"] for r in rows] == [1, 2]
    for r in rows:
        assert r["errors"] == 0 and r["searches"] == 4 * r["tenants"]
        assert r["searches_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert (tmp_path / "tenants.png").read_bytes()[:4] == PNG
    assert "## tenants\n| tenants | searches | errors |" in out


def test_search_suite(cluster, capsys, tmp_path):
    flags = ["--suites", "search", "--search-tokens", "8192", "--search-iters", "2"]
    rows, out = bench(capsys, tmp_path, *flags, "--address", cluster)
    paths = ["baseline", "bank", "gRPC service", "gRPC service"]
    assert [r["path"].split(",")[0].split(":")[0] for r in rows] == paths
    assert rows[0]["p50_vs_baseline"] == 1 and rows[0]["wire_bytes"] == 0
    for r in rows:
        assert r["p50_ms"] > 0 and r["queries_per_s"] > 0 and r["p50_vs_baseline"] > 0
    assert all(r["wire_bytes"] > 0 for r in rows[2:])
    assert (tmp_path / "search.png").read_bytes()[:4] == PNG
    assert "## search\n| path | p50 ms |" in out


def test_capacity_suite(capsys, tmp_path):
    """One int4 bank filled in appends of 65,536 tokens (4 here) and searched, in process."""
    flags = ["--suites", "capacity", "--capacity-tokens", "262144", "--capacity-dtype", "int4"]
    (row,), out = bench(capsys, tmp_path, *flags)
    assert (row["tokens"], row["dtype"], row["bytes_per_token"]) == (262144, "int4", 390)
    assert row["search_dtype"] == "float32"
    assert row["bank_gb"] == round(262144 * 390 / 1e9, 3) < min(row["rss_gb"], row["estimated_gb"])
    assert row["search_s"] > 0 and row["append_tokens_per_s"] > 0
    assert (tmp_path / "capacity.png").read_bytes()[:4] == PNG
    assert "## capacity\n| tokens | dtype | means | B/token |" in out
    flags = [*flags[:-1], "int8", "--capacity-search-dtype", "float16"]
    (row,), _ = bench(capsys, tmp_path, *flags)
    assert (row["dtype"], row["search_dtype"], row["bytes_per_token"]) == ("int8", "float16", 486)

"""The `longmem` command: train, eval, generate and demo on a tiny real backbone, and every
bad input ending with one clear line (exit 2), never a traceback or a half-written
checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray

from memory_service.cli import build_parser
from memory_service.service import start_service
from model_worker.cli import main
from tests.longmem_tiny import make_backbone, make_books

TINY = ["--segment-len", "32", "--k", "8", "--chunk-size", "2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_backbone(root / "bb"), make_books(root / "books", n_docs=2), root


@pytest.fixture(scope="module")
def service():
    svc = start_service(shards=2)
    yield svc
    svc.stop()
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(assets, service):
    bb, books, root = assets
    out = root / "ck"
    code = main(["train", "--backbone", str(bb), "--data", str(books), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--no-progress", "--memory",
                 service.address, *TINY])
    assert code == 0
    return out


def one_line_error(capsys, argv: list[str], match: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"longmem {argv[0]}: ") and match in err, err
    return err


def test_parser_has_every_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {
        "train", "eval", "generate", "demo", "serve", "memory-demo", "keygen", "bench"}


def test_train_eval_generate(assets, service, checkpoint, capsys, tmp_path):
    bb, books, _ = assets
    assert (checkpoint / "sidenet.safetensors").is_file()
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(books),
                 "--segment-len", "128", "--docs", "1", "--segments", "2",
                 "--passkey-distances", "600", "--passkey-trials", "1",
                 "--json-out", str(out), "--memory", service.address]) == 0
    printed = capsys.readouterr().out
    assert "passkey prose @ 600" in printed and "passkey filler @ 600" in printed
    assert "memory off" in printed and "backbone alone" in printed
    result = json.loads(out.read_text())
    assert result["checkpoint"] == str(checkpoint) and result["model"] == str(bb)
    assert result["sidenet"]["k"] == 8, "the checkpoint brings its SideNet config"
    assert main(["generate", "--checkpoint", str(checkpoint), "--document",
                 str(books / "book0.txt"), "--prompt", "the memory", "--max-new-tokens", "5",
                 "--segment-len", "32", "--memory", service.address]) == 0
    assert capsys.readouterr().out.strip()


def test_bad_data_folders(assets, service, capsys, tmp_path):
    bb, _, _ = assets
    train = ["train", "--backbone", str(bb), "--steps", "1", "--no-progress",
             "--memory", service.address, *TINY]
    out = tmp_path / "ck"
    one_line_error(capsys, [*train, "--data", str(tmp_path / "nope"), "--out", str(out)],
                   "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, [*train, "--data", str(tmp_path / "empty"), "--out", str(out)],
                   "holds no documents")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "image.png").write_bytes(bytes(range(256)) * 4)
    one_line_error(capsys, [*train, "--data", str(binary), "--out", str(out)],
                   "is not a UTF-8 text file")
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("too short")
    one_line_error(capsys, [*train, "--data", str(short), "--out", str(out)],
                   "shorter than one segment")
    assert not out.exists() and not list(tmp_path.glob(".ck*")), "no checkpoint was written"


def test_bad_checkpoints(assets, checkpoint, service, capsys, tmp_path):
    _, books, root = assets
    other = make_backbone(root / "other", seed=1)
    ev = ["eval", "--data", str(books), "--memory", service.address, "--json-out", ""]
    one_line_error(capsys, [*ev, "--checkpoint", str(checkpoint), "--backbone", str(other)],
                   "was made for backbone")
    one_line_error(capsys, [*ev, "--checkpoint", str(tmp_path / "nothing")], "not found")
    one_line_error(capsys, [*ev, "--checkpoint", str(checkpoint), "--segment-len", "128",
                            "--passkey-distances", "10", "--sections", "passkey"],
                   "too short")


def test_unreachable_service_and_refused_key(assets, service, capsys, tmp_path):
    bb, books, _ = assets
    train = ["train", "--backbone", str(bb), "--data", str(books), "--out",
             str(tmp_path / "ck"), "--steps", "1", "--no-progress", *TINY]
    one_line_error(capsys, [*train, "--memory", "127.0.0.1:1"], "is unreachable")
    one_line_error(capsys, [*train, "--memory", service.address, "--api-key", "wrong"],
                   "refused the API key")
    one_line_error(capsys, ["generate", "--backbone", str(bb), "--prompt", "x",
                            "--memory", service.address, "--api-key", "wrong"],
                   "refused the API key")
    assert not (tmp_path / "ck").exists()


def test_demo_runs_end_to_end_on_the_embedded_service(assets, checkpoint, tmp_path):
    """`longmem demo` as a user runs it (own process, embedded service, demo text)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "memory_service.cli", "demo", "--checkpoint", str(checkpoint),
         "--out", str(tmp_path / "demo"), "--segment-len", "128", "--docs", "1",
         "--segments", "2", "--passkey-distances", "600", "--filler-distances", "600,2000",
         "--passkey-trials", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("memory service", "perplexity", "passkey prose @ 600",
                 "passkey filler @ 2000", "backbone alone", "total"):
        assert line in proc.stdout, line
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(result["phases"]) >= {"model", "perplexity", "passkey"}
    assert any(r["figure"] == "passkey filler @ 2000" for r in result["rows"])

"""The committed gRPC stubs are what `make protos` generates from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = Path("protos/longmem/v1")


def test_committed_stubs_match_the_protos(tmp_path):
    protos = sorted(p.relative_to(ROOT) for p in (ROOT / PROTO_DIR).glob("*.proto"))
    assert protos, "no .proto files found"
    for p in protos:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / p, tmp_path / p)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        *map(str, protos),
    ]
    subprocess.run(cmd, cwd=tmp_path, check=True)
    generated = sorted((tmp_path / PROTO_DIR).glob("*_pb2*.py*"))
    assert len(generated) == 3 * len(protos)
    for fresh in generated:
        committed = ROOT / PROTO_DIR / fresh.name
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} differs from what the .proto generates: run `make protos`"
        )

"""Whole-or-nothing writes: a failed write leaves the previous file or folder, and no
temporary one behind."""

from __future__ import annotations

import pytest

from memory_service.files import atomic_dir, atomic_write


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "state.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"one"))
    assert path.read_bytes() == b"one"

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"one"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"two"))
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["state.bin"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "checkpoint"
    atomic_dir(path, lambda tmp: (tmp / "a").write_text("1"))
    assert [p.name for p in path.iterdir()] == ["a"]
    assert path.stat().st_mode & 0o777 == 0o755

    def fail(tmp):
        (tmp / "b").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_dir(path, fail)
    assert [p.name for p in path.iterdir()] == ["a"]
    atomic_dir(path, lambda tmp: (tmp / "b").write_text("2"))
    assert [p.name for p in path.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]

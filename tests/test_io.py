"""pipeline.io: files written whole or not at all."""

from __future__ import annotations

import pytest

from pipeline.io import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "state.json"
    assert atomic_write_text(path, "old") == path  # missing folders are made
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failed_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_the_temporary_is_hidden_beside_the_file_and_swept_by_a_tmp_glob(tmp_path):
    with atomic_path(tmp_path / "manifest.json") as tmp:
        tmp.write_text("{}")
        assert tmp.parent == tmp_path and tmp.name.startswith(".manifest.json.")
        assert list(tmp_path.glob("*.tmp")) == [tmp]  # what clean_folder removes after a kill

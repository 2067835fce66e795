"""pipeline.io: files written whole or not at all, values made fit for strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.io import atomic_path, atomic_write_bytes, atomic_write_text, json_safe


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


def test_json_safe_gives_strict_json_that_keeps_what_non_finite_values_were():
    event = {
        "kind": "non_finite_loss",
        "value": float("nan"),
        "bounds": (float("-inf"), np.float32(2.5)),  # a tuple, a numpy scalar
        "steps": np.int64(7),
        3: Path("runs/a"),  # a non-string key, an object JSON has no type for
        "ok": True,
        "none": None,
    }
    text = json.dumps(json_safe(event), allow_nan=False)
    assert json.loads(text) == {
        "kind": "non_finite_loss",
        "value": "nan",
        "bounds": ["-inf", 2.5],
        "steps": 7,
        "3": "runs/a",
        "ok": True,
        "none": None,
    }
    assert math.isnan(float(json.loads(text)["value"]))  # float() reads the strings back
    assert json_safe(float("inf")) == "inf" and json_safe(1) == 1 and json_safe(0.5) == 0.5

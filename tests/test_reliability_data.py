"""Shard integrity (issue 15.8): a shard whose bytes are not the ones its manifest recorded is
skipped, named and counted, identically on resume; a reader left with no intact shard stops with an
error that says what to do."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pipeline.data import ShardError, build_loader
from pipeline.data.manifest import sha256_file
from tests.data_helpers import batch_ids, data_cfg, write_set
from tests.test_data import check_resume


def damage(path) -> None:
    """Flip a bit of the tar's end-of-archive padding: every member still reads back the same, so
    only the sha256 in the manifest can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def epoch_ids(loader) -> list[int]:
    it = iter(loader)
    return batch_ids(torch.cat([next(it) for _ in range(loader.batches_per_epoch)]))


def test_damage_keeps_the_tar_readable(tmp_path):
    """The control: with its digest re-recorded, a damaged shard gives every sample."""
    folder = write_set(tmp_path / "s", 8, [8] * 4, [4] * 2)
    damage(folder / "train-000001.tar")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"]["train"][1]["sha256"] = sha256_file(folder / "train-000001.tar")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loader = build_loader(data_cfg(), folder, "train", 4, 0, 1)
    assert sorted(epoch_ids(loader)) == list(range(32)) and loader.bad_samples == {}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_shard_is_skipped_named_and_counted(tmp_path, workers, caplog):
    folder = write_set(tmp_path / "s", 8, [8] * 4, [4] * 2)
    damage(folder / "train-000001.tar")  # samples 8..15
    loader = build_loader(data_cfg(workers=workers), folder, "train", 4, 0, 1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        ids = epoch_ids(loader)
    assert len(ids) == 32  # the quota, refilled from the intact shards
    assert set(ids) == set(range(32)) - set(range(8, 16))
    bad = loader.bad_samples
    passes = 1 + bad.get("refill_pass", 0)  # a refill pass may stop before the bad shard
    assert bad["bad_shard"] % 8 == 0 and 8 <= bad["bad_shard"] <= 8 * passes
    assert "missing_sample" not in bad
    assert loader.bad_shards == {"train-000001.tar"}
    assert loader.state_dict()["bad_shards"] == ["train-000001.tar"]
    if workers == 0:  # worker processes log for themselves
        assert "bad shard" in caplog.text and "train-000001.tar" in caplog.text
    val = build_loader(data_cfg(workers=workers), folder, "val", 1, 0, 1)
    assert sorted(epoch_ids(val)) == list(range(32, 40)) and val.bad_shards == set()


def test_a_damaged_shard_is_skipped_the_same_way_on_resume(tmp_path):
    folder = write_set(tmp_path / "r", 8, [7] * 12 + [5], [4] * 6)
    damage(folder / "train-000004.tar")
    check_resume(folder, 0, lambda n: (1, n // 2 + 1, n - 1, n + 1))
    cfg = data_cfg(hflip=True, n_bits=5, shuffle_buffer=8)
    loader = build_loader(cfg, folder, "train", 3, 0, 2)
    other = build_loader(cfg, folder, "train", 3, 1, 2)
    it, it_other = iter(loader), iter(other)
    for _ in range(loader.batches_per_epoch):
        next(it)
        next(it_other)
    assert (loader.bad_shards | other.bad_shards) == {"train-000004.tar"}
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = build_loader(cfg, folder, "train", 3, 0, 2)
    resumed.load_state_dict(state)
    assert resumed.bad_shards == loader.bad_shards and resumed.bad_samples == loader.bad_samples


def test_no_intact_shard_left_is_a_clear_error(tmp_path):
    folder = write_set(tmp_path / "s", 8, [8] * 2, [4] * 2)
    for name in ("train-000000.tar", "train-000001.tar"):
        damage(folder / name)
    loader = build_loader(data_cfg(), folder, "train", 4, 0, 1)
    with pytest.raises(ShardError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "train-000000.tar, train-000001.tar" in message and "sha256" in message
    assert "python -m pipeline shards" in message and "--force" in message


def test_a_training_run_reports_a_damaged_shard(tmp_path):
    """Through the real entry point: the run goes on without the shard, and says so in its
    metrics (data/bad_samples), events (bad_shard, naming it) and summary."""
    from pipeline.config import load_config
    from pipeline.data import prepare_synthetic
    from tests.conftest import run_pipeline

    overrides = [f"run.root={tmp_path}/runs", f"data.cache={tmp_path}/data", "train.steps=4"]
    folder = prepare_synthetic(load_config("configs/debug.yaml", overrides).data)
    damage(folder / "train-000002.tar")
    run_pipeline("train", "--config", "configs/debug.yaml", *overrides, "guard.battery_images=0")
    run = tmp_path / "runs" / "debug"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["bad_shards"] == ["train-000002.tar"]
    assert summary["bad_samples"]["bad_shard"] > 0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["shard"]) for e in events] == [("bad_shard", "train-000002.tar")]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    counted = [r["data/bad_samples"] for r in rows if "data/bad_samples" in r]
    assert counted[-1] >= summary["bad_samples"]["bad_shard"]

"""Data path: shard writer, synthetic faces, streaming loader, exact resume (issue 3).

Everything runs on real WebDataset tar files generated in tmp dirs at 8²-32², so the file stays
fast.
"""

from __future__ import annotations

import json
import tarfile
import threading

import numpy as np
import pytest
import torch

from pipeline.__main__ import main
from pipeline.data import (
    BadSamples,
    ShardError,
    build_loader,
    dequantise,
    prepare_synthetic,
    quantise,
    read_manifest,
    resolve_shards,
    to_pixels,
)
from pipeline.data.config import DataConfig
from pipeline.data.images import encode_png
from pipeline.data.loader import to_input
from pipeline.data.manifest import MANIFEST, SplitWriter
from pipeline.data.synth import make_face
from tests.conftest import run_main
from tests.data_helpers import (
    batch_ids,
    data_cfg,
    index_image,
    record_digests,
    save_image,
    write_set,
    write_tar,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def shard_keys(folder, split) -> set[str]:
    keys = set()
    for rec in read_manifest(folder)["shards"][split]:
        keys |= {name.rsplit(".", 1)[0] for name in tar_members(folder / rec["name"])}
    return keys


# --- shards command ---------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    """CelebA-HQ-like nested folder of random 16² PNGs plus a few larger JPEGs."""
    src = tmp_path / "CelebA-HQ-img"
    rng = np.random.default_rng(0)
    pixels = {}
    for i in range(24):
        a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        save_image(src / "part" / f"{i}.png", a)
        pixels[f"part/{i}"] = a
    for i in range(3):
        save_image(src / f"big{i}.jpg", make_face(40, 1, i), quality=95)
    return src, pixels


def shards_cmd(src, out, *extra):
    return main(["shards", "--src", str(src), "--out", str(out), "--quiet", *map(str, extra)])


def test_shards_png_pixel_round_trip_split_and_manifest(image_folder, tmp_path):
    src, pixels = image_folder
    out = tmp_path / "out"
    args = ["--resolution", 16, "--shard-size", 5, "--val-fraction", 0.3, "--workers", 0]
    assert shards_cmd(src, out, *args) == 0
    folder = out / "16"
    manifest = read_manifest(folder)
    assert manifest["resolution"] == 16 and manifest["image_format"] == "png"
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 27
    for split in ("train", "val"):
        for rec in manifest["shards"][split]:
            assert rec["count"] == len(tar_members(folder / rec["name"]))
            assert len(rec["sha256"]) == 64
    seen = 0
    for split in ("train", "val"):
        for rec in manifest["shards"][split]:
            for name, data in tar_members(folder / rec["name"]).items():
                key = name.rsplit(".", 1)[0]
                if key in pixels:  # a 16² png at 16²: stored losslessly, untouched
                    np.testing.assert_array_equal(np.asarray(_open(data)), pixels[key])
                    seen += 1
    assert seen == 24
    train, val = shard_keys(folder, "train"), shard_keys(folder, "val")
    assert train.isdisjoint(val) and len(train | val) == 27 and val


def _open(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_shards_deterministic_across_workers_and_val_list(image_folder, tmp_path):
    src, _ = image_folder
    a, b = tmp_path / "a", tmp_path / "b"
    val_list = tmp_path / "val.txt"
    val_list.write_text("part/3.png\n5\nbig1\n")
    common = ["--resolution", 8, "--resolution", 16, "--shard-size", 4, "--val-list", val_list]
    assert shards_cmd(src, a, *common, "--workers", 0) == 0
    assert shards_cmd(src, b, *common, "--workers", 2) == 0
    for res in ("8", "16"):
        names = sorted(p.name for p in (a / res).glob("*.tar"))
        assert names == sorted(p.name for p in (b / res).glob("*.tar"))
        for n in names:
            assert (a / res / n).read_bytes() == (b / res / n).read_bytes()
        assert shard_keys(a / res, "val") == {"part/3", "part/5", "big1"}
    # unchanged input: the rerun is a no-op that keeps the shards
    before = (a / "16" / MANIFEST).stat().st_mtime_ns
    assert shards_cmd(src, a, *common) == 0
    assert (a / "16" / MANIFEST).stat().st_mtime_ns == before


def test_shards_bad_inputs_converted_or_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    face = make_face(32, 0, 0)
    save_image(src / "ok.png", face)
    save_image(src / "gray.jpg", face, "L")
    save_image(src / "cmyk.jpg", face, "CMYK")
    rgba = np.dstack([face, np.full((32, 32), 255, np.uint8)])
    rgba[:4, :4, 3] = 0  # transparent corner -> flattened onto white
    save_image(src / "alpha.png", rgba)
    sixteen = np.full((32, 32), 257 * 100, np.uint16)  # 16-bit grey 100·257 -> 8-bit 100
    save_image(src / "sixteen.png", sixteen)
    save_image(src / "tiny.png", face[:8, :8])
    full = encode_png(face)
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    (src / "garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (src / "readme.txt").write_text("not an image")
    out = tmp_path / "out"
    assert shards_cmd(src, out, "--resolution", 16, "--val-fraction", 0, "--workers", 0) == 0
    m = read_manifest(out / "16")
    assert m["counts"] == {"train": 5, "val": 0}
    assert m["converted"] == {"16bit": 1, "alpha": 1, "cmyk": 1, "grayscale": 1}
    assert m["skipped"] == {"corrupt": 1, "not_an_image": 1, "not_an_image_file": 1, "too_small": 1}
    reasons = {f["file"]: f["reason"] for f in m["skipped_files"]}
    assert reasons == {
        "readme.txt": "not_an_image_file",
        "garbage.jpg": "not_an_image",
        "truncated.png": "corrupt",
        "tiny.png": "too_small",
    }
    assert "truncated.png" in capsys.readouterr().err
    members = tar_members(out / "16" / m["shards"]["train"][0]["name"])
    assert np.asarray(_open(members["sixteen.png"]))[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(_open(members["alpha.png"]))[0, 0].tolist() == [255, 255, 255]
    assert all(_open(d).mode == "RGB" and _open(d).size == (16, 16) for d in members.values())


def test_shards_wrong_path_is_a_clear_error(tmp_path, capsys):
    assert shards_cmd(tmp_path / "nope", tmp_path / "out", "--resolution", 16) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert shards_cmd(tmp_path / "empty", tmp_path / "out", "--resolution", 16) == 2
    assert "no images" in capsys.readouterr().err


def test_shards_killed_run_leaves_no_partial_shard_and_rerun_completes(
    image_folder, tmp_path, monkeypatch
):
    src, _ = image_folder
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = ["--resolution", 16, "--shard-size", 4, "--workers", 0]
    assert shards_cmd(src, clean, *args) == 0
    real_write, calls = SplitWriter.write, []

    def dying_write(self, key, png):
        calls.append(key)
        if len(calls) == 10:  # mid-shard: shards 0-1 done, shard 2 half written
            raise KeyboardInterrupt
        real_write(self, key, png)

    monkeypatch.setattr(SplitWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        shards_cmd(src, out, *args)
    monkeypatch.undo()
    folder = out / "16"
    assert not (folder / MANIFEST).exists()
    assert list(folder.glob("*.tmp"))  # the interrupted shard never got a final name
    for tar in folder.glob("*.tar"):
        assert (tar.read_bytes()) == (clean / "16" / tar.name).read_bytes()
    with pytest.raises(ShardError, match="not a finished shard set"):
        read_manifest(folder)
    assert shards_cmd(src, out, *args) == 0
    assert not list(folder.glob("*.tmp"))
    assert read_manifest(folder)["shards"] == read_manifest(clean / "16")["shards"]


# --- synthetic faces ----------------------------------------------------------------------------


def test_synth_faces_are_deterministic_and_varied(tmp_path):
    a, b, c = make_face(32, 0, 1), make_face(32, 0, 1), make_face(32, 0, 2)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 10
    assert main(["synth", "--out", str(tmp_path), "--n", "3", "--resolution", "24"]) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 3
    np.testing.assert_array_equal(np.asarray(_open(files[1].read_bytes())), make_face(24, 0, 1))


def test_prepare_synthetic_is_idempotent_atomic_and_shards_enough(tmp_path):
    cfg = DataConfig(cache=str(tmp_path), synthetic_train=64, synthetic_val=16, resolution=16)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare_synthetic(cfg))) for _ in range(2)
    ]  # two "ranks" racing: both must see the complete set
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == resolve_shards(cfg)
    m = read_manifest(results[0])
    assert m["counts"] == {"train": 64, "val": 16}
    assert len(m["shards"]["train"]) >= 8 and len(m["shards"]["val"]) >= 8
    assert [p.name for p in tmp_path.iterdir()] == [results[0].parent.name]  # no temp folders
    stamp = (results[0] / MANIFEST).stat().st_mtime_ns
    assert prepare_synthetic(cfg) == results[0]
    assert (results[0] / MANIFEST).stat().st_mtime_ns == stamp


# --- loader -------------------------------------------------------------------------------------


@pytest.fixture
def even_set(tmp_path):
    """16 train shards × 8 and 8 val shards × 4 of 8² index images (0..127 train, 128..159 val)."""
    return write_set(tmp_path / "even", 8, [8] * 16, [4] * 8)


@pytest.mark.parametrize("n_bits", [5, 8])
def test_quantise_and_dequantise(even_set, n_bits):
    batch = take(build_loader(data_cfg(n_bits=n_bits), even_set, "train", 8, 0, 1), 1)[0]
    assert batch.shape == (8, 3, 8, 8) and batch.dtype == torch.float32
    assert batch.min() >= -0.5 and batch.max() < 0.5
    ids = batch_ids(build_loader(data_cfg(), even_set, "train", 8, 0, 1).__iter__().__next__())
    pixels = torch.tensor(np.stack([index_image(i, 8) for i in ids])).permute(0, 3, 1, 2)
    k = (pixels >> (8 - n_bits)).double()
    u = (batch.double() + 0.5) * 2**n_bits - k  # x = k/2^n - 1/2 + u/2^n
    assert u.min() >= 0 and u.max() < 1 + 1e-5
    assert 0.2 < u.std() < 0.38  # uniform noise: std 1/sqrt(12) ≈ 0.29


def test_dequantise_stays_below_half():
    class MaxNoise:  # the largest value numpy's float32 uniform can return
        def random(self, shape, dtype):
            return np.full(shape, np.nextafter(np.float32(1), np.float32(0)), dtype)

    x = to_input(np.full((2, 2, 3), 255, np.uint8), 8, MaxNoise(), flip=False)
    assert x.dtype == np.float32 and x.max() < 0.5


@pytest.mark.parametrize("n_bits", range(1, 9))
def test_the_n_bit_rule(n_bits):
    """quantise, dequantise and to_pixels (pipeline/data/quantise.py): the one home of the rule."""
    pixels = np.arange(256, dtype=np.uint8)
    k = quantise(pixels, n_bits)
    assert np.array_equal(k, pixels // 2 ** (8 - n_bits)) and k.max() == 2**n_bits - 1
    assert np.array_equal(quantise(to_pixels(k, n_bits), n_bits), k)  # PNGs give the levels back
    levels = np.arange(2**n_bits)
    assert np.array_equal(dequantise(levels, n_bits, 0.5), (levels + 0.5) / 2**n_bits - 0.5)
    assert dequantise(levels, n_bits, 0.0).min() == -0.5
    assert dequantise(levels, n_bits, 1.0).max() == 0.5  # u < 1: the top bin stays below 1/2
    # numpy and torch give the same float32 bits; the dtype is that of k + u
    u = np.random.default_rng(n_bits).random(k.shape, dtype=np.float32)
    x = dequantise(k, n_bits, u)
    t = dequantise(torch.from_numpy(k), n_bits, torch.from_numpy(u))
    assert x.dtype == np.float32 and t.dtype == torch.float32
    assert x.tobytes() == t.numpy().tobytes()
    assert dequantise(k.astype(np.float64), n_bits, u.astype(np.float64)).dtype == np.float64


def test_loader_is_deterministic_and_epochs_differ(even_set):
    cfg = data_cfg(hflip=True)
    a = take(build_loader(cfg, even_set, "train", 8, 0, 1), 32)
    b = take(build_loader(cfg, even_set, "train", 8, 0, 1), 32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert batch_ids(torch.cat(a[:16])) != batch_ids(torch.cat(a[16:]))  # reshuffled per epoch
    assert sorted(batch_ids(torch.cat(a[:16]))) == sorted(batch_ids(torch.cat(a[16:])))
    other = take(build_loader(data_cfg(seed=4, hflip=True), even_set, "train", 8, 0, 1), 1)[0]
    assert not torch.equal(other, a[0])


def test_hflip_is_deterministic_per_sample(tmp_path):
    def ramp(i, res):  # left-right asymmetric, index in the green channel
        a = np.zeros((res, res, 3), np.uint8)
        a[..., 0] = np.arange(res) * 20
        a[..., 1] = i
        return a

    folder = write_set(tmp_path / "ramp", 8, [8] * 4, [4] * 4, image=ramp)
    flips = []
    for _ in range(2):
        batches = take(build_loader(data_cfg(hflip=True), folder, "train", 8, 0, 1), 4)
        k = torch.floor((torch.cat(batches).double() + 0.5) * 256)
        flips.append((k[:, 0, 0, 0] > k[:, 0, 0, -1]).tolist())
    assert flips[0] == flips[1] and 8 < sum(flips[0]) < 24
    val = take(build_loader(data_cfg(hflip=True), folder, "val", 4, 0, 1), 4)
    k = torch.floor((torch.cat(val).double() + 0.5) * 256)
    assert not (k[:, 0, 0, 0] > k[:, 0, 0, -1]).any()  # val is never flipped


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_across_ranks(even_set, workers):
    cfg = data_cfg(workers=workers)
    for epoch in range(2):
        ids = []
        for rank in range(2):
            loader = build_loader(cfg, even_set, "train", 8, rank, 2)
            loader.load_state_dict({**loader.state_dict(), "epoch": epoch})
            assert loader.batches_per_epoch == 8
            batches = take(loader, 8)
            assert loader.epoch == epoch
            ids += batch_ids(torch.cat(batches))
        assert sorted(ids) == list(range(128))  # each train sample exactly once
    val_ids = []
    for rank in range(2):
        val = build_loader(cfg, even_set, "val", 4, rank, 2)
        val_ids += batch_ids(torch.cat(list(val)))
        assert batch_ids(torch.cat(list(val))) == batch_ids(torch.cat(list(val)))
    assert sorted(val_ids) == list(range(128, 160))


def test_uneven_shards_give_equal_batches_on_every_rank(tmp_path):
    folder = write_set(tmp_path / "uneven", 8, [9, 9, 9, 9, 9, 9, 9, 3], [5, 5, 2])
    for workers, val_workers in ((0, 0), (2, 1)):
        cfg = data_cfg(workers=workers)
        loaders = [build_loader(cfg, folder, "train", 4, r, 2) for r in range(2)]
        assert len({ld.batches_per_epoch for ld in loaders}) == 1
        n = loaders[0].batches_per_epoch
        ids = []
        for ld in loaders:
            batches = take(ld, n)
            assert ld.state_dict()["epoch"] == 1  # exactly n batches make the epoch
            ids += batch_ids(torch.cat(batches))
        assert len(ids) == len(set(ids)) == n * 4 * 2
        vcfg = data_cfg(workers=val_workers)
        vals = [list(build_loader(vcfg, folder, "val", 2, r, 2)) for r in range(2)]
        assert len(vals[0]) == len(vals[1]) >= 1


def test_clear_errors_for_layout_and_resolution(even_set):
    with pytest.raises(ShardError, match="fewer than 2 ranks × 5 workers"):
        build_loader(data_cfg(workers=5), even_set, "val", 1, 0, 2)
    with pytest.raises(ShardError, match="holds 8² images but data.resolution is 16"):
        build_loader(data_cfg(resolution=16), even_set, "train", 8, 0, 1)
    with pytest.raises(ShardError, match="holds 8² images"):
        resolve_shards(data_cfg(source="shards", shards=str(even_set), resolution=16))
    with pytest.raises(ShardError, match="not enough for one batch"):
        build_loader(data_cfg(), even_set, "val", 64, 0, 2)


def test_bad_members_and_truncated_tar_are_skipped_and_counted(tmp_path):
    folder = write_set(tmp_path / "bad", 8, [8] * 4, [4] * 2)
    good = [(f"g{i}", {"png": encode_png(index_image(200 + i, 8))}) for i in range(6)]
    write_tar(
        folder / "train-000000.tar",
        good[:3] + [("junk", {"png": b"garbage bytes"}), ("note", {"txt": b"hello"})] + good[3:],
    )
    for shard, cut in (("train-000002.tar", 700), ("train-000003.tar", 1500)):
        tar = folder / shard  # 1 KiB per sample: 700 cuts the first one's padding (ReadError),
        # 1500 the second header (tarfile sees a clean end there)
        tar.write_bytes(tar.read_bytes()[:cut])
    record_digests(folder)  # written this way: the tar-level handlers, not the checksum, see it
    loader = build_loader(data_cfg(), folder, "train", 4, 0, 1)
    batches = take(loader, loader.batches_per_epoch)  # never raises
    bad = loader.bad_samples
    assert bad["refill_pass"] == 1  # short of its 32-sample quota, the reader read its shards again
    assert 1 <= bad["undecodable"] <= 2 and 1 <= bad["no_image"] <= 2
    assert 1 <= bad["tar_read_error"] <= 2  # shard 2, once per pass
    # 7 of shard 2 and 7 of shard 3 per pass; shard 3 raised nothing, only the manifest count tells
    assert bad["missing_sample"] == 28
    assert set(range(200, 206)) <= set(batch_ids(torch.cat(batches)))
    multi = build_loader(data_cfg(workers=2), folder, "train", 4, 0, 1)
    take(multi, multi.batches_per_epoch)  # counts made in worker processes reach the rank
    assert multi.bad_samples["undecodable"] >= 1 and multi.bad_samples["tar_read_error"] >= 1


def test_bad_sample_handler_counts_and_continues():
    handler = BadSamples("test")
    assert handler.handler(tarfile.ReadError("unexpected end of data")) is True
    assert handler.handler(OSError("gone")) is True
    assert handler.take() == {"tar_read_error": 1, "shard_error": 1}
    assert handler.take() == {}


# --- exact resume ---------------------------------------------------------------------------------


def check_resume(folder, workers, cuts):
    """A loader rebuilt from the JSON state after ``cut`` batches yields the reference's next."""
    cfg = data_cfg(workers=workers, hflip=True, n_bits=5, shuffle_buffer=8)
    for rank in range(2):
        ref_loader = build_loader(cfg, folder, "train", 3, rank, 2)
        n = ref_loader.batches_per_epoch
        ref = take(ref_loader, max(cuts(n)) + n + 2)
        for cut in cuts(n):
            loader = build_loader(cfg, folder, "train", 3, rank, 2)
            it = iter(loader)
            for _ in range(cut):
                next(it)
            state = json.loads(json.dumps(loader.state_dict()))
            resumed = build_loader(cfg, folder, "train", 3, rank, 2)
            resumed.load_state_dict(state)
            got = take(resumed, n + 2)  # through the next epoch boundary
            for i, (x, y) in enumerate(zip(got, ref[cut : cut + n + 2], strict=True)):
                assert torch.equal(x, y), f"rank {rank}, cut {cut}: batch {cut + i} differs"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_next_batches(tmp_path, workers):
    folder = write_set(tmp_path / "r", 8, [7] * 12 + [5], [4] * 6)
    if workers == 0:
        check_resume(folder, 0, lambda n: (1, n // 2 + 1, n - 1, n, n + 2))
    else:  # each rebuilt loader starts worker processes: fewer cuts, still odd/even and epoch edges
        check_resume(folder, 2, lambda n: (n // 2 + 1, n + 1))


@pytest.mark.slow
def test_resume_with_three_workers_at_every_cut(tmp_path):
    folder = write_set(tmp_path / "r", 8, [7] * 12 + [5], [4] * 6)
    check_resume(folder, 3, lambda n: range(1, n + 3))


def test_resume_refuses_a_different_layout(even_set):
    state = build_loader(data_cfg(), even_set, "train", 8, 0, 2).state_dict()
    other = build_loader(data_cfg(), even_set, "train", 4, 0, 2)
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        other.load_state_dict(state)


@pytest.mark.slow
def test_bench_data_prints_rates_and_ratios(capsys):
    args = [
        "--n",
        "64",
        "--resolution",
        "16",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--rounds",
        "1",
    ]
    result = json.loads(run_main(capsys, "bench", "data", *args, "--workers", "2"))
    names = {"pil_loop", "folder_dataset", "loader", "loader_inprocess"}
    assert set(result["images_per_s"]) == names
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["ratios"]["loader_vs_folder_dataset"] > 0

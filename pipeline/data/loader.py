"""The streaming loader: WebDataset shards -> per-rank batches, exactly resumable mid-epoch.

Each rank reads with W "readers" (W = data.workers, or 1 in-process). One reader's stream for one
epoch is a pure function of (seed, epoch, rank, reader) and runs these stages (docs/design.md §8.8):

    shard order       train: the split's shards permuted by rng(seed, epoch); val: manifest order
    split by node     rank r takes positions r, r + R, r + 2R, ...            (R = world size)
    split by worker   reader w of rank r takes positions r + R·w (mod R·W)
    check sha256      each shard's sha256 against the manifest, on its first open in the process
                      (hashing streams the file once; the page cache then serves the tar read): a
                      mismatch is a bad shard, named in the log and in ``Loader.bad_shards``,
                      its manifest count added to "bad_shard", and it is skipped; a reader left
                      with no intact shard stops with a ShardError naming them
    tar -> samples    wds.tarfile_to_samples; an unreadable shard or member goes to the named
                      handler BadSamples.handler: counted, skipped, never fatal
    check counts      a shard yielding fewer samples than its manifest count: each missing one
                      counted (tarfile ends silently on a tar cut at a header boundary)
    shuffle           train only: buffer shuffle on raw bytes, rng(seed, epoch, rank, reader)
    (refill)          the same shards again, only if bad samples left the reader short of its quota
    position          number the raw samples; on resume, drop the already-consumed ones undecoded
    decode            png -> uint8 [R, R, 3]; no image, undecodable, wrong size: counted, skipped
    quantise          k = floor(pixel / 2^(8 - n_bits))         (data/quantise.py, docs/design.md §3)
    dequantise        x = (k + u)/2^n - 1/2, u ~ U[0, 1)^D, clamped below 1/2: x ∈ [-1/2, 1/2)
    h-flip            train only, probability 1/2; u and the flip come from rng(seed, epoch, key)
    chunk             train: B samples -> one tensor; val: single samples (batched by the rank)

``read_chunks`` chains them; each is a function below (``check_sha256``, ``check_counts``, ``one_pass``,
``raw_samples``, ``position``, ``decode``, ``to_inputs``, ``chunked``) taking what it shares with
the others, the reader's shards, counts and bad-sample handler, as one ``ReaderEpoch``.

Equal batches on every rank: each reader yields exactly ``chunks_per_reader`` chunks per epoch,
computed from the manifest's per-shard counts as the worst case over all shard permutations, so no
rank waits in a collective at an epoch end. The rank takes chunks from its readers round-robin
(reader j mod W, chunk j div W) and reorders whatever the DataLoader delivers into that order, which
makes the batch sequence independent of worker timing. The position saved by ``state_dict`` is
(epoch, batches, raw position of each reader), which is all a rebuilt loader needs to continue with
the very next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.config import DataConfig
from pipeline.data.images import SkipImage, decode_rgb_array
from pipeline.data.manifest import ShardError, read_manifest, sha256_file
from pipeline.data.quantise import dequantise, quantise
from pipeline.data.source import check_resolution

log = logging.getLogger("pipeline.data")

# The largest float32 below 1/2: (k + u)/2^n rounds up to exactly 1/2 for k = 2^n - 1 and u near 1.
BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0.0))
LOGGED_PER_READER = 10  # bad-sample warnings per reader; the counts carry the rest
REWRITE = (
    "rewrite the set: `python -m pipeline shards --src IMAGES --out DIR --resolution R --force` "
    "(a synthetic set: delete its folder under data.cache and it is generated again)"
)


def mix(*parts: Any) -> int:
    """A 64-bit seed from any tuple of ints/strings; stable across processes and Python runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BadSamples:
    """The named bad-sample handler of the stream: count by reason, log the first few, skip.

    ``handler`` follows webdataset's protocol (called with the exception, True = keep going).
    """

    def __init__(self, where: str):
        self.where = where
        self.counts: Counter[str] = Counter()
        self.shards: set[str] = set()  # names of shards that failed their checksum
        self.shards_logged: set[str] = set()
        self.logged = 0

    def handler(self, exn: Exception) -> bool:
        reason = "tar_read_error" if "tar" in type(exn).__module__ else "shard_error"
        self.add(reason, f"{type(exn).__name__}: {exn}")
        return True

    def add(self, reason: str, detail: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        if self.logged < LOGGED_PER_READER:
            self.logged += 1
            log.warning("skipped bad sample (%s) in %s: %s", reason, self.where, detail[:300])

    def bad_shard(self, url: str, samples: int, detail: str) -> None:
        """A whole shard skipped: its samples counted as "bad_shard", its name kept and logged
        (once per reader and epoch, whatever the bad samples before it left of the warnings)."""
        name = Path(url).name
        self.counts["bad_shard"] += samples
        if name not in self.shards_logged:
            self.shards_logged.add(name)
            log.warning(
                "skipped bad shard %s in %s: %s; its %d samples skipped (%s)",
                url,
                self.where,
                detail,
                samples,
                REWRITE,
            )
        self.shards.add(name)

    def take(self) -> dict[str, int]:
        """The counts since the last take (they travel with the next chunk)."""
        out = dict(self.counts)
        self.counts.clear()
        return out

    def take_shards(self) -> list[str]:
        out = sorted(self.shards)
        self.shards.clear()
        return out


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime, inode) -> sha256


def shard_digest(url: str) -> str:
    """The file's sha256, computed once per process (DataLoader worker) and file version."""
    st = os.stat(url)
    key = (url, st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(Path(url))
    return _DIGESTS[key]


@dataclass(frozen=True)
class StreamPlan:
    """Everything a reader needs to produce its stream; plain data, so it pickles into workers."""

    split: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sha256: tuple[str | None, ...]  # the manifest's digest per shard (None: not recorded)
    resolution: int
    n_bits: int
    hflip: bool
    shuffle: bool
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    readers: int
    chunk: int
    chunks_per_reader: int
    set_id: str  # digest of the split's shard records: a resume must read the same bytes

    def reader_shards(self, epoch: int, reader: int) -> list[int]:
        """Indices of the shards reader ``reader`` of this rank reads in ``epoch``."""
        n = len(self.urls)
        if self.shuffle:
            order = np.random.default_rng(mix("shards", self.seed, epoch)).permutation(n)
        else:
            order = np.arange(n)
        slot = self.rank + self.world_size * reader  # split by node, then by worker
        return [int(i) for i in order[slot :: self.world_size * self.readers]]


def plan_stream(
    cfg: DataConfig, shards_dir: str | Path, split: str, batch_size: int, rank: int, world_size: int
) -> StreamPlan:
    """Read the manifest, check it against the config and layout, fix the per-reader quota."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 1 <= cfg.n_bits <= 8:
        raise ValueError(f"data.n_bits={cfg.n_bits}: shards hold 8-bit images, choose 1..8")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size=}, "
            f"{rank=}, {world_size=}"
        )
    if cfg.workers < 0:
        raise ValueError(f"data.workers={cfg.workers} must be >= 0")
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    check_resolution(manifest, shards_dir, cfg.resolution)
    records = manifest["shards"][split]
    readers = max(1, cfg.workers)
    slots = world_size * readers
    if len(records) < slots:
        raise ShardError(
            f"{shards_dir}: the {split} split has {len(records)} shards, fewer than "
            f"{world_size} ranks × {readers} workers = {slots} readers (each needs at least one). "
            f"Rewrite the shards with a smaller --shard-size, or lower data.workers."
        )
    counts = [int(r["count"]) for r in records]
    shuffle = split == "train"
    if shuffle:  # worst case over permutations: a reader gets the smallest shards
        least = sum(sorted(counts)[: len(counts) // slots])
    else:
        least = min(sum(counts[s::slots]) for s in range(slots))
    chunk = batch_size if split == "train" else 1
    plan = StreamPlan(
        split=split,
        urls=tuple(str(shards_dir / r["name"]) for r in records),
        counts=tuple(counts),
        sha256=tuple(r.get("sha256") for r in records),
        resolution=cfg.resolution,
        n_bits=cfg.n_bits,
        hflip=cfg.hflip and split == "train",
        shuffle=shuffle,
        shuffle_buffer=max(1, cfg.shuffle_buffer),
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        readers=readers,
        chunk=chunk,
        chunks_per_reader=least // chunk,
        set_id=hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16],
    )
    if plan.chunks_per_reader * readers * chunk < batch_size:
        raise ShardError(
            f"{shards_dir}: the {split} split gives each of the {slots} readers only {least} "
            f"samples, not enough for one batch of {batch_size} per rank; lower the batch size "
            f"or data.workers, or add data"
        )
    return plan


def to_input(pixels: np.ndarray, n_bits: int, rng: np.random.Generator, flip: bool) -> np.ndarray:
    """uint8 pixels p [H, W, 3] -> float32 [3, H, W], quantised and dequantised with u ~ U[0, 1)
    in float32 (data/quantise.py). The result lies in [-1/2, 1/2): the rare float32 round-up to
    exactly 1/2 is clamped to the largest float below it.
    """
    k = pixels.transpose(2, 0, 1)
    if flip:
        k = k[:, :, ::-1]
    k = quantise(np.ascontiguousarray(k), n_bits)  # layout work on bytes, not floats
    x = dequantise(k, n_bits, rng.random(k.shape, dtype=np.float32))
    return np.minimum(x, BELOW_HALF, out=x)


@dataclass(frozen=True)
class ReaderEpoch:
    """What the stages of one reader's stream for one epoch share: the reader's shards in reading
    order (``urls``) with their manifest counts and digests, where it is (``where``, for messages)
    and its bad-sample handler, whose counts travel with the next chunk."""

    plan: StreamPlan
    epoch: int
    reader: int
    urls: list[str]
    expected: dict[str, int]  # url -> the manifest's sample count
    digests: dict[str, str | None]  # url -> the manifest's sha256
    per_pass: int  # samples in one pass over the shards, by the manifest
    where: str
    bad: BadSamples

    @classmethod
    def of(cls, plan: StreamPlan, epoch: int, reader: int) -> ReaderEpoch:
        """Shard order, split by node, split by worker (``StreamPlan.reader_shards``)."""
        shard_ids = plan.reader_shards(epoch, reader)
        where = f"{plan.split} rank {plan.rank} reader {reader} epoch {epoch}"
        return cls(
            plan=plan,
            epoch=epoch,
            reader=reader,
            urls=[plan.urls[i] for i in shard_ids],
            expected={plan.urls[i]: plan.counts[i] for i in shard_ids},
            digests={plan.urls[i]: plan.sha256[i] for i in shard_ids},
            per_pass=sum(plan.counts[i] for i in shard_ids),
            where=where,
            bad=BadSamples(where),
        )


def check_sha256(src: Iterator[dict], r: ReaderEpoch, rejected: set[str]) -> Iterator[dict]:
    """Shards ``{"url": ...}`` -> the same, less those whose sha256 is not the manifest's: each of
    those is added to ``rejected`` and reported to ``r.bad`` as a bad shard."""
    for shard in src:
        url, want = shard["url"], r.digests[shard["url"]]
        try:
            got = shard_digest(url) if want else want
        except OSError:
            got = want  # unreadable: the tar stage reports it as it reports any
        if got != want:
            rejected.add(url)
            detail = f"sha256 {got[:16]}... is not the manifest's {want[:16]}..."
            r.bad.bad_shard(url, r.expected[url], detail)
            continue
        yield shard


def check_counts(src: Iterator[dict], r: ReaderEpoch, rejected: set[str]) -> Iterator[dict]:
    """Samples of ``r.urls`` in order -> the same samples; each sample a shard lost short of its
    manifest count is counted "missing_sample" once the shard is done (shards in ``rejected`` are
    counted as bad shards already)."""
    # tarfile reads a tar cut at a header boundary as a clean end: only the manifest's count
    # reveals the lost samples
    done = iter(r.urls)
    url, n = next(done, None), 0
    for sample in itertools.chain(src, [None]):
        while url is not None and (sample is None or sample["__url__"] != url):
            if n < r.expected[url] and url not in rejected:
                detail = f"{url} yielded {n} of its {r.expected[url]} samples"
                r.bad.add("missing_sample", detail, r.expected[url] - n)
            url, n = next(done, None), 0
        if sample is None:
            return
        n += 1
        yield sample


def one_pass(r: ReaderEpoch, index: int, rejected: set[str]) -> wds.DataPipeline:
    """Pass ``index`` over the reader's shards -> raw samples ``{"__key__", "__url__", "png"}``,
    buffer-shuffled (train); the shards that failed their checksum are added to ``rejected``."""
    plan = r.plan
    return wds.DataPipeline(
        # this reader's shards: shard order, split by node, split by worker (reader_shards)
        wds.SimpleShardList(r.urls),
        # a shard whose bytes are not the manifest's -> skipped, named, counted
        functools.partial(check_sha256, r=r, rejected=rejected),
        # tar members -> {"__key__", "png"} samples; bad shards/members -> the named handler
        wds.tarfile_to_samples(handler=r.bad.handler),
        # samples a shard lost without an exception (cut at a header) -> the named handler
        functools.partial(check_counts, r=r, rejected=rejected),
        # buffer shuffle on raw bytes, before any decode work
        wds.shuffle(
            plan.shuffle_buffer,
            initial=plan.shuffle_buffer,
            rng=random.Random(mix("buffer", plan.seed, r.epoch, plan.rank, r.reader, index)),
        )
        if plan.shuffle
        else None,
    )


def raw_samples(r: ReaderEpoch) -> Iterator[dict]:
    """The reader's raw samples, pass after pass (a refill pass is only reached when bad samples
    left the reader short of its quota, and is counted). A pass that yields nothing is a
    ShardError: all shards failed their checksum, or none is readable."""
    for index in itertools.count():
        if index:
            r.bad.add("refill_pass", f"reading {len(r.urls)} shards again")
        n, rejected = 0, set()
        for sample in one_pass(r, index, rejected):
            n += 1
            yield sample
        if n == 0 and rejected == set(r.urls):
            names = ", ".join(sorted(Path(u).name for u in rejected))
            raise ShardError(
                f"{r.where}: no intact shard left: {names} in {Path(r.urls[0]).parent} do not "
                f"match the sha256 in its manifest.json (corrupted or changed since written); "
                f"{REWRITE}"
            )
        if n == 0:
            raise ShardError(f"{r.where}: no readable sample in shards {r.urls}")


def position(src: Iterator[dict], r: ReaderEpoch, skip: int) -> Iterator[dict]:
    """Raw samples -> the same numbered in ``"__pos__"``, less the first ``skip`` (consumed
    before a resume: dropped undecoded, their bad-sample counts with them)."""
    for pos, sample in enumerate(src):
        if pos < skip:
            if pos == skip - 1:  # reported with the consumed chunks before the resume
                r.bad.take()
                r.bad.take_shards()
            continue
        sample["__pos__"] = pos
        yield sample


def decode(src: Iterator[dict], r: ReaderEpoch) -> Iterator[tuple[str, int, np.ndarray]]:
    """Numbered raw samples -> (key, pos, uint8 pixels [R, R, 3]); a sample without an image, or
    one that does not decode to R×R, is counted and skipped. More skips in a row than a pass and a
    shuffle buffer hold is a ShardError."""
    plan, streak = r.plan, 0
    for sample in src:
        data = sample.get("png", sample.get("jpg", sample.get("jpeg")))
        try:
            if data is None:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise SkipImage("no_image", f"{sample['__key__']} has members {members}")
            pixels = decode_rgb_array(data, plan.resolution)
        except SkipImage as e:
            r.bad.add(e.reason, f"{sample['__key__']} in {sample.get('__url__')}: {e.detail}")
            streak += 1
            if streak > r.per_pass + plan.shuffle_buffer:
                raise ShardError(f"{r.where}: no decodable image in shards {r.urls}") from e
            continue
        streak = 0
        yield sample["__key__"], sample["__pos__"], pixels


def to_inputs(
    src: Iterator[tuple[str, int, np.ndarray]], r: ReaderEpoch
) -> Iterator[tuple[int, np.ndarray]]:
    """(key, pos, pixels) -> (pos, float32 [3, R, R]): quantised, dequantised and (train) maybe
    flipped, the noise and the flip from rng(seed, epoch, key) (``to_input``)."""
    plan = r.plan
    for key, pos, pixels in src:
        rng = np.random.default_rng(mix("sample", plan.seed, r.epoch, key))
        flip = plan.hflip and bool(rng.random() < 0.5)
        yield pos, to_input(pixels, plan.n_bits, rng, flip)


def chunked(
    src: Iterator[tuple[int, np.ndarray]], r: ReaderEpoch, start: int
) -> Iterator[tuple[torch.Tensor, dict]]:
    """(pos, x) -> chunks ``start .. chunks_per_reader - 1``: ``plan.chunk`` inputs stacked, with
    their metadata (epoch, reader, index, the raw position after the chunk, and the bad-sample
    counts and bad shards since the previous chunk)."""
    plan = r.plan
    index, parts = start, []
    for pos, x in src:
        parts.append(x)
        if len(parts) == plan.chunk:
            meta = {"epoch": r.epoch, "reader": r.reader, "index": index, "pos": pos + 1}
            meta["bad"], meta["bad_shards"] = r.bad.take(), r.bad.take_shards()
            yield torch.from_numpy(np.stack(parts)), meta
            parts, index = [], index + 1
            if index == plan.chunks_per_reader:
                return


def read_chunks(
    plan: StreamPlan, epoch: int, reader: int, start: int, skip: int
) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """One reader's chunks ``start .. chunks_per_reader - 1`` of ``epoch`` (stages: module
    docstring); ``skip`` raw samples, the reader's saved position, are dropped undecoded."""
    if start >= plan.chunks_per_reader:
        return
    r = ReaderEpoch.of(plan, epoch, reader)
    yield from wds.DataPipeline(
        # verified shards -> raw samples, buffer-shuffled (train), pass after pass if need be
        functools.partial(raw_samples, r),
        # numbered; on resume the consumed ones are dropped here, undecoded
        functools.partial(position, r=r, skip=skip),
        # png -> uint8 pixels; bad images counted and skipped
        functools.partial(decode, r=r),
        # quantise, dequantise, h-flip
        functools.partial(to_inputs, r=r),
        # chunks with their metadata, up to the reader's quota
        functools.partial(chunked, r=r, start=start),
    )


def iter_levels(
    shards_dir: str | Path,
    n_bits: int,
    *,
    split: str = "train",
    batch_size: int = 64,
    limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 batches [B, 3, R, R] of n-bit levels k = pixel >> (8 - n) of one split, in manifest
    order, at most ``limit`` images: the stream's own stages up to ``decode`` (manifest, sha256,
    counts, bad samples), without its noise, flip or shuffle, for the closed-form optimum, which
    integrates the dequantisation noise itself."""
    manifest = read_manifest(shards_dir)
    cfg = DataConfig(resolution=manifest["resolution"], n_bits=n_bits, workers=0)
    plan = plan_stream(cfg, shards_dir, split, 1, 0, 1)
    r = ReaderEpoch.of(dataclasses.replace(plan, shuffle=False, hflip=False), 0, 0)
    samples = position(one_pass(r, 0, set()), r, 0)
    batch: list[np.ndarray] = []
    n = 0
    for n, (_, _, pixels) in enumerate(decode(samples, r), 1):
        batch.append(quantise(pixels.transpose(2, 0, 1), n_bits))
        if len(batch) == batch_size or n == limit:
            yield torch.from_numpy(np.stack(batch))
            batch = []
        if n == limit:
            return
    if batch:
        yield torch.from_numpy(np.stack(batch))
    if n == 0:
        raise ShardError(
            f"{shards_dir}: no usable image in the {split} split (logged above); {REWRITE}"
        )


def keep(item: Any) -> Any:
    """DataLoader collate_fn: readers already build whole chunks."""
    return item


def reader_chunks(
    plan: StreamPlan, epoch: int, reader: int, start: int, skip: int
) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """``read_chunks`` from the saved position on, then (train) every later epoch from its start, so
    worker processes live across epoch boundaries instead of restarting at each."""
    yield from read_chunks(plan, epoch, reader, start, skip)
    if plan.split == "train":
        for later in itertools.count(epoch + 1):
            yield from read_chunks(plan, later, reader, 0, 0)


class ReaderDataset(IterableDataset):
    """What each DataLoader worker runs: worker i plays reader (i + consumed) mod W, so after a
    resume the round-robin continues with the reader that is due next."""

    def __init__(self, plan: StreamPlan, epoch: int, consumed: int, positions: tuple[int, ...]):
        self.plan, self.epoch, self.consumed, self.positions = plan, epoch, consumed, positions

    def __iter__(self):
        info = get_worker_info()
        w = self.plan.readers
        reader = ((info.id if info else 0) + self.consumed) % w
        start = (self.consumed - reader + w - 1) // w  # chunks this reader delivered already
        return reader_chunks(self.plan, self.epoch, reader, start, self.positions[reader])


class Loader:
    """Iterable of float32 batches [B, 3, R, R] in [-1/2, 1/2) for one rank.

    train: endless; epoch e+1 starts after ``batches_per_epoch`` batches. val: each ``iter()``
    finishes the current pass (a full one unless resumed), no shuffle, no flip, the same noise every
    pass. ``bad_samples`` sums the counts of every reader this rank has consumed from, and
    ``bad_shards`` names the shards they skipped for a checksum mismatch; counts made in DataLoader
    worker processes travel to the rank inside each chunk's metadata, so no shared memory or queue
    is needed. With workers > 0 one DataLoader serves all epochs of an ``iter()``
    (train), so worker processes start once, not at every epoch.
    """

    def __init__(self, plan: StreamPlan, batch_size: int, workers: int):
        self.plan, self.batch_size, self.workers = plan, batch_size, workers
        self.split = plan.split
        chunks = plan.readers * plan.chunks_per_reader
        self.batches_per_epoch: int = chunks * plan.chunk // batch_size
        self.bad_samples: dict[str, int] = {}
        self.bad_shards: set[str] = set()
        self.epoch = 0
        self.batches = 0  # consumed in the current epoch
        self.positions = [0] * plan.readers  # raw position of each reader after its last used chunk

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _layout(self) -> dict[str, Any]:
        p = self.plan
        return {
            "split": p.split,
            "seed": p.seed,
            "rank": p.rank,
            "world_size": p.world_size,
            "readers": p.readers,
            "batch_size": self.batch_size,
            "shards": p.set_id,
            "n_bits": p.n_bits,
            "hflip": p.hflip,
            "shuffle_buffer": p.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: a loader rebuilt with the same layout and given this
        continues with the next batch. Per rank: every rank saves its own."""
        epoch, batches, positions = self.epoch, self.batches, list(self.positions)
        if batches >= self.batches_per_epoch:  # finished: the next batch opens a new pass
            epoch = epoch + 1 if self.split == "train" else epoch
            batches, positions = 0, [0] * self.plan.readers
        return {
            "version": 1,
            "epoch": epoch,
            "batches": batches,
            "samples": batches * self.batch_size,
            "reader_positions": positions,
            "bad_samples": dict(self.bad_samples),
            "bad_shards": sorted(self.bad_shards),
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self._layout()
        saved = state.get("layout", {})
        diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume the data stream exactly, the layout changed ({changes}); "
                f"resume with the same data config, batch size and world size"
            )
        if not 0 <= state["batches"] < self.batches_per_epoch:
            raise ValueError(
                f"saved batches={state['batches']} outside 0..{self.batches_per_epoch}"
            )
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.positions = [int(p) for p in state["reader_positions"]]
        self.bad_samples = {k: int(v) for k, v in state.get("bad_samples", {}).items()}
        self.bad_shards = set(state.get("bad_shards", []))

    def __iter__(self) -> Iterator[torch.Tensor]:
        per_batch = self.batch_size // self.plan.chunk
        source = self._chunks(self.epoch, self.batches * per_batch)
        pending: dict[tuple[int, int, int], tuple[torch.Tensor, dict]] = {}
        while True:
            yield from self._rest_of_epoch(source, pending)
            self.batches, self.positions = 0, [0] * self.plan.readers
            if self.split != "train":
                return
            self.epoch += 1

    def _chunks(self, epoch: int, consumed: int) -> Iterator[tuple[torch.Tensor, dict]]:
        if self.workers == 0:
            return reader_chunks(self.plan, epoch, 0, consumed, self.positions[0])
        dataset = ReaderDataset(self.plan, epoch, consumed, tuple(self.positions))
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, collate_fn=keep))

    def _rest_of_epoch(self, source: Iterator, pending: dict) -> Iterator[torch.Tensor]:
        """Chunk j of the epoch is chunk j div W of reader j mod W; whatever arrives early waits in
        ``pending``. State (positions, counts, batches) advances only when a batch is handed out."""
        w, per_batch = self.plan.readers, self.batch_size // self.plan.chunk
        parts: list[torch.Tensor] = []
        metas: list[dict] = []
        for j in range(self.batches * per_batch, self.batches_per_epoch * per_batch):
            due = (self.epoch, j % w, j // w)
            while due not in pending:
                item = next(source, None)
                if item is None:
                    raise RuntimeError(f"{self.split} readers stopped before chunk {due} (a bug)")
                pending[(item[1]["epoch"], item[1]["reader"], item[1]["index"])] = item
            x, meta = pending.pop(due)
            parts.append(x)
            metas.append(meta)
            if len(parts) == per_batch:
                for m in metas:
                    self.positions[m["reader"]] = m["pos"]
                    self.bad_shards.update(m["bad_shards"])
                    for reason, n in m["bad"].items():
                        self.bad_samples[reason] = self.bad_samples.get(reason, 0) + n
                self.batches += 1
                batch = parts[0] if per_batch == 1 else torch.cat(parts)
                parts, metas = [], []
                yield batch


def build_loader(
    cfg: DataConfig,
    shards_dir: str | Path,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
) -> Loader:
    """The loader of one rank: contract in ``Loader``, stages in the module docstring."""
    plan = plan_stream(cfg, shards_dir, split, batch_size, rank, world_size)
    return Loader(plan, batch_size, cfg.workers)

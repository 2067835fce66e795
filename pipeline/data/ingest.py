"""An image folder (CelebA-HQ as distributed) -> WebDataset tar shards (`python -m pipeline shards`).

Output: ``<out>/<res>/{train,val}-%06d.tar`` + ``<out>/<res>/manifest.json`` per ``--resolution``.
Each sample is ``<key>.png``: centre crop to the largest square, Lanczos downscale, lossless PNG.
Keys are the relative paths without suffix (dots replaced by ``_``, which webdataset would read as
suffixes).

Deterministic: files are ordered by a seeded hash of their key (not by the file system), every
worker result is consumed in that order, and tar headers carry no time or owner, so the same input
gives byte-identical shards whatever ``--workers`` is. The split is a function of the key alone
(``--val-fraction``: hash(key) < F) or of a list (``--val-list``), so adding images never moves
others.

Atomic: the manifest is deleted first and written last; each shard is renamed into place only when
complete; a killed run leaves only ``*.tmp`` files, which the next run removes. Unchanged input and
options (same fingerprint in every manifest) make a rerun a no-op unless ``--force``.

Bad inputs are converted where sensible (grayscale, CMYK, palette, alpha flattened onto white,
16-bit scaled to 8-bit, EXIF rotation applied) and counted in ``converted``; the rest (not an image,
corrupt or truncated, smaller than the resolution, duplicate key) are skipped, counted in
``skipped`` and listed per file in ``skipped_files``.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data.images import (
    IMAGE_SUFFIXES,
    SkipImage,
    encode_png,
    load_rgb,
    square_resize,
)
from pipeline.data.loader import mix
from pipeline.data.manifest import (
    FORMAT,
    MANIFEST,
    SplitWriter,
    clean_folder,
    finish_folder,
)
from pipeline.errors import PipelineError

VERSION = 1  # bump when the conversion changes, so old fingerprints stop matching
MIN_VAL_SHARDS = (
    64  # default val sharding: enough shards for 64 readers when there are images for it
)
PRINTED_SKIPS = 20
SHARD_SIZE = 256  # train samples per shard by default


class UsageError(PipelineError, ValueError):
    """Bad arguments or an input with nothing to shard; the command prints the message and exits 2."""


def sample_key(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0]
    return stem.replace(".", "_")


def scan(src: Path, exclude: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Relative paths of candidate images (sorted), and the files skipped on sight with reasons."""
    found, skipped = [], []
    for root, dirs, files in os.walk(src):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and here / d != exclude)
        for name in sorted(files):
            rel = (here / name).relative_to(src).as_posix()
            if name.startswith("."):
                skipped.append({"file": rel, "reason": "hidden_file"})
            elif Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"file": rel, "reason": "not_an_image_file"})
            else:
                found.append(rel)
    return found, skipped


def split_rule(
    rels: list[str], val_fraction: float, val_list: str | None
) -> tuple[dict[str, str], str, Any]:
    """key -> "train" | "val", the rule in words, and its identity for the fingerprint."""
    keys = {rel: sample_key(rel) for rel in rels}
    if val_list:
        path = Path(val_list)
        if not path.is_file():
            raise UsageError(f"--val-list {path} does not exist")
        names = {ln.strip() for ln in path.read_text().splitlines() if ln.strip()}
        matched = set()
        split = {}
        for rel, key in keys.items():
            p = Path(rel)
            hits = names & {rel, rel.rsplit(".", 1)[0], p.name, p.stem}
            matched |= hits
            split[key] = "val" if hits else "train"
        if missing := len(names - matched):
            print(f"warning: {missing} names in {path} match no image", file=sys.stderr)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return split, f"val = names listed in {path.name} (sha256 {digest[:16]})", ["list", digest]
    f = val_fraction
    if not 0.0 <= f < 1.0:
        raise UsageError(f"--val-fraction {f} must be in [0, 1)")
    split = {key: "val" if mix("split", key) / 2**64 < f else "train" for key in keys.values()}
    rule = f"val = keys with blake2b64(('split', key)) / 2^64 < {f}"
    return split, rule, ["fraction", f]


def convert(task: tuple[str, tuple[int, ...]]) -> tuple[dict[int, Any], list[str], str, str]:
    """Worker: one file -> ({res: png or (reason, detail)}, notes, skip reason, detail)."""
    path, resolutions = task
    try:
        img, notes = load_rgb(path)
    except SkipImage as e:
        return {}, [], e.reason, e.detail
    out: dict[int, Any] = {}
    for res in resolutions:
        try:
            out[res] = encode_png(square_resize(img, res))
        except SkipImage as e:
            out[res] = (e.reason, e.detail)
    return out, notes, "", ""


def converted_stream(tasks: list, workers: int) -> Iterable:
    if workers <= 1:
        yield from map(convert, tasks)
        return
    with multiprocessing.Pool(workers) as pool:
        # imap keeps input order: results arrive in the deterministic write order
        yield from pool.imap(convert, tasks, chunksize=4)


def write_shards(
    src: Path,
    out: Path,
    resolution: Iterable[int],
    *,
    val_fraction: float = 0.1,
    val_list: str | None = None,
    shard_size: int = SHARD_SIZE,
    val_shard_size: int = 0,
    workers: int = 1,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
) -> None:
    """Shard the images under ``src`` into ``<out>/<res>/`` for each resolution (module docstring).

    Raises UsageError for bad arguments and for an input with no usable image; the names of the
    arguments are those of the ``shards`` command's options, which the messages quote.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        what = "is a file, not a folder" if src.exists() else "does not exist"
        raise UsageError(
            f"--src {src} {what}; give the folder holding the images "
            f"(e.g. .../CelebA-HQ-img or .../data1024x1024)"
        )
    resolutions = tuple(sorted(set(resolution)))
    if min(resolutions) < 8:
        raise UsageError(f"--resolution must be >= 8, got {min(resolutions)}")
    if shard_size < 1 or val_shard_size < 0 or workers < 0:
        raise UsageError("--shard-size must be >= 1, --val-shard-size and --workers >= 0")

    rels, skipped_files = scan(src, out.resolve())
    if not rels:
        raise UsageError(f"no images under {src} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    first_rel: dict[str, str] = {}
    for rel in rels:  # the same key from a.jpg and a.png: keep the first, skip the other
        key = sample_key(rel)
        if key in first_rel:
            skipped_files.append(
                {"file": rel, "reason": "duplicate_key", "detail": f"same key as {first_rel[key]}"}
            )
        else:
            first_rel[key] = rel
    rels = sorted(first_rel.values())
    split, rule, rule_id = split_rule(rels, val_fraction, val_list)
    n_val = sum(1 for v in split.values() if v == "val")
    val_size = val_shard_size or min(shard_size, max(1, math.ceil(n_val / MIN_VAL_SHARDS)))

    stats = [[rel, os.stat(src / rel).st_size, os.stat(src / rel).st_mtime_ns] for rel in rels]
    fingerprint = hashlib.sha256(
        json.dumps([VERSION, stats, resolutions, rule_id, shard_size, val_size, seed]).encode()
    ).hexdigest()
    dirs = {res: out / str(res) for res in resolutions}
    if not force and all(current(d, fingerprint) for d in dirs.values()):
        print(
            f"shards in {out} are up to date ({', '.join(map(str, resolutions))}); --force rewrites"
        )
        return

    order = sorted(rels, key=lambda rel: mix("order", seed, sample_key(rel)))
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        clean_folder(d)
    writers = {
        res: {
            "train": SplitWriter(d, "train", shard_size),
            "val": SplitWriter(d, "val", val_size),
        }
        for res, d in dirs.items()
    }
    skipped = {res: Counter(r["reason"] for r in skipped_files) for res in resolutions}
    per_res_files: dict[int, list[dict[str, str]]] = {res: [] for res in resolutions}
    converted: Counter[str] = Counter()
    tasks = [(str(src / rel), resolutions) for rel in order]
    bar = tqdm(total=len(tasks), unit="img", desc="shards", disable=quiet, file=sys.stderr)
    for rel, (pngs, notes, reason, detail) in zip(order, converted_stream(tasks, workers)):
        bar.update()
        key = sample_key(rel)
        converted.update(notes)
        if reason:  # unreadable: skipped at every resolution, listed once
            skipped_files.append({"file": rel, "reason": reason, "detail": detail})
        for res in resolutions:
            got = pngs.get(res, (reason, detail))
            if isinstance(got, bytes):
                writers[res][split[key]].write(key, got)
            else:
                skipped[res][got[0]] += 1
                if not reason:
                    per_res_files[res].append({"file": rel, "reason": got[0], "detail": got[1]})
    bar.close()

    written = 0
    for res, d in dirs.items():
        shards = {s: w.close() for s, w in writers[res].items()}
        counts = {s: sum(r["count"] for r in recs) for s, recs in shards.items()}
        written += sum(counts.values())
        finish_folder(
            d,
            {
                "format": FORMAT,
                "resolution": res,
                "image_format": "png",
                "counts": counts,
                "source": {"kind": "folder", "path": str(src.resolve()), "files": len(rels)},
                "split_rule": rule,
                "write_order": f"blake2b64(('order', {seed}, key))",
                "skipped": dict(sorted(skipped[res].items())),
                "skipped_files": skipped_files + per_res_files[res],
                "converted": dict(sorted(converted.items())),
                "input_fingerprint": fingerprint,
                "shards": shards,
            },
        )
        print(
            f"{d}: train {counts['train']} in {len(shards['train'])} shards, "
            f"val {counts['val']} in {len(shards['val'])} shards"
        )
    report_skips(skipped_files, per_res_files, skipped, converted)
    if written == 0:
        raise UsageError(f"every image under {src} was skipped; see the reasons above")


def current(d: Path, fingerprint: str) -> bool:
    try:
        return json.loads((d / MANIFEST).read_text()).get("input_fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def report_skips(files: list, per_res: dict, skipped: dict, converted: Counter) -> None:
    listed = files + [f for fs in per_res.values() for f in fs]
    for f in listed[:PRINTED_SKIPS]:
        print(f"skipped {f['file']}: {f['reason']} {f.get('detail', '')}".rstrip(), file=sys.stderr)
    if len(listed) > PRINTED_SKIPS:
        print(
            f"... {len(listed) - PRINTED_SKIPS} more in manifest.json skipped_files",
            file=sys.stderr,
        )
    for res, counts in skipped.items():
        if counts:
            print(f"skipped at {res}: {dict(sorted(counts.items()))}", file=sys.stderr)
    if converted:
        print(f"converted: {dict(sorted(converted.items()))}", file=sys.stderr)

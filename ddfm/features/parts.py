"""Embedding across workers: slices of the unique items, their part directories, the merge.

    ddfm embed data/train.jsonl --out runs/features --shard 0/4     # ... 1/4, 2/4, 3/4: any machines
    torchrun --nproc_per_node=8 -m ddfm embed data/train.jsonl --out runs/features   # rank r: slice r/8
    ddfm embed data/train.jsonl --out runs/features --merge         # if the automatic merge did not run

Slice I of N is a run of whole batches of the canonical item order (unique items in order
of first appearance): batches ``[I·nb/N, (I+1)·nb/N)`` of the nb batches. Each slice runs
exactly the encoder calls one process would make for those items, so its rows are the
same bits. It is written to ``OUT/part-I-of-N/`` as a features directory of its own
(``features.npy``, ``keys.json``, ``embed.json`` with a ``"part"`` entry); when the last
part is complete (whichever worker finishes last, under a file lock) the parts are
concatenated in order into ``OUT``, which is then byte-identical to a one-process run,
and the part directories are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ddfm.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^part-(\d+)-of-(\d+)$")
LOCK = ".merge.lock"


def parse_part(spec: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``: slice 2 (from 0) of 8; a clear error names ``--shard`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"shard: expected I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def part_of_run(spec: str | None) -> tuple[int, int] | None:
    """This worker's slice: ``--shard I/N``, else under torchrun (WORLD_SIZE > 1) RANK/WORLD_SIZE, else None."""
    if spec is not None:
        return parse_part(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def item_range(n_items: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """Items ``[start, stop)`` of slice ``index`` of ``count``: whole batches, as even as can be."""
    n_batches = -(-n_items // batch_size)
    start, stop = index * n_batches // count, (index + 1) * n_batches // count
    return min(start * batch_size, n_items), min(stop * batch_size, n_items)


def part_dir(out: Path, index: int, count: int) -> Path:
    return out / f"part-{index}-of-{count}"


def save_rows(path: Path, chunks: list[np.ndarray], dim: int) -> None:
    """Write the rows of ``chunks`` (each (m, dim) float32), in order, as one ``.npy`` file.

    The rows are copied chunk by chunk into a memory-mapped file, so merging N parts never
    holds all rows in memory; one process and a merge write the same bytes.
    """
    rows = sum(len(c) for c in chunks)
    if rows == 0:  # a zero-length map is not possible; np.save writes the same header
        with open(path, "wb") as f:
            np.save(f, np.zeros((0, dim), dtype=np.float32))
        return
    target = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    at = 0
    for c in chunks:
        target[at:at + len(c)] = c
        at += len(c)
    target.flush()
    del target


def write_features(out: Path, chunks: list[np.ndarray], keys: list[str], meta: dict, timing: dict) -> None:
    """A features directory: ``features.npy``, ``keys.json``, ``timing.json``, then ``embed.json``.

    Each file is written atomically; ``embed.json`` is removed first and written last, so it
    marks a complete set. ``timing.json`` (seconds, items per second) is kept apart: the
    other three files depend only on the data and the encoder.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "embed.json").unlink(missing_ok=True)  # a crash below must not leave a stale cache hit
    with atomic_path(out / "features.npy", suffix=".npy") as tmp:
        save_rows(tmp, chunks, meta["dim"])
    write_json(out / "keys.json", keys)
    write_json(out / "timing.json", timing)
    write_json(out / "embed.json", meta)


def complete_parts(out: Path, cache_key: str, count: int) -> dict[int, Path]:
    """The parts ``part-I-of-count`` in ``out`` that are complete for ``cache_key``, by I."""
    found = {}
    for d in out.glob(f"part-*-of-{count}"):
        m = PART_RE.match(d.name)
        try:
            meta = read_json(d / "embed.json")
        except (OSError, ValueError):
            continue
        if m and meta.get("cache_key") == cache_key:
            found[int(m.group(1))] = d
    return found


def part_counts(out: Path) -> set[int]:
    """The N of every ``part-I-of-N`` directory in ``out``."""
    return {int(m.group(2)) for d in out.glob("part-*-of-*") if (m := PART_RE.match(d.name))}


@contextlib.contextmanager
def merge_lock(out: Path) -> Iterator[None]:
    """One merge at a time in ``out`` (an exclusive ``flock``; released if the process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge(out: Path, parts: dict[int, Path], count: int) -> dict:
    """Concatenate complete parts 0..count-1 into ``out``; returns the merged ``embed.json``.

    Checks that the parts tile the items in order (each starts where the previous ended).
    The merged meta is part 0's with ``count`` and ``failed`` over all parts and no
    ``"part"``: exactly what one process writes. The part directories are removed after.
    """
    t0 = time.perf_counter()
    metas = [read_json(parts[i] / "embed.json") for i in range(count)]
    at = 0
    for i, m in enumerate(metas):
        start, stop = m["part"]["items"]
        if start != at:
            raise ValueError(f"{parts[i]}: covers items [{start}, {stop}) but the previous part ended at {at}; "
                             "the parts were cut with different batch sizes: embed them again")
        at = stop
    chunks = [np.load(parts[i] / "features.npy", mmap_mode="r") for i in range(count)]
    keys = [k for i in range(count) for k in read_json(parts[i] / "keys.json")]
    meta = {k: v for k, v in metas[0].items() if k != "part"}
    meta["count"] = len(keys)
    meta["failed"] = [f for m in metas for f in m["failed"]]
    timing = {"parts": [read_json(parts[i] / "timing.json") for i in range(count)]}
    timing["merge_seconds"] = round(time.perf_counter() - t0, 3)
    write_features(out, chunks, keys, meta, timing)
    del chunks
    for d in parts.values():
        shutil.rmtree(d, ignore_errors=True)
    (out / LOCK).unlink(missing_ok=True)
    log.info("embed: merged %d parts, %d rows -> %s", count, len(keys), out)
    return meta

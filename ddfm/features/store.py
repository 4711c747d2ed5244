"""Features directories: which item each record is, the cache key, and reading the files back.

A features directory (written by ``ddfm embed``, read by ``partition``, ``ablate`` and the
tests) holds ``features.npy`` (M, D) float32 unit rows, ``keys.json`` (M keys,
:func:`record_key`), ``embed.json`` (what the rows are: a function of the data and the
encoder only) and ``timing.json``. The directory is its own cache: :func:`cache_key` of the
same data (file digests, image sizes and mtimes) and encoder (spec and weights identity)
finds it up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddfm.data import IMAGE_TOKEN, Record
from ddfm.io import file_digest, read_json

FORMAT_VERSION = 1  # bump when the cache key or the files change meaning

def record_key(record: Record, modality: str) -> str | None:
    """The features key of a record: its resolved image path ("image") or ``"text:" + id``.

    Returns None for a text-only record under an image encoder: it has no row (the
    partition stage spreads such records randomly over the shards).
    """
    if modality == "image":
        return str(record.image_path.resolve()) if record.image_path is not None else None
    if modality == "text":
        return "text:" + record.id
    raise ValueError(f"modality: must be 'image' or 'text', got {modality!r}")


def record_text(record: Record) -> str:
    """The text a text encoder sees: the human and gpt turns, ``<image>`` removed."""
    return "\n".join(t["value"].replace(IMAGE_TOKEN, "").strip()
                     for t in record.conversations if t["from"] in ("human", "gpt"))


@dataclass
class Items:
    """The unique items of some records under one modality, in first-appearance order."""

    keys: list[str]  # unique keys, first-appearance order
    texts: dict[str, str]  # key -> text (text modality only)
    n_records: int
    n_without: int  # records with no item under this modality (text-only under an image encoder)


def collect_items(records: list[tuple[Path, Record]], modality: str) -> Items:
    keys: dict[str, None] = {}
    texts: dict[str, str] = {}
    origin: dict[str, Path] = {}
    n_without = 0
    for path, r in records:
        key = record_key(r, modality)
        if key is None:
            n_without += 1
            continue
        if modality == "text":
            text = record_text(r)
            if key in texts and texts[key] != text:
                raise ValueError(f"{path}: record id {r.id!r} also appears in {origin[key]} with a different text; "
                                 "text records need unique ids across the data files")
            texts[key], origin[key] = text, path
        keys[key] = None
    return Items(list(keys), texts, len(records), n_without)


def items_fingerprint(items: Items) -> str:
    """Digest of what will be embedded: each key with its image's size and mtime (or its text)."""
    h = hashlib.sha256()
    for key in items.keys:
        if key in items.texts:
            h.update(f"{key}\0{items.texts[key]}\n".encode())
            continue
        try:
            st = os.stat(key)
            h.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{key}\0missing\n".encode())
    return h.hexdigest()



def cache_key(data: list[str], encoder, items: Items) -> str:
    """What the rows of a features directory depend on: data files, encoder (spec, weights), items."""
    blob = {"format": FORMAT_VERSION, "encoder": encoder.spec, "weights": encoder.identity,
            "data": [file_digest(f) for f in data], "items": items_fingerprint(items)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def cache_hit(out: Path, key: str, part: dict | None = None) -> bool:
    """True when ``out`` holds complete features for ``key`` (and, for a slice, that slice)."""
    try:
        meta = read_json(out / "embed.json")
        if meta.get("cache_key") != key or meta.get("part") != part:
            return False
        feats = np.load(out / "features.npy", mmap_mode="r")
        return feats.shape[0] == meta.get("count") == len(read_json(out / "keys.json"))
    except (OSError, ValueError):
        return False


def load_features(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict]:
    """Read a features directory: ``(features (M, D) float32, keys [M], meta dict)``.

    The features are memory-mapped read-only (``np.load(..., mmap_mode="r")``): a million
    768-d rows (3 GB) are read from the page cache as they are used, not copied into memory.
    """
    path = Path(path)
    if not (path / "embed.json").is_file():
        raise FileNotFoundError(f"features directory not found or incomplete: {path} has no embed.json "
                                "(run `ddfm embed` first)")
    meta = read_json(path / "embed.json")
    keys = read_json(path / "keys.json")
    try:
        feats = np.load(path / "features.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'features.npy'}: cannot read: {err}") from None
    if feats.ndim != 2 or feats.dtype != np.float32:
        raise ValueError(f"{path / 'features.npy'}: expected a 2-D float32 array, got {feats.dtype} {feats.shape}")
    if not isinstance(keys, list) or len(keys) != feats.shape[0] or meta.get("count") != len(keys):
        raise ValueError(f"{path}: features.npy has {feats.shape[0]} rows, keys.json {len(keys)} keys and "
                         f"embed.json count {meta.get('count')}; they must agree (re-run `ddfm embed`)")
    if meta.get("dim") != feats.shape[1]:
        raise ValueError(f"{path}: embed.json dim {meta.get('dim')} != features.npy width {feats.shape[1]}")
    return feats, keys, meta


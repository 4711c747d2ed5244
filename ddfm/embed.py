"""Embed stage: one feature vector per unique image (or per text record) (paper §4.2).

    ddfm embed data/mix/train.jsonl --encoder efficientnet-lite0 --out runs/embed
    ddfm embed data/docs/train.jsonl --encoder minilm --out runs/embed-docs
    ddfm embed data/mix/train.jsonl --encoder clip:/models/clip-vit-b16 --out runs/embed-clip

The paper clusters "image features from unique images in the dataset" computed by a
pretrained vision encoder f (CLIP), and routes a request by the cosine between f(image)
and the cluster centroids (eq. 29). The encoders are :mod:`ddfm.features` (specs:
:data:`ddfm.features.registry.ENCODERS`); this stage runs one over every unique item of
the data files and writes a features directory (:mod:`ddfm.features.store`), which is its
own cache: a re-run with the same data and encoder does nothing and says so.

Across workers (:mod:`ddfm.features.parts`): ``--shard I/N`` (or one rank of ``torchrun``)
embeds slice I of the unique items into ``OUT/part-I-of-N/``; the last slice to finish
merges them into ``OUT``, byte for byte what one process writes::

    ddfm embed data/mix/train.jsonl --out runs/embed --shard 0/4      # ... 3/4, anywhere
    torchrun --nproc_per_node=8 -m ddfm embed data/mix/train.jsonl --out runs/embed
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ddfm.config import arg
from ddfm.data import Record, load_records, open_image
from ddfm.features import parts
from ddfm.features.encoders import Encoder
from ddfm.features.registry import get_encoder, parse_spec
from ddfm.features.store import FORMAT_VERSION, Items, cache_hit, cache_key, collect_items
from ddfm.runtime.device import DEVICE_HELP, check_device
from ddfm.runtime.progress import progress

log = logging.getLogger(__name__)

MAX_LOGGED_FAILURES = 20
AUTO, IMAGE_DEFAULT, TEXT_DEFAULT = "auto", "efficientnet-lite0", "minilm"


@dataclass
class EmbedConfig:
    """``ddfm embed``: features of every unique image (or text record) of the data files."""

    data: list[str] = arg("one or more canonical data files (JSONL or LLaVA JSON list)", positional=True)
    encoder: str = arg("encoder spec: efficientnet-lite0[@RES], clip:PATH, tower:PATH, minilm, pixels[@S]; "
                       f"{AUTO}: {IMAGE_DEFAULT} when any record has an image, else {TEXT_DEFAULT} (a text-only "
                       "corpus)", default=AUTO)
    out: str = arg("output directory (features.npy, keys.json, embed.json); also the cache", default="runs/embed")
    batch_size: int = arg("items per encoder call", default=64)
    device: str = arg(DEVICE_HELP, default="auto")
    force: bool = arg("recompute even when the cache in --out is up to date", default=False)
    shard: Optional[str] = arg("embed only slice I/N of the unique items (I from 0) into OUT/part-I-of-N/; the "
                               "last slice to finish merges them into OUT (under torchrun: RANK/WORLD_SIZE)",
                               default=None)
    merge: bool = arg("merge the finished OUT/part-I-of-N/ slices into OUT (when the automatic merge did not run)",
                      default=False)

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        if not self.data:
            raise ValueError("data: give at least one data file")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.shard is not None:
            parts.parse_part(self.shard)
            if self.merge:
                raise ValueError("shard: --shard embeds one slice, --merge merges finished ones; give one of them")
        check_device(self.device)
        if self.encoder != AUTO:
            parse_spec(self.encoder)  # an unknown name fails before any model loads


def default_encoder(records: list[tuple[Path, Record]]) -> str:
    """``--encoder auto``: the image encoder when any record has an image (the paper
    clusters unique images; ``ddfm partition`` spreads a mixed corpus's text-only records
    equally over the clusters), else the text encoder (the records themselves are clustered)."""
    return IMAGE_DEFAULT if any(r.image for _, r in records) else TEXT_DEFAULT


def embed(cfg: EmbedConfig) -> Path:
    """Embed every unique item of ``cfg.data`` with ``cfg.encoder`` into ``cfg.out``.

    Returns the output directory (for a slice whose siblings are not all done yet, its
    ``part-I-of-N`` directory). Items that cannot be read (missing file, bad bytes) are
    logged and listed in ``embed.json["failed"]``; they get no row. A slice (``--shard``,
    or one rank under torchrun) embeds whole batches of the items (:mod:`ddfm.features.parts`).
    """
    out = Path(cfg.out)
    records: list[tuple[Path, Record]] = []
    for f in cfg.data:
        records += [(Path(f), r) for r in load_records(f, check_images=False).records]
    part = parts.part_of_run(cfg.shard)
    t0 = time.perf_counter()
    encoder = get_encoder(default_encoder(records) if cfg.encoder == AUTO else cfg.encoder, device=cfg.device)
    load_s = time.perf_counter() - t0
    items = collect_items(records, encoder.modality)
    key = cache_key(cfg.data, encoder, items)
    if not cfg.force and cache_hit(out, key):
        log.info("embed: cache hit, %s is up to date for these data and %s (cache key %s); nothing recomputed "
                 "(--force recomputes)", out, encoder.spec, key[:12])
        return out
    if cfg.merge:
        return _merge(out, key)
    if part is None:
        keys, feats, failed, timing = _embed_timed(encoder, items, cfg.batch_size, load_s)
        parts.write_features(out, [feats], keys, _meta(cfg, encoder, items, key, keys, failed), timing)
        n_rows = len(keys)
    else:
        index, count = part
        where = _embed_part(cfg, encoder, items, key, load_s, index, count)
        with parts.merge_lock(out):  # the last slice to finish merges; one waiting finds it done
            done = parts.complete_parts(out, key, count)
            if len(done) < count:
                if cache_hit(out, key):
                    return out
                log.info("embed: part %d of %d written (%d of %d done) -> %s", index, count, len(done), count, where)
                return where
            n_rows = parts.merge(out, done, count)["count"]
    if not n_rows and items.n_without:
        log.warning("embed: none of the %d records has an image; for a text-only corpus use --encoder %s "
                    "(the default, auto, picks it)", items.n_without, TEXT_DEFAULT)
    return out


def _embed_part(cfg: EmbedConfig, encoder: Encoder, items: Items, key: str, load_s: float,
                index: int, count: int) -> Path:
    """Slice ``index`` of ``count`` into ``OUT/part-I-of-N/`` (unless it is there already); its directory."""
    start, stop = parts.item_range(len(items.keys), cfg.batch_size, index, count)
    where = parts.part_dir(Path(cfg.out), index, count)
    mine = {"index": index, "count": count, "items": [start, stop]}
    if cfg.force or not cache_hit(where, key, part=mine):
        sliced = Items(items.keys[start:stop], items.texts, items.n_records, items.n_without)
        keys, feats, failed, timing = _embed_timed(encoder, sliced, cfg.batch_size, load_s)
        meta = {**_meta(cfg, encoder, items, key, keys, failed), "part": mine}
        parts.write_features(where, [feats], keys, meta, timing)
    return where


def _meta(cfg: EmbedConfig, encoder: Encoder, items: Items, key: str, keys: list[str],
          failed: list[dict]) -> dict:
    """``embed.json``: what the rows are, a function of the data and the encoder only."""
    return {"encoder": encoder.spec, "modality": encoder.modality, "dim": encoder.dim, "count": len(keys),
            "data": [str(Path(f).resolve()) for f in cfg.data], "cache_key": key, "failed": failed,
            "records": items.n_records, "records_without_item": items.n_without, "weights": encoder.identity,
            "batch_size": cfg.batch_size, "format": FORMAT_VERSION}


def _embed_timed(encoder: Encoder, items: Items, batch_size: int, load_s: float):
    """:func:`_embed_items` plus ``timing.json``'s figures, logged."""
    t0 = time.perf_counter()
    keys, feats, failed = _embed_items(encoder, items, batch_size)
    seconds = time.perf_counter() - t0
    timing = {"seconds": round(seconds, 3), "model_load_seconds": round(load_s, 3),
              "items_per_second": round(len(items.keys) / seconds, 1) if seconds > 0 else None}
    log.info("embed: %d unique %s item(s) with %s in %.1f s (%.0f/s), %d failed",
             len(keys), encoder.modality, encoder.spec, seconds, len(items.keys) / max(seconds, 1e-9), len(failed))
    return keys, feats, failed, timing


def _merge(out: Path, key: str) -> Path:
    """``--merge``: the finished parts of these data and encoder into ``out``, or an error saying what is missing."""
    counts = parts.part_counts(out)
    if len(counts) != 1:
        raise ValueError(f"{out}: " + ("no part-I-of-N directories to merge" if not counts else
                                       f"parts of different splits ({', '.join(f'of-{n}' for n in sorted(counts))})"
                                       "; remove the stale ones"))
    count = counts.pop()
    with parts.merge_lock(out):
        done = parts.complete_parts(out, key, count)
        missing = [i for i in range(count) if i not in done]
        if missing:
            raise ValueError(f"{out}: part(s) {', '.join(f'{i}/{count}' for i in missing)} not finished for these "
                             "data and encoder; run `ddfm embed ... --shard I/N` for them first")
        parts.merge(out, done, count)
    return out


def _embed_items(encoder: Encoder, items: Items, batch_size: int) -> tuple[list[str], np.ndarray, list[dict]]:
    """Encode ``items.keys`` in batches; returns (kept keys, (M, D) features, failures)."""
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    failed: list[dict] = []
    with progress(len(items.keys), f"embed {encoder.spec}", unit="item") as bar:
        for batch_keys, loaded in _batches(items, encoder.modality, batch_size):
            good = [(k, x) for k, x in zip(batch_keys, loaded) if not isinstance(x, Exception)]
            for k, x in zip(batch_keys, loaded):
                if isinstance(x, Exception):
                    failed.append({"key": k, "error": str(x)})
                    if len(failed) <= MAX_LOGGED_FAILURES:
                        log.warning("embed: skipping %s: %s", k, x)
            if good:
                chunks.append(encoder.encode([x for _, x in good]))
                keys += [k for k, _ in good]
            bar.update(len(batch_keys))
    if len(failed) > MAX_LOGGED_FAILURES:
        log.warning("embed: %d items failed in all (listed in embed.json)", len(failed))
    feats = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), dtype=np.float32)
    return keys, feats, failed


def _load_item(key: str):
    try:
        return open_image(key)
    except ValueError as err:  # "image file not found: ..." or "unreadable image ...: ..."
        return err


def _batches(items: Items, modality: str, batch_size: int) -> Iterator[tuple[list[str], list]]:
    """Yield (keys, loaded items or exceptions); images of the next batch decode in a thread meanwhile."""
    groups = [items.keys[i:i + batch_size] for i in range(0, len(items.keys), batch_size)]
    if modality == "text":
        for g in groups:
            yield g, [items.texts[k] for k in g]
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda g: [_load_item(k) for k in g], groups[0]) if groups else None
        for i, g in enumerate(groups):
            loaded = pending.result()
            if i + 1 < len(groups):
                pending = pool.submit(lambda g: [_load_item(k) for k in g], groups[i + 1])
            yield g, loaded

"""The prepare stage: build a source's records and write them with their images.

Output (``OUT``): ``train.jsonl``, ``test.jsonl`` (and ``val``, ``align``, ``pretrain``
when asked), ``images/<source>/<split>/<index>.png`` (paths in the records are relative
to the jsonl files) and ``prepare.json``, written last: re-running with the same
configuration on a complete output returns at once. Every image task has short canonical
answers (exact-match evaluable); ``prepare.json`` lists each task's answer set and chance
levels (:func:`task_stats`).
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddfm.config import arg, to_dict
from ddfm.data import Record, write_records
from ddfm.io import file_digest, read_json, write_json
from ddfm.prepare.offline import FASHION_MNIST_DIR, PYTHON_DOCS_DIR
from ddfm.prepare.sources import OPTIONS, SOURCES, build, check_source
from ddfm.runtime import track

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class PrepareConfig:
    """Options of ``ddfm prepare``: the source, where to write it and the source's sizes."""

    source: str = arg("source: " + "; ".join(f"{k} ({v['help']})" for k, v in SOURCES.items()),
                      positional=True)
    out: str = arg("output directory (train.jsonl, test.jsonl, images/, prepare.json)", default="data/mix")
    seed: int = arg("seed of every sampling choice (images, prompts, yes/no, text)", default=0)
    train_size: int | None = arg("unique train images (text passages for python-docs); "
                                 "default: 3000 for mix, all for the others", default=None)
    test_size: int | None = arg("unique test images (text passages for python-docs); "
                                "default: 500 for mix, all for the others", default=None)
    val_size: int | None = arg("mix/image sources: unique held-out images (all tasks) from the train split's "
                               "unused images -> val.jsonl (held-out loss during training)", default=None)
    align_size: int | None = arg("mix/image sources: unique images with a caption each -> align.jsonl (the "
                                 "alignment stage's image-text pairs; disjoint from train while images last)",
                                 default=None)
    pretrain_size: int | None = arg("mix: python-docs passages of the train files -> pretrain.jsonl (language "
                                    "pretraining text)", default=None)
    tasks_per_image: int | None = arg("tasks (records) per image, chosen at random; default: all 4",
                                      default=None)
    text_share: float | None = arg("mix: fraction of records that are text-only python-docs "
                                   "passages (default 0.12)", default=None)
    max_words: int = arg("python-docs: words per passage at most", default=120)
    fashion_mnist_dir: str = arg("directory of the Fashion-MNIST IDX files", default=FASHION_MNIST_DIR)
    python_docs_dir: str = arg("directory of the Python docs' reST sources", default=PYTHON_DOCS_DIR)
    force: bool = arg("rebuild even if OUT already holds this exact output", default=False)

    def __post_init__(self) -> None:
        check_source(self.source)
        for name in ("train_size", "test_size", "tasks_per_image"):  # 0 is allowed for the optional splits
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v}")
        for name in ("val_size", "align_size", "pretrain_size"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name}: must be >= 0, got {v}")
        if self.pretrain_size and self.source != "mix":
            raise ValueError(f"pretrain_size: only the mix source has pretraining text, not {self.source!r}")
        if (self.val_size or self.align_size) and self.source == "python-docs":
            raise ValueError("val_size / align_size: image sources only (python-docs has no images)")
        if self.tasks_per_image is not None and self.tasks_per_image > 4:
            raise ValueError(f"tasks_per_image: at most 4 tasks exist per image, got {self.tasks_per_image}")
        if self.text_share is not None and not 0 <= self.text_share < 1:
            raise ValueError(f"text_share: must be in [0, 1), got {self.text_share}")
        if self.max_words < 8:
            raise ValueError(f"max_words: must be at least 8, got {self.max_words}")

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in OPTIONS}

def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_images(out: Path, images: dict[str, np.ndarray]) -> None:
    """Each PNG via a temporary file + rename (never half-written); one ``os.sync`` at the
    end instead of an fsync per file (3,500 fsyncs take 20 s)."""
    for rel in track(sorted(images), "prepare: writing images", unit="img"):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(_png(images[rel]))
        os.replace(tmp, path)
    os.sync()
    wanted = {(out / rel).resolve() for rel in images}
    root = out / "images"
    stale = [p for p in root.rglob("*.png") if p.resolve() not in wanted] if root.is_dir() else []
    for p in stale:  # left over from a run with another configuration
        p.unlink()


def task_stats(train: list[Record], test: list[Record]) -> dict[str, dict[str, Any]]:
    """Per task: source, record counts, answer set and chance levels.

    ``chance_majority`` is the test accuracy of always answering the train split's most
    common answer; ``chance_uniform`` is 1/#distinct answers. Text tasks (answers are
    passages, evaluated by perplexity) get ``kind="text"`` and no answer set.
    """
    stats: dict[str, dict[str, Any]] = {}
    for task in sorted({r.task for r in train + test}):
        tr = [r for r in train if r.task == task]
        te = [r for r in test if r.task == task]
        some = (tr or te)[0]
        entry: dict[str, Any] = {"source": some.source, "kind": "qa" if some.has_image else "text",
                                 "train": len(tr), "test": len(te)}
        if some.has_image:
            counts = Counter(r.answer() for r in tr + te)
            majority = Counter(r.answer() for r in (tr or te)).most_common(1)[0][0]
            entry.update(answers=sorted(counts), n_answers=len(counts), majority_answer=majority,
                         chance_majority=(sum(r.answer() == majority for r in te) / len(te)) if te else None,
                         chance_uniform=1.0 / len(counts))
        stats[task] = entry
    return stats


def _split_counts(records: list[Record]) -> dict[str, Any]:
    return {"records": len(records),
            "images": len({r.image for r in records if r.image}),
            "text_only": sum(not r.has_image for r in records),
            "by_source": dict(sorted(Counter(r.source for r in records).items())),
            "by_task": dict(sorted(Counter(r.task for r in records).items()))}


def _is_complete(out: Path, identity: dict) -> bool:
    meta_path = out / "prepare.json"
    if not meta_path.is_file():
        return False
    try:
        meta = read_json(meta_path)
    except ValueError:
        return False
    if {k: meta.get(k) for k in identity} != identity:
        return False
    digests = meta.get("digests", {})
    files = list((meta.get("files") or {"train": "train.jsonl", "test": "test.jsonl"}).values())
    return all((out / f).is_file() and file_digest(out / f) == digests.get(f) for f in files)


def prepare(cfg: PrepareConfig) -> Path:
    """Write ``cfg.out``/{train,test}.jsonl, images/ and prepare.json; return the directory."""
    out = Path(cfg.out)
    identity = {"format_version": FORMAT_VERSION, "source": cfg.source, "seed": cfg.seed,
                "options": cfg.options()}
    if not cfg.force and _is_complete(out, identity):
        log.info("prepare: %s is up to date (%s, seed %d); nothing to do", out, cfg.source, cfg.seed)
        return out
    built = build(cfg.source, cfg.seed, cfg.options())
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").unlink(missing_ok=True)  # the output is incomplete until rewritten
    _write_images(out, built.images)
    root = out.resolve()
    splits = built.splits()
    for split, recs in splits.items():
        for r in recs:
            r.image_path = root / r.image if r.image else None
        write_records(out / f"{split}.jsonl", recs)
    # an optional split this configuration does not write is removed, so OUT holds only this output
    for stale in ("val", "align", "pretrain"):
        if stale not in splits:
            (out / f"{stale}.jsonl").unlink(missing_ok=True)
    files = {split: f"{split}.jsonl" for split in splits}
    meta = {**identity, "config": to_dict(cfg), "files": files,
            "digests": {f: file_digest(out / f) for f in files.values()},
            "counts": {split: _split_counts(recs) for split, recs in splits.items()},
            "tasks": task_stats(built.train, built.test)}
    write_json(out / "prepare.json", meta)
    log.info("prepare: %s -> %s: %s", cfg.source, out, "; ".join(
        f"{split} {c['records']} records ({c['images']} images, {c['text_only']} text)"
        for split, c in meta["counts"].items()))
    return out


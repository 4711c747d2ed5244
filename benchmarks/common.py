"""Pieces the benchmarks share: real Fashion-MNIST test images and a tiny data file of them.

Benchmarks run as scripts (``python benchmarks/bench_x.py``), so this module is imported
from the script's own directory.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fmnist_images(n: int):
    """The first ``n`` Fashion-MNIST test images as RGB PIL images (Debian dataset-fashion-mnist)."""
    from PIL import Image

    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return [Image.fromarray(images[i]).convert("RGB") for i in range(n)]


def write_image_records(root: Path, images) -> Path:
    """``root/train.jsonl``: one "What is this?" record per image (saved under ``root/images``)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(images):
        img.save(root / "images" / f"{i:03d}.png")
        rows.append({"id": f"fm-{i}", "image": f"images/{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A garment."}]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


def write_results(path: str | Path, results) -> None:
    """``--json`` output of a benchmark: its results with :func:`ddfm.runtime.provenance.provenance`
    (commit, versions, CPU, threads, date) beside them, written atomically."""
    from ddfm.io import write_json
    from ddfm.runtime.provenance import provenance

    write_json(Path(path), {"results": results, "provenance": provenance()})

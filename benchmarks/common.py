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


def paired_summary(reference: list[tuple[float, ...]], ours: list[tuple[float, ...]], units: tuple[str, ...],
                   names: tuple[str, str], note: str) -> dict[str, dict]:
    """Print and return, per unit (a rate: higher is better), both sides' medians over rounds,
    their ratio, and the median and min–max of the per-round ratios ours / reference.

    ``reference[r][i]`` and ``ours[r][i]``: round ``r``'s rate in ``units[i]``; ``names``:
    how the two sides are printed; ``note``: the setting, printed after each line."""
    import statistics

    out = {}
    for i, unit in enumerate(units):
        ref_med, our_med = statistics.median(x[i] for x in reference), statistics.median(x[i] for x in ours)
        paired = [o[i] / q[i] for o, q in zip(ours, reference)]
        out[unit] = {"reference_median": ref_med, "ours_median": our_med, "ratio_of_medians": our_med / ref_med,
                     "ratio_median": statistics.median(paired), "ratio_min": min(paired), "ratio_max": max(paired),
                     "reference": [x[i] for x in reference], "ours": [x[i] for x in ours]}
        r = out[unit]
        print(f"{unit:16s} {names[0]} {ref_med:8.1f}   {names[1]} {our_med:8.1f}   ratio of medians "
              f"{r['ratio_of_medians']:.3f}   per-round ratio: median {r['ratio_median']:.3f} "
              f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f})  ({note})")
    return out

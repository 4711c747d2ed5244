"""Real data for the tests, from the offline sources of ASSETS.md.

:func:`make_data` writes a small canonical JSON Lines file of real Fashion-MNIST and
scikit-learn digits images plus text-only records (the data most tests train, embed and
partition); :func:`real_images` returns Fashion-MNIST test images in memory.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
FM_NAMES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@functools.cache
def _idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (n, 28, 28) and labels (n,) of ``split`` (train or t10k), read-only,
    read once per process (the train images take ~0.3 s to decompress)."""
    with gzip.open(FASHION / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def make_data(out: Path, n_fashion: int = 40, n_digits: int = 20, n_text: int = 10,
              offset: int = 0, name: str = "train.jsonl") -> Path:
    """A small canonical JSONL file of real images (Fashion-MNIST, digits) + text records.

    Images are written to ``out/images`` (28x28 PNGs); records ``offset .. offset + n`` of
    each source, so two calls with different offsets give disjoint data.
    """
    from sklearn.datasets import load_digits

    (out / "images").mkdir(parents=True, exist_ok=True)
    images, labels = _idx("train")
    digits = load_digits()
    rows = []
    for i in range(offset, offset + n_fashion):
        path = f"images/f{i}.png"
        Image.fromarray(images[i]).save(out / path)
        rows.append({"id": f"f{i}", "image": path, "source": "fashion-mnist", "task": "name",
                     "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                       {"from": "gpt", "value": f"A {FM_NAMES[labels[i]]}."}]})
    for i in range(offset, offset + n_digits):
        path = f"images/d{i}.png"
        pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28)).save(out / path)
        rows.append({"id": f"d{i}", "image": path, "source": "digits", "task": "digit",
                     "conversations": [{"from": "human", "value": "<image>\nWhich digit is this?"},
                                       {"from": "gpt", "value": DIGITS[digits.target[i]]}]})
    for i in range(offset, offset + n_text):
        a, b = i % 7, (i * 3) % 5
        rows.append({"id": f"t{i}", "image": None, "source": "arithmetic", "task": "sum",
                     "conversations": [{"from": "human", "value": f"What is {a} plus {b}?"},
                                       {"from": "gpt", "value": f"{a + b}"}]})
    path = out / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def real_images(n: int, offset: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    """The Fashion-MNIST test images ``offset .. offset + n`` (28x28 grey, mode ``L``) and
    their labels, shape (n,) uint8; scikit-learn digits (8x8) if the Debian package is absent."""
    if (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        x, y = _idx("t10k")
        return [Image.fromarray(a, "L") for a in x[offset:offset + n]], y[offset:offset + n].copy()
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[offset:offset + n] * 255 / 16).astype(np.uint8)
    return [Image.fromarray(a, "L") for a in x], d.target[offset:offset + n]

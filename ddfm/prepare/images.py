"""The image sources: pixels, labels and the question/answer tasks asked about each image.

* ``fashion-mnist`` — Debian ``dataset-fashion-mnist``: the IDX files are read directly
  with numpy + gzip (the Debian checksums differ from upstream, so torchvision's loader
  rejects them); torchvision's downloader is used only when the files are absent and
  torchvision is importable. Official split: 60k train / 10k test (``t10k``).
* ``digits`` — scikit-learn ``load_digits`` (1,797 8x8 images). It has no official split,
  so a fixed stratified 80/20 split (``SPLIT_SEED``, independent of ``--seed``) is used:
  1,437 train / 360 test, the same for every run.

Image tasks (``task`` field; answers in brackets):

    fmnist-name      What is this?              [t-shirt, trousers, ..., ankle boot]
    fmnist-category  What category ...?         [tops, bottoms, dresses, footwear, bags]
    fmnist-yesno     Is this footwear?          [yes, no]  (balanced per split)
    fmnist-caption   Describe the image briefly.[a bright sneaker | a faint sneaker]
    digits-read      What digit is this?        [0 ... 9]
    digits-parity    Is this digit even or odd? [even, odd]
    digits-yesno     Is this digit above four?  [yes, no]  (5 of 10 classes: balanced by the class-stratified sample)
    digits-caption   Describe the image briefly.[a thick handwritten three | a thin ...]

A yes/no question asks whether the image has a visual property: footwear, clothing or a
bag (half of each split's records ask a property the image has, half one it lacks), or a
digit above four (true of half the classes; the images are sampled class-stratified).
Asking about one of the ten classes instead ("Is this a sneaker?") needs the model to
compare a named class with the image, which the demo's tiny models did not learn at all
in 13 epochs: their train accuracy stayed at chance.

The caption attribute is measured on the pixels (mean brightness of the lit pixels,
or the inked area for digits) and split at the class's train median, so it is a real
visual property, balanced within each class.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ddfm.data import IMAGE_TOKEN, Record
from ddfm.prepare.offline import FASHION_MNIST_DIR, missing, stable_int

SPLIT_SEED = 0  # the digits split is fixed: the same test set whatever --seed is


@dataclass
class ImageSplit:
    """Pixels and labels of one split: ``x`` (N, H, W) uint8, ``y`` (N,) int64,
    ``attr`` (N,) bool — the caption attribute (above the class median or not)."""

    x: np.ndarray
    y: np.ndarray
    attr: np.ndarray


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzip): big-endian magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root_p = Path(root)
    files = {s: (root_p / f"{p}-images-idx3-ubyte.gz", root_p / f"{p}-labels-idx1-ubyte.gz")
             for s, p in (("train", "train"), ("test", "t10k"))}
    if all(f.is_file() for pair in files.values() for f in pair):
        return {s: (_read_idx(xi), _read_idx(yi).astype(np.int64)) for s, (xi, yi) in files.items()}
    try:  # fallback off Debian: torchvision's downloader (never a dependency of ddfm)
        import torchvision  # noqa: F401
    except ImportError:
        absent = next(f for pair in files.values() for f in pair if not f.is_file())
        raise missing("fashion-mnist", f"{absent} not found") from None
    from torchvision.datasets import FashionMNIST  # pragma: no cover - not installed here
    cache = Path.home() / ".cache" / "ddfm" / "fashion-mnist"
    out = {}
    for split in ("train", "test"):
        ds = FashionMNIST(str(cache), train=split == "train", download=True)
        out[split] = (ds.data.numpy(), ds.targets.numpy().astype(np.int64))
    return out


@functools.lru_cache(maxsize=1)
def _load_digits(root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # ink bright on black, as MNIST
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=SPLIT_SEED)
    return {"train": (x[np.sort(tr)], d.target[np.sort(tr)].astype(np.int64)),
            "test": (x[np.sort(te)], d.target[np.sort(te)].astype(np.int64))}


def _mean_ink(x: np.ndarray) -> np.ndarray:
    """Mean brightness of the lit pixels, (N,): faint vs bright items."""
    lit = x > 0
    return (x * lit).reshape(len(x), -1).sum(1) / np.maximum(lit.reshape(len(x), -1).sum(1), 1)


def _ink_area(x: np.ndarray) -> np.ndarray:
    """Fraction of inked pixels, (N,): thin vs thick strokes."""
    return (x > 64).reshape(len(x), -1).mean(1)


def with_attributes(raw: dict, measure: Callable[[np.ndarray], np.ndarray]) -> dict[str, ImageSplit]:
    """Caption attribute: above the per-class median of ``measure`` on the train split,
    so within each class the two caption words are balanced."""
    x_tr, y_tr = raw["train"]
    m_tr = measure(x_tr)
    medians = np.array([np.median(m_tr[y_tr == c]) if (y_tr == c).any() else 0.0
                        for c in range(int(y_tr.max()) + 1)])
    return {s: ImageSplit(x, y, measure(x) > medians[y]) for s, (x, y) in raw.items()}


FMNIST_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat",
                "sandal", "shirt", "sneaker", "bag", "ankle boot")
FMNIST_CATEGORIES = ("tops", "bottoms", "tops", "dresses", "tops",
                     "footwear", "tops", "footwear", "bags", "footwear")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Image sources as data: id prefix, how to load, the caption attribute and the tasks.
# A task is (prompt templates, answer(label, attr) -> str); "yesno" is built separately
# (balanced yes/no over the source's "properties").
IMAGE_SOURCES: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "short": "fmnist", "load": _load_fashion_mnist, "root": ("fashion_mnist_dir", FASHION_MNIST_DIR),
        "measure": _mean_ink,
        # yes/no properties: (question phrasings, the labels that have the property)
        "properties": ((("Is this footwear?", "Is this something worn on the feet? Answer yes or no."), {5, 7, 9}),
                       (("Is this clothing?", "Is this a piece of clothing? Answer yes or no."), {0, 1, 2, 3, 4, 6}),
                       (("Is this a bag?", "Does the image show a bag? Answer yes or no."), {8})),
        "tasks": {
            "name": (("What is this?", "What item is shown in the image?", "Name the item in the picture."),
                     lambda c, a: FMNIST_NAMES[c]),
            "category": (("What category of item is this?", "Which kind of product is shown: tops, "
                          "bottoms, dresses, footwear or bags?"),
                         lambda c, a: FMNIST_CATEGORIES[c]),
            "yesno": ((), None),
            "caption": (("Describe the image briefly.", "Write a short caption for this image."),
                        lambda c, a: f"a {'bright' if a else 'faint'} {FMNIST_NAMES[c]}"),
        },
    },
    "digits": {
        "short": "digits", "load": _load_digits, "root": ("", ""), "measure": _ink_area,
        # one property: its two complementary forms ("above four" / "below five") needed
        # the answer flipped by the question, which the demo's dense model did not learn
        "properties": ((("Is this digit above four?", "Is the digit greater than four? Answer yes or no."),
                        {5, 6, 7, 8, 9}),),
        "tasks": {
            "read": (("What digit is this?", "Read the handwritten digit."), lambda c, a: str(c)),
            "parity": (("Is this digit even or odd?", "Is the number shown even or odd?"),
                       lambda c, a: "even" if c % 2 == 0 else "odd"),
            "yesno": ((), None),
            "caption": (("Describe the image briefly.", "Write a short caption for this image."),
                        lambda c, a: f"a {'thick' if a else 'thin'} handwritten {DIGIT_WORDS[c]}"),
        },
    },
}


def sample_stratified(y: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices with classes as equal as possible (all of them if ``n`` is None), sorted."""
    if n is None or n >= len(y):
        return np.arange(len(y))
    classes = np.unique(y)
    pools = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    take = {c: 0 for c in classes}
    order = list(rng.permutation(classes))
    while sum(take.values()) < n:  # round-robin over classes that still have images
        for c in order:
            if take[c] < len(pools[c]) and sum(take.values()) < n:
                take[c] += 1
    return np.sort(np.concatenate([pools[c][:take[c]] for c in classes]))


def image_records(source: str, split: str, data: ImageSplit, idx: np.ndarray, seed: int,
                   tasks_per_image: int | None, *, only: tuple[str, ...] | None = None,
                   split_name: str | None = None) -> tuple[list[Record], dict[str, np.ndarray]]:
    """Records of the images ``idx`` of one source split (``train``/``test``): several tasks
    per image (``only`` those tasks), ids naming ``split_name`` (default: the split)."""
    spec = IMAGE_SOURCES[source]
    names = [t for t in spec["tasks"] if only is None or t in only]
    rng = np.random.default_rng([seed, stable_int(source), stable_int(split_name or split)])
    k = len(names) if tasks_per_image is None else min(tasks_per_image, len(names))
    chosen = [sorted(rng.choice(len(names), size=k, replace=False)) for _ in idx]
    yes_pool = [i for i, c in zip(idx, chosen) if "yesno" in names and names.index("yesno") in c]
    yes = set(rng.permutation(yes_pool)[: (len(yes_pool) + 1) // 2].tolist())  # balanced yes/no
    records, images = [], {}
    for i, task_ids in zip(idx.tolist(), chosen):
        label, attr = int(data.y[i]), bool(data.attr[i])
        rel = f"images/{source}/{split}/{i:05d}.png"
        images[rel] = data.x[i]
        for t in task_ids:
            task = names[t]
            templates, answer_fn = spec["tasks"][task]
            if task == "yesno":
                props = spec["properties"]
                if len(props) > 1:  # balance: a property the image has (the yes half) or lacks
                    props = [p for p in props if (label in p[1]) == (i in yes)]
                templates, labels = props[int(rng.integers(len(props)))]
                answer = "yes" if label in labels else "no"
            else:
                answer = answer_fn(label, attr)
            prompt = templates[int(rng.integers(len(templates)))]
            records.append(Record(
                id=f"{spec['short']}-{split_name or split}-{i:05d}-{task}", image=rel,
                conversations=[{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                               {"from": "gpt", "value": answer}],
                extra={"source": source, "task": f"{spec['short']}-{task}", "label": label}))
    return records, images


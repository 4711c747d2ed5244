"""The sources as data (``SOURCES``): each entry builds the records of every split.

``fashion-mnist`` and ``digits`` (:mod:`ddfm.prepare.images`) and ``python-docs``
(:mod:`ddfm.prepare.docs`) are the real offline sources; ``mix`` is the embedded default:
Fashion-MNIST + digits images (2:1), each image used by several records (one per task:
naming the item / reading the digit, its category or parity, a balanced yes/no question,
a short caption), plus ``text_share`` of text-only python-docs records. Image splits come
from the sources' own splits. Default size: 3,000 unique train images (13,636 records)
and 500 test images. Every choice is deterministic in ``seed``.

    train, test = build_source("python-docs")          # records only, nothing written
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddfm.data import Record
from ddfm.prepare.docs import docs_records
from ddfm.prepare.images import IMAGE_SOURCES, image_records, sample_stratified, with_attributes
from ddfm.prepare.offline import PYTHON_DOCS_DIR, stable_int

log = logging.getLogger(__name__)


@dataclass
class Built:
    """What a source builder returns: records per split and the pixels of each image path.

    ``extra`` holds the optional splits (``val``, ``align``, ``pretrain``) by name."""

    train: list[Record]
    test: list[Record]
    images: dict[str, np.ndarray]
    extra: dict[str, list[Record]] = field(default_factory=dict)

    def splits(self) -> dict[str, list[Record]]:
        return {"train": self.train, "test": self.test, **{k: v for k, v in self.extra.items() if v}}

    def add(self, other: "Built") -> None:
        self.train += other.train
        self.test += other.test
        self.images.update(other.images)
        for name, recs in other.extra.items():
            self.extra.setdefault(name, []).extend(recs)


def _build_image_source(source: str, o: dict, shares: dict[str, float] | None = None) -> Built:
    """Records of one image source: ``train`` (every task) and ``test`` from the source's
    own splits; then ``val`` (held out, every task) and ``align`` (captions only, LLaVA's
    stage-1 pairs) from the train split's images that ``train`` did not take (``align``
    reuses train images when the source runs out, and says so)."""
    spec = IMAGE_SOURCES[source]
    option, default_root = spec["root"]  # which option names the source's directory
    data = with_attributes(spec["load"](o.get(option) or default_root), spec["measure"])
    rng = np.random.default_rng([o["seed"], stable_int(source)])
    share = 1.0 if shares is None else shares[source]
    out = Built([], [], {})
    pool = np.arange(len(data["train"].y))  # train-split images not used yet
    taken: dict[str, np.ndarray] = {}
    for split, size in (("train", o.get("train_size")), ("test", o.get("test_size")),
                        ("val", o.get("val_size")), ("align", o.get("align_size"))):
        if split in ("val", "align") and not size:
            continue
        n = None if size is None else int(round(size * share))
        if split == "test":
            idx, where = sample_stratified(data["test"].y, _capped(source, split, n, len(data["test"].y)), rng), "test"
        else:
            idx = pool[sample_stratified(data["train"].y[pool], _capped(source, split, n, len(pool)), rng)]
            where = "train"
            if split == "align" and n is not None and len(idx) < n:  # the source ran out: reuse train images
                used = taken["train"]  # never val images: those stay held out
                more = used[sample_stratified(data["train"].y[used], min(n - len(idx), len(used)), rng)]
                log.warning("%s: reusing %d train images for the align split (only %d unused remain)",
                            source, len(more), len(idx))
                idx = np.sort(np.concatenate([idx, more]))
            pool = np.setdiff1d(pool, idx)
            taken[split] = idx
        recs, imgs = image_records(source, where, data[where], idx, o["seed"], o.get("tasks_per_image"),
                                    only=("caption",) if split == "align" else None, split_name=split)
        out.images.update(imgs)
        if split in ("train", "test"):
            setattr(out, split, recs)
        else:
            out.extra[split] = recs
    return out


def _capped(source: str, split: str, n: int | None, have: int) -> int | None:
    if n is not None and n > have:
        log.warning("%s: %d %s images asked, only %d exist; using all", source, n, split, have)
        return have
    return n


def _build_docs(o: dict) -> Built:
    recs = docs_records(o.get("python_docs_dir") or PYTHON_DOCS_DIR, o.get("max_words") or 120)
    rng = np.random.default_rng([o["seed"], stable_int("python-docs")])
    for split, size in (("train", o.get("train_size")), ("test", o.get("test_size"))):
        if size is not None and size < len(recs[split]):
            keep = np.sort(rng.choice(len(recs[split]), size=size, replace=False))
            recs[split] = [recs[split][i] for i in keep]
    return Built(recs["train"], recs["test"], {})


def _mix_sizes(o: dict, shares: dict[str, float]) -> dict[str, dict[str, int | None]]:
    """Images per source and split: ``size · share``, and a source short of images gives
    its deficit to the others (digits has 1,437 train images; Fashion-MNIST 60,000), so
    the mix holds the number of unique images asked for whenever they exist. ``align``
    keeps the shares (reusing train images of a short source, see :func:`_build_image_source`)."""
    have = {src: {sp: len(IMAGE_SOURCES[src]["load"](o.get(IMAGE_SOURCES[src]["root"][0]) or
                                                     IMAGE_SOURCES[src]["root"][1])[sp][1])
                  for sp in ("train", "test")} for src in shares}
    sizes: dict[str, dict[str, int | None]] = {src: {} for src in shares}
    left = {src: have[src]["train"] for src in shares}  # the train split feeds train, val and align
    for split in ("train", "test", "val", "align"):
        size = o.get(f"{split}_size")
        if not size:
            for src in shares:
                sizes[src][split] = size
            continue
        # align may reuse train images (each source keeps its share of captions), the others may not
        room = {src: have[src]["test"] if split == "test" else have[src]["train"] if split == "align"
                else left[src] for src in shares}
        want = {src: size * shares[src] for src in shares}
        for _ in shares:  # hand the deficit of a capped source to the sources with room
            capped = {src for src in shares if want[src] > room[src]}
            deficit = sum(want[src] - room[src] for src in capped)
            open_ = [src for src in shares if src not in capped and want[src] < room[src]]
            for src in capped:
                want[src] = room[src]
            if not deficit or not open_:
                break
            total = sum(shares[src] for src in open_)
            for src in open_:
                want[src] += deficit * shares[src] / total
        for src in shares:
            n = int(round(want[src]))
            sizes[src][split] = n
            if split != "test":
                left[src] = max(0, left[src] - n)
    return sizes


def _build_mix(o: dict) -> Built:
    spec = SOURCES["mix"]
    o = {**o, "train_size": o.get("train_size") or spec["train_size"],
         "test_size": o.get("test_size") or spec["test_size"]}
    out = Built([], [], {})
    sizes = _mix_sizes(o, spec["images"])
    for source in spec["images"]:
        out.add(_build_image_source(source, {**o, **{f"{k}_size": v for k, v in sizes[source].items()}}))
    share = spec["text_share"] if o.get("text_share") is None else o["text_share"]
    docs = None
    if share > 0 or o.get("pretrain_size"):
        docs = docs_records(o.get("python_docs_dir") or PYTHON_DOCS_DIR, o.get("max_words") or 120)
    if share > 0:
        rng = np.random.default_rng([o["seed"], stable_int("mix-text")])
        for split in ("train", "test"):
            recs = getattr(out, split)
            n = min(int(round(share / (1 - share) * len(recs))), len(docs[split]))
            keep = np.sort(rng.choice(len(docs[split]), size=n, replace=False))
            recs.extend(docs[split][i] for i in keep)
    if o.get("pretrain_size"):  # language pretraining text: python-docs passages of the train files
        rng = np.random.default_rng([o["seed"], stable_int("mix-pretrain")])
        n = min(o["pretrain_size"], len(docs["train"]))
        out.extra["pretrain"] = [docs["train"][i] for i in np.sort(rng.choice(len(docs["train"]), n, replace=False))]
    return out


# Sources as data: adding a source is adding an entry (builder + description + defaults).
SOURCES: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"build": lambda o: _build_image_source("fashion-mnist", o),
                      "help": "Fashion-MNIST 28x28 clothing (Debian dataset-fashion-mnist), 4 tasks per image"},
    "digits": {"build": lambda o: _build_image_source("digits", o),
               "help": "scikit-learn 8x8 handwritten digits, fixed stratified 80/20 split, 4 tasks per image"},
    "python-docs": {"build": _build_docs,
                    "help": "text-only passages of the Python 3.11 docs (Debian python3.11-doc), split by file"},
    "mix": {"build": _build_mix, "images": {"fashion-mnist": 2 / 3, "digits": 1 / 3},
            "train_size": 3000, "test_size": 500, "text_share": 0.12,
            "help": "the embedded default: Fashion-MNIST + digits images, several tasks each, "
                    "plus a share of python-docs text"},
}
OPTIONS = ("train_size", "test_size", "val_size", "align_size", "pretrain_size", "tasks_per_image", "text_share",
           "max_words", "fashion_mnist_dir", "python_docs_dir")


def check_source(name: str) -> None:
    if name not in SOURCES:
        raise ValueError(f"source: unknown source {name!r}; known sources: {', '.join(SOURCES)}")


def build(name: str, seed: int, options: dict) -> Built:
    check_source(name)
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    return SOURCES[name]["build"]({**options, "seed": seed})


def build_source(name: str, *, seed: int = 0, **options) -> tuple[list[Record], list[Record]]:
    """(train, test) records of a source without writing anything.

    ``options`` are :class:`PrepareConfig`'s source options (``train_size``,
    ``test_size``, ``tasks_per_image``, ``text_share``, ``max_words``,
    ``fashion_mnist_dir``, ``python_docs_dir``). Image records carry their future path
    (``images/<source>/<split>/<index>.png``) in ``image`` and ``image_path=None``: the
    files exist only after :func:`prepare` writes them. Text-only users (``ddfm.theory``)
    call ``build_source("python-docs")``.
    """
    built = build(name, seed, options)
    return built.train, built.test

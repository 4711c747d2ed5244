"""Stage 1, prepare: turn a real offline source into canonical records (paper §5, data).

    ddfm prepare mix --out data/mix                      # the embedded default (make demo)
    ddfm prepare fashion-mnist --out data/fmnist --train-size 5000 --test-size 1000
    ddfm prepare digits --out data/digits
    ddfm prepare python-docs --out data/docs --max-words 120

Sources (``SOURCES``, presets as data):

* ``fashion-mnist`` — Debian ``dataset-fashion-mnist``: the IDX files are read directly
  with numpy + gzip (the Debian checksums differ from upstream, so torchvision's loader
  rejects them); torchvision's downloader is used only when the files are absent and
  torchvision is importable. Official split: 60k train / 10k test (``t10k``).
* ``digits`` — scikit-learn ``load_digits`` (1,797 8x8 images). It has no official split,
  so a fixed stratified 80/20 split (``SPLIT_SEED``, independent of ``--seed``) is used:
  1,437 train / 360 test, the same for every run.
* ``python-docs`` — Debian ``python3.11-doc``: ``_sources/**/*.rst.txt``, text-only
  records. Each file is cleaned of reStructuredText markup and cut into passages of at
  most ``max_words`` words at paragraph boundaries; the human turn is an instruction
  naming the heading (or the documented function/class) and the file, the gpt turn is
  the passage. ``task`` is ``docs-<section>`` (library, c-api, howto, tutorial,
  reference, ...) so the records cluster by section and are evaluated by perplexity.
  Split by file (per section, the 10% of files first by a hash of their path), so test
  text is unseen.
* ``mix`` — the embedded default: Fashion-MNIST + digits images (2:1), each image used by
  several records (one per task: naming the item / reading the digit, its category or
  parity, a balanced yes/no question, a short caption), plus ``text_share`` of
  text-only python-docs records. Image splits come from the sources' own splits.
  Default size: 3,000 unique train images (13,636 records) and 500 test images.

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

Every image task has short canonical answers (exact-match evaluable); ``prepare.json``
lists each task's answer set and chance levels (majority-answer rate on the test split
of the train majority answer, and 1/#answers). Everything is deterministic in ``seed``.

Output (``OUT``): ``train.jsonl``, ``test.jsonl``, ``images/<source>/<split>/<index>.png``
(paths in the records are relative to the jsonl files) and ``prepare.json``, written last:
re-running with the same configuration on a complete output returns at once.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ddfm.config import arg, to_dict
from ddfm.data import IMAGE_TOKEN, Record, write_records
from ddfm.io import file_digest, read_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT_SEED = 0  # the digits split is fixed: the same test set whatever --seed is
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
PYTHON_DOCS_DIR = "/usr/share/doc/python3.11/html/_sources"
DEBIAN_PACKAGE = {"fashion-mnist": "dataset-fashion-mnist", "python-docs": "python3.11-doc"}


def _missing(source: str, what: str) -> FileNotFoundError:
    pkg = DEBIAN_PACKAGE[source]
    return FileNotFoundError(f"{source}: {what}; install the Debian package `{pkg}` "
                             f"(`sudo apt-get install {pkg}`)")


# --------------------------------------------------------------------------- images

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
        raise _missing("fashion-mnist", f"{absent} not found") from None
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


def _with_attributes(raw: dict, measure: Callable[[np.ndarray], np.ndarray]) -> dict[str, ImageSplit]:
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


def _sample_stratified(y: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
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


def _image_records(source: str, split: str, data: ImageSplit, idx: np.ndarray, seed: int,
                   tasks_per_image: int | None, *, only: tuple[str, ...] | None = None,
                   split_name: str | None = None) -> tuple[list[Record], dict[str, np.ndarray]]:
    """Records of the images ``idx`` of one source split (``train``/``test``): several tasks
    per image (``only`` those tasks), ids naming ``split_name`` (default: the split)."""
    spec = IMAGE_SOURCES[source]
    names = [t for t in spec["tasks"] if only is None or t in only]
    rng = np.random.default_rng([seed, _stable_int(source), _stable_int(split_name or split)])
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


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


# --------------------------------------------------------------------------- python docs

_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_ROLE = re.compile(r":[\w:.+-]+:`([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{1,2}")
_REF = re.compile(r"`([^`]+)`_{1,2}")
# directives that document one object: the passage heading becomes its signature
_OBJECTS = {"function", "method", "class", "attribute", "data", "exception", "decorator",
            "decoratormethod", "classmethod", "staticmethod", "abstractmethod",
            "coroutinefunction", "coroutinemethod", "awaitablefunction", "opcode", "cmdoption",
            "envvar", "describe", "pdbcommand", "object", "c:function", "c:member", "c:type",
            "c:var", "c:macro", "c:struct"}
# directives whose whole block is markup, not prose
_DROP = {"index", "module", "currentmodule", "moduleauthor", "sectionauthor", "toctree",
         "highlight", "testsetup", "testcleanup", "testoutput", "include", "literalinclude",
         "tabularcolumns", "raw", "image", "figure", "contents", "only", "program",
         "audit-event", "productionlist", "list-table", "table", "miscnews", "limited-api-list",
         "csv-table", "sidebar"}
# directives kept as a lead-in phrase (arguments: the version)
_LABELS = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
           "caution": "Caution:", "versionadded": "New in version {v}.",
           "versionchanged": "Changed in version {v}:", "deprecated": "Deprecated since version {v}:",
           "deprecated-removed": "Deprecated since version {v}:", "availability": "Availability: {a}.",
           "impl-detail": "CPython implementation detail:", "rubric": "{a}"}


def _clean_inline(text: str) -> str:
    """reST inline markup -> plain text (roles show their display text, as Sphinx does)."""
    def role(m: re.Match) -> str:
        body = m.group(1)
        if "<" in body and body.endswith(">"):
            return body[: body.index("<")].strip()
        body = body.lstrip("!")
        return body[1:].rsplit(".", 1)[-1] if body.startswith("~") else body
    text = _ROLE.sub(role, text)
    text = _LINK.sub(r"\1", text)
    text = text.replace("``", "`")
    text = _REF.sub(r"\1", text)
    text = re.sub(r"(\S)::$", r"\1:", text)
    return re.sub(r"\s+", " ", text).strip()


def _skip_block(lines: list[str], i: int, indent: int) -> int:
    """Index of the first line after the indented block that starts after line ``i``."""
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
        j += 1
    return j


def _skip_options(lines: list[str], i: int, signatures: bool = False) -> int:
    """Skip a directive's ``:option: value`` lines (and, for objects, extra signature lines)."""
    while i < len(lines) and lines[i].strip() and (signatures or lines[i].strip().startswith(":")):
        i += 1
    return i


def parse_rst(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A ``.rst.txt`` file -> (title, [(heading, paragraphs)]) of plain-text prose.

    Headings are section titles or documented objects' signatures (``abspath(path)``);
    index entries, targets, comments and other markup blocks are dropped; notes and
    version changes are kept with a lead-in ("Changed in version 3.8: ...").
    """
    lines = text.splitlines()
    entries: list[tuple[str, list[str]]] = []
    section = heading = title = ""
    paragraphs: list[str] = []
    para: list[str] = []
    pending: list[str] = []  # a note's lead-in, waiting for its first paragraph
    obj_indent = -1

    def flush_para() -> None:
        if para:
            sep = "\n" if para[0].startswith(">>>") else " "
            paragraphs.append(_clean_inline(sep.join(para)) if sep == " " else "\n".join(para))
            para.clear()

    def start(new_heading: str) -> None:
        nonlocal heading, paragraphs
        flush_para()
        if paragraphs:
            entries.append((heading, paragraphs))
        heading, paragraphs = new_heading, []

    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        indent = len(line) - len(line.lstrip())
        if stripped and obj_indent >= 0 and indent <= obj_indent and not _DIRECTIVE.match(line):
            obj_indent = -1
            start(section)
        if _UNDERLINE.match(line):  # overline or transition
            flush_para()
            i += 1
            continue
        if stripped and indent == 0 and i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) \
                and len(lines[i + 1].strip()) >= len(stripped) - 1:
            section = _clean_inline(stripped)
            title = title or section
            obj_indent = -1
            start(section)
            i += 2
            continue
        m = _DIRECTIVE.match(line)
        if m:
            name, argument = m.group(2), _clean_inline(m.group(3))
            if name in _OBJECTS:
                obj_indent = indent
                start(argument.rstrip(" \\") or section)
                i = _skip_options(lines, i + 1, signatures=True)
            elif name in _DROP:
                flush_para()
                i = _skip_block(lines, i, indent)
            elif name in _LABELS:
                flush_para()
                lead = _LABELS[name].format(v=(argument.split() or [""])[0], a=argument).strip().replace("..", ".")
                i = _skip_options(lines, i + 1)
                if lead:  # joins the first paragraph of the directive's content
                    pending.append(lead)
            else:  # code-block, doctest, topic, ...: keep the content
                flush_para()
                i = _skip_options(lines, i + 1)
            continue
        if _COMMENT.match(line):  # comment or hyperlink target
            flush_para()
            i = _skip_block(lines, i, indent)
            continue
        if not stripped:
            flush_para()
        elif stripped != "::":
            if pending and not para:  # a doctest keeps its lines: its lead-in stands alone
                (paragraphs if stripped.startswith(">>>") else para).append(" ".join(pending))
                pending.clear()
            para.append(stripped)
        i += 1
    start("")
    title = title.replace(" --- ", " — ").split(" — ")[0].strip()
    return title, [(h, p) for h, p in entries if p]


def _chunks(paragraphs: list[str], max_words: int) -> list[str]:
    """Pack paragraphs into passages of at most ``max_words`` words (long ones are cut)."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for p in paragraphs:
        words = p.split()
        pieces = [p] if len(words) <= max_words else \
            [" ".join(words[j:j + max_words]) for j in range(0, len(words), max_words)]
        for piece in pieces:
            m = len(piece.split())
            if cur and n + m > max_words:
                out.append("\n".join(cur))
                cur, n = [], 0
            cur.append(piece)
            n += m
    if cur:
        out.append("\n".join(cur))
    return out


@functools.lru_cache(maxsize=1024)
def _parse_file(path: str, mtime_ns: int, size: int) -> tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    """:func:`parse_rst` of one file, cached per process (keyed by mtime and size):
    the mix, the tests and ``ddfm.theory`` all read the same 497 files."""
    title, entries = parse_rst(Path(path).read_text(encoding="utf-8", errors="replace"))
    return title, tuple((h, tuple(p)) for h, p in entries)


def docs_section(rel: str) -> str:
    """The section of a docs file: its top folder (library, c-api, ...) or ``general``."""
    parts = Path(rel).parts
    return parts[0] if len(parts) > 1 else "general"


def docs_test_files(rels: list[str], fraction: float = 0.1) -> set[str]:
    """Fixed split by file, stratified by section: in each section the ``fraction`` of
    files (at least one when it has 5 or more) first in the order of a hash of their path."""
    by_section: dict[str, list[str]] = {}
    for rel in rels:
        by_section.setdefault(docs_section(rel), []).append(rel)
    test: set[str] = set()
    for files in by_section.values():
        n = int(round(fraction * len(files))) or (1 if len(files) >= 5 else 0)
        test.update(sorted(files, key=lambda r: _stable_int("python-docs:" + r))[:n])
    return test


def _docs_records(root: str, max_words: int, min_words: int = 8) -> dict[str, list[Record]]:
    root_p = Path(root)
    files = sorted(root_p.rglob("*.rst.txt")) if root_p.is_dir() else []
    if not files:
        raise _missing("python-docs", f"no *.rst.txt files under {root}")
    out: dict[str, list[Record]] = {"train": [], "test": []}
    test_files = docs_test_files([f.relative_to(root_p).as_posix() for f in files])
    for f in files:
        rel = f.relative_to(root_p).as_posix()
        doc = rel[: -len(".rst.txt")]
        st = f.stat()
        title, entries = _parse_file(str(f), st.st_mtime_ns, st.st_size)
        title = title or doc
        section = docs_section(rel)
        n = 0
        for heading, paragraphs in entries:
            for part, passage in enumerate(_chunks(list(paragraphs), max_words)):
                if len(passage.split()) < min_words:
                    continue
                subject = heading if heading and heading != title else title
                prompt = (f"Explain {subject} ({title})." if part == 0
                          else f"Continue explaining {subject} ({title}), part {part + 1}.")
                out["test" if rel in test_files else "train"].append(Record(
                    id=f"docs-{doc}-{n:04d}", image=None,
                    conversations=[{"from": "human", "value": prompt}, {"from": "gpt", "value": passage}],
                    extra={"source": "python-docs", "task": f"docs-{section}", "section": section, "doc": rel}))
                n += 1
    return out


# --------------------------------------------------------------------------- sources

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
    data = _with_attributes(spec["load"](o.get(option) or default_root), spec["measure"])
    rng = np.random.default_rng([o["seed"], _stable_int(source)])
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
            idx, where = _sample_stratified(data["test"].y, _capped(source, split, n, len(data["test"].y)), rng), "test"
        else:
            idx = pool[_sample_stratified(data["train"].y[pool], _capped(source, split, n, len(pool)), rng)]
            where = "train"
            if split == "align" and n is not None and len(idx) < n:  # the source ran out: reuse train images
                used = taken["train"]  # never val images: those stay held out
                more = used[_sample_stratified(data["train"].y[used], min(n - len(idx), len(used)), rng)]
                log.warning("%s: reusing %d train images for the align split (only %d unused remain)",
                            source, len(more), len(idx))
                idx = np.sort(np.concatenate([idx, more]))
            pool = np.setdiff1d(pool, idx)
            taken[split] = idx
        recs, imgs = _image_records(source, where, data[where], idx, o["seed"], o.get("tasks_per_image"),
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
    recs = _docs_records(o.get("python_docs_dir") or PYTHON_DOCS_DIR, o.get("max_words") or 120)
    rng = np.random.default_rng([o["seed"], _stable_int("python-docs")])
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
        docs = _docs_records(o.get("python_docs_dir") or PYTHON_DOCS_DIR, o.get("max_words") or 120)
    if share > 0:
        rng = np.random.default_rng([o["seed"], _stable_int("mix-text")])
        for split in ("train", "test"):
            recs = getattr(out, split)
            n = min(int(round(share / (1 - share) * len(recs))), len(docs[split]))
            keep = np.sort(rng.choice(len(docs[split]), size=n, replace=False))
            recs.extend(docs[split][i] for i in keep)
    if o.get("pretrain_size"):  # language pretraining text: python-docs passages of the train files
        rng = np.random.default_rng([o["seed"], _stable_int("mix-pretrain")])
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


def _check_source(name: str) -> None:
    if name not in SOURCES:
        raise ValueError(f"source: unknown source {name!r}; known sources: {', '.join(SOURCES)}")


def _build(name: str, seed: int, options: dict) -> Built:
    _check_source(name)
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
    built = _build(name, seed, options)
    return built.train, built.test


# --------------------------------------------------------------------------- the stage

@dataclass
class PrepareConfig:
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
        _check_source(self.source)
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


def _progress(items: list, desc: str) -> Iterable:
    """tqdm on a terminal, a few plain log lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(items, desc=desc, unit="img")
        return
    step = max(1, len(items) // 4)
    for n, item in enumerate(items, start=1):
        yield item
        if n % step == 0 or n == len(items):
            log.info("%s: %d/%d", desc, n, len(items))


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_images(out: Path, images: dict[str, np.ndarray]) -> None:
    """Each PNG via a temporary file + rename (never half-written); one ``os.sync`` at the
    end instead of an fsync per file (3,500 fsyncs took 20 s here)."""
    for rel in _progress(sorted(images), "prepare: writing images"):
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
    built = _build(cfg.source, cfg.seed, cfg.options())
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").unlink(missing_ok=True)  # the output is incomplete until rewritten
    _write_images(out, built.images)
    root = out.resolve()
    splits = built.splits()
    for split, recs in splits.items():
        for r in recs:
            r.image_path = root / r.image if r.image else None
        write_records(out / f"{split}.jsonl", recs)
    for stale in ("val", "align", "pretrain"):  # an earlier run's optional split that this one has not
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


__all__ = ["PrepareConfig", "SOURCES", "build_source", "prepare", "parse_rst", "task_stats"]

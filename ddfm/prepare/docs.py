"""The ``python-docs`` source: text-only records of Debian ``python3.11-doc``
(``_sources/**/*.rst.txt``).

Each file is cleaned of reStructuredText markup (:mod:`ddfm.prepare.rst`) and cut into
passages of at most ``max_words`` words at paragraph boundaries; the human turn is an
instruction naming the heading (or the documented function/class) and the file, the gpt
turn is the passage. ``task`` is ``docs-<section>`` (library, c-api, howto, tutorial,
reference, ...) so the records cluster by section and are evaluated by perplexity.
Split by file (per section, the 10% of files first by a hash of their path), so test
text is unseen.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ddfm.data import Record
from ddfm.prepare.offline import missing, stable_int
from ddfm.prepare.rst import chunks, parse_rst


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
        test.update(sorted(files, key=lambda r: stable_int("python-docs:" + r))[:n])
    return test


def docs_records(root: str, max_words: int, min_words: int = 8) -> dict[str, list[Record]]:
    """``{"train": [...], "test": [...]}``: every passage of every ``*.rst.txt`` under ``root``
    of ``min_words`` to ``max_words`` words, split by file (:func:`docs_test_files`)."""
    root_p = Path(root)
    files = sorted(root_p.rglob("*.rst.txt")) if root_p.is_dir() else []
    if not files:
        raise missing("python-docs", f"no *.rst.txt files under {root}")
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
            for part, passage in enumerate(chunks(list(paragraphs), max_words)):
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


"""The canonical sample format: LLaVA-style conversation records.

One record per line in JSON Lines (``.jsonl``), or LLaVA's own JSON list files
(``.json`` holding ``[{...}, ...]``) loaded as they are::

    {"id": "fmnist-train-00042-name",
     "image": "images/fmnist/train/00042.png",      # relative to the file, or null
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A sneaker."}],
     "source": "fashion-mnist", "task": "name"}      # optional extra fields, kept

Rules checked for every record (each violation names file, line and field):

* ``id``: a non-empty string (integers are accepted and turned into strings), unique
  within the file;
* ``image``: a string path or null/absent; an absolute path is used as is, a relative
  one is resolved against the file's directory;
* ``conversations``: a non-empty list of ``{"from", "value"}`` turns, ``from`` one of
  ``human``/``gpt``/``system``, ``value`` a string; at least one ``gpt`` turn;
* the ``<image>`` placeholder appears at most once, and only when ``image`` is set (a
  record with an image and no placeholder gets one prepended to its first human turn,
  which is what LLaVA's own preprocessing does).

Images that fail. A record whose image file is missing or cannot be decoded is *not* an
error of the file, so one lost file does not stop a run over a million records; and it
is never used silently either. One rule in every stage: such a record is left out and
reported as a :class:`FailedImage` (data file, line, record id, image, reason such as
``image file not found: …`` or ``unreadable image …: cannot identify image file …``);
every record sharing the failed image is left out with it. :func:`load_records` leaves
out missing files (:attr:`LoadResult.missing_images`); :func:`check_images` also decodes
each unique image once; ``embed`` lists failed images in ``embed.json``, ``partition``
keeps their records out of every shard and lists them in its report, ``train`` and
``eval`` skip them and list them in ``ddfm.json`` / ``eval.json``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ddfm.io import write_jsonl

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt", "system")
MAX_REPORTED_ERRORS = 20
# a reference answer of at most this many words is a short (VQA-style) answer: the demo's
# longest are 4-word captions, a Python-docs passage has at least 8 (ddfm.prepare's min_words)
SHORT_ANSWER_WORDS = 5
MAX_LOGGED_FAILED_IMAGES = 5  # a log line names this many; the stage's output file lists all


class DataError(ValueError):
    """One or more records of a data file are invalid; the message lists them."""

    def __init__(self, path: Path, errors: list["RecordError"]):
        self.path, self.errors = path, errors
        shown = "\n".join(f"  {e}" for e in errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        super().__init__(f"{path}: {len(errors)} invalid record(s):\n{shown}{more}")


@dataclass(frozen=True)
class RecordError:
    """Where a record is wrong: file, 1-based line (or list index for JSON lists), field."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: field '{self.field}': {self.message}"


@dataclass
class Record:
    """One training or test sample.

    ``image`` is the path as written in the file; ``image_path`` is it resolved
    against the file's directory (``None`` for text-only records). ``extra`` keeps
    any other keys (``source``, ``task``, ``label``, ...) so a round trip loses nothing.
    """

    id: str
    conversations: list[dict[str, str]]
    image: str | None = None
    image_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    file: str | None = field(default=None, compare=False)  # the data file it was read from
    line: int | None = field(default=None, compare=False)  # 1-based line (JSONL) or list index (JSON)

    @property
    def source(self) -> str:
        """``extra["source"]``; when absent (or null), the name of the image's folder (``fabric`` for
        ``fabric/0.png``), or ``"text"`` for a text-only record."""
        if self.extra.get("source") not in (None, ""):
            return str(self.extra["source"])
        if self.image is None:
            return "text"
        return (self.image_path or Path(self.image)).parent.name or "images"

    @property
    def task(self) -> str:
        """``extra["task"]``; when absent (or null), ``"qa"`` if the reference answer is short (at most
        :data:`SHORT_ANSWER_WORDS` words, the records ``ddfm eval`` scores by accuracy by
        default), else ``"long-answer"``."""
        if self.extra.get("task") not in (None, ""):
            return str(self.extra["task"])
        return "qa" if len(self.answer().split()) <= SHORT_ANSWER_WORDS else "long-answer"

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def prompt(self) -> str:
        """The first human turn (with its ``<image>`` placeholder, if any)."""
        return next(t["value"] for t in self.conversations if t["from"] == "human")

    def answer(self) -> str:
        """The first assistant (``gpt``) turn: the reference answer."""
        return next(t["value"] for t in self.conversations if t["from"] == "gpt")

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The record as written to a file in directory ``relative_to``.

        The image path is rewritten relative to that directory so a shard written
        elsewhere still points at the same image file.
        """
        image = self.image
        if self.image_path is not None and relative_to is not None:
            image = os.path.relpath(self.image_path, relative_to)
        return {"id": self.id, "image": image, "conversations": self.conversations, **self.extra}


@dataclass(frozen=True)
class FailedImage:
    """A record left out because its image is missing or unreadable, and why."""

    file: str  # the data file
    line: int  # 1-based line (JSONL) or list index (JSON list)
    id: str
    image: str  # the image path, resolved against the data file's directory
    reason: str  # "image file not found: ..." or "unreadable image ...: ..."

    @classmethod
    def of(cls, record: Record, reason: str) -> "FailedImage":
        # a Record built in Python has no file: "<in memory>", line 0
        return cls(record.file or "<in memory>", record.line or 0, record.id, str(record.image_path), reason)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "id": self.id, "image": self.image, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: record {self.id!r}: {self.reason}"


def log_failed_images(what: str, failed: list[FailedImage], where: str) -> None:
    """One warning line: how many records ``what`` left out, the first few, and where all are listed."""
    if not failed:
        return
    first = "; ".join(str(f) for f in failed[:MAX_LOGGED_FAILED_IMAGES])
    more = f" and {len(failed) - MAX_LOGGED_FAILED_IMAGES} more" if len(failed) > MAX_LOGGED_FAILED_IMAGES else ""
    log.warning("%s: %d record(s) left out because their image failed: %s%s (all listed in %s)",
                what, len(failed), first, more, where)


@dataclass
class LoadResult:
    """Records that passed validation, plus what was left out and why."""

    path: Path
    records: list[Record]
    errors: list[RecordError] = field(default_factory=list)
    missing_images: list[FailedImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def _iter_raw(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """Yield ``(line_or_index, object, parse_error)`` for JSONL or a JSON list file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # LLaVA's own format: one JSON list
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            yield err.lineno, None, f"invalid JSON: {err.msg} (column {err.colno})"
            return
        for i, item in enumerate(items, start=1):
            yield i, item, None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), None
        except json.JSONDecodeError as err:
            yield lineno, None, f"invalid JSON: {err.msg} (column {err.colno})"


def _validate(raw: Any, path: Path, line: int) -> tuple[Record | None, list[RecordError]]:
    def err(fld: str, msg: str) -> RecordError:
        return RecordError(str(path), line, fld, msg)

    if not isinstance(raw, dict):
        return None, [err("<record>", f"expected a JSON object, got {type(raw).__name__}")]
    errors: list[RecordError] = []
    rid = raw.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        errors.append(err("id", "missing or not a non-empty string"))
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        errors.append(err("image", "must be a non-empty string path or null"))
        image = None
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        errors.append(err("conversations", "missing or not a non-empty list"))
        return None, errors
    turns: list[dict[str, str]] = []
    n_placeholders = 0
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            errors.append(err(f"conversations[{i}]", "expected an object with 'from' and 'value'"))
            continue
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            errors.append(err(f"conversations[{i}].from", f"must be one of {', '.join(ROLES)}, got {role!r}"))
        if not isinstance(value, str):
            errors.append(err(f"conversations[{i}].value", "missing or not a string"))
            continue
        n_placeholders += value.count(IMAGE_TOKEN)
        turns.append({"from": role, "value": value})
    if not errors and not any(t["from"] == "gpt" for t in turns):
        errors.append(err("conversations", "has no 'gpt' (assistant) turn to learn from"))
    if not errors and not any(t["from"] == "human" for t in turns):
        errors.append(err("conversations", "has no 'human' turn"))
    if n_placeholders > 1:
        errors.append(err("conversations", f"'{IMAGE_TOKEN}' appears {n_placeholders} times; at most once"))
    if image is None and n_placeholders:
        errors.append(err("conversations", f"'{IMAGE_TOKEN}' placeholder in a record without an image"))
    if errors:
        return None, errors
    if image is not None and n_placeholders == 0:  # LLaVA prepends the placeholder
        first = next(i for i, t in enumerate(turns) if t["from"] == "human")
        turns[first] = {"from": "human", "value": f"{IMAGE_TOKEN}\n{turns[first]['value']}"}
    extra = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
    image_path = None
    if image is not None:
        image_path = Path(image) if os.path.isabs(image) else (path.parent / image)
    return Record(id=rid, conversations=turns, image=image, image_path=image_path, extra=extra,
                  file=str(path), line=line), []


def load_records(path: str | os.PathLike, *, strict: bool = True, check_images: bool = True) -> LoadResult:
    """Load and validate every record of a JSONL or JSON-list file.

    Parameters
    ----------
    path : the data file.
    strict : if True (default) any invalid record raises :class:`DataError` listing
        every bad record with its line and field; if False they are skipped, logged
        and returned in ``LoadResult.errors``.
    check_images : check that each image file exists; records whose image is missing
        are left out, logged and listed in ``LoadResult.missing_images`` (never fatal).
        Whether the bytes decode is :func:`check_images`'s job (it reads every image).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[Record] = []
    errors: list[RecordError] = []
    missing: list[FailedImage] = []
    seen: dict[str, int] = {}
    for line, raw, parse_error in _iter_raw(path):
        if parse_error is not None:
            errors.append(RecordError(str(path), line, "<line>", parse_error))
            continue
        record, errs = _validate(raw, path, line)
        if errs:
            errors.extend(errs)
            continue
        assert record is not None
        if record.id in seen:
            errors.append(RecordError(str(path), line, "id", f"duplicate id {record.id!r} (first on line {seen[record.id]})"))
            continue
        seen[record.id] = line
        if check_images and record.image_path is not None and not record.image_path.is_file():
            missing.append(FailedImage.of(record, f"image file not found: {record.image_path}"))
            continue
        records.append(record)
    if errors and strict:
        raise DataError(path, errors)
    for e in errors:
        log.warning("skipping invalid record: %s", e)
    if missing:
        log.warning("%s: %d record(s) left out because their image is missing (first: %s)",
                    path, len(missing), missing[0])
    return LoadResult(path=path, records=records, errors=errors, missing_images=missing)


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records as JSON Lines, atomically; image paths relative to ``path``'s directory."""
    path = Path(path).resolve()
    write_jsonl(path, [r.to_json(relative_to=path.parent) for r in records])


def open_image(path: str | os.PathLike):
    """Decode an image file to an RGB ``PIL.Image``.

    Raises ``ValueError`` naming the file: ``image file not found: PATH`` or
    ``unreadable image PATH: REASON`` (not an image, truncated, a decompression bomb, ...).
    """
    from PIL import Image

    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            load_strict(img)
            return img.convert("RGB")
    # OSError covers UnidentifiedImageError and truncated files; some decoders raise
    # SyntaxError, ValueError or EOFError on malformed headers, and PIL refuses images over
    # 2 x MAX_IMAGE_PIXELS with DecompressionBombError (not an OSError)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"unreadable image {path}: {err}") from None


_STRICT = threading.Lock()  # guards the two below
_strict_decoders = 0  # strict decodes in progress
_saved_truncated = False  # the process's LOAD_TRUNCATED_IMAGES while they run


def load_strict(img) -> None:
    """Decode ``img``'s pixels, raising ``OSError`` on a truncated file whatever the process set.

    Pillow pads a truncated image with grey, silently, once anything in the process sets
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` (importing ``lmms_eval`` does). The flag is
    a module global read during ``load()``: it is held False while any strict decode runs and
    put back when the last one ends, so concurrent decodes (the server's threads) still run
    in parallel (Pillow releases the GIL while decoding).
    """
    from PIL import ImageFile

    global _strict_decoders, _saved_truncated
    with _STRICT:
        if _strict_decoders == 0:
            _saved_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        _strict_decoders += 1
    try:
        img.load()
    finally:
        with _STRICT:
            _strict_decoders -= 1
            if _strict_decoders == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated


def check_images(records: Iterable[Record]) -> tuple[list[Record], list[FailedImage]]:
    """Split records into those whose image decodes (or that have none) and those left out.

    Each unique image is decoded once (:func:`open_image`); every record that shares a
    failed image is left out with the same reason. Order is kept in both lists.
    """
    kept: list[Record] = []
    failed: list[FailedImage] = []
    reason_of: dict[Path, str | None] = {}  # by resolved path: "a.png" and "./a.png" are one image
    for r in records:
        if r.image_path is None:
            kept.append(r)
            continue
        key = r.image_path.resolve()
        if key not in reason_of:
            try:
                open_image(r.image_path)
                reason_of[key] = None
            except ValueError as err:
                reason_of[key] = str(err)
        reason = reason_of[key]
        if reason is None:
            kept.append(r)
        else:
            failed.append(FailedImage.of(r, reason))
    return kept, failed

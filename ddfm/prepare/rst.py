"""reStructuredText of the Python docs -> plain-text passages.

:func:`parse_rst` reads one ``.rst.txt`` file into (heading, paragraphs) entries; headings
are section titles or the signatures of documented objects, markup blocks are dropped and
inline roles show their display text, as Sphinx renders them. :func:`chunks` packs an
entry's paragraphs into passages of at most ``max_words`` words.
"""

from __future__ import annotations

import re

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


class _Reader:
    """One pass over a file's lines: the finished (heading, paragraphs) entries, the
    paragraph being read (its lines) and the heading it belongs to."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.entries: list[tuple[str, list[str]]] = []
        self.title = self.section = self.heading = ""
        self.paragraphs: list[str] = []  # finished paragraphs under ``heading``
        self.para: list[str] = []  # lines of the paragraph being read
        self.pending: list[str] = []  # a note's lead-in, waiting for its first paragraph
        self.obj_indent = -1  # indent of the documented object whose block is open, else -1

    def read(self) -> None:
        i = 0
        while i < len(self.lines):
            i = self._step(i)
        self._start("")

    def _step(self, i: int) -> int:
        """Read line ``i`` (and the block it opens, if any); return the next line to read."""
        line, stripped = self.lines[i], self.lines[i].strip()
        indent = len(line) - len(line.lstrip())
        if stripped and self.obj_indent >= 0 and indent <= self.obj_indent and not _DIRECTIVE.match(line):
            self.obj_indent = -1  # the object's block ended: its section goes on
            self._start(self.section)
        if _UNDERLINE.match(line):  # overline or transition
            self._flush_para()
            return i + 1
        if stripped and indent == 0 and i + 1 < len(self.lines) and _UNDERLINE.match(self.lines[i + 1]) \
                and len(self.lines[i + 1].strip()) >= len(stripped) - 1:  # a section title, underlined
            self.section = _clean_inline(stripped)
            self.title = self.title or self.section
            self.obj_indent = -1
            self._start(self.section)
            return i + 2
        m = _DIRECTIVE.match(line)
        if m:
            return self._directive(i, indent, m.group(2), _clean_inline(m.group(3)))
        if _COMMENT.match(line):  # comment or hyperlink target
            self._flush_para()
            return _skip_block(self.lines, i, indent)
        self._text(stripped)
        return i + 1

    def _directive(self, i: int, indent: int, name: str, argument: str) -> int:
        """The directive ``.. name:: argument`` on line ``i``; return the next line to read."""
        if name in _OBJECTS:
            self.obj_indent = indent
            self._start(argument.rstrip(" \\") or self.section)
            return _skip_options(self.lines, i + 1, signatures=True)
        self._flush_para()
        if name in _DROP:
            return _skip_block(self.lines, i, indent)
        if name in _LABELS:
            lead = _LABELS[name].format(v=(argument.split() or [""])[0], a=argument).strip().replace("..", ".")
            if lead:  # joins the first paragraph of the directive's content
                self.pending.append(lead)
        # labels, and code-block, doctest, topic, ...: the content is read as text
        return _skip_options(self.lines, i + 1)

    def _text(self, stripped: str) -> None:
        """A line of prose or of a doctest; a blank line ends the paragraph."""
        if not stripped:
            self._flush_para()
        elif stripped != "::":
            if self.pending and not self.para:  # a doctest keeps its lines: its lead-in stands alone
                (self.paragraphs if stripped.startswith(">>>") else self.para).append(" ".join(self.pending))
                self.pending.clear()
            self.para.append(stripped)

    def _flush_para(self) -> None:
        """End the paragraph being read: a doctest keeps its lines, prose is joined and cleaned."""
        if self.para:
            self.paragraphs.append("\n".join(self.para) if self.para[0].startswith(">>>")
                                   else _clean_inline(" ".join(self.para)))
            self.para.clear()

    def _start(self, heading: str) -> None:
        """End the current entry (kept if it has paragraphs) and open one under ``heading``."""
        self._flush_para()
        if self.paragraphs:
            self.entries.append((self.heading, self.paragraphs))
        self.heading, self.paragraphs = heading, []


def parse_rst(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A ``.rst.txt`` file -> (title, [(heading, paragraphs)]) of plain-text prose.

    Headings are section titles or documented objects' signatures (``abspath(path)``);
    index entries, targets, comments and other markup blocks are dropped; notes and
    version changes are kept with a lead-in ("Changed in version 3.8: ...").
    """
    reader = _Reader(text.splitlines())
    reader.read()
    title = reader.title.replace(" --- ", " — ").split(" — ")[0].strip()
    return title, [(h, p) for h, p in reader.entries if p]


def chunks(paragraphs: list[str], max_words: int) -> list[str]:
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


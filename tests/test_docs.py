"""The docs stay true to the code: README.md and docs/*.md are read as text, nothing runs.

* every relative link points to an existing file, and a ``#anchor`` to a heading of it;
* every ``ddfm ...`` command line of a code block parses with the CLI's own parser
  (``ddfm.cli.build_parser(argv).parse_args(argv)``: a renamed or removed flag fails here
  with the file and line of the command; a line with a placeholder, ``...`` or ``<name>``,
  is skipped only when it does not parse), and a command named in an inline code span
  (``ddfm train --fsdp``) names a real command and only options it has;
* every code path named in backquotes (``ddfm/...``, ``tests/...``, ``benchmarks/...``)
  exists, a ``tests/test_x.py::test_name`` names a test of that file, and a
  "`Name` in `ddfm/path`" names an identifier that occurs in that file or package.

A module path and its package are one name (``ddfm/kmeans/`` is satisfied by
``ddfm/kmeans.py`` and the other way round), so a module turned into a package keeps its
docs valid.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_PATH = re.compile(r"^(?:ddfm|tests|benchmarks|docs)/[\w./-]*$")
NAME = r"`[A-Za-z_][\w.]*(?:\(\))?`"
NAME_IN_PATH = re.compile(rf"((?:{NAME},\s*)*{NAME}) in `((?:ddfm|tests|benchmarks)/[\w./-]*)`")
SHELL_STOP = {"&", "&&", "|", "||", ";", ">", ">>", "2>&1"}
PLACEHOLDER = re.compile(r"\.\.\.|…|<[\w -]+>")


@dataclass(frozen=True)
class Span:
    """A piece of a doc: its text, the file and 1-based line where it starts, in code or not."""

    text: str
    file: Path
    line: int
    code_block: bool

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def spans(path: Path) -> list[Span]:
    """Code blocks' logical lines (``\\`` continuations joined) and prose lines of ``path``."""
    out: list[Span] = []
    in_block, pending, start = False, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            out.append(Span(line, path, n, False))
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(Span(pending + line, path, start, True))
        pending = ""
    return out


def prose(path: Path) -> list[Span]:
    return [s for s in spans(path) if not s.code_block]


def ddfm_argv(command: str) -> list[str] | None:
    """The arguments after ``ddfm`` in one shell line, or None when it runs no ``ddfm``.

    Accepts ``ddfm ...``, ``$ ddfm ...``, ``.venv/bin/ddfm ...``, ``VAR=1 ddfm ...`` and
    ``torchrun ... -m ddfm ...``; stops at a comment, ``&``, a pipe or a redirection.
    """
    line = command.strip()
    line = line[2:] if line.startswith("$ ") else line
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        tokens.pop(0)
    if not tokens:
        return None
    if tokens[0] == "ddfm" or tokens[0].endswith("/bin/ddfm"):
        argv = tokens[1:]
    elif tokens[0] in ("torchrun", "python", "python3") or tokens[0].endswith("/bin/python"):
        at = next((i for i in range(len(tokens) - 1) if tokens[i] == "-m" and tokens[i + 1] == "ddfm"), None)
        if at is None:
            return None
        argv = tokens[at + 2:]
    else:
        return None
    stop = next((i for i, t in enumerate(argv) if t in SHELL_STOP), len(argv))
    return argv[:stop] or None


def commands() -> list[tuple[Span, list[str]]]:
    """Every ``ddfm`` command of the docs: code-block lines and inline code spans."""
    found = []
    for path in DOCS:
        for span in spans(path):
            pieces = [span.text] if span.code_block else INLINE_CODE.findall(span.text)
            for piece in pieces:
                argv = ddfm_argv(piece)
                if argv is not None:
                    found.append((Span(piece.strip(), span.file, span.line, span.code_block), argv))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for span in prose(path):
        match = HEADING.match(span.text)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
    return {base if i == 0 else f"{base}-{i}" for base, n in seen.items() for i in range(n)}


def links() -> list[tuple[Span, str]]:
    found = []
    for path in DOCS:
        for span in prose(path):
            for target in LINK.findall(INLINE_CODE.sub("", span.text)):
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                    found.append((span, target))
    return found


def module_variants(rel: str) -> list[Path]:
    """``rel`` and the module/package it may have become: ddfm/x.py <-> ddfm/x/."""
    rel = rel.rstrip("/")
    variants = [ROOT / rel]
    if rel.endswith(".py"):
        variants.append(ROOT / rel[:-3])
    else:
        variants.append(ROOT / f"{rel}.py")
    return variants


def existing(rel: str) -> Path | None:
    return next((p for p in module_variants(rel) if p.exists()), None)


def code_paths() -> list[tuple[Span, str]]:
    found = []
    for path in DOCS:
        for span in spans(path):
            if span.code_block:
                continue
            for code in INLINE_CODE.findall(span.text):
                rel = code.split("::")[0]
                if CODE_PATH.match(rel) and "*" not in rel:
                    found.append((span, code))
    return found


def names_in_paths() -> list[tuple[Span, str, str]]:
    """Each name of "`A`, `B` in `ddfm/x.py`" with its path."""
    return [(span, name.strip("`()"), rel) for path in DOCS for span in prose(path)
            for names, rel in NAME_IN_PATH.findall(span.text) for name in re.findall(NAME, names)]


def source_text(path: Path) -> str:
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def _ids(items) -> list[str]:
    return [f"{item[0].where()}:{item[1] if isinstance(item[1], str) else ' '.join(item[1])[:40]}" for item in items]


LINKS = links()
COMMANDS = commands()
CODE_PATHS = code_paths()
NAMES = names_in_paths()


def test_the_docs_are_found_and_hold_links_commands_and_code_paths():
    # an extractor that silently finds nothing would pass every test below
    assert (ROOT / "README.md") in DOCS and len(DOCS) >= 5
    assert len(LINKS) >= 10 and len(COMMANDS) >= 20 and len(CODE_PATHS) >= 30 and len(NAMES) >= 10


@pytest.mark.parametrize(("span", "target"), LINKS, ids=_ids(LINKS))
def test_relative_link_points_to_an_existing_file_and_heading(span, target):
    file_part, _, anchor = target.partition("#")
    dest = (span.file.parent / file_part).resolve() if file_part else span.file
    assert dest.exists(), f"{span.where()}: link to {target}: no file {dest}"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{span.where()}: link to {target}: no heading #{anchor} in {dest.name}"


def parse_error(argv: list[str]) -> str | None:
    """The CLI parser's error for ``ddfm ARGV``, or None when it parses (``--help`` included)."""
    from ddfm.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser(argv).parse_args(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return (err.getvalue().strip().splitlines()[-1:] or [f"exit {exit_.code}"])[0]
    return None


def unknown_options(argv: list[str]) -> str | None:
    """For a command named in prose (required arguments may be left out): an unknown command
    or an option that command does not have, else None."""
    from ddfm.cli import COMMANDS as CLI_COMMANDS
    from ddfm.cli import build_parser

    if argv[0] not in CLI_COMMANDS:
        return f"no command {argv[0]!r}"
    sub = next(a for a in build_parser(argv)._actions if a.dest == "command").choices[argv[0]]
    known = {opt for action in sub._actions for opt in action.option_strings}
    wrong = [t.split("=")[0] for t in argv[1:] if t.startswith("-") and t.split("=")[0] not in known]
    return f"ddfm {argv[0]} has no option {', '.join(wrong)}" if wrong else None


@pytest.mark.parametrize(("span", "argv"), COMMANDS, ids=_ids(COMMANDS))
def test_documented_command_parses(span, argv):
    error = parse_error(argv) if span.code_block else unknown_options(argv)
    if error and PLACEHOLDER.search(span.text):
        pytest.skip(f"{span.where()}: placeholder in `{span.text}`: {error}")
    if error:
        pytest.fail(f"{span.where()}: `{span.text}` does not parse: {error}", pytrace=False)


@pytest.mark.parametrize(("span", "code"), CODE_PATHS, ids=_ids(CODE_PATHS))
def test_named_code_path_exists(span, code):
    rel, _, test_name = code.partition("::")
    found = existing(rel)
    assert found is not None, f"{span.where()}: `{code}`: no file or module {rel}"
    if test_name:
        assert re.search(rf"^\s*(async )?def {re.escape(test_name)}\(", source_text(found), re.M), \
            f"{span.where()}: `{code}`: no test {test_name} in {rel}"


@pytest.mark.parametrize(("span", "name", "rel"), NAMES, ids=[f"{s.where()}:{n}" for s, n, _ in NAMES])
def test_named_identifier_is_in_its_code_path(span, name, rel):
    found = existing(rel)
    assert found is not None, f"{span.where()}: `{name}` in `{rel}`: no file or module {rel}"
    last = name.split(".")[-1]
    assert re.search(rf"\b{re.escape(last)}\b", source_text(found)), \
        f"{span.where()}: `{name}` is not in {rel}"

"""Helpers for the lock files in requirements/ (used by `make lock`, `make lock-check` and `make venv`).

The lock files are resolved once by `make lock` and then installed as they are. Whether they are stale
is decided from their *inputs* only, never by resolving again: a new release on the index must not
turn CI red. Every lock file carries, on its first line, the SHA-256 of the inputs it was made from:

* pyproject.toml's ``[build-system] requires``, ``[project] requires-python``, ``dependencies`` and
  ``optional-dependencies`` (parsed, so comments and formatting do not count);
* every requirements/*.in file, byte for byte.

Subcommands:

* ``hash``: print that digest.
* ``header``: print the first line that `make lock` writes on each lock file.
* ``check FILE...``: exit 1, naming the files, when a file's first line is not the current header.
* ``build-requires``: print ``[build-system] requires``, one a line (locked with the rest, so that
  ddfm's editable install builds without fetching an unpinned setuptools).
* ``uv-index``: print uv options for the package index pip is configured with (``pip config list``:
  index-url, extra-index-url, find-links); uv does not read pip's configuration itself.
* ``link-hashes FILE``: give a pinned line that has no hash the SHA-256 of its wheels in pip's local
  find-links folders (uv 0.13 writes no hash for those, e.g. the local CPU build of torch).
"""

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER_PREFIX = "# inputs-sha256: "


def inputs_digest(root: Path = ROOT) -> str:
    """SHA-256 (hex) of pyproject's dependency tables and of requirements/*.in."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    project = pyproject.get("project", {})
    tables = {
        "build-system.requires": pyproject.get("build-system", {}).get("requires", []),
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    digest = hashlib.sha256(json.dumps(tables, sort_keys=True).encode())
    for path in sorted((root / "requirements").glob("*.in")):
        digest.update(f"\0{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def header(root: Path = ROOT) -> str:
    return f"{HEADER_PREFIX}{inputs_digest(root)} (pyproject.toml and requirements/*.in; refresh: make lock)"


def stale(paths: list[str], root: Path = ROOT) -> list[str]:
    """The lock files among `paths` whose first line is not the current header."""
    want = header(root)
    out = []
    for p in paths:
        lines = Path(p).read_text().splitlines()
        if not lines or lines[0] != want:
            out.append(p)
    return out


def uv_index_options() -> list[str]:
    """pip's configured index, find-links and extra indexes as uv command-line options."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    options, seen = [], set()
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        flag = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}
        if name not in flag:
            continue
        for item in value.strip().strip("'\"").split():
            if (name, item) not in seen:
                seen.add((name, item))
                options += [flag[name], item]
    return options


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def add_link_hashes(path: Path, folders: list[Path]) -> None:
    """Rewrite `path` so that every ``name==version`` line without hashes gets its local wheels' hashes."""
    out = []
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            name, version = _norm(m[1]), m[2]
            wheels = sorted(
                w for d in folders for w in d.glob("*.whl")
                if _norm(w.name.split("-")[0]) == name and w.name.split("-")[1] == version
            )
            if not wheels:
                raise SystemExit(f"{path}: no hash for {line} and no wheel of it in {' '.join(map(str, folders))}")
            hashes = sorted({hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels})
            line = " \\\n".join([line] + [f"    --hash=sha256:{h}" for h in hashes])
        out.append(line)
    path.write_text("\n".join(out) + "\n")


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "hash":
        print(inputs_digest())
    elif cmd == "header":
        print(header())
    elif cmd == "check":
        bad = stale(argv[1:])
        if bad:
            print(f"lock files out of date with pyproject.toml / requirements/*.in: {' '.join(bad)}; run: make lock")
            return 1
        print(f"lock files match their inputs: {' '.join(argv[1:])}")
    elif cmd == "build-requires":
        print("\n".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]))
    elif cmd == "link-hashes":
        opts = uv_index_options()
        folders = [Path(v) for k, v in zip(opts, opts[1:]) if k == "--find-links" and Path(v).is_dir()]
        for p in argv[1:]:
            add_link_hashes(Path(p), folders)
    elif cmd == "uv-index":
        print(shlex.join(uv_index_options()))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

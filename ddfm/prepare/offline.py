"""Where the offline sources live, what to install when one is missing, and the stable
hash that seeds every sampling choice (so a run is deterministic in ``seed`` alone)."""

from __future__ import annotations

import hashlib

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
PYTHON_DOCS_DIR = "/usr/share/doc/python3.11/html/_sources"
DEBIAN_PACKAGE = {"fashion-mnist": "dataset-fashion-mnist", "python-docs": "python3.11-doc"}


def missing(source: str, what: str) -> FileNotFoundError:
    """The error for an absent source, naming the Debian package that provides it."""
    pkg = DEBIAN_PACKAGE[source]
    return FileNotFoundError(f"{source}: {what}; install the Debian package `{pkg}` "
                             f"(`sudo apt-get install {pkg}`)")


def stable_int(text: str) -> int:
    """A 32-bit integer of ``text`` (sha256), the same in every process, unlike ``hash()``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")

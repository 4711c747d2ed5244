"""Rank and world size of a ``torchrun`` job, read from its environment (1 process: rank 0 of 1).

Only rank 0 writes files and log lines that describe the whole job; the others compute.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (and in a plain, non-distributed process)."""
    return rank() == 0

"""Giving memory back to the system after a large request.

A large request body (up to ``--max-body-bytes``: its bytes, its text, its JSON) or a large
image (decoded in 16 MB blocks by Pillow) is allocated in the worker thread that handles
it, from that thread's glibc arena, and an arena keeps the pages it frees. After a burst of
them the server would keep what it no longer uses: ~210 MB after four 4096 x 4096 images
(``tests/test_serve_attacks.py::test_a_burst_of_maximal_images...``), ~170 MB after 40
8 MB prompts at concurrency 32. :func:`release_memory` (glibc's ``malloc_trim``) returns
it: after each such image (:mod:`~ddfm.serve.images`: then ~+10 MB are kept) and each
body of 1 MB or more (:mod:`~ddfm.serve.admission`: then 60-130 MB, not growing with more
prompts, ``bench_serve.py --soak``).
"""

from __future__ import annotations

__all__ = ["release_memory", "LARGE_BODY_BYTES"]

LARGE_BODY_BYTES = 1 << 20  # bodies from this size on are followed by a trim

_malloc_trim = None


def release_memory() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim(0)``; elsewhere nothing)."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)

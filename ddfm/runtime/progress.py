"""Progress of long work: a tqdm bar on a terminal, a plain log line every ~10 % otherwise.

    with progress(total, "embed efficientnet-lite0", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

    for path in track(paths, "prepare: writing images", unit="img"):
        ...

Logs (CI, a batch job's output file) get lines such as ``embed: 4000/8000`` rather than a
bar redrawn with carriage returns. Off rank 0 of a distributed job nothing is shown.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, Optional, TypeVar

from ddfm.runtime.distributed import is_main_process

log = logging.getLogger("ddfm")
T = TypeVar("T")


class Progress:
    """A counter towards ``total`` shown as described in the module docstring."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, every: float = 0.1,
                 enabled: Optional[bool] = None):
        self.total, self.desc, self.done = int(total), desc, int(initial)
        self.every = every
        self.next_log = self.done + self.total * every
        self.enabled = is_main_process() if enabled is None else enabled
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and self.total and (self.done >= self.next_log or self.done == self.total):
            extra = "".join(f" {k} {v}" for k, v in postfix.items())
            log.info("%s: %d/%d%s", self.desc, self.done, self.total, extra)
            self.next_log = self.done + self.total * self.every

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", **kwargs) -> Progress:
    """A :class:`Progress` (use it as a context manager, or call ``close()``)."""
    return Progress(total, desc, unit=unit, **kwargs)


def track(items: Iterable[T], desc: str, unit: str = "it", total: Optional[int] = None) -> Iterator[T]:
    """Iterate over ``items`` showing progress (``total`` defaults to ``len(items)``)."""
    n = len(items) if total is None else total  # type: ignore[arg-type]
    with Progress(n, desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)

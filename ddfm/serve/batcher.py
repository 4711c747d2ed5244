"""Continuous batching: one thread owns the ensemble's running batch (paper §4.3 at serving time).

The :class:`Batcher` thread owns one :class:`~ddfm.ensemble.DecodeBatch`. Between decode
steps it admits waiting prompts (up to ``max_batch`` rows: they are encoded, routed and
prefilled and join every expert's KV cache), scores echo prompts
(``Ensemble.score_tokens``), steps the batch one token for every row, hands finished rows
their :class:`~ddfm.ensemble.Generation` and streams text deltas. Each prompt keeps its
own :class:`~ddfm.ensemble.Sampling` (max tokens, temperature, top-p, seed, stop strings,
log-probabilities), so requests with different parameters share a batch, and a seeded
request gives the same text alone or batched. A cancelled prompt (its client left) leaves
the batch at the next token.

Events go back to the asyncio side through an :class:`Inbox` per prompt: ``("delta",
text)``, ``("logprobs", [entry, ...])`` (streams only), then ``("done", result)`` or
``("error", exception)``. Generation never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ddfm.ensemble import DecodeBatch

log = logging.getLogger(__name__)

__all__ = ["Batcher", "Generate", "Score", "Inbox", "Tagged"]

# While the batch is busy (4 rows or more), arrivals join once JOIN_AT of them wait (at most
# a quarter of the running rows, at most the room left) or after JOIN_WAIT steps: a join is a prefill forward, whose cost at small
# sizes is mostly per call (bench_serve: 1 row 11 ms, 8 rows 38 ms joining 16 running rows).
JOIN_AT, JOIN_WAIT = 4, 8


class Inbox:
    """Events from the batcher thread to one waiting coroutine (thread-safe ``put``)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, kind: str, value: Any, tag: int = 0) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (tag, kind, value))
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def tagged(self, tag: int) -> "Tagged":
        """The same inbox, its events marked ``tag`` (several prompts of one request)."""
        return Tagged(self, tag)

    async def get(self) -> tuple[int, str, Any]:
        """The next ``(tag, kind, value)``."""
        return await self.queue.get()


class Tagged:
    def __init__(self, inbox: Inbox, tag: int):
        self.inbox, self.tag = inbox, tag

    def put(self, kind: str, value: Any) -> None:
        self.inbox.put(kind, value, self.tag)


@dataclass
class Generate:
    """Generate for one prompt with its own sampling; ``stream`` sends deltas as they grow."""

    request: Any   # ddfm.ensemble.Request
    sampling: Any  # ddfm.ensemble.Sampling
    inbox: Inbox | Tagged
    stream: bool = False
    cancelled: bool = False
    handle: Optional[int] = None
    logprobs_sent: int = 0


@dataclass
class Score:
    """The mixture's log-probability of every prompt token (echo), with ``top`` alternatives."""

    request: Any
    top: int
    inbox: Inbox | Tagged
    cancelled: bool = False


@dataclass
class _Stats:
    steps: int = 0
    joined: int = 0
    max_rows: int = 0
    cancelled: int = 0
    rows: collections.Counter = field(default_factory=collections.Counter)


class Batcher:
    """The thread that owns the running batch (see the module docstring).

    ``pending()`` (optional) tells how many requests the server has in flight: when the
    batch is idle the batcher waits up to ``window_s`` for the first arrivals' companions
    only while more are on their way, so a lone request is not delayed.
    """

    def __init__(self, ensemble, *, max_batch: int = 16, window_s: float = 0.0, metrics=None,
                 pending: Callable[[], int] | None = None):
        self.ens, self.max_batch, self.window_s = ensemble, max_batch, window_s
        self.metrics, self.pending = metrics, pending
        self._queue: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Generate] = collections.deque()
        self._active: dict[int, Generate] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._waited = 0
        self.join_at, self.join_wait = JOIN_AT, JOIN_WAIT
        self.stats = _Stats()

    # -------------------------------------------------------------- the asyncio side
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="ddfm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every admitted and waiting prompt, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, work: Generate | Score) -> None:
        if self._thread is None or self._stopping:
            work.inbox.put("error", RuntimeError("the server is shutting down"))
            return
        self._queue.put(work)

    @staticmethod
    def cancel(work: Generate | Score) -> None:
        """Stop a prompt at the next token boundary (its client has gone)."""
        work.cancelled = True

    # -------------------------------------------------------------- the thread
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            self.batch = DecodeBatch(self.ens)
            while True:
                idle = not self._active and not self._waiting
                if idle and self._stopping:
                    return
                self._take(block=idle)
                t0 = time.perf_counter()
                self._admit()
                if self._active:
                    self._step()
                if self.metrics is not None:
                    self.metrics.busy.inc(time.perf_counter() - t0)

    def _take(self, block: bool) -> None:
        """Move submitted work into the waiting line; scoring runs right away."""
        new: list = []
        try:
            new.append(self._queue.get() if block else self._queue.get_nowait())
            if block and self.window_s > 0:
                self._gather(new)
            while True:
                new.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if any(w is None for w in new):
            self._stopping = True
        scores = [w for w in new if isinstance(w, Score) and not w.cancelled]
        self._waiting.extend(w for w in new if isinstance(w, Generate))
        if scores:
            self._score(scores)

    def _gather(self, new: list) -> None:
        """Idle: wait up to ``window_s`` for requests already in flight to arrive too."""
        deadline = time.monotonic() + self.window_s
        while self.pending is not None and self.pending() > len(new) and len(new) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                new.append(self._queue.get(timeout=left))
            except queue.Empty:
                return

    def _admit(self) -> None:
        room = self.max_batch - len(self._active)
        if not room or not self._waiting:
            return
        if not self.batch.can_join():  # sliding-window caches: arrivals wait until the batch is empty
            return
        # a busy batch lets a few arrivals gather first (JOIN_AT, JOIN_WAIT); an idle one admits at once
        gather = min(room, self.join_at, len(self._active) // 4)  # a small batch admits at once
        if len(self._waiting) < gather and self._waited < self.join_wait:
            self._waited += 1
            return
        self._waited = 0
        joining = []
        while self._waiting and len(joining) < room:
            work = self._waiting.popleft()
            if work.cancelled:  # its client left while it waited: nothing was generated
                self._count_cancelled(work.sampling.max_new_tokens)
            else:
                joining.append(work)
        if not joining:
            return
        try:
            self._join(joining)
        except Exception:  # noqa: BLE001 - find the prompt that fails, admit the others
            for work in joining:
                try:
                    self._join([work])
                except Exception as err:  # noqa: BLE001 - reported to that prompt's client
                    log.warning("prompt refused by the ensemble: %s", err)
                    work.inbox.put("error", err)

    def _join(self, works: list[Generate]) -> None:
        deltas = [(lambda d, w=w: w.inbox.put("delta", d)) if w.stream else None for w in works]
        handles = self.batch.add([w.request for w in works], [w.sampling for w in works], deltas)
        for work, h in zip(works, handles):
            work.handle = h
            self._active[h] = work
        self.stats.joined += len(works)
        if self.metrics is not None:
            self.metrics.joined.inc(len(works))

    def _step(self) -> None:
        for h, work in self._active.items():
            if work.cancelled:
                self.batch.cancel(h)
        rows = len(self._active)
        try:
            finished = self.batch.step()
        except Exception as err:  # noqa: BLE001 - the batch is lost: fail its prompts, start a new one
            log.exception("decode step failed")
            self._fail_all(err)
            return
        self._count_step(rows)
        self._send_logprobs()
        for h in finished:
            work, result = self._active.pop(h), self.batch.result(h)
            if result.finish_reason == "cancelled":
                self._count_cancelled(work.sampling.max_new_tokens - result.completion_tokens)
            work.inbox.put("done", result)

    def _count_cancelled(self, tokens_left: int) -> None:
        self.stats.cancelled += 1
        if self.metrics is not None:
            self.metrics.cancelled.inc()
            self.metrics.cancelled_tokens.inc(max(0, tokens_left))

    def _count_step(self, rows: int) -> None:
        self.stats.steps += 1
        self.stats.max_rows = max(self.stats.max_rows, rows)
        self.stats.rows[rows] += 1
        if self.metrics is not None:
            self.metrics.steps.inc()
            self.metrics.rows.observe(rows)

    def _send_logprobs(self) -> None:
        for h, work in self._active.items():
            self._send_logprobs_of(h, work)

    def _send_logprobs_of(self, h: int, work: Generate) -> None:
        if not work.stream or work.sampling.logprobs is None:
            return
        row = self.batch.rows.get(h)  # finished rows stay until their result is taken
        entries = (row.logprobs or []) if row is not None else []
        if len(entries) > work.logprobs_sent:
            work.inbox.put("logprobs", entries[work.logprobs_sent:])
            work.logprobs_sent = len(entries)

    def _fail_all(self, err: Exception) -> None:
        for work in self._active.values():
            work.inbox.put("error", err)
        self._active.clear()
        self.batch = DecodeBatch(self.ens)

    def _score(self, works: list[Score]) -> None:
        """Score prompts together (alternatives, when asked, for all: the largest ``top``)."""
        top = max(w.top for w in works)
        try:
            results = self.ens.score_tokens([w.request for w in works], top_logprobs=top)
        except Exception as err:  # noqa: BLE001 - isolate the failing prompt
            if len(works) > 1:
                for w in works:
                    self._score([w])
                return
            log.warning("prompt scoring failed: %s", err)
            works[0].inbox.put("error", err)
            return
        if self.metrics is not None:
            self.metrics.scored.inc(len(works))
        for w, res in zip(works, results):
            if res["top_logprobs"] is not None:
                res["top_logprobs"] = [t[:w.top] if t is not None else None for t in res["top_logprobs"]]
            w.inbox.put("done", res)

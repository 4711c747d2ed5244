"""The HTTP connections themselves: a request head must arrive in bounded time, and idle
sockets never lock out requests.

uvicorn (0.54) arms no timer on a new connection and none while a request head is
arriving: a socket that sends nothing, or half a header, stays open for ever. Its own
``limit_concurrency`` counts open *connections*, so enough idle sockets make every
request, ``/health`` included, a 503. This module is uvicorn's
httptools protocol (``uvicorn.Config(http=...)`` takes a protocol class) with two rules:

* ``header_timeout``: from the moment a connection opens, and from the first byte of each
  later request on it, the request head (request line and headers) must be complete
  within this many seconds, else the connection is closed (with a 408 if part of a head
  had arrived). Between requests uvicorn's own keep-alive timeout applies.
* ``max_header_bytes``: a request head (request line and headers) larger than this is
  answered 431 and the connection closed (uvicorn's httptools protocol has no limit: a
  client could send 20 MB of headers, and hold them for ``header_timeout``).
* ``max_connections``: when a new connection would exceed it, the connection that has been
  idle longest (no request in progress) is closed. A request in progress is never cut.

The server's own limit on requests in flight is :class:`~ddfm.serve.admission.Admission`'s
(``--max-concurrent``), which counts requests, not sockets; :func:`uvicorn_config` leaves
uvicorn's ``limit_concurrency`` unset.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GuardedHttpProtocol", "guarded_protocol", "uvicorn_config"]

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 41\r\nconnection: close\r\n\r\nthe request head did not arrive in time.\n")
_TOO_LARGE_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
                  b"content-length: 31\r\nconnection: close\r\n\r\nthe request head is too large.\n")


class _HeadTooLarge(Exception):
    """Raised in a parser callback: httptools stops and uvicorn answers (see ``send_400_response``)."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head timeout and a connection cap (see the
    module docstring); :func:`guarded_protocol` sets the two class attributes."""

    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1000

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since: Optional[float] = time.monotonic()
        self._head_started = False
        self._head_bytes = 0
        self._head_timer: Any = None
        self._arm_head_timer()
        if len(self.connections) > self.max_connections:
            self._close_longest_idle()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    # -------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._arm_head_timer()  # the next request's head: timed from its first byte

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._head_started = False
        self._head_bytes = 0
        self._idle_since = None  # a request is in progress
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline:
            self._idle_since = time.monotonic()

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self.max_header_bytes:  # our callback stopped the parser
            self._cancel_head_timer()
            self.transport.write(_TOO_LARGE_431)
            self.transport.close()
            return
        super().send_400_response(msg)

    # -------------------------------------------------------------- the rules
    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_header_bytes:
            raise _HeadTooLarge(f"request head over {self.max_header_bytes} bytes")
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:  # part of a head arrived: say why before closing
            self.transport.write(_TIMEOUT_408)
        self.transport.close()

    def _close_longest_idle(self) -> None:
        idle = [c for c in self.connections if getattr(c, "_idle_since", None) is not None and c is not self
                and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda c: c._idle_since).transport.close()


def guarded_protocol(header_timeout: float, max_connections: int,
                     max_header_bytes: int = 64 * 1024) -> type[GuardedHttpProtocol]:
    """A :class:`GuardedHttpProtocol` class with these limits (uvicorn instantiates the class)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,),
                {"header_timeout": float(header_timeout), "max_connections": int(max_connections),
                 "max_header_bytes": int(max_header_bytes)})


def uvicorn_config(app, cfg, **overrides):
    """The ``uvicorn.Config`` of a :class:`~ddfm.serve.cli.ServeConfig`: the guarded
    protocol, uvicorn's keep-alive timeout, and no ``limit_concurrency`` (requests are
    counted by :class:`~ddfm.serve.admission.Admission`, not sockets)."""
    import uvicorn

    options = dict(host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="on",
                   http=guarded_protocol(cfg.header_timeout, cfg.max_connections, cfg.max_header_bytes),
                   timeout_keep_alive=cfg.keep_alive_timeout)
    return uvicorn.Config(app, **{**options, **overrides})

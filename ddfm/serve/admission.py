"""What a request must pass before any handler runs: an allowed Host, the API key, a
concurrency slot, and a body of bounded size that arrives in bounded time (an ASGI middleware).

Every request but the liveness probe (``GET /health``, which then says only ``{"status":
"ok"}``) must name an allowed host in its ``Host`` header (``--allowed-hosts``; else
421: a DNS-rebinding page in a browser names its own host) and, when the server has a key,
carry it as a bearer token (else 401; constant-time comparison). ``scope["state"]
["ddfm_trusted"]`` tells the handlers whether a request passed both (``/health`` shows
its details only then). For the completion endpoints (POST): more than
``max_concurrent`` requests in flight is a 429 (requests are counted, not connections:
:mod:`~ddfm.serve.connections`); the body is read here, up to ``max_body_bytes`` (413)
and within ``body_timeout`` seconds (408), so a slow sender cannot hold a slot, and
handed on to FastAPI. The slot is held until the response has been sent (for a stream:
its last event).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Optional

from ddfm.serve.errors import ApiError
from ddfm.serve.memory import LARGE_BODY_BYTES, release_memory

__all__ = ["Admission", "Slots"]


class Slots:
    """Requests in flight (read by ``/health``, the metrics and the batcher)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0


class Admission:
    """ASGI middleware (see the module docstring); ``on_error(ApiError)`` sees each refusal."""

    def __init__(self, app, *, cfg, slots: Slots, on_error=None):
        self.app, self.cfg, self.slots, self.on_error = app, cfg, slots, on_error
        self.key: Optional[bytes] = cfg.api_key.encode() if cfg.api_key else None
        self.hosts: Optional[set[str]] = cfg.hosts()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        liveness = scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")
        completion = scope["method"] == "POST" and scope["path"].startswith("/v1/")
        try:
            trusted = self._check_host(scope, liveness) and self._check_key(scope, liveness)
            if completion and self.slots.used >= self.slots.limit:
                raise ApiError(429, f"server busy: {self.slots.limit} requests already in flight; retry later",
                               type="rate_limit_error", code="too_many_concurrent_requests",
                               headers={"Retry-After": "1"})
        except ApiError as err:
            return await self._refuse(err, scope, receive, send)
        scope.setdefault("state", {})["ddfm_trusted"] = trusted
        if not completion:
            return await self.app(scope, receive, send)
        self.slots.used += 1
        body = b""
        try:
            try:
                body = await asyncio.wait_for(self._read(scope, receive), self.cfg.body_timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.cfg.body_timeout} s",
                               code="request_timeout") from None
            await self.app(scope, _replay(body, receive), send)
        except ApiError as err:
            await self._refuse(err, scope, receive, send)
        finally:
            self.slots.used -= 1
            if len(body) >= LARGE_BODY_BYTES:
                del body
                await asyncio.to_thread(release_memory)  # its copies are freed: give their pages back

    def _check_host(self, scope, liveness: bool) -> bool:
        """True if the Host header names an allowed host; else 421 (the liveness probe: False)."""
        if self.hosts is None:
            return True
        host = _host_name(dict(scope.get("headers") or []).get(b"host", b""))
        if host in self.hosts:
            return True
        if liveness:
            return False
        raise ApiError(421, f"this server does not answer for host {host[:100]!r} (the Host header); start it with "
                       "--allowed-hosts to accept more names", code="host_not_allowed")

    def _check_key(self, scope, liveness: bool) -> bool:
        """True if the server has no key or the request carries it; else 401 (the liveness probe: False)."""
        if self.key is None:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return True
        if liveness:
            return False
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                       type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read(self, scope, receive) -> bytes:
        limit = self.cfg.max_body_bytes
        too_big = ApiError(413, f"request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client disconnected before sending its body", code="client_disconnected")
            body += message.get("body", b"")
            if len(body) > limit:
                raise too_big
            if not message.get("more_body", False):
                return bytes(body)

    async def _refuse(self, err: ApiError, scope, receive, send) -> None:
        if self.on_error is not None:
            self.on_error(err)
        await err.response()(scope, receive, send)


def _host_name(header: bytes) -> str:
    """The host of a Host header, lower case, without port or trailing dot: ``[::1]:8000`` -> ``::1``."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):  # an IPv6 literal
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _replay(body: bytes, receive):
    """A ``receive`` that gives the body once, then waits on the client (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

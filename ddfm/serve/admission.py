"""What a request must pass before any handler runs: the API key, a concurrency slot, and a
body of bounded size that arrives in bounded time (an ASGI middleware).

For ``/v1/*``: a missing or wrong bearer key is a 401 (constant-time comparison). For the
completion endpoints (POST): more than ``max_concurrent`` requests in flight is a 429;
the body is read here, up to ``max_body_bytes`` (413) and within ``body_timeout``
seconds (408), so a slow sender cannot hold a slot, and handed on to FastAPI. The slot is
held until the response has been sent (for a stream: its last event).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Optional

from ddfm.serve.errors import ApiError

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

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        try:
            self._check_key(scope)
            if scope["method"] != "POST":
                return await self.app(scope, receive, send)
            if self.slots.used >= self.slots.limit:
                raise ApiError(429, f"server busy: {self.slots.limit} requests already in flight; retry later",
                               type="rate_limit_error", code="too_many_concurrent_requests",
                               headers={"Retry-After": "1"})
        except ApiError as err:
            return await self._refuse(err, scope, receive, send)
        self.slots.used += 1
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

    def _check_key(self, scope) -> None:
        if self.key is None:
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

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

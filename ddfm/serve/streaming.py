"""Server-sent events in OpenAI's framing: ``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from ddfm.serve.errors import ApiError

__all__ = ["sse", "DONE", "event_stream"]

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n``."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def opened(events: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """A backend stream whose first event has arrived: an error before anything was
    generated (an upstream that is down, a prompt the ensemble refuses) is raised here,
    while the response status can still say so; later errors are sent in-band."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    if first is not None and isinstance(first[1], ApiError):
        await events.aclose()
        raise first[1]

    async def chained():
        try:
            if first is not None:
                yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return chained()

"""What both completion endpoints do the same way: check the model id and the token limits,
turn a request's generation parameters into its own :class:`~ddfm.sampling.Sampling`, and
stop working for a client that has gone (:func:`while_connected`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Optional

from ddfm.sampling import Sampling
from ddfm.serve.errors import ApiError, bad

__all__ = ["check_model", "check_max_tokens", "sampling", "new_id", "while_connected"]


def check_model(model: str, model_ids: list[str]) -> None:
    if model not in model_ids:
        raise ApiError(404, f"model {model!r} does not exist; available: {', '.join(model_ids)}", param="model",
                       code="model_not_found")


def check_max_tokens(value: int, param: str, limit: int) -> int:
    if value > limit:
        raise bad(f"'{param}' is {value}, more than this server's limit of {limit} output tokens", param,
                  "too_many_tokens")
    return value


def sampling(body: Any, max_tokens: int, logprobs: Optional[int]):
    """The request's :class:`~ddfm.sampling.Sampling`: temperature 0 is greedy (OpenAI's default is 1)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    return Sampling(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                    top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=list(body.stop or []),
                    logprobs=logprobs)


def new_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


async def while_connected(http: Any, awaitable: Any) -> Any:
    """The result of ``awaitable`` (a backend's answer, or a stream's first event), unless
    the client disconnects first: then it is cancelled, which cancels the request's prompts
    (their rows leave the batch at the next token, :class:`~ddfm.serve.batcher.Batcher`),
    and ``ApiError(499)`` is raised (nginx's "client closed request"; nobody reads it).

    Once a stream has started, Starlette's ``StreamingResponse`` watches the client itself.
    """
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(http.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled() or not work.done():
        await asyncio.gather(work, return_exceptions=True)
        raise ApiError(499, "the client closed the connection before the answer", code="client_disconnected")
    return work.result()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

"""``POST /v1/chat/completions``: OpenAI's chat API over the ensemble (or the gateway).

Messages become one :class:`~ddfm.ensemble.Request`: the last user turn's text is the
prompt, the turns before it the history, and the one ``image_url`` (user turns only) the
image. ``logprobs``/``top_logprobs`` give each generated token's log-probability under
the ensemble's mixture p(x | z) = Σ_k w_k p_k(x | z) (eq. 24), in OpenAI's chat format
``choices[0].logprobs.content = [{token, logprob, bytes, top_logprobs}]``. The response
carries ``ddfm`` (:class:`~ddfm.serve.protocol.Routing`); a stream carries it on the
chunk with the ``finish_reason``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from ddfm.ensemble import Request
from ddfm.serve import protocol as P
from ddfm.serve.backends import Delta, Job, Output, Prompt, TokenLogprob
from ddfm.serve.errors import ApiError, JsonRoute, bad
from ddfm.serve.images import load_image_url
from ddfm.serve.params import check_max_tokens, check_model, new_id, sampling, while_connected
from ddfm.serve.streaming import DONE, event_stream, opened, sse

__all__ = ["router", "chat_job", "conversation"]

router = APIRouter(route_class=JsonRoute)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@router.post("/v1/chat/completions", response_model=None, responses={200: {"model": P.ChatCompletion}})
async def chat_completions(body: P.ChatCompletionRequest, http: HttpRequest):
    state, t0 = http.app.state.ddfm, time.perf_counter()
    job = await asyncio.to_thread(_prepared_job, body, state)
    if job.stream:
        events = await while_connected(http, opened(state.backend.stream(job)))
        return event_stream(_events(body, events, state, t0))
    [out] = await while_connected(http, state.backend.complete(job))
    state.metrics.account(out.usage, out.routing["routed_to"], time.perf_counter() - t0)
    return JSONResponse(_completion(body, out))


def _prepared_job(body: P.ChatCompletionRequest, state: Any) -> Job:
    # in a worker thread: image decoding, tokenising and routing stay off the event loop
    job = chat_job(body, state.cfg, state.model_ids, state.backend.image_side)
    state.backend.prepare(job)
    return job


def chat_job(body: P.ChatCompletionRequest, cfg: Any, model_ids: list[str], image_side: int | None = None) -> Job:
    """The validated request as a :class:`Job`: checks what depends on the server (model,
    limits, image policy) and on several fields together (turn order, one image);
    ``image_side``: shrink an image to this short side (:func:`~ddfm.serve.images.image_side`)."""
    check_model(body.model, model_ids)
    key = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = check_max_tokens(cfg.default_max_tokens if given is None else given, key, cfg.max_output_tokens)
    prompt, history, image = conversation(body.messages, cfg, image_side)
    top = (body.top_logprobs or 0) if body.logprobs else None
    request = Request(prompt=prompt, image=image, history=history or None, literal=True)
    return Job("chat", [Prompt(request, sampling(body, max_tokens, top), body=body.model_dump(exclude_unset=True))],
               stream=bool(body.stream))


def conversation(messages: list[P.ChatMessage], cfg: Any,
                 image_side: int | None = None) -> tuple[str, list[dict[str, str]], Any]:
    """OpenAI messages -> (the last user turn's text, the earlier turns, the one image or None)."""
    turns, image = [], None
    for i, msg in enumerate(messages):
        texts = []
        parts = [P.TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content or []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, P.TextPart):
                texts.append(part.text)
                continue
            if msg.role != "user":
                raise bad(f"{where}: images are accepted only in user messages", where)
            if image is not None:
                raise bad(f"{where}: only one image per request is supported", where, "too_many_images")
            image = load_image_url(part.url, f"{where}.image_url.url", cfg, image_side)
        turns.append({"role": _ROLES[msg.role], "content": "\n".join(texts)})
    if turns[-1]["role"] != "user":
        raise bad(f"the last message must have role 'user', got {turns[-1]['role']!r}",
                  f"messages[{len(turns) - 1}].role")
    return turns[-1]["content"], turns[:-1], image


# ----------------------------------------------------------------------------- responses

def _logprobs(entries: list[TokenLogprob] | None) -> P.ChatLogprobs | None:
    if entries is None:
        return None
    return P.ChatLogprobs(content=[P.TokenLogprobEntry(
        token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
        top_logprobs=[P.TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in e.top])
        for e in entries])


def _completion(body: P.ChatCompletionRequest, out: Output) -> dict:
    cid, created = new_id("chatcmpl")
    choice = P.ChatChoice(message=P.ChatMessageOut(content=out.text), finish_reason=out.finish_reason,
                          logprobs=_logprobs(out.logprobs if body.logprobs else None))
    return P.dump(P.ChatCompletion(id=cid, created=created, model=body.model, choices=[choice],
                                   usage=P.Usage(**out.usage), ddfm=P.Routing(**out.routing)))


async def _events(body: P.ChatCompletionRequest, events: AsyncIterator, state: Any, t0: float) -> AsyncIterator[bytes]:
    cid, created = new_id("chatcmpl")

    def chunk(delta: P.ChatDelta, **kw) -> bytes:
        choice = P.ChatChunkChoice(delta=delta, logprobs=kw.pop("logprobs", None),
                                   finish_reason=kw.pop("finish_reason", None))
        return sse(P.dump(P.ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[choice], **kw)))

    yield chunk(P.ChatDelta(role="assistant", content=""))
    async for _, event in events:
        if isinstance(event, Delta):
            yield chunk(P.ChatDelta(content=event.text), logprobs=_logprobs(event.logprobs or None))
        elif isinstance(event, ApiError):  # the headers are sent: report in-band, as OpenAI does
            state.metrics.errors.labels(code=str(event.code)).inc()
            yield sse(event.body())
        else:
            yield chunk(P.ChatDelta(), finish_reason=event.finish_reason, ddfm=P.Routing(**event.routing))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(P.dump(P.ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[],
                                                       usage=P.Usage(**event.usage))))
            state.metrics.account(event.usage, event.routing["routed_to"], time.perf_counter() - t0)
    yield DONE

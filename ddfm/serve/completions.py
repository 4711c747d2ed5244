"""``POST /v1/completions``: OpenAI's legacy completions API, as evaluation harnesses drive it.

A prompt is a string, a list of strings, a token-id list or a list of token-id lists; each
is one choice (``choices[i].index`` = its position) and is used as given: no chat template
(:class:`~ddfm.ensemble.Request` with ``raw``/``token_ids``). ``logprobs`` (0..5) gives each
token's log-probability under the ensemble's mixture (eq. 24) and that many alternatives
(plus the chosen token, as OpenAI documents); ``echo`` puts the prompt before the text, with
its tokens' log-probabilities (``Ensemble.score_tokens``; ``token_logprobs[0]`` is None); with
``max_tokens: 0`` it only scores the prompt. lm-evaluation-harness's ``local-completions``
model sends ``echo: true, logprobs: 1, max_tokens: 1`` and reads
``token_logprobs[ctxlen:-1]`` and ``top_logprobs`` from this response. Each choice carries
its own ``ddfm`` routing field (the last chunk of each choice, when streaming).
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
from ddfm.serve.params import check_max_tokens, check_model, new_id, sampling, while_connected
from ddfm.serve.streaming import DONE, event_stream, opened, sse

__all__ = ["router", "completion_job", "legacy_logprobs"]

router = APIRouter(route_class=JsonRoute)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API


@router.post("/v1/completions", response_model=None, responses={200: {"model": P.Completion}})
async def completions(body: P.CompletionRequest, http: HttpRequest):
    state, t0 = http.app.state.ddfm, time.perf_counter()
    job = completion_job(body, state.cfg, state.model_ids)
    await asyncio.to_thread(state.backend.prepare, job)
    if job.stream:
        events = await while_connected(http, opened(state.backend.stream(job)))
        return event_stream(_events(body, events, state, t0))
    outs = await while_connected(http, state.backend.complete(job))
    for i, out in enumerate(outs):
        state.metrics.account(out.usage, out.routing["routed_to"], time.perf_counter() - t0 if i == 0 else None)
    return JSONResponse(_completion(body, outs))


def completion_job(body: P.CompletionRequest, cfg: Any, model_ids: list[str]) -> Job:
    check_model(body.model, model_ids)
    given = body.max_tokens
    max_tokens = check_max_tokens(min(DEFAULT_MAX_TOKENS, cfg.max_output_tokens) if given is None else given,
                                  "max_tokens", cfg.max_output_tokens)
    if max_tokens == 0 and not body.echo:
        raise bad("'max_tokens' is 0 without 'echo': there is nothing to return (use echo with logprobs to "
                  "score the prompt)", "max_tokens")
    prompts = []
    for p in body.prompts():
        request = Request(prompt=p, raw=True) if isinstance(p, str) else Request(prompt="", token_ids=list(p))
        gen = sampling(body, max_tokens, body.logprobs) if max_tokens > 0 else None
        echo = (body.logprobs or 0) if body.echo else None
        forwarded = {**body.model_dump(exclude_unset=True), "prompt": p}
        prompts.append(Prompt(request, gen, echo=echo, echo_text=p if isinstance(p, str) else "", body=forwarded))
    return Job("completions", prompts, stream=bool(body.stream))


# ----------------------------------------------------------------------------- responses

def legacy_logprobs(entries: list[TokenLogprob], offset: int = 0) -> P.CompletionLogprobs:
    """OpenAI's legacy format: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict per
    token, best first, the chosen token always in it; None for an echoed first token) and
    ``text_offset`` (each token's position in the choice's text, from ``offset``)."""
    out = P.CompletionLogprobs(top_logprobs=[])
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        top: dict[str, float] | None = None
        if e.logprob is not None:
            top = {}
            for t, v in e.top:
                top.setdefault(t, v)  # two ids with the same text: keep the likelier
            top.setdefault(e.token, e.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def _choice(body: P.CompletionRequest, i: int, out: Output) -> P.CompletionChoice:
    logprobs = None
    if body.logprobs is not None:
        logprobs = legacy_logprobs(out.prefix_logprobs or [])
        tail = legacy_logprobs(out.logprobs or [], offset=len(out.prefix))
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(logprobs, name).extend(getattr(tail, name))
    return P.CompletionChoice(index=i, text=out.prefix + out.text, logprobs=logprobs, finish_reason=out.finish_reason,
                              ddfm=P.Routing(**out.routing))


def _completion(body: P.CompletionRequest, outs: list[Output]) -> dict:
    cid, created = new_id("cmpl")
    usage = {k: sum(o.usage[k] for o in outs) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return P.dump(P.Completion(id=cid, created=created, model=body.model,
                               choices=[_choice(body, i, o) for i, o in enumerate(outs)], usage=P.Usage(**usage)))


async def _events(body: P.CompletionRequest, events: AsyncIterator, state: Any, t0: float) -> AsyncIterator[bytes]:
    cid, created = new_id("cmpl")
    offsets: dict[int, int] = {}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def chunk(choice: P.CompletionChoice) -> bytes:
        return sse(P.dump(P.Completion(id=cid, created=created, model=body.model, choices=[choice])))

    async for i, event in events:
        if isinstance(event, Delta):
            lp = legacy_logprobs(event.logprobs, offsets.get(i, 0)) if body.logprobs is not None else None
            offsets[i] = offsets.get(i, 0) + len(event.text)
            yield chunk(P.CompletionChoice(index=i, text=event.text, logprobs=lp))
        elif isinstance(event, ApiError):
            state.metrics.errors.labels(code=str(event.code)).inc()
            yield sse(event.body())
        else:
            yield chunk(P.CompletionChoice(index=i, text="", finish_reason=event.finish_reason,
                                           ddfm=P.Routing(**event.routing)))
            usage = {k: usage[k] + event.usage[k] for k in usage}
            state.metrics.account(event.usage, event.routing["routed_to"], None)
    state.metrics.duration.observe(time.perf_counter() - t0)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse(P.dump(P.Completion(id=cid, created=created, model=body.model, choices=[], usage=P.Usage(**usage))))
    yield DONE

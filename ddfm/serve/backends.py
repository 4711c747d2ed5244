"""One backend interface, two backends: the experts loaded here, or a gateway to remote experts.

A handler (:mod:`ddfm.serve.chat`, :mod:`ddfm.serve.completions`) turns a request into a
:class:`Job` of one or more :class:`Prompt` s and calls, on any :class:`Backend`:

* ``prepare(job)`` — in a worker thread, before any generation: count prompt tokens
  against the limits (local) or route each prompt (gateway); raises ``ApiError``;
* ``await complete(job)`` -> one :class:`Output` per prompt;
* ``stream(job)`` -> async iterator of ``(index, Delta | Output | ApiError)``: text as it
  grows, then each prompt's :class:`Output` (an ``ApiError`` if it broke off).

Backends:

* :class:`LocalBackend` — the ensemble in this process behind the continuous
  :class:`~ddfm.serve.batcher.Batcher`; log-probabilities are the mixture's.
* :class:`~ddfm.serve.gateway.GatewayBackend` — ``--upstream k=URL``: routes top-1 here
  and forwards to expert k's own OpenAI-compatible server (vLLM, TGI, another ``ddfm serve``).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Protocol

from ddfm.serve.batcher import Batcher, Generate, Inbox, Score
from ddfm.serve.errors import ApiError, bad
from ddfm.serve.images import image_side

__all__ = ["Backend", "Job", "Prompt", "Output", "Delta", "TokenLogprob", "LocalBackend", "extension"]


@dataclass
class TokenLogprob:
    """One token under the mixture: its text, log-probability (None: an echoed first
    token) and the most likely alternatives ``[(text, logprob), ...]``, best first."""

    token: str
    logprob: Optional[float]
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Prompt:
    """One choice to produce. ``sampling`` None: nothing to generate (echo with max_tokens 0);
    ``echo`` (completions): score the prompt with this many alternatives and put it
    before the text; ``body``: what a gateway forwards (the request as the client sent it)."""

    request: Any  # ddfm.ensemble.Request
    sampling: Any  # ddfm.ensemble.Sampling or None
    echo: Optional[int] = None
    echo_text: str = ""
    body: dict = field(default_factory=dict)
    prompt_tokens: int = 0
    weights: Optional[list[float]] = None  # gateway: the route


@dataclass
class Job:
    """A request's prompts; ``api`` is ``"chat"`` or ``"completions"``."""

    api: str
    prompts: list[Prompt]
    stream: bool = False


@dataclass
class Output:
    """One prompt's answer: ``prefix`` (the echoed prompt) + ``text``, with token counts,
    the ``ddfm`` routing field and (when asked) log-probabilities of both parts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    routing: dict
    logprobs: Optional[list[TokenLogprob]] = None
    prefix: str = ""
    prefix_logprobs: Optional[list[TokenLogprob]] = None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Delta:
    """Text (and its tokens' log-probabilities) added to a streamed prompt."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Backend(Protocol):
    kind: str
    mode: str
    expert_names: list[str]
    image_side: int  # images are shrunk to this short side (ddfm.serve.images.image_side)

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def prepare(self, job: Job) -> None: ...
    async def complete(self, job: Job) -> list[Output]: ...
    def stream(self, job: Job) -> AsyncIterator[tuple[int, Any]]: ...


def extension(weights: Any, experts: list[str], mode: str, **extra: Any) -> dict[str, Any]:
    """The ``ddfm`` field: weights (K,) aligned with the K expert names, the experts that
    generated (weight > 0) and the routing mode (:class:`~ddfm.serve.protocol.Routing`)."""
    w = [round(float(x), 6) for x in list(weights)]
    return {"weights": w, "experts": list(experts), "routed_to": [e for e, x in zip(experts, w) if x > 0],
            "mode": mode, **{k: v for k, v in extra.items() if v}}


class LocalBackend:
    """The experts loaded in this process (:class:`~ddfm.ensemble.Ensemble`) behind a :class:`Batcher`."""

    kind = "local"

    def __init__(self, ensemble, cfg, metrics, pending=None):
        self.ens, self.cfg = ensemble, cfg
        self.batcher = Batcher(ensemble, max_batch=cfg.max_batch_size, window_s=cfg.batch_window_ms / 1000,
                               metrics=metrics, pending=pending)
        self.mode, self.expert_names = ensemble.mode, list(ensemble.expert_names)
        # Requests are encoded in worker threads while the batcher thread uses the ensemble's
        # tokenizer: each thread encodes with its own copy of the encoder (no lock to wait on).
        self._template = copy.deepcopy(ensemble.prompts)
        self._copying = threading.Lock()
        self._local = threading.local()
        ref = next(m for m in ensemble.experts if m is not None)
        self.context = getattr(ref.config.get_text_config(), "max_position_embeddings", None)
        self.token_bytes = longest_token_bytes(self._template.tokenizer)
        self.image_side = image_side(self._template.processor)

    def _prompts(self):
        """This thread's :class:`~ddfm.ensemble.prompts.PromptEncoder`."""
        enc = getattr(self._local, "prompts", None)
        if enc is None:
            with self._copying:
                enc = self._local.prompts = copy.deepcopy(self._template)
        return enc

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.batcher.stop)

    # -------------------------------------------------------------- before generation
    def prepare(self, job: Job) -> None:
        """Count each prompt's tokens (image tokens included) against the limits: a bound
        from its bytes first, so that an oversized prompt is refused without tokenizing it."""
        param = "messages" if job.api == "chat" else "prompt"
        for i, p in enumerate(job.prompts):
            where = param if len(job.prompts) == 1 else f"{param}[{i}]"
            new = p.sampling.max_new_tokens if p.sampling is not None else 0
            self._check_size(p.request, new, where)
            enc = self._prompts()
            try:
                encoded = p.request.encoded = enc.encode(p.request)
                if p.echo is not None and p.request.token_ids is not None:
                    p.echo_text = enc.tokenizer.decode(encoded.ids)
            except ValueError as err:  # an image for text-only experts, a token id outside the vocabulary
                raise bad(f"{where}: {err}", where, "unsupported_input") from None
            p.prompt_tokens = n = len(encoded.ids)
            self._check_length(n, new, where)

    def _check_size(self, request: Any, new: int, param: str) -> None:
        """Refuse a prompt that must exceed the limits, from what it is before tokenizing:
        a token covers at most ``token_bytes`` bytes and every turn has one at least."""
        if request.token_ids is not None:
            n_bytes, least = None, len(request.token_ids)
        else:
            texts = [request.prompt] + [_turn_text(t) for t in request.history or []]
            n_bytes = sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts)
            least = max(-(-n_bytes // self.token_bytes), len(texts))
        limit = self.cfg.max_prompt_tokens if self.context is None else min(self.cfg.max_prompt_tokens,
                                                                            self.context - new)
        if least > limit:
            what = f"{least} token ids" if n_bytes is None else (
                f"{n_bytes} bytes of text: at least {least} tokens (a token of these experts spans at most "
                f"{self.token_bytes} bytes)")
            raise bad(f"the prompt is {what}, more than this server's limit of {limit} tokens"
                      + (f" (the experts' context of {self.context} minus max_tokens {new})"
                         if limit < self.cfg.max_prompt_tokens else ""), param, "context_length_exceeded")

    def _check_length(self, n: int, new: int, param: str) -> None:
        if n > self.cfg.max_prompt_tokens:
            raise bad(f"the prompt is {n} tokens (image tokens included), more than this server's limit of "
                      f"{self.cfg.max_prompt_tokens}", param, "context_length_exceeded")
        if self.context is not None and n + new > self.context:
            raise bad(f"the prompt is {n} tokens and max_tokens is {new}: more than the experts' context of "
                      f"{self.context} tokens", param, "context_length_exceeded")

    # -------------------------------------------------------------- generation
    async def complete(self, job: Job) -> list[Output]:
        inbox = Inbox()
        works = self._submit(job, inbox)
        results: dict[int, dict[str, Any]] = {i: {} for i in range(len(job.prompts))}
        try:
            left = sum(len(w) for w in works)
            while left:
                tag, kind, value = await inbox.get()
                if kind == "error":
                    raise _as_api_error(value)
                if kind == "done":
                    results[tag]["score" if isinstance(value, dict) else "gen"] = value
                    left -= 1
        finally:
            self._cancel(works)
        return [self._output(p, results[i]) for i, p in enumerate(job.prompts)]

    async def stream(self, job: Job) -> AsyncIterator[tuple[int, Any]]:
        inbox = Inbox()
        works = self._submit(job, inbox)
        results: dict[int, dict[str, Any]] = {i: {} for i in range(len(job.prompts))}
        left = {i: len(w) for i, w in enumerate(works)}
        try:
            while any(left.values()):
                tag, kind, value = await inbox.get()
                if kind == "error":
                    yield tag, _as_api_error(value)
                    left[tag] = 0
                elif kind == "delta":
                    yield tag, Delta(value)
                elif kind == "logprobs":
                    yield tag, Delta("", self._token_logprobs(value))
                else:
                    results[tag]["score" if isinstance(value, dict) else "gen"] = value
                    left[tag] -= 1
                    if isinstance(value, dict):  # the echo comes first
                        yield tag, Delta(job.prompts[tag].echo_text, self._prompt_logprobs(value))
                    if not left[tag]:
                        yield tag, self._output(job.prompts[tag], results[tag], streamed=True)
        finally:  # done, or the client went away: nothing keeps decoding for nobody
            self._cancel(works)

    def _submit(self, job: Job, inbox: Inbox) -> list[list[Any]]:
        works = []
        for i, p in enumerate(job.prompts):
            mine = []
            if p.echo is not None:
                mine.append(Score(p.request, p.echo, inbox.tagged(i)))
            if p.sampling is not None:
                mine.append(Generate(p.request, p.sampling, inbox.tagged(i), stream=job.stream))
            for w in mine:
                self.batcher.submit(w)
            works.append(mine)
        return works

    def _cancel(self, works: list[list[Any]]) -> None:
        for mine in works:
            for w in mine:
                self.batcher.cancel(w)

    # -------------------------------------------------------------- results
    def _output(self, p: Prompt, res: dict[str, Any], streamed: bool = False) -> Output:
        gen, score = res.get("gen"), res.get("score")
        if gen is not None:
            routing = extension(gen.weights, gen.experts, self.mode, left_out=list(gen.left_out))
        else:
            routing = extension(score["weights"], self.expert_names, self.mode, left_out=list(self.ens.left_out))
        out = Output(text=gen.text if gen is not None else "",
                     finish_reason=gen.finish_reason if gen is not None else "length",
                     prompt_tokens=gen.prompt_tokens if gen is not None else len(score["token_ids"]),
                     completion_tokens=gen.completion_tokens if gen is not None else 0, routing=routing)
        if not streamed:  # a stream has sent these already
            if gen is not None and gen.logprobs is not None:
                out.logprobs = self._token_logprobs(gen.logprobs)
            if score is not None:
                out.prefix, out.prefix_logprobs = p.echo_text, self._prompt_logprobs(score)
        return out

    def _token_logprobs(self, entries: list[dict]) -> list[TokenLogprob]:
        """Generation entries ``{"token_id", "logprob", "top": [[id, lp], ...]}`` -> :class:`TokenLogprob`."""
        return [TokenLogprob(self._text(e["token_id"]), e["logprob"], [(self._text(t), v) for t, v in e["top"]])
                for e in entries]

    def _prompt_logprobs(self, score: dict) -> list[TokenLogprob]:
        tops = score["top_logprobs"] or [None] * len(score["token_ids"])
        return [TokenLogprob(self._text(t), lp, [(self._text(a), v) for a, v in top or []])
                for t, lp, top in zip(score["token_ids"], score["token_logprobs"], tops)]

    def _text(self, token_id: int) -> str:
        return self._prompts().tokenizer.decode([int(token_id)])


def longest_token_bytes(tokenizer) -> int:
    """The most bytes of text one token of ``tokenizer`` decodes to (an incomplete UTF-8
    character counts as its 3-byte replacement: an over-estimate, so a bound from it holds):
    a text of N bytes is at least N / this many tokens."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return max(1, max(len(t.encode("utf-8", "surrogatepass")) for t in texts))


def _turn_text(turn: dict) -> str:
    """The text of an earlier turn, LLaVA (``value``) or chat (``content``: a string or parts)."""
    content = turn.get("value", turn.get("content"))
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def _as_api_error(err: Exception) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ValueError):  # the ensemble refused the prompt (e.g. no route for it)
        return bad(str(err), None, "unsupported_input")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error",
                    code="internal_error")

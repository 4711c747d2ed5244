"""The gateway backend: route here (top-1), generate on expert k's own OpenAI-compatible server.

``ddfm serve --router router.json --upstream 0=URL0 1=URL1``: each prompt is routed with
the :class:`~ddfm.router.Router` (eq. 29, top-1: its image, its text under a text router,
else the cluster shares π_k) and forwarded, as the client sent it, to that expert's
``/v1/chat/completions`` or ``/v1/completions`` (vLLM, TGI, another ``ddfm serve``).
With top-1 routing the mixture is that one expert, so its log-probabilities are the
ensemble's. Implements :class:`~ddfm.serve.backends.Backend`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import httpx

from ddfm.mixture import top_k_renormalise
from ddfm.serve.backends import Delta, Job, Output, Prompt, TokenLogprob, extension
from ddfm.serve.errors import ApiError
from ddfm.serve.images import MIN_SIDE

__all__ = ["GatewayBackend", "parse_upstreams"]


def parse_upstreams(specs: list[str]) -> dict[int, str]:
    """``["0=http://h:8000/v1", ...]`` -> ``{0: "http://h:8000/v1", ...}`` (base URL ending in ``/v1``)."""
    out: dict[int, str] = {}
    for spec in specs:
        k, sep, url = spec.partition("=")
        if not sep or not k.strip().isdigit():
            raise ValueError(f"upstream: expected k=URL (e.g. 0=http://127.0.0.1:8001/v1), got {spec!r}")
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"upstream: URL of expert {k} must start with http:// or https://, got {url!r}")
        if not url.endswith("/v1"):
            url += "/v1"
        if int(k) in out:
            raise ValueError(f"upstream: expert {k} given twice")
        out[int(k)] = url
    return out


def _upstream_error(k: int, url: str, status: int, text: str) -> ApiError:
    try:
        err = json.loads(text)["error"]
        message = err.get("message") or text
    except (ValueError, KeyError, TypeError, AttributeError):
        err, message = None, text[:500]
    if 400 <= status < 500 and status not in (401, 403, 404, 408):
        # the client's fault (e.g. too many tokens for that expert): pass it on as it is
        err = err or {}
        return ApiError(status, f"upstream expert {k}: {message}", type=err.get("type", "invalid_request_error"),
                        param=err.get("param"), code=err.get("code"))
    return ApiError(502, f"upstream expert {k} at {url} answered HTTP {status}: {message}",
                    type="upstream_error", code="bad_upstream_response")


def _bad_upstream(k: int, what: str) -> ApiError:
    return ApiError(502, f"upstream expert {k} answered with {what}", type="upstream_error",
                    code="bad_upstream_response")


class GatewayBackend:
    """Route locally (top-1), forward to expert k's server."""

    kind = "gateway"
    mode = "gateway-top1"
    image_side = MIN_SIDE  # the image is only routed here: the router's encoder needs no more

    def __init__(self, router: Any, upstreams: dict[int, str], cfg: Any):
        self.router, self.upstreams = router, upstreams
        k = int(router.k) if router is not None else 1
        missing, extra = sorted(set(range(k)) - set(upstreams)), sorted(set(upstreams) - set(range(k)))
        if missing or extra:
            raise ValueError(f"upstream: the router has {k} experts (0..{k - 1}); "
                             + (f"no --upstream for {missing}" if missing else f"unknown experts {extra}"))
        self.k, self.expert_names = k, [f"expert-{j}" for j in range(k)]
        headers = {"Authorization": f"Bearer {cfg.upstream_api_key}"} if cfg.upstream_api_key else {}
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.upstream_timeout, connect=cfg.upstream_connect_timeout),
            headers=headers, limits=httpx.Limits(max_connections=cfg.max_concurrent))
        self._models: dict[int, str] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.client.aclose()

    def prepare(self, job: Job) -> None:
        """Each prompt's route (K,): the router on its image (or text), else the prior π_k, top-1."""
        for p in job.prompts:
            p.weights = self._route(p.request)

    def _route(self, request: Any) -> list[float]:
        """Top-1 of the router's prior (:meth:`ddfm.router.Router.prior_log`), as the ensemble routes."""
        if self.router is None:
            return [1.0]
        if self.router.modality == "text" and request.token_ids is not None:  # no tokenizer here to read them
            raise ApiError(400, "prompt: a gateway with a text router routes on the prompt's text; send the "
                           "prompt as a string, not token ids", param="prompt", code="unsupported_value")
        item = request.prompt if self.router.modality == "text" else request.image
        w = top_k_renormalise(self.router.prior_log([item]).exp(), 1)[0]
        return [round(float(x), 6) for x in w]

    def _expert(self, p: Prompt) -> int:
        return max(range(len(p.weights)), key=lambda j: p.weights[j])

    def _routing(self, p: Prompt) -> dict:
        return extension(p.weights, self.expert_names, self.mode, upstream=self.upstreams[self._expert(p)])

    # -------------------------------------------------------------- upstream HTTP
    async def _upstream_model(self, k: int) -> str:
        if k not in self._models:
            resp = await self._send(k, "GET", "/models")
            try:
                self._models[k] = resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise _bad_upstream(k, "a /models list without a model id") from None
        return self._models[k]

    async def _send(self, k: int, method: str, path: str, body: dict | None = None, stream: bool = False):
        url = self.upstreams[k] + path
        try:
            resp = await self.client.send(self.client.build_request(method, url, json=body), stream=stream)
        except httpx.TimeoutException:
            raise ApiError(503, f"upstream expert {k} at {url} did not answer within the timeout",
                           type="upstream_error", code="upstream_timeout", headers={"Retry-After": "5"}) from None
        except httpx.HTTPError as err:
            raise ApiError(503, f"upstream expert {k} at {url} is unreachable: {type(err).__name__}: {err}",
                           type="upstream_error", code="upstream_unavailable", headers={"Retry-After": "5"}) from None
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            await resp.aclose()
            if resp.status_code == 404:
                self._models.pop(k, None)  # the upstream may have restarted with another model id
            raise _upstream_error(k, url, resp.status_code, text)
        return resp

    async def _forward(self, api: str, p: Prompt, stream: bool):
        k = self._expert(p)
        body = {**p.body, "model": await self._upstream_model(k), "stream": stream}
        body.pop("stream_options", None)
        if stream:  # always ask for the token counts (usage chunk), for our usage and metrics
            body["stream_options"] = {"include_usage": True}
        return k, await self._send(k, "POST", "/chat/completions" if api == "chat" else "/completions", body, stream)

    # -------------------------------------------------------------- the interface
    async def complete(self, job: Job) -> list[Output]:
        return list(await asyncio.gather(*(self._complete_one(job.api, p) for p in job.prompts)))

    async def _complete_one(self, api: str, p: Prompt) -> Output:
        k, resp = await self._forward(api, p, stream=False)
        try:
            out = resp.json()
            choice, usage = out["choices"][0], out.get("usage") or {}
            text = choice["message"]["content"] if api == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _bad_upstream(k, f"something that is not a {api} completion") from None
        return Output(text=text or "", finish_reason=choice.get("finish_reason") or "stop",
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0), routing=self._routing(p),
                      logprobs=_logprobs(api, choice.get("logprobs")))

    async def stream(self, job: Job) -> AsyncIterator[tuple[int, Any]]:
        for i, p in enumerate(job.prompts):
            try:
                k, resp = await self._forward(job.api, p, stream=True)
            except ApiError as err:
                yield i, err
                continue
            async for event in self._relay(job.api, p, k, resp):
                yield i, event

    async def _relay(self, api: str, p: Prompt, k: int, resp) -> AsyncIterator[Any]:
        """Upstream SSE chunks -> :class:`Delta` s, then the prompt's :class:`Output`."""
        text, finish, usage = [], "stop", {}
        try:
            async for line in resp.aiter_lines():
                chunk = _event(line)
                if chunk is None:
                    continue
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}) if api == "chat" else {"content": choice.get("text")}
                    piece = delta.get("content") or ""
                    text.append(piece)
                    finish = choice.get("finish_reason") or finish
                    yield Delta(piece, _logprobs(api, choice.get("logprobs")) or [])
        except httpx.HTTPError as err:
            yield ApiError(502, f"upstream expert {k} broke off the stream: {type(err).__name__}: {err}",
                           type="upstream_error", code="upstream_stream_error")
            return
        finally:
            await resp.aclose()
        yield Output(text="".join(text), finish_reason=finish, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0), routing=self._routing(p))


def _event(line: str) -> dict | None:
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    try:
        chunk = json.loads(data) if data != "[DONE]" else None
    except json.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _logprobs(api: str, lp: Any) -> list[TokenLogprob] | None:
    """An upstream choice's log-probabilities (either API's format) as :class:`TokenLogprob` s."""
    if not isinstance(lp, dict):
        return None
    if api == "chat":
        return [TokenLogprob(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
                for e in lp.get("content") or []]
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or [])
    return [TokenLogprob(t, v, sorted((top or {}).items(), key=lambda kv: -kv[1]))
            for t, v, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops)]

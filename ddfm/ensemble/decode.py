"""The running batch: requests join and leave at token boundaries, each with its own parameters.

:class:`DecodeBatch` holds, for every active request (a *row*), each expert's next-token
log-probabilities ``lp`` (B, K, V), the routing log-weights ``log_w`` (B, K) (float64)
and which experts run the row; each expert keeps one KV cache over its rows
(:class:`~ddfm.ensemble.experts.ExpertRun`). One :meth:`DecodeBatch.step`:

1. mixes the experts in probability space, p(x | z) = Σ_k w_k p_k(x | z) (eq. 24);
2. chooses every row's token with that row's own :class:`Sampling` (greedy, or
   temperature + top-p with the row's own seed);
3. under an updating routing (the posterior, eq. 26–27) multiplies each row's weights by
   every expert's probability of its token;
4. finishes rows (eos, a stop token or string, ``max_new_tokens``, cancellation) and
   drops them from every cache;
5. runs each expert one token further on its remaining rows.

:meth:`DecodeBatch.add` may be called between steps: the new rows are encoded, routed and
prefilled and their caches joined to the running ones. ``Ensemble.generate`` adds all of
its requests and steps until none is left; ``ddfm serve`` adds requests as they arrive.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ddfm.ensemble.experts import ExpertRun, prefill
from ddfm.ensemble.prompts import Batch, Request, left_pad
from ddfm.mixture import Mixture, normalise_log, posterior_update
from ddfm.sampling import Sampling

__all__ = ["Sampling", "Generation", "DecodeBatch"]


@dataclass
class Generation:
    """The result of one request.

    ``weights`` (K,) are the mixture weights in force at the end (for ``posterior``, the
    posterior after the last token; ``prior`` holds the weights before any token),
    aligned with ``experts`` (the K experts' names). ``token_ids`` are the generated ids,
    including a final eos; ``finish_reason`` is ``"stop"``, ``"length"`` or
    ``"cancelled"``. ``logprobs`` (when asked for) has one entry per generated token:
    ``{"token_id", "logprob", "top": [[id, logprob], ...]}`` under the mixture.
    """

    text: str
    token_ids: list[int]
    weights: list[float]
    experts: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    left_out: list[str] = field(default_factory=list)
    prior: list[float] = field(default_factory=list)
    logprobs: Optional[list[dict]] = None


class _TextStream:
    """One row's text: stop strings, and the streamed deltas (holding back what may still change)."""

    def __init__(self, tokenizer, stop: list[str], on_delta: Callable[[str], None] | None):
        self.tok, self.stop, self.on_delta = tokenizer, stop, on_delta
        self.tokens: list[int] = []
        self.sent = 0

    def text(self) -> tuple[str, bool]:
        """Decoded text cut at the first stop string, and whether one was found."""
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def push(self, token: int, final: bool) -> bool:
        """Add a token; returns True when a stop string ended the request."""
        self.tokens.append(token)
        if not self.stop and self.on_delta is None:
            return False
        text, stopped = self.text()
        if self.on_delta is not None:
            self._send(text if (stopped or final) else self._hold_back(text))
        return stopped

    def _hold_back(self, text: str) -> str:
        # keep back an incomplete UTF-8 character and a possible beginning of a stop string
        text = text.rstrip("\ufffd")
        for s in self.stop:
            for j in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:j]):
                    return text[:-j]
        return text

    def _send(self, visible: str) -> None:
        if self.on_delta is not None and len(visible) > self.sent:
            self.on_delta(visible[self.sent:])
            self.sent = len(visible)

    def finish(self) -> str:
        text, _ = self.text()
        self._send(text)
        return text


@dataclass
class _Row:
    request: Request
    sampling: Sampling
    stream: _TextStream
    stop_ids: set[int]
    prompt_tokens: int
    prior: torch.Tensor  # (K,) float64 log-weights before any token
    generator: Optional[torch.Generator]
    logprobs: Optional[list[dict]]
    cancelled: bool = False
    result: Optional[Generation] = None


def _choose(logp: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Next token per row from mixture log-probs (B, V): argmax, or a sample after the
    row's temperature and nucleus (top-p) filtering, drawn with the row's generator."""
    token = logp.argmax(-1)
    for i, row in enumerate(rows):
        s = row.sampling
        if not s.do_sample:
            continue
        probs = torch.softmax(logp[i] / s.temperature, dim=-1)
        if not torch.isfinite(probs).all():  # a temperature so small that logp / T overflows: its limit, argmax
            probs = torch.zeros_like(probs).scatter_(-1, token[i:i + 1], 1.0)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
        token[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    return token


class DecodeBatch:
    """The running batch of an :class:`~ddfm.ensemble.Ensemble` (see the module docstring)."""

    def __init__(self, ensemble):
        self.ens = ensemble
        self.K = len(ensemble.experts)
        self.runs = {k: ExpertRun(m) for k, m in enumerate(ensemble.experts) if m is not None}
        self.order: list[int] = []  # active row handles, in the order of lp / log_w / run_mask
        self.rows: dict[int, _Row] = {}
        self.lp = torch.zeros(0, self.K, 0)  # (B, K, V) float32; rows an expert does not run are never read
        self.log_w = torch.zeros(0, self.K, dtype=torch.float64)  # (B, K)
        self.run_mask = torch.zeros(0, self.K, dtype=torch.bool)  # (B, K)
        self._handles = itertools.count()
        self._layout: Optional[tuple] = None  # (mixture or None, {k: index}) for the current rows

    def __len__(self) -> int:
        return len(self.order)

    # -------------------------------------------------------------- joining
    def can_join(self) -> bool:
        """Whether requests can :meth:`add` now: the batch is empty or every expert's KV cache
        takes new rows (not a sliding-window or static cache, :func:`~ddfm.ensemble.experts.can_join`)."""
        return not self.order or all(run.can_join() for run in self.runs.values())

    def add(self, requests: Sequence[Request], samplings: Sequence[Sampling],
            on_delta: Sequence[Callable[[str], None] | None] | None = None) -> list[int]:
        """Encode, route and prefill requests; they decode from the next :meth:`step`.

        Returns one handle per request (see :meth:`result`, :meth:`cancel`).
        """
        ens = self.ens
        if not self.can_join():
            raise NotImplementedError("requests cannot join this running batch: an expert's KV cache is a "
                                      "sliding-window or static cache; add them once the batch is empty")
        batch = left_pad([ens.prompts.encode(r) for r in requests], ens.pad_id)
        prior, run_mask = ens.start_weights(requests, batch)  # (n, K) float64 log-weights, (n, K) bool
        lp, evidence_ll, joining = self._prefill(batch, run_mask, want_evidence=ens.routing.update)
        log_w = normalise_log(prior + evidence_ll) if ens.routing.update else prior
        handles = [next(self._handles) for _ in requests]
        for i, (req, s, h) in enumerate(zip(requests, samplings, handles)):
            seed = s.seed if s.seed is not None else int(torch.randint(2**62, ()))  # torch.manual_seed governs
            self.rows[h] = _Row(
                request=req, sampling=s, prompt_tokens=batch.lengths[i], prior=prior[i],
                stream=_TextStream(ens.tokenizer, [x for x in s.stop if isinstance(x, str) and x],
                                   on_delta[i] if on_delta else None),
                stop_ids=ens.eos_ids | {int(x) for x in s.stop if not isinstance(x, str)},
                logprobs=[] if s.logprobs is not None else None,
                generator=torch.Generator().manual_seed(seed) if s.do_sample else None)
        for k, (rows, pre) in joining.items():
            self.runs[k].join([handles[r] for r in rows], pre)
        self.order += handles
        self.lp = torch.cat([self.lp, lp]) if len(self.lp) else lp
        self.log_w = torch.cat([self.log_w, log_w])
        self.run_mask = torch.cat([self.run_mask, run_mask])
        self._layout = None
        return handles

    def _prefill(self, batch: Batch, run_mask: torch.Tensor, want_evidence: bool):
        """Each expert prefills the new rows it runs. Returns lp (n, K, V), the prompts'
        evidence log-likelihood (n, K) float64 (0 where not asked for or not run) and
        ``{k: (rows, Prefill)}`` to join."""
        ens, n = self.ens, len(batch.input_ids)
        shared = ens.shared_tower.outputs(batch) if ens.shared_tower is not None else None
        joining, lp, ll = {}, None, torch.zeros(n, self.K, dtype=torch.float64)
        for k, run in self.runs.items():
            rows = run_mask[:, k].nonzero()[:, 0].tolist()
            if not rows:
                continue
            enc = shared.for_expert(k, rows) if shared is not None else None
            pre = prefill(run.model, batch, rows, encoder_outputs=enc, want_tokens=want_evidence)
            if lp is None:
                lp = torch.zeros(n, self.K, pre.last.shape[-1])
            lp[rows, k] = pre.last
            if want_evidence:
                ll[rows, k] = _evidence_log_likelihood(pre.tokens, batch, rows)
            joining[k] = (rows, pre)
        return lp, ll, joining

    # -------------------------------------------------------------- stepping
    def _ensure_layout(self):
        """The fixed mixture (non-updating routing) and each expert's row positions, cached
        until rows join or leave."""
        if self._layout is None:
            pos = {h: i for i, h in enumerate(self.order)}
            index = {k: (slice(None) if run.rows == self.order else torch.tensor([pos[h] for h in run.rows]))
                     for k, run in self.runs.items() if run.rows}
            fixed = None if self.ens.routing.update else Mixture(self._mixing())
            self._layout = (fixed, index)
        return self._layout

    def _mixing(self) -> torch.Tensor:
        return self.ens.mixing(self.log_w).masked_fill(~self.run_mask, float("-inf"))

    def mixture(self) -> Mixture:
        """The mixture of the active rows' next-token distributions (eq. 24)."""
        fixed, _ = self._ensure_layout()
        return fixed if fixed is not None else Mixture(self._mixing())

    def step(self) -> list[int]:
        """Choose one token for every active row; returns the handles that finished."""
        if not self.order:
            return []
        rows = [self.rows[h] for h in self.order]
        logp = self.mixture()(self.lp)  # (B, V)
        token = _choose(logp, rows)  # (B,)
        if any(r.logprobs is not None for r in rows):
            _record_logprobs(logp, token, rows)
        if self.ens.routing.update:
            chosen = self.lp[torch.arange(len(rows)), :, token].double()  # (B, K) log p_k(token)
            self.log_w = posterior_update(self.log_w.masked_fill(~self.run_mask, float("-inf")), chosen)
        ids = token.tolist()
        finished = []
        for i, (h, row) in enumerate(zip(self.order, rows)):
            last = len(row.stream.tokens) + 1 >= row.sampling.max_new_tokens
            stop = row.stream.push(ids[i], final=last or ids[i] in row.stop_ids) or ids[i] in row.stop_ids
            if stop or last or row.cancelled:
                self._finish(h, i, "cancelled" if row.cancelled else "stop" if stop else "length")
                finished.append(h)
        if finished:
            keep = [i for i, h in enumerate(self.order) if h not in set(finished)]
            token = token[keep]
            self._drop(set(finished), keep)
        _, index = self._ensure_layout()
        for k, idx in index.items():
            self.lp[idx, k] = self.runs[k].step(token[idx])
        return finished

    def cancel(self, handle: int) -> None:
        """Stop a row at the next token boundary (its result says ``"cancelled"``)."""
        row = self.rows.get(handle)
        if row is not None and row.result is None:
            row.cancelled = True

    def result(self, handle: int) -> Optional[Generation]:
        """The finished row's :class:`Generation` (removed from the batch), or None if still running."""
        row = self.rows.get(handle)
        if row is None or row.result is None:
            return None
        del self.rows[handle]
        return row.result

    def _finish(self, handle: int, i: int, reason: str) -> None:
        row, ens = self.rows[handle], self.ens
        text = row.stream.finish()
        weights = self.log_w[i].exp()
        row.result = Generation(text=text, token_ids=list(row.stream.tokens), weights=[float(x) for x in weights],
                                experts=list(ens.expert_names), finish_reason=reason,
                                prompt_tokens=row.prompt_tokens, completion_tokens=len(row.stream.tokens),
                                left_out=list(ens.left_out), prior=[float(x) for x in row.prior.exp()],
                                logprobs=row.logprobs)

    def _drop(self, handles: set[int], keep: list[int]) -> None:
        for run in self.runs.values():
            run.leave(handles)
        self.order = [self.order[i] for i in keep]
        self.lp, self.log_w, self.run_mask = self.lp[keep], self.log_w[keep], self.run_mask[keep]
        self._layout = None


def _evidence_log_likelihood(tokens: torch.Tensor, batch: Batch, rows: list[int]) -> torch.Tensor:
    """Σ_t log p_k(x_t | x_<t) over the prompt tokens marked as evidence (eq. 26–27).

    tokens: (n, T'-1) from :func:`~ddfm.ensemble.experts.prefill` (right-aligned with the
    batch, which may hold more shared left padding). Returns (n,) float64.
    """
    T = tokens.shape[1] + 1
    mask = batch.attention_mask[rows][:, -T:]
    counted = batch.evidence[rows][:, -T:][:, 1:] & mask[:, :-1].bool()  # x_t has a real predecessor
    return (tokens.double() * counted).sum(1)


def _record_logprobs(logp: torch.Tensor, token: torch.Tensor, rows: list[_Row]) -> None:
    for i, row in enumerate(rows):
        if row.logprobs is None:
            continue
        n = row.sampling.logprobs
        top = torch.topk(logp[i], n) if n else None
        row.logprobs.append({"token_id": int(token[i]), "logprob": float(logp[i, token[i]]),
                             "top": [[int(t), float(v)] for v, t in zip(top.values, top.indices)] if top else []})

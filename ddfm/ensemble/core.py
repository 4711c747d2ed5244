"""The :class:`Ensemble`: K expert checkpoints + a router, generating as one model (paper §3.3, §4.3)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ddfm.ensemble.config import EnsembleConfig
from ddfm.ensemble.decode import DecodeBatch, Generation, _evidence_log_likelihood
from ddfm.ensemble.experts import full_log_probs, prefill
from ddfm.ensemble.prompts import Batch, PromptEncoder, Request, left_pad, open_request_image
from ddfm.ensemble.shared_encoder import SharedTower
from ddfm.mixture import mixture_log_probs, normalise_log, top_k_log
from ddfm.model.chat import get_tokenizer
from ddfm.model.checkpoint import load_model, read_meta
from ddfm.router import Router
from ddfm.routing import EVIDENCE, Routing, parse_top_k, resolve_top_k, routing_mode
from ddfm.sampling import Sampling

log = logging.getLogger(__name__)

__all__ = ["Ensemble", "check_compatible"]


class Ensemble:
    """K expert checkpoints + a router, generating as one model.

    Attributes: ``experts`` (K models, ``None`` for a left-out expert), ``expert_names``,
    ``processor`` (shared), ``router`` (or None), ``routing`` (the mode, a
    :class:`~ddfm.routing.Routing`), ``top_k`` (experts mixed per token, 1..K),
    ``left_out``.
    """

    def __init__(self, experts: list, processor, router: Router | None = None, *, names: list[str] | None = None,
                 mode: str = "centroid", top_k: Union[int, str, None] = None, shared_encoder: bool = False,
                 left_out: list[str] | None = None, evidence: str = "prompt"):
        K = len(experts)
        if K == 0 or all(m is None for m in experts):
            raise ValueError("ensemble: no expert to run")
        self.experts, self.processor, self.router = experts, processor, router
        self.expert_names = names or [f"expert-{k}" for k in range(K)]
        self.left_out = list(left_out or [])
        if evidence not in EVIDENCE:
            raise ValueError(f"evidence must be one of {', '.join(EVIDENCE)}, got {evidence!r}")
        if router is not None and router.k != K:
            raise ValueError(f"router {router.path or ''} has {router.k} clusters but {K} experts were given; "
                             "give one expert per cluster, in the router's order")
        routing = routing_mode(mode, K)
        if routing.prior == "router" and not routing.update and router is None:
            if K > 1:
                raise ValueError(f"mode {mode!r} with several experts needs a router (--router router.json); "
                                 "or use --mode uniform / posterior")
            routing = routing_mode("uniform")
        self.routing: Routing = routing
        self.top_k = resolve_top_k(parse_top_k(top_k), routing, K, router.top_k if router is not None else None)
        self.available = torch.tensor([m is not None for m in experts])
        ref = next(m for m in experts if m is not None)
        self.image_token_id = getattr(ref.config, "image_token_id", None)
        self.prompts = PromptEncoder(processor, evidence, self.image_token_id)
        self.tokenizer = self.prompts.tokenizer
        self.is_vlm = self.prompts.is_vlm
        self.evidence = evidence
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        eos = ref.generation_config.eos_token_id if ref.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None}
        if shared_encoder and router is not None and router.modality != "image":
            raise ValueError(f"shared_encoder: router {router.path or ''} routes on {router.modality} features; "
                             "the experts' vision tower can only replace an image encoder")
        self.shared_tower = SharedTower(experts, processor) if shared_encoder else None
        if self.shared_tower is not None and router is not None:
            router.use_encoder(self.shared_tower)

    @property
    def mode(self) -> str:
        """The routing mode's name (``centroid``, ``posterior``, ``uniform`` or ``expert:J``)."""
        return self.routing.name

    # -------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: EnsembleConfig) -> "Ensemble":
        """The ensemble an :class:`~ddfm.ensemble.config.EnsembleConfig` describes."""
        return cls.from_pretrained(cfg.experts, cfg.router, mode=cfg.mode, top_k=cfg.top_k,
                                   router_temperature=cfg.router_temperature, allow_missing=cfg.allow_missing,
                                   device=cfg.device, dtype=cfg.dtype, shared_encoder=cfg.shared_encoder,
                                   evidence=cfg.evidence)

    @classmethod
    def from_pretrained(cls, experts: Sequence[str | os.PathLike], router: str | os.PathLike | Router | None = None, *,
                        mode: str = "centroid", top_k: Union[int, str, None] = None,
                        router_temperature: float | None = None, allow_missing: bool = False, device: str = "auto",
                        dtype: str = "auto", shared_encoder: bool = False, evidence: str = "prompt") -> "Ensemble":
        """Load K expert checkpoint directories (one per cluster, in the router's order).

        ``router_temperature`` overrides the router's τ; ``top_k`` is N, ``"all"`` or None
        (the mode's default: the router file's under ``centroid``, all otherwise). A missing
        or unloadable expert is an error unless ``allow_missing``: then it is left out, the
        others are renormalised and every :class:`Generation` names it in ``left_out``.
        """
        paths = [str(p) for p in experts]
        if not paths:
            raise ValueError("--experts: give at least one checkpoint directory")
        if router is not None and not isinstance(router, Router):
            router = Router.load(router, temperature=router_temperature)
        elif isinstance(router, Router) and router_temperature is not None:
            router.temperature = float(router_temperature)
        names = _names(paths)
        device = _device(device)
        models, processors, left_out = [], [], []
        for name, path in zip(names, paths):
            try:
                model, proc = _load_expert(path, device, dtype)
            except Exception as err:  # noqa: BLE001 - any load failure is reported with the expert's name
                if not allow_missing:
                    raise ValueError(f"expert {name} ({path}) cannot be loaded: {err}; "
                                     "use --allow-missing to run without it") from err
                log.warning("ensemble: leaving out expert %s (%s): %s", name, path, err)
                models.append(None), processors.append(None), left_out.append(name)
                continue
            models.append(model), processors.append(proc)
        loaded = [i for i, m in enumerate(models) if m is not None]
        if not loaded:
            raise ValueError(f"none of the {len(paths)} experts could be loaded")
        check_compatible([names[i] for i in loaded], [processors[i] for i in loaded], [models[i] for i in loaded])
        warn_different_inits([names[i] for i in loaded], [paths[i] for i in loaded])
        return cls(models, processors[loaded[0]], router, names=names, mode=mode, top_k=top_k,
                   shared_encoder=shared_encoder, left_out=left_out, evidence=evidence)

    # -------------------------------------------------------------- routing
    def route(self, requests: Request | Sequence[Request]) -> torch.Tensor:
        """Initial mixture weights (B, K) float64 of requests under the ensemble's mode.

        For a fixed routing these are the weights that mix (top-k renormalised); for the
        posterior, the prior before any token (eq. 29 over all experts, or π_k). Left-out
        experts get weight 0 and the rest are renormalised.
        """
        requests = [requests] if isinstance(requests, Request) else list(requests)
        images = [open_request_image(r.image) for r in requests]
        return self._initial(requests, images).exp()

    def start_weights(self, requests: Sequence[Request], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(initial log-weights (B, K) float64, which experts run each row (B, K) bool)."""
        if self.shared_tower is not None:
            self.shared_tower.remember(batch)
        log_w = self._initial(list(requests), batch.images)
        if self.routing.runs == "all":
            run = self.available.expand(len(requests), -1).clone()
        else:
            run = torch.isfinite(self.mixing(log_w))
        return log_w, run

    def _initial(self, requests: list[Request], images: list) -> torch.Tensor:
        log_w = self._prior_log(requests, images)
        log_w = log_w.masked_fill(~self.available, float("-inf"))
        if torch.isneginf(log_w).all(1).any():
            raise ValueError(f"all routing weight falls on left-out expert(s) {self.left_out}")
        return normalise_log(log_w) if self.routing.update else top_k_log(log_w, self.top_k)

    def _prior_log(self, requests: list[Request], images: list) -> torch.Tensor:
        """Log-weights (B, K) float64 before any token (unnormalised allowed)."""
        B, K = len(requests), len(self.experts)
        prior = self.routing.prior
        if prior == "expert":
            return torch.full((B, K), float("-inf"), dtype=torch.float64).index_fill_(1, torch.tensor([self.routing.expert]), 0.0)
        if prior == "uniform" or self.router is None:
            return torch.zeros(B, K, dtype=torch.float64)
        if self.router.modality == "text":  # a token-id prompt (completions API) is routed on its text
            return self.router.prior_log([r.prompt if r.token_ids is None else
                                          self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
                                          for r in requests])
        return self.router.prior_log(images)

    def mixing(self, log_w: torch.Tensor) -> torch.Tensor:
        """The log-weights that mix: the top-k of ``log_w`` (B, K), renormalised."""
        return log_w if self.top_k >= log_w.shape[1] else top_k_log(log_w, self.top_k)

    # -------------------------------------------------------------- generation
    def generate(self, requests: Request | Sequence[Request], sampling: Sampling | None = None, *,
                 on_token: Callable[[int, str], None] | None = None, **overrides) -> list[Generation]:
        """Generate for a batch of requests (which may route to different experts).

        ``sampling``: the :class:`~ddfm.sampling.Sampling` of every request (default
        ``Sampling()``); keyword ``overrides`` replace its fields, as ``transformers``'
        ``generate(generation_config, **kwargs)`` does (``max_new_tokens=16``, ``seed=0``, ...).
        ``on_token(i, delta_text)`` streams the text of request ``i`` as it grows.
        """
        requests = [requests] if isinstance(requests, Request) else list(requests)
        sampling = (sampling or Sampling()).override(**overrides)
        if not requests:
            return []
        deltas = [(lambda d, i=i: on_token(i, d)) for i in range(len(requests))] if on_token else None
        with torch.inference_mode():
            batch = DecodeBatch(self)
            handles = batch.add(requests, [sampling] * len(requests), deltas)
            while len(batch):
                batch.step()
        return [batch.result(h) for h in handles]

    @torch.inference_mode()
    def next_token_distribution(self, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's next-token probabilities (V,) after the prompt, and the weights (K,)
        float64 that mixed them (for ``posterior``: after the prompt's evidence)."""
        batch = DecodeBatch(self)
        batch.add([request], [Sampling(max_new_tokens=1)])
        mixture = batch.mixture()
        return mixture(batch.lp)[0].exp(), normalise_log(mixture.log_weights)[0].exp()

    def count_prompt_tokens(self, request: Request) -> int:
        """Number of prompt tokens (image placeholders expanded) of a request."""
        return len(self.prompts.encode(request).ids)

    # -------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, requests: Sequence[Request], targets: Sequence[str]) -> list[dict]:
        """Negative log-likelihood of each reference answer under the mixture.

        Per token, -log Σ_k w_k p_k(x_t | x_<t) with the mode's weights (for an updating
        routing, the weights after every earlier answer token, so the sum is the exact
        sequence likelihood -log Σ_k π_k(z) Π_t p_k). Returns ``[{"nll", "n_tokens",
        "weights"}]`` (nll in nats, summed; weights after the answer).
        """
        requests = list(requests)
        if len(requests) != len(targets):
            raise ValueError(f"score: {len(requests)} requests but {len(targets)} targets")
        if not requests:
            return []
        suffixes = [self.prompts.target_ids(r, t, self.eos_ids) for r, t in zip(requests, targets)]
        batch = left_pad([self.prompts.encode(r) for r in requests], self.pad_id, suffixes)
        log_w, run = self.start_weights(requests, batch)
        K, n_max = len(self.experts), max(len(s) for s in suffixes)
        answer = torch.full((len(requests), K, n_max), float("-inf"), dtype=torch.float64)  # log p_k(answer token t)
        shared = self.shared_tower.outputs(batch) if self.shared_tower is not None else None
        for k, model in enumerate(self.experts):
            rows = run[:, k].nonzero()[:, 0].tolist()
            if model is None or not rows:
                continue
            pre = prefill(model, batch, rows, encoder_outputs=shared.for_expert(k, rows) if shared else None,
                          want_tokens=True)
            if self.routing.update:  # the prompt's evidence, as in generation

                log_w[rows, k] += _evidence_log_likelihood(pre.tokens, batch, rows)
            for j, r in enumerate(rows):
                n = len(suffixes[r])
                answer[r, k, :n] = pre.tokens[j, -n:].double()
        if self.routing.update:
            log_w = normalise_log(log_w)
        return [self._score_row(log_w[i], answer[i, :, :len(s)]) for i, s in enumerate(suffixes)]

    @torch.inference_mode()
    def score_tokens(self, requests: Sequence[Request], top_logprobs: int = 0) -> list[dict]:
        """The mixture's log-probability of every prompt token after the first (OpenAI's
        ``echo`` with ``logprobs``), with the ``top_logprobs`` most likely tokens there.

        The weights at token t are the mode's: fixed, or (updating routing) the prior
        times every expert's probability of the tokens before t. Returns per request
        ``{"token_ids", "token_logprobs": [None, lp_1, ...], "top_logprobs": [None,
        [[id, lp], ...], ...] or None, "weights"}`` (weights after the last token).
        """
        requests = list(requests)
        if not requests:
            return []
        batch = left_pad([self.prompts.encode(r) for r in requests], self.pad_id)
        log_w, run = self.start_weights(requests, batch)
        K = len(self.experts)
        lengths = batch.attention_mask.sum(1).tolist()
        tokens = [torch.full((K, n - 1), float("-inf"), dtype=torch.float64) for n in lengths]
        full: dict[tuple[int, int], torch.Tensor] = {}
        for k, model in enumerate(self.experts):
            rows = run[:, k].nonzero()[:, 0].tolist()
            if model is None or not rows:
                continue
            if top_logprobs:
                for r, lp in zip(rows, full_log_probs(model, batch, rows)):
                    full[r, k] = lp
                    scored = batch.input_ids[r, batch.input_ids.shape[1] - lengths[r] + 1:]  # (n-1,): empty if n = 1
                    tokens[r][k] = lp.gather(1, scored[:, None])[:, 0].double()
            else:
                pre = prefill(model, batch, rows, want_tokens=True)
                for j, r in enumerate(rows):
                    tokens[r][k] = pre.tokens[j, pre.tokens.shape[1] - lengths[r] + 1:].double()
        results = []
        for i, n in enumerate(lengths):
            ids = batch.input_ids[i, -n:].tolist()
            steps, final = self._weights_along(log_w[i], tokens[i], batch.evidence[i, -n:][1:])
            mix = self.mixing(steps)  # (n-1, K)
            token_lp = torch.logsumexp(mix + tokens[i].T.nan_to_num(neginf=-1e30), dim=1)
            top = None
            if top_logprobs:
                V = next(iter(full.values())).shape[-1]
                lp = torch.stack([full[i, k] if (i, k) in full else torch.zeros(n - 1, V)  # expert k not run
                                  for k in range(K)], 1)  # (n-1, K, V)
                mixture = mixture_log_probs(mix.float(), lp)  # (n-1, V): eq. 24 at every position
                # the chosen tokens' values from the same tensor as the alternatives, so that a
                # token that is the most likely one has exactly the top value (harnesses compare)
                token_lp = mixture.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                best = torch.topk(mixture, min(top_logprobs, mixture.shape[-1]), dim=-1)
                top = [None] + [[[int(t), float(v)] for v, t in zip(vs, ts)] for vs, ts in zip(best.values, best.indices)]
            results.append({"token_ids": ids, "token_logprobs": [None] + [float(x) for x in token_lp],
                            "top_logprobs": top, "weights": [float(x) for x in final.exp()]})
        return results

    def _weights_along(self, log_w: torch.Tensor, token_lp: torch.Tensor, evidence: torch.Tensor):
        """Weights before each of n scored tokens (n, K) and after the last (K,).

        log_w (K,) before the first scored token; token_lp (K, n) each expert's log p of
        each token; evidence (n,) which tokens update an updating routing's weights.
        """
        n = token_lp.shape[1]
        if not self.routing.update:
            return log_w.expand(n, -1), log_w
        counted = token_lp.nan_to_num(neginf=-1e30) * evidence.to(token_lp.dtype)  # (K, n)
        before = torch.cat([torch.zeros(token_lp.shape[0], 1, dtype=token_lp.dtype), counted.cumsum(1)[:, :-1]], 1)
        steps = normalise_log((log_w[:, None] + before).T)  # (n, K)
        return steps, normalise_log(log_w + counted.sum(1))

    def _score_row(self, log_w: torch.Tensor, answer: torch.Tensor) -> dict:
        """log_w (K,) before the answer, answer (K, n) log p_k of each answer token."""
        n = answer.shape[1]
        steps, final = self._weights_along(log_w, answer, torch.ones(n, dtype=torch.bool))
        mix = self.mixing(steps)  # (n, K)
        token = torch.logsumexp(mix + answer.T.nan_to_num(neginf=-1e30), dim=1)  # (n,)
        return {"nll": float(-token.sum()), "n_tokens": n, "weights": [float(x) for x in final.exp()]}


# ------------------------------------------------------------------------------ loading and checks

def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_expert(path: str, device: str, dtype: str = "auto"):
    if not Path(path).is_dir():
        raise FileNotFoundError(f"expert checkpoint directory not found: {path}")
    return load_model(path, device=device, dtype=dtype if dtype == "auto" else getattr(torch, dtype))


def _names(paths: list[str]) -> list[str]:
    names = [Path(p).name or p for p in paths]
    return names if len(set(names)) == len(names) else paths


def _describe_tokenizer(tok) -> dict[str, Any]:
    return {"vocabulary": tok.get_vocab(), "special tokens": sorted(map(str, tok.all_special_tokens)),
            "bos/eos/pad ids": (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id),
            "chat template": getattr(tok, "chat_template", None)}


def _describe_images(processor, model) -> dict[str, Any]:
    ip = getattr(processor, "image_processor", None)
    cfg = model.config
    vision = getattr(cfg, "vision_config", None)
    return {"image processor": ip.to_dict() if ip is not None else None,
            "image token": getattr(processor, "image_token", None),
            "image token id": getattr(cfg, "image_token_id", None),
            "vision input": (getattr(vision, "image_size", None), getattr(vision, "patch_size", None)),
            "vision feature select strategy": getattr(cfg, "vision_feature_select_strategy", None),
            "vocab size": cfg.get_text_config().vocab_size}


def _first_difference(a: Any, b: Any, name_a: str, name_b: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        if only_a or only_b:
            return f"entries only in {name_a}: {only_a}, only in {name_b}: {only_b}"
        key = next(k for k in sorted(a, key=str) if a[k] != b[k])
        return f"{key!r}: {str(a[key])[:80]} in {name_a} vs {str(b[key])[:80]} in {name_b}"
    return f"{str(a)[:120]} in {name_a} vs {str(b)[:120]} in {name_b}"


def check_compatible(names: Sequence[str], processors: Sequence[Any], models: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the expert and the difference unless all experts share
    tokenizer (vocabulary, special tokens, chat template) and image processing."""
    ref = {**_describe_tokenizer(get_tokenizer(processors[0])), **_describe_images(processors[0], models[0])}
    for name, proc, model in zip(names[1:], processors[1:], models[1:]):
        this = {**_describe_tokenizer(get_tokenizer(proc)), **_describe_images(proc, model)}
        for what in ref:
            if ref[what] != this[what]:
                raise ValueError(f"expert {name} differs from expert {names[0]} in its {what} "
                                 f"({_first_difference(ref[what], this[what], names[0], name)}); an ensemble needs "
                                 "one tokenizer and one image processing (train all experts from the same `ddfm init`)")


def init_identity(path: str | os.PathLike) -> Optional[str]:
    """Where an expert's training started: a fingerprint of its initial checkpoint's
    ``ddfm.json`` (``ddfm train`` keeps a copy as ``init_meta``; a checkpoint written by
    ``ddfm init`` is its own start), else the initial checkpoint's path; None for a
    checkpoint that ddfm did not write."""
    meta = read_meta(path)  # paths resolved, so copies at other depths compare equal
    if meta is None:
        return None

    def fingerprint(m: dict) -> str:
        return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]

    if meta.get("stage") == "init":
        return fingerprint(meta)
    if meta.get("stage") == "train":
        return fingerprint(meta["init_meta"]) if meta.get("init_meta") else meta.get("init")
    return None


def warn_different_inits(names: Sequence[str], paths: Sequence[str]) -> list[str]:
    """Log a warning naming the experts when they were trained from different initial
    checkpoints (the method's experts share one start; mixing independent models works
    but is not what the theory describes). Returns the warnings."""
    ids = [(n, init_identity(p)) for n, p in zip(names, paths)]
    known = [(n, i) for n, i in ids if i is not None]
    warnings = [f"experts {known[0][0]} and {n} were trained from different initial checkpoints; the method's "
                "experts start from one shared checkpoint (train all of them with the same --init)"
                for n, i in known[1:] if i != known[0][1]]
    for w in warnings:
        log.warning("ensemble: %s", w)
    return warnings

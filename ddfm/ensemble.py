"""Ensemble generation: K experts + router decode as one model (paper §3.3, §4.3).

    ddfm generate --experts runs/expert-0 runs/expert-1 --router runs/partition/router.json \\
                  --image cat.png --prompt "What is this?" [--mode posterior] [--top-k 2]

At every step the next-token distribution is the mixture

    p(x | z) = Σ_k w_k p_k(x | z)                                          (eq. 24)

taken in probability space (:func:`ddfm.mixture.mixture_log_probs`), never by averaging
logits. Routing modes give the weights w:

* ``centroid`` — the paper's router, fixed for the whole generation: softmax_k(τ·cos(f, c_k))
  of the image (or prompt) features, top-k renormalised (eq. 29). A request without an
  image under an image router starts from the cluster shares π_k.
* ``posterior`` — the exact router (eq. 26–27): start from the centroid prior (or π_k),
  multiply by each expert's probability of every prompt token and of every generated
  token, renormalise every step. Needs every expert's forward pass; works for text-only
  prompts too. ``top_k`` < K mixes only the top-k of the current posterior.
  ``evidence="answers"`` counts only the history's assistant turns among the prompt
  tokens (experts trained LLaVA-style never learn to predict the human turns).
* ``uniform`` — w_k = 1/K;  ``expert:J`` — all weight on expert J.

Each expert keeps its own KV cache and runs only on the rows of the batch that give it
weight, so experts with zero weight are never run (top-1 costs exactly one expert).
``shared_encoder=True`` routes with the experts' own (frozen, identical) vision tower and
hands the tower's output to the chosen expert, so routing costs no extra encoder pass.

Python API::

    ens = Ensemble.from_pretrained(["runs/expert-0", "runs/expert-1"], "runs/partition/router.json")
    [gen] = ens.generate(Request("What is this?", image="cat.png"), max_new_tokens=16)
    gen.text, gen.weights
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ddfm.config import arg
from ddfm.mixture import Mixture, mixture_log_probs, normalise_log, posterior_update, top_k_renormalise
from ddfm.router import Router

log = logging.getLogger(__name__)

__all__ = ["Request", "Generation", "Ensemble", "GenerateConfig", "generate_cli", "check_compatible"]

MODES = ("centroid", "posterior", "uniform", "expert:J")
# which prompt tokens the posterior router counts: every text token of the prompt (the
# exact posterior of experts that model whole conversations), or only the assistant
# turns of the history (what LLaVA-style experts are trained on: their loss masks the
# human turns, so those tokens' probabilities carry no information about the cluster)
EVIDENCE = ("prompt", "answers")


@dataclass
class Request:
    """One generation request: the user's prompt, an optional image and earlier turns.

    ``history`` holds earlier turns, as LLaVA turns (``{"from", "value"}``) or HF chat
    messages (``{"role", "content"}``); ``image`` is a PIL image or an image file path.
    """

    prompt: str
    image: Any = None
    history: Optional[list[dict]] = None


@dataclass
class Generation:
    """The result of one request.

    ``weights`` (K,) are the mixture weights in force at the end (for ``posterior``, the
    posterior after the last token; ``prior`` holds the weights before any token),
    aligned with ``experts`` (the K experts' names). ``token_ids`` are the generated ids,
    including a final eos; ``finish_reason`` is ``"stop"`` or ``"length"``.
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


# ------------------------------------------------------------------------------ loading

def _load_expert(path: str, device: str):
    from ddfm.models import load_model

    if not Path(path).is_dir():
        raise FileNotFoundError(f"expert checkpoint directory not found: {path}")
    return load_model(path, device=device)


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


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        if only_a or only_b:
            return f"entries only in the first: {only_a}, only in this one: {only_b}"
        key = next(k for k in sorted(a, key=str) if a[k] != b[k])
        return f"{key!r}: {str(a[key])[:80]} vs {str(b[key])[:80]}"
    return f"{str(a)[:120]} vs {str(b)[:120]}"


def check_compatible(names: Sequence[str], processors: Sequence[Any], models: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the expert and the difference unless all experts share
    tokenizer (vocabulary, special tokens, chat template) and image processing."""
    from ddfm.models import get_tokenizer

    ref = {**_describe_tokenizer(get_tokenizer(processors[0])), **_describe_images(processors[0], models[0])}
    for name, proc, model in zip(names[1:], processors[1:], models[1:]):
        this = {**_describe_tokenizer(get_tokenizer(proc)), **_describe_images(proc, model)}
        for what in ref:
            if ref[what] != this[what]:
                raise ValueError(f"expert {name} differs from expert {names[0]} in its {what} "
                                 f"({_first_difference(ref[what], this[what])}); an ensemble needs one "
                                 "tokenizer and one image processing (train all experts from the same `ddfm init`)")


# ------------------------------------------------------------------------------ prompts

@dataclass
class _Batch:
    """Left-padded prompts of a batch. input_ids/attention_mask: (B, T); evidence (B, T)
    marks the prompt tokens whose probability is evidence for the posterior router;
    pixel_values[i]: (1, C, H, W) or None; images[i]: PIL or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    evidence: torch.Tensor
    pixel_values: list
    images: list
    lengths: list[int]


def _messages(request: Request, with_image: bool) -> list[dict]:
    from ddfm.models import to_chat_messages

    history = to_chat_messages(request.history or [])
    has_image_part = any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
                         for m in history)
    parts = ([{"type": "image"}] if with_image and not has_image_part else []) + [{"type": "text", "text": request.prompt}]
    return history + [{"role": "user", "content": parts}]


def _open(image):
    if image is None:
        return None
    from ddfm.data import open_image

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"request image not found: {image}")
        return open_image(image)
    return image.convert("RGB")


# ------------------------------------------------------------------------------ one expert's decoding state

class _ExpertRun:
    """Expert ``k`` decoding its rows of the batch with its own KV cache.

    rows: (n,) indices into the batch. Prefill returns log-probabilities (n, T, V) of all
    positions (``all_positions``) or (n, V) of the last one; ``step`` feeds one token per
    row and returns (n, V). ``index`` selects the rows from a (B, ...) tensor: a plain
    slice when the expert runs on the whole batch (no gather/scatter per step).
    """

    def __init__(self, model, rows: torch.Tensor, batch: _Batch, encoder_outputs: Any = None):
        self.model, self.rows = model, rows
        self.index = slice(None) if rows.tolist() == list(range(len(batch.input_ids))) else rows
        mask = batch.attention_mask[rows]
        keep = int(mask.sum(0).nonzero()[0]) if mask.numel() else 0  # drop padding shared by all rows
        self.input_ids, self.mask = batch.input_ids[rows][:, keep:], mask[:, keep:]
        self.position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)
        # decode steps pass a mask only when some row is left-padded: without one
        # transformers skips building and checking it (for sdpa it is None either way)
        self.padded = bool((self.mask == 0).any())
        pixels = [batch.pixel_values[r] for r in rows.tolist() if batch.pixel_values[r] is not None]
        self.extra: dict[str, Any] = {}
        if encoder_outputs is not None:
            self.extra["mm_encoder_outputs"] = encoder_outputs
        elif pixels:
            self.extra["pixel_values"] = torch.cat(pixels).to(model.device, model.dtype)
        self.decode = _decode_forward(model)
        self.cache = None

    @torch.inference_mode()
    def prefill(self, all_positions: bool = False) -> torch.Tensor:
        dev = self.model.device
        self.mask = self.mask.to(dev)
        out = self.model(input_ids=self.input_ids.to(dev), attention_mask=self.mask,
                         position_ids=self.position_ids.to(dev), use_cache=True,
                         logits_to_keep=0 if all_positions else 1, **self.extra)
        self.cache, self.next_pos = out.past_key_values, self.position_ids[:, -1:].to(dev) + 1  # (n, 1)
        logits = out.logits.float().cpu()
        return torch.log_softmax(logits if all_positions else logits[:, -1], dim=-1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step (under inference mode): tokens (n,) -> log-probs (n, V)."""
        inputs = {"input_ids": tokens.view(-1, 1).to(self.mask.device), "position_ids": self.next_pos}
        if self.padded:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            inputs["attention_mask"] = self.mask
        logits, self.cache = self.decode(inputs, self.cache)  # (n, 1, V)
        self.next_pos = self.next_pos + 1
        return torch.log_softmax(logits[:, -1].float().cpu(), dim=-1)


# Classes whose forward at a decode step (text tokens only, a KV cache, logits of every
# position) is exactly lm_head(decoder(...)): the presets' LLaVA and Llama. Their steps call
# the two directly and skip the wrapper's per-call work (LLaVA's image-token checks, output
# dataclasses, decorators), which at tiny-model scale is ~10 % of a step. Same modules, same
# inputs, same numbers; any other class runs its full forward.
_DECODER_THEN_HEAD = ("LlavaForConditionalGeneration", "LlamaForCausalLM")


def _decode_forward(model) -> Callable[[dict, Any], tuple[torch.Tensor, Any]]:
    """``decode(inputs, cache)`` -> (logits (n, 1, V), cache) of one decode step."""
    cls = type(model)
    if cls.__name__ in _DECODER_THEN_HEAD:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        key = _cache_argument(type(decoder))

        def decode(inputs: dict, cache) -> tuple[torch.Tensor, Any]:
            out = decoder(**inputs, use_cache=True, **{key: cache})
            return head(out.last_hidden_state), out.past_key_values  # last_hidden_state: (n, 1, H)

        return decode
    key = _cache_argument(cls)

    def forward(inputs: dict, cache) -> tuple[torch.Tensor, Any]:
        out = model(**inputs, use_cache=True, **{key: cache})
        return out.logits, out.past_key_values

    return forward


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The forward() keyword of the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _prompt_log_likelihood(lp: torch.Tensor, run: _ExpertRun, evidence: torch.Tensor) -> torch.Tensor:
    """Σ_t log p_k(x_t | x_<t) over the prompt tokens marked as evidence.

    lp: (n, T, V) prefill log-probs of ``run``'s rows; evidence: (n, T_batch) of the batch
    (right-aligned with ``run``, which may have dropped shared left padding). Returns (n,).
    """
    ids, mask = run.input_ids, run.mask
    counted = evidence[:, -ids.shape[1]:][:, 1:] & mask[:, :-1].bool()  # x_t has a real predecessor
    token_lp = lp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (n, T-1): log p(x_t | x_<t)
    return (token_lp * counted).sum(1)


def _choose(logp: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from mixture log-probs (B, V): argmax, or a sample after
    temperature and nucleus (top-p) filtering."""
    if not do_sample:
        return logp.argmax(-1)
    probs = torch.softmax(logp / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Streams:
    """Per-request text, stop strings and streamed deltas."""

    def __init__(self, tokenizer, n: int, stop_strings: list[str], on_token: Callable | None):
        self.tok, self.stop, self.on_token = tokenizer, stop_strings, on_token
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.sent = [0] * n
        self.texts: list[str | None] = [None] * n

    def text(self, i: int) -> tuple[str, bool]:
        """Decoded text of row ``i`` cut at the first stop string, and whether one was found."""
        text = self.tok.decode(self.tokens[i], skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def push(self, i: int, token: int, final: bool) -> bool:
        """Add a token; returns True when a stop string ended the request."""
        self.tokens[i].append(token)
        if not self.stop and self.on_token is None:
            return False
        text, stopped = self.text(i)
        if self.on_token is not None:
            visible = text if (stopped or final) else self._hold_back(text)
            if len(visible) > self.sent[i]:
                self.on_token(i, visible[self.sent[i]:])
                self.sent[i] = len(visible)
        return stopped

    def _hold_back(self, text: str) -> str:
        # keep back an incomplete UTF-8 character and a possible beginning of a stop string
        text = text.rstrip("\ufffd")
        for s in self.stop:
            for j in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:j]):
                    return text[:-j]
        return text

    def finish(self, i: int) -> None:
        if self.on_token is not None:
            text, _ = self.text(i)
            if len(text) > self.sent[i]:
                self.on_token(i, text[self.sent[i]:])
                self.sent[i] = len(text)


# ------------------------------------------------------------------------------ the ensemble

class Ensemble:
    """K expert checkpoints + a router, generating as one model.

    Attributes: ``experts`` (K models, ``None`` for a left-out expert), ``expert_names``,
    ``processor`` (shared), ``router`` (or None), ``mode``, ``top_k``, ``left_out``.
    """

    def __init__(self, experts: list, processor, router: Router | None = None, *, names: list[str] | None = None,
                 mode: str = "centroid", top_k: int | None = None, shared_encoder: bool = False,
                 left_out: list[str] | None = None, evidence: str = "prompt"):
        from ddfm.models import get_tokenizer, image_token

        K = len(experts)
        if K == 0 or all(m is None for m in experts):
            raise ValueError("ensemble: no expert to run")
        self.experts, self.processor, self.router = experts, processor, router
        self.expert_names = names or [f"expert-{k}" for k in range(K)]
        self.left_out = list(left_out or [])
        self.tokenizer = get_tokenizer(processor)
        self.image_token = image_token(processor)
        self.is_vlm = self.image_token is not None
        self.mode, self.forced = _parse_mode(mode, K)
        if evidence not in EVIDENCE:
            raise ValueError(f"evidence must be one of {', '.join(EVIDENCE)}, got {evidence!r}")
        self.evidence = evidence
        if router is not None and router.k != K:
            raise ValueError(f"router {router.path or ''} has {router.k} clusters but {K} experts were given; "
                             "give one expert per cluster, in the router's order")
        if self.mode == "centroid" and router is None:
            if K > 1:
                raise ValueError("mode 'centroid' with several experts needs a router (--router router.json); "
                                 "or use --mode uniform / posterior")
            self.mode = "uniform"
        default_top_k = router.top_k if (self.mode == "centroid" and router is not None) else K
        self.top_k = int(top_k or default_top_k)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        self.available = torch.tensor([m is not None for m in experts])
        ref = next(m for m in experts if m is not None)
        self.image_token_id = getattr(ref.config, "image_token_id", None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        eos = ref.generation_config.eos_token_id if ref.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None}
        if shared_encoder and router is not None and router.modality != "image":
            raise ValueError(f"shared_encoder: router {router.path or ''} routes on {router.modality} features; "
                             "the experts' vision tower can only replace an image encoder")
        self.shared_tower = _SharedTower(experts, processor) if shared_encoder else None
        if self.shared_tower is not None and router is not None:
            router.use_encoder(self.shared_tower)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, experts: Sequence[str | os.PathLike], router: str | os.PathLike | Router | None = None, *,
                        mode: str = "centroid", top_k: int | None = None, temperature: float | None = None,
                        allow_missing: bool = False, device: str = "cpu", shared_encoder: bool = False,
                        evidence: str = "prompt") -> "Ensemble":
        """Load K expert checkpoint directories (one per cluster, in the router's order).

        ``temperature`` overrides the router's τ; ``top_k`` defaults to the router file's
        value for ``centroid`` and to K otherwise. A missing or unloadable expert is an
        error unless ``allow_missing``: then it is left out, the others are renormalised
        and every :class:`Generation` names it in ``left_out``.
        """
        paths = [str(p) for p in experts]
        if not paths:
            raise ValueError("--experts: give at least one checkpoint directory")
        if router is not None and not isinstance(router, Router):
            router = Router.load(router, temperature=temperature)
        elif isinstance(router, Router) and temperature is not None:
            router.temperature = float(temperature)
        names = _names(paths)
        models, processors, left_out = [], [], []
        for name, path in zip(names, paths):
            try:
                model, proc = _load_expert(path, device)
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
        return cls(models, processors[loaded[0]], router, names=names, mode=mode, top_k=top_k,
                   shared_encoder=shared_encoder, left_out=left_out, evidence=evidence)

    # -------------------------------------------------------------- prompts
    def _encode_one(self, request: Request) -> tuple[list[int], Any, Any, list[bool]]:
        """(prompt ids, pixel_values (1, C, H, W) or None, image or None, evidence per token)."""
        from ddfm.models import render_prompt

        image = _open(request.image)
        if image is not None and not self.is_vlm:
            raise ValueError("the experts are text-only language models; a request with an image cannot be served")
        messages = _messages(request, image is not None)
        text = render_prompt(self.processor, messages)
        if self.is_vlm:
            enc = self.processor(text=text, images=[image] if image is not None else None, return_tensors="pt")
            ids, pixels = enc["input_ids"][0].tolist(), enc.get("pixel_values")
        else:
            ids, pixels = self.tokenizer(text, add_special_tokens=False)["input_ids"], None
        return ids, pixels, image, self._evidence(messages, ids, image is not None)

    def _evidence(self, messages: list[dict], ids: list[int], has_image: bool) -> list[bool]:
        """Which prompt tokens the posterior router counts (see :data:`EVIDENCE`)."""
        if self.evidence == "prompt":
            return [t != self.image_token_id for t in ids]
        from ddfm.models import encode_conversation, num_image_tokens

        if has_image and not hasattr(self, "_n_image_tokens"):
            self._n_image_tokens = num_image_tokens(self.processor)
        conv_ids, answer = encode_conversation(self.processor, messages, self._n_image_tokens if has_image else None)
        n = min(len(ids), len(conv_ids))
        if conv_ids[:n] != ids[:n]:
            raise ValueError("the prompt's tokens differ from the conversation's; cannot find its assistant turns")
        return answer[:n] + [False] * (len(ids) - n)

    def count_prompt_tokens(self, request: Request) -> int:
        """Number of prompt tokens (image placeholders expanded) of a request."""
        return len(self._encode_one(request)[0])

    def _encode(self, requests: list[Request], suffixes: list[list[int]] | None = None) -> _Batch:
        encoded = [self._encode_one(r) for r in requests]
        seqs = [ids + (suffixes[i] if suffixes else []) for i, (ids, *_) in enumerate(encoded)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
        evidence = torch.zeros((len(seqs), T), dtype=torch.bool)
        for i, e in enumerate(encoded):  # prompt tokens only: a scored answer is not evidence
            n_suffix = len(seqs[i]) - len(e[0])
            evidence[i, T - len(seqs[i]):T - n_suffix] = torch.tensor(e[3], dtype=torch.bool)
        return _Batch(ids, mask, evidence, [e[1] for e in encoded], [e[2] for e in encoded],
                      [len(e[0]) for e in encoded])

    # -------------------------------------------------------------- routing
    def route(self, requests: Request | Sequence[Request], *, images: list | None = None) -> torch.Tensor:
        """Initial mixture weights (B, K) of requests under the ensemble's mode.

        For ``posterior`` this is the prior (centroid weights before top-k, or π_k).
        Left-out experts get weight 0 and the rest are renormalised.
        """
        requests = [requests] if isinstance(requests, Request) else list(requests)
        B, K = len(requests), len(self.experts)
        if self.mode == "uniform" or (self.mode == "posterior" and self.router is None):
            w = torch.ones(B, K)
        elif self.mode == "expert":
            w = torch.zeros(B, K)
            w[:, self.forced] = 1.0
        else:
            w = self._router_probabilities(requests, images)
        w = w * self.available
        if (w.sum(1) <= 0).any():
            raise ValueError(f"all routing weight falls on left-out expert(s) {self.left_out}")
        k = K if self.mode == "posterior" else self.top_k
        return top_k_renormalise(w, min(k, K))

    def _router_probabilities(self, requests: list[Request], images: list | None) -> torch.Tensor:
        router = self.router
        w = router.cluster_shares.expand(len(requests), -1).clone()  # prior p(S_k) without evidence
        if router.modality == "text":
            return router.probabilities(router.features([r.prompt for r in requests]))
        images = images if images is not None else [_open(r.image) for r in requests]
        rows = [i for i, im in enumerate(images) if im is not None]
        if rows:
            w[rows] = router.probabilities(router.features([images[i] for i in rows]))
        return w

    # -------------------------------------------------------------- decoding
    def _start(self, requests: list[Request], suffixes=None, all_positions=False):
        """Encode, route, prefill. Returns (batch, runs {k: run}, log_w (B,K), lp (B,K,V) or
        per-run full log-probs, prior (B,K))."""
        batch = self._encode(requests, suffixes)
        if self.shared_tower is not None:
            self.shared_tower.remember(batch)
        prior = self.route(requests, images=batch.images)
        posterior = self.mode == "posterior"
        log_w = prior.log()
        runs = {}
        outputs = {}
        shared = self.shared_tower.outputs(batch) if self.shared_tower is not None else None
        for k, model in enumerate(self.experts):
            rows = (prior[:, k] > 0).nonzero().squeeze(1)
            if model is None or len(rows) == 0:
                continue
            enc = shared.for_expert(k, rows) if shared is not None else None
            run = _ExpertRun(model, rows, batch, enc)
            lp = run.prefill(all_positions=all_positions or posterior)
            if posterior:
                ll = _prompt_log_likelihood(lp, run, batch.evidence[rows])
                log_w[rows, k] = log_w[rows, k] + ll
            runs[k], outputs[k] = run, lp
        return batch, runs, normalise_log(log_w), outputs, prior

    def _mixing(self, log_w: torch.Tensor) -> torch.Tensor:
        """Log-weights used to mix: the posterior's top-k (posterior mode) or log_w itself."""
        if self.mode != "posterior" or self.top_k >= log_w.shape[1]:
            return log_w
        return top_k_renormalise(log_w.exp(), self.top_k).log()

    @torch.inference_mode()
    def generate(self, requests: Request | Sequence[Request], *, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str | int] | None = None,
                 seed: int | None = None, on_token: Callable[[int, str], None] | None = None) -> list[Generation]:
        """Generate for a batch of requests (which may route to different experts).

        ``stop``: strings (the text is cut before them) and/or token ids; eos always stops.
        ``on_token(i, delta_text)`` streams the text of request ``i`` as it grows.
        """
        requests = [requests] if isinstance(requests, Request) else list(requests)
        _check_decoding(max_new_tokens, temperature, top_p)
        if not requests:
            return []
        stop_strings = [s for s in (stop or []) if isinstance(s, str) and s]
        stop_ids = self.eos_ids | {int(s) for s in (stop or []) if not isinstance(s, str)}
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        batch, runs, log_w, last_lp, prior = self._start(requests)
        B, K = log_w.shape
        posterior = self.mode == "posterior"
        V = next(iter(last_lp.values())).shape[-1]
        lp = torch.zeros(B, K, V)  # each expert's next-token log-probs; rows it does not run stay 0, never read
        run_mask = torch.zeros(B, K, dtype=torch.bool)
        for k, run in runs.items():
            lp[run.rows, k] = last_lp[k][:, -1] if posterior else last_lp[k]
            run_mask[run.rows, k] = True
        # the mixture weights change per token only under the posterior router
        fixed = None if posterior else Mixture(self._mixing(log_w).masked_fill(~run_mask, float("-inf")))
        streams = _Streams(self.tokenizer, B, stop_strings, on_token)
        done = torch.zeros(B, dtype=torch.bool)
        active = list(range(B))  # rows still generating (Python-side: no tensor op per row per step)
        reasons = ["length"] * B
        rows = torch.arange(B)
        for t in range(max_new_tokens):
            mixture = fixed if fixed is not None else Mixture(self._mixing(log_w).masked_fill(~run_mask, float("-inf")))
            token = _choose(mixture(lp), do_sample, temperature, top_p, generator)  # (B,)
            if len(active) < B:
                token = torch.where(done, torch.full_like(token, self.pad_id), token)
            if posterior:
                updated = posterior_update(log_w.masked_fill(~run_mask, float("-inf")), lp[rows, :, token])
                log_w = torch.where(done.unsqueeze(1), log_w, updated)
            last = t == max_new_tokens - 1
            ids = token.tolist()
            for i in list(active):
                if streams.push(i, ids[i], final=last or ids[i] in stop_ids) or ids[i] in stop_ids:
                    done[i], reasons[i] = True, "stop"
                    active.remove(i)
                    streams.finish(i)
            if not active or last:
                break
            for k, run in runs.items():
                lp[run.index, k] = run.step(token[run.index])
        return [self._result(i, streams, reasons[i], log_w[i], prior[i], batch.lengths[i], stop_ids)
                for i in range(B)]

    def _result(self, i, streams: _Streams, reason: str, log_w, prior, n_prompt: int, stop_ids) -> Generation:
        ids = streams.tokens[i]
        text, _ = streams.text(i)
        streams.finish(i)
        return Generation(text=text, token_ids=ids, weights=[float(x) for x in log_w.exp()],
                          experts=list(self.expert_names), finish_reason=reason, prompt_tokens=n_prompt,
                          completion_tokens=len(ids), left_out=list(self.left_out),
                          prior=[float(x) for x in prior])

    @torch.inference_mode()
    def next_token_distribution(self, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's next-token probabilities (V,) after the prompt, and the weights (K,)
        that mixed them (for ``posterior``: after the prompt's evidence)."""
        _, runs, log_w, last_lp, _ = self._start([request])
        K = log_w.shape[1]
        V = next(iter(last_lp.values())).shape[-1]
        lp = torch.zeros(1, K, V)
        run_mask = torch.zeros(1, K, dtype=torch.bool)
        for k in runs:
            lp[0, k] = last_lp[k][0, -1] if last_lp[k].dim() == 3 else last_lp[k][0]
            run_mask[0, k] = True
        mix_w = self._mixing(log_w).masked_fill(~run_mask, float("-inf"))
        return mixture_log_probs(mix_w, lp)[0].exp(), normalise_log(mix_w)[0].exp()

    def _target_ids(self, request: Request, target: str) -> list[int]:
        """Token ids of ``target`` as the assistant's answer, closing eos included (as trained)."""
        from ddfm.models import render_prompt

        has_image = request.image is not None
        msgs = _messages(request, has_image)
        prompt = render_prompt(self.processor, msgs, add_generation_prompt=True)
        full = render_prompt(self.processor, msgs + [{"role": "assistant", "content": [{"type": "text", "text": target}]}],
                             add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not extend the prompt with the answer; cannot score")
        ids = self.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        eos = [j for j, t in enumerate(ids) if t in self.eos_ids]
        return ids[: eos[0] + 1] if eos else ids

    @torch.inference_mode()
    def score(self, requests: Sequence[Request], targets: Sequence[str]) -> list[dict]:
        """Negative log-likelihood of each reference answer under the mixture.

        Per token, -log Σ_k w_k p_k(x_t | x_<t) with the mode's weights (for ``posterior``
        updated after every answer token, so the sum is the exact sequence likelihood
        Σ_k π_k(z) Π_t p_k). Returns ``[{"nll", "n_tokens", "weights"}]`` (nll in nats, summed).
        """
        requests = list(requests)
        if len(requests) != len(targets):
            raise ValueError(f"score: {len(requests)} requests but {len(targets)} targets")
        if not requests:
            return []
        suffixes = [self._target_ids(r, t) for r, t in zip(requests, targets)]
        batch, runs, log_w, full_lp, _ = self._start(requests, suffixes=suffixes, all_positions=True)
        results = []
        for i, suffix in enumerate(suffixes):
            n = len(suffix)
            target = torch.tensor(suffix, dtype=torch.long)
            per_expert = {k: full_lp[k][(run.rows == i).nonzero()[0, 0], -n - 1:-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)
                          for k, run in runs.items() if (run.rows == i).any()}  # k -> (n,)
            w, nll = log_w[i:i + 1], 0.0
            for t in range(n):
                tok_lp = torch.full((1, len(self.experts)), float("-inf"))
                for k, v in per_expert.items():
                    tok_lp[0, k] = v[t]
                mix_w = self._mixing(w).masked_fill(torch.isneginf(tok_lp), float("-inf"))
                nll -= float(torch.logsumexp(normalise_log(mix_w) + tok_lp.nan_to_num(neginf=-1e30), dim=1))
                if self.mode == "posterior":
                    w = posterior_update(w, tok_lp.nan_to_num(neginf=-1e30).masked_fill(torch.isneginf(w), 0.0))
            results.append({"nll": nll, "n_tokens": n, "weights": [float(x) for x in w[0].exp()]})
        return results


def _parse_mode(mode: str, K: int) -> tuple[str, int | None]:
    if mode in ("centroid", "posterior", "uniform"):
        return mode, None
    if mode.startswith("expert:"):
        try:
            j = int(mode.split(":", 1)[1])
        except ValueError:
            j = -1
        if not 0 <= j < K:
            raise ValueError(f"--mode {mode!r}: expert index must be 0..{K - 1}")
        return "expert", j
    raise ValueError(f"--mode: unknown routing mode {mode!r}; use one of {', '.join(MODES)}")


def _names(paths: list[str]) -> list[str]:
    names = [Path(p).name or p for p in paths]
    return names if len(set(names)) == len(names) else paths


def _check_decoding(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ------------------------------------------------------------------------------ shared encoder

class _SharedTower:
    """The experts' own vision tower as the router's encoder (the paper's shared encoder).

    The tower of the first expert computes the routing features (mean-pooled selected
    layer, CLS dropped, as ``ddfm.embed``'s ``tower:PATH`` encoder) and its hidden states
    are reused by every expert whose tower has identical weights (LLaVA trains with a
    frozen tower), so routing adds no encoder pass. ``encode`` serves :class:`Router`.
    """

    spec = "shared-tower"
    modality = "image"

    def __init__(self, experts: list, processor):
        self.ref = next(m for m in experts if m is not None)
        if getattr(self.ref.config, "vision_config", None) is None:
            raise ValueError("shared_encoder: the experts have no vision tower")
        self.processor, self.experts = processor, experts
        towers = [_tower(m) for m in experts]
        ref_state = _tower(self.ref).state_dict()
        self.same = [t is not None and all(torch.equal(v, ref_state[n]) for n, v in t.state_dict().items())
                     for t in towers]
        self._last: dict[int, Any] = {}
        self._pixels: dict[int, torch.Tensor] = {}

    def remember(self, batch: _Batch) -> None:
        """Pixel values the processor already computed for the batch's images."""
        self._pixels = {id(im): pv for im, pv in zip(batch.images, batch.pixel_values) if im is not None}

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.ref.config
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
        with torch.inference_mode():
            out = _tower(self.ref)(pixel_values.to(self.ref.device, self.ref.dtype), output_hidden_states=True)
            hidden = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        return hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden  # (B, T, H)

    def encode(self, items: list) -> torch.Tensor:
        """Routing features (B, D) of images; remembers the tower output for the experts."""
        originals = list(items)
        known = [self._pixels.get(id(x)) for x in originals]
        if all(p is not None for p in known):  # the batch's own pixel values: no second preprocessing
            pixels = torch.cat(known)
        else:
            images = [_open(x) for x in originals]
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = self._hidden(pixels)
        self._last = {id(x): hidden[j:j + 1] for j, x in enumerate(originals)}
        return torch.nn.functional.normalize(hidden.mean(1).float(), dim=1).numpy()

    def outputs(self, batch: _Batch) -> "_SharedOutputs":
        hidden = [self._last.get(id(im)) if im is not None else None for im in batch.images]
        todo = [i for i, h in enumerate(hidden) if h is None and batch.pixel_values[i] is not None]
        if todo:  # requests the router did not see (e.g. a forced expert): one tower pass now
            h = self._hidden(torch.cat([batch.pixel_values[i] for i in todo]))
            for j, i in enumerate(todo):
                hidden[i] = h[j:j + 1]
        self._last, self._pixels = {}, {}
        return _SharedOutputs(self, hidden)


class _SharedOutputs:
    def __init__(self, tower: _SharedTower, hidden: list):
        self.tower, self.hidden = tower, hidden

    def for_expert(self, k: int, rows: torch.Tensor):
        """``mm_encoder_outputs`` for expert k's rows (its own projector on the shared tower
        states), or None when its tower differs (it then runs its own tower)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        states = [self.hidden[r] for r in rows.tolist() if self.hidden[r] is not None]
        if not self.tower.same[k] or not states:
            return None
        model = self.tower.experts[k]
        projector = getattr(model, "model", model).multi_modal_projector
        with torch.inference_mode():
            feats = projector(torch.cat(states))
        return {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}


def _tower(model):
    if model is None:
        return None
    inner = getattr(model, "model", model)
    return getattr(inner, "vision_tower", None)


# ------------------------------------------------------------------------------ ddfm generate

@dataclass
class GenerateConfig:
    """``ddfm generate``: generate with K experts + router as one model."""

    experts: list[str] = arg("expert checkpoint directories, one per cluster in the router's order")
    prompt: str = arg("the user's prompt")
    router: Optional[str] = arg("router.json (or partition directory) written by `ddfm partition`", default=None)
    image: Optional[str] = arg("image file for the prompt", default=None)
    mode: str = arg("routing: centroid, posterior, uniform or expert:J", default="centroid")
    top_k: Optional[int] = arg("experts mixed per request (default: router's top_k for centroid, else all)", default=None)
    router_temperature: Optional[float] = arg("router temperature τ of eq. 29 (default: the router file's)", default=None)
    shared_encoder: bool = arg("route with the experts' own vision tower instead of the partition's encoder",
                               default=False)
    evidence: str = arg("posterior: prompt tokens counted as evidence (prompt: all text; answers: the "
                        "history's assistant turns, for experts trained on answers only)", default="prompt",
                        choices=EVIDENCE)
    max_new_tokens: int = arg("maximum generated tokens", default=64)
    do_sample: bool = arg("sample instead of greedy decoding", default=False)
    temperature: float = arg("sampling temperature", default=1.0)
    top_p: float = arg("nucleus sampling mass", default=1.0)
    seed: Optional[int] = arg("sampling seed", default=None)
    stop: list[str] = arg("stop strings", default_factory=list)
    allow_missing: bool = arg("run without experts that are missing or cannot be loaded", default=False)
    device: str = arg("torch device", default="cpu")
    json: bool = arg("print the result as JSON", default=False)

    def __post_init__(self):
        if not self.experts:
            raise ValueError("--experts: give at least one checkpoint directory")
        _parse_mode(self.mode, max(len(self.experts), 1))
        _check_decoding(self.max_new_tokens, self.temperature, self.top_p)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.router_temperature is not None and not self.router_temperature > 0:
            raise ValueError(f"--router-temperature must be > 0, got {self.router_temperature}")
        if self.image is not None and not Path(self.image).is_file():
            raise FileNotFoundError(f"--image: file not found: {self.image}")


def generate_cli(cfg: GenerateConfig) -> Generation:
    """Load the ensemble, generate for one prompt, print the text and the weights."""
    ens = Ensemble.from_pretrained(cfg.experts, cfg.router, mode=cfg.mode, top_k=cfg.top_k,
                                   temperature=cfg.router_temperature, allow_missing=cfg.allow_missing,
                                   device=cfg.device, shared_encoder=cfg.shared_encoder, evidence=cfg.evidence)
    [gen] = ens.generate(Request(cfg.prompt, image=cfg.image), max_new_tokens=cfg.max_new_tokens,
                         do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                         stop=cfg.stop or None, seed=cfg.seed)
    if cfg.json:
        print(json.dumps({**asdict(gen), "mode": cfg.mode}, ensure_ascii=False))
    else:
        print(gen.text)
        weights = "  ".join(f"{n}={w:.3f}" for n, w in zip(gen.experts, gen.weights))
        print(f"[mode {ens.mode}, weights {weights}, {gen.completion_tokens} tokens, {gen.finish_reason}"
              + (f", left out: {', '.join(gen.left_out)}" if gen.left_out else "") + "]")
    return gen

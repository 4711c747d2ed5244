"""One expert's side of decoding: its rows, its KV cache, and the only device crossing.

An :class:`ExpertRun` is expert k decoding the rows of the running batch that give it
weight. It owns its KV cache: rows join (their prompts prefilled, the cache left-padded
to a common length and concatenated) and leave (their cache rows dropped) at token
boundaries, so requests with different lengths and parameters share one batch.

Devices and dtypes: the experts run on their device in their dtype (bf16 included);
everything the ensemble mixes — log-probabilities, weights, tokens — lives on the CPU in
float32 (log-probabilities) and float64 (routing log-weights). Every move between the two
happens in this module: inputs go to ``model.device`` in :func:`prefill` and
:meth:`ExpertRun.step`; log-probabilities are computed in float32 on the device and come
back with :func:`_to_host`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ddfm.ensemble.prompts import Batch
from ddfm.model.families import rope_positions, stack_vision

__all__ = ["ExpertRun", "Prefill", "full_log_probs", "prefill", "token_log_probs"]


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """Log-probabilities back to the ensemble: CPU float32."""
    return x.to("cpu", torch.float32)


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x_<=t) at every position: logits (n, T, V), ids (n, T) -> (n, T-1) float32.

    One row at a time, so only one (T, V) float32 copy exists at once.
    """
    out = torch.empty(ids.shape[0], ids.shape[1] - 1, dtype=torch.float32, device=logits.device)
    for i in range(ids.shape[0]):
        out[i] = logits[i, :-1].float().log_softmax(-1).gather(-1, ids[i, 1:, None])[:, 0]
    return out


@dataclass
class Prefill:
    """What a prefill of n rows returns (CPU): ``last`` (n, V) float32 log-probabilities of
    the next token; ``tokens`` (n, T-1) float32 log p(x_{t+1} | x_<=t) of the prompt's own
    tokens (when asked for), aligned with the (shared-padding-trimmed) ``input_ids`` (n, T)."""

    last: torch.Tensor
    tokens: Optional[torch.Tensor]
    input_ids: torch.Tensor
    cache: Any
    mask: torch.Tensor
    next_pos: torch.Tensor


@torch.inference_mode()
def prefill(model, batch: Batch, rows: list[int], *, encoder_outputs: Any = None,
            want_tokens: bool = False) -> Prefill:
    """Run the prompts of batch rows ``rows`` through ``model`` with a fresh KV cache.

    Positions are explicit: 1-D RoPE counts each row's real tokens (left padding skipped);
    M-RoPE families (Qwen2-VL, Qwen2.5-VL) take the model's own 3-D positions
    (:func:`ddfm.model.families.rope_positions`), and every later token of a row the position
    after its largest one — what ``generate`` does with its rope deltas.
    """
    dev = model.device
    idx = torch.tensor(rows, dtype=torch.long)
    mask = batch.attention_mask[idx]
    keep = int(mask.sum(0).nonzero()[0]) if mask.numel() else 0  # drop padding shared by all rows
    input_ids, mask = batch.input_ids[idx][:, keep:], mask[:, keep:]
    extra: dict[str, Any] = {}
    visions = [batch.vision[r] for r in rows if batch.vision[r] is not None]
    vision = stack_vision(visions) if visions else {}
    if encoder_outputs is not None:
        extra["mm_encoder_outputs"] = encoder_outputs
    else:
        extra.update({k: v.to(dev, model.dtype) if v.is_floating_point() else v.to(dev) for k, v in vision.items()})
    types = {k: v[idx][:, keep:] for k, v in batch.token_types.items()}
    position_ids = rope_positions(model, input_ids, mask, vision, types)  # (3, n, T) or None
    if position_ids is None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0).to(dev)  # (n, T)
        next_pos = position_ids[:, -1:] + 1
    else:
        next_pos = position_ids.amax(dim=(0, 2))[:, None] + 1  # (n, 1)
    ids_dev, mask_dev = input_ids.to(dev), mask.to(dev)
    out = model(input_ids=ids_dev, attention_mask=mask_dev, position_ids=position_ids, use_cache=True,
                logits_to_keep=0 if want_tokens else 1, **extra)
    last = out.logits[:, -1].float().log_softmax(-1)
    tokens = _to_host(token_log_probs(out.logits, ids_dev)) if want_tokens else None
    return Prefill(_to_host(last), tokens, input_ids, _cache_of(out), mask_dev, next_pos)


@torch.inference_mode()
def full_log_probs(model, batch: Batch, rows: list[int]) -> list[torch.Tensor]:
    """Next-token log-probabilities at every real position but the last: for each row,
    (L-1, V) CPU float32 where L is its length and entry t predicts token t+1."""
    dev = model.device
    out = []
    for r in rows:  # one row at a time: a (L, V) float32 copy per row, no padding
        n = int(batch.attention_mask[r].sum())
        ids = batch.input_ids[r, -n:][None]
        logits = model(input_ids=ids.to(dev), use_cache=False).logits[0, :-1]
        out.append(_to_host(logits.float().log_softmax(-1)))
    return out


class ExpertRun:
    """Expert ``k`` decoding its rows with its own KV cache.

    ``rows`` are the batch's row handles in cache order; :meth:`join` adds prefilled rows,
    :meth:`leave` drops rows, :meth:`step` feeds one token per row and returns (n, V)
    CPU float32 log-probabilities.
    """

    def __init__(self, model):
        self.model, self.device = model, model.device
        self.decode = _decode_forward(model)
        self.rows: list[int] = []
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None  # (n, T) on the device; 0 = left padding
        self.next_pos: Optional[torch.Tensor] = None  # (n, 1) on the device
        self.padded = False

    def join(self, handles: list[int], pre: Prefill) -> None:
        """Add rows (``handles``) whose prompts ``pre`` holds to the running cache."""
        if self.cache is None:
            self.cache, self.mask, self.next_pos = pre.cache, pre.mask, pre.next_pos
        else:
            self.cache, self.mask = _concat_caches(self.cache, self.mask, pre.cache, pre.mask)
            self.next_pos = torch.cat([self.next_pos, pre.next_pos])
        self.rows = self.rows + list(handles)
        self.padded = bool((self.mask == 0).any())

    def can_join(self) -> bool:
        """Whether rows can join now: no cache yet, or one whose layers can be concatenated."""
        return self.cache is None or can_join(self.cache)

    def leave(self, handles: set[int]) -> None:
        """Drop rows from the cache (their requests finished or were cancelled)."""
        keep = [i for i, h in enumerate(self.rows) if h not in handles]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next_pos = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]
        start = int(self.mask.sum(0).nonzero()[0])  # columns that are padding in every remaining row
        if start and can_join(self.cache):  # trimming is a saving; a sliding-window cache keeps its columns
            _trim_left(self.cache, start)
            self.mask = self.mask[:, start:]
        self.padded = bool((self.mask == 0).any())

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens (n,) -> log-probs (n, V) (CPU float32)."""
        inputs = {"input_ids": tokens.view(-1, 1).to(self.device), "position_ids": self.next_pos}
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        if self.padded:
            # without a mask transformers skips building and checking one (for sdpa it is None anyway)
            inputs["attention_mask"] = self.mask
        logits, self.cache = self.decode(inputs, self.cache)  # (n, 1, V)
        self.next_pos = self.next_pos + 1
        return _to_host(logits[:, -1].float().log_softmax(-1))


# ------------------------------------------------------------------------------ KV caches

def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and not getattr(layer, "is_sliding", False)
                                 for layer in layers):
        raise NotImplementedError(f"rows cannot join a running {type(cache).__name__} (sliding-window or "
                                  "non-dynamic cache layers)")
    return layers


def can_join(cache) -> bool:
    """Whether rows can join a running cache of this kind (dynamic, full-attention layers)."""
    try:
        _layers(cache)
    except NotImplementedError:
        return False
    return True


def _concat_caches(old, old_mask: torch.Tensor, new, new_mask: torch.Tensor):
    """Cache and mask of ``old``'s rows followed by ``new``'s, left-padded to one length."""
    T = max(old_mask.shape[1], new_mask.shape[1])

    def pad(x: torch.Tensor, length: int) -> torch.Tensor:  # (n, H, t, D) -> (n, H, T, D), zeros on the left
        return x if length == T else torch.nn.functional.pad(x, (0, 0, T - length, 0))

    t_old, t_new = old_mask.shape[1], new_mask.shape[1]
    for a, b in zip(_layers(old), _layers(new)):
        a.keys = torch.cat([pad(a.keys, t_old), pad(b.keys, t_new)])
        a.values = torch.cat([pad(a.values, t_old), pad(b.values, t_new)])
    mask = torch.cat([torch.nn.functional.pad(old_mask, (T - t_old, 0)),
                      torch.nn.functional.pad(new_mask, (T - t_new, 0))])
    return old, mask


def _trim_left(cache, start: int) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


def _cache_of(out) -> Any:
    # transformers >= 5.24 names it `cache` (reading `past_key_values` logs a deprecation warning)
    return out["cache"] if "cache" in out.keys() else out.past_key_values


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
            return head(out.last_hidden_state), _cache_of(out)  # last_hidden_state: (n, 1, H)

        return decode
    key = _cache_argument(cls)

    def forward(inputs: dict, cache) -> tuple[torch.Tensor, Any]:
        out = model(**inputs, use_cache=True, **{key: cache})
        return out.logits, _cache_of(out)

    return forward


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The forward() keyword of the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"

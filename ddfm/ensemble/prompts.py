"""Requests to token ids: the checkpoint's own chat template and processor, one place.

A :class:`Request` (prompt, optional image, earlier turns) becomes an :class:`Encoded`
prompt: token ids with each image placeholder expanded by the family's processor to that
image's own tokens (tiles, grids, any resolution), the processor's vision inputs
(``pixel_values`` and whatever else the family returns: ``image_grid_thw``,
``pixel_attention_mask``, ``image_sizes``), its per-token inputs (Qwen2-VL's
``mm_token_type_ids``), and which tokens count as evidence for the posterior router. :func:`left_pad` stacks encoded
prompts into a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ddfm.data import IMAGE_TOKEN, open_image
from ddfm.model.chat import (
    assistant_spans,
    encode_chat,
    encode_conversation,
    encode_prompt,
    get_tokenizer,
    image_token,
    render_prompt,
    spells_control_tokens,
    to_chat_messages,
)

__all__ = ["Request", "Encoded", "Batch", "PromptEncoder", "left_pad", "open_request_image"]


@dataclass
class Request:
    """One generation request: the user's prompt, an optional image and earlier turns.

    ``history`` holds earlier turns, as LLaVA turns (``{"from", "value"}``) or HF chat
    messages (``{"role", "content"}``); ``image`` is a PIL image or an image file path.
    An ``<image>`` in the prompt marks where the image goes (as in LLaVA records) unless
    ``literal``: then the prompt is text the way a chat API's user typed it (``ddfm
    serve``). Either way, control tokens spelled in the text (``</s>``, ``<|assistant|>``)
    are plain text (:func:`~ddfm.model.chat.encode_chat`).
    A *raw* request (OpenAI's completions API) skips the chat template: ``token_ids`` are
    the prompt as given, or, with ``raw=True``, ``prompt`` is tokenized as plain text
    (with the tokenizer's own special tokens, e.g. a leading bos). ``encoded``: the request
    already encoded by this ensemble's :class:`PromptEncoder` (``ddfm serve`` encodes while
    it checks the prompt's length, in the request's thread, so the decoding thread does not
    encode it again).
    """

    prompt: str
    image: Any = None
    history: Optional[list[dict]] = None
    raw: bool = False
    token_ids: Optional[list[int]] = None
    literal: bool = False
    encoded: Optional["Encoded"] = field(default=None, repr=False, compare=False)


@dataclass
class Encoded:
    """A request's prompt: ``ids`` (T,), ``vision`` (processor outputs other than the
    ids and mask, each with the image on dim 0, e.g. ``pixel_values`` (1, C, H, W)) or
    None, the decoded ``image`` or None, and ``evidence`` (T,) for the posterior router."""

    ids: list[int]
    vision: Optional[dict[str, torch.Tensor]]
    image: Any
    evidence: list[bool]
    token_types: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token inputs, each (T,)


@dataclass
class Batch:
    """Left-padded prompts. input_ids/attention_mask: (B, T) int64 (on the CPU); evidence
    (B, T) bool marks the tokens whose probability is evidence for the posterior router;
    vision[i]: row i's vision inputs or None; images[i]: PIL or None; lengths[i]: prompt
    tokens of row i (without a scored suffix); token_types: per-token inputs (B, T) int64
    (e.g. Qwen2-VL's ``mm_token_type_ids``), left-padded with 0."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    evidence: torch.Tensor
    vision: list
    images: list
    lengths: list[int] = field(default_factory=list)
    token_types: dict[str, torch.Tensor] = field(default_factory=dict)


def open_request_image(image):
    """A request's image as an RGB PIL image (path or PIL), or None."""
    if image is None:
        return None

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"request image not found: {image}")
        return open_image(image)
    return image.convert("RGB")


def _messages(request: Request, with_image: bool) -> list[dict]:
    """The chat messages of a request. The image goes where the prompt's ``<image>``
    placeholder stands (as LLaVA records place it; not in a ``literal`` prompt), else
    before the prompt's text, unless an earlier turn already holds it."""
    history = to_chat_messages(request.history or [])
    has_image_part = any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
                         for m in history)
    if IMAGE_TOKEN in request.prompt and not request.literal:
        if not with_image or has_image_part:
            raise ValueError(f"the prompt holds an {IMAGE_TOKEN} placeholder but the request has no image for it")
        [user] = to_chat_messages([{"from": "human", "value": request.prompt}])
        return history + [user]
    parts = ([{"type": "image"}] if with_image and not has_image_part else []) + [{"type": "text", "text": request.prompt}]
    return history + [{"role": "user", "content": parts}]


class PromptEncoder:
    """Encodes requests with one checkpoint's processor (or tokenizer) and chat template.

    ``evidence``: ``"prompt"`` (every text token of the prompt) or ``"answers"`` (only
    the tokens of the history's assistant turns, as the LLaVA loss sees them).
    """

    def __init__(self, processor, evidence: str = "prompt", image_token_id: int | None = None):
        self.processor, self.evidence = processor, evidence
        self.tokenizer = get_tokenizer(processor)
        self.is_vlm = image_token(processor) is not None
        self.image_token_id = image_token_id

    def encode(self, request: Request) -> Encoded:
        if request.encoded is not None:
            return request.encoded
        if request.token_ids is not None or request.raw:
            return self._encode_raw(request)
        image = open_request_image(request.image)
        if image is not None and not self.is_vlm:
            raise ValueError("the experts are text-only language models; a request with an image cannot be served")
        messages = _messages(request, image is not None)
        images = [image] if image is not None else None
        if spells_control_tokens(self.processor, messages):  # typed control tokens are text, not turns
            enc = encode_chat(self.processor, messages, images)
        else:
            enc = encode_prompt(self.processor, render_prompt(self.processor, messages), images)
        return Encoded(enc.ids, enc.vision, image, self._evidence(messages, enc.ids, images), enc.token_types)

    def _encode_raw(self, request: Request) -> Encoded:
        if request.image is not None or request.history:
            raise ValueError("a raw (completions) prompt takes no image and no history; use chat messages")
        ids = list(request.token_ids) if request.token_ids is not None else \
            self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        return Encoded([int(t) for t in ids], None, None, [t != self.image_token_id for t in ids])

    def _evidence(self, messages: list[dict], ids: list[int], images: list | None) -> list[bool]:
        if self.evidence == "prompt":
            return [t != self.image_token_id for t in ids]

        if spells_control_tokens(self.processor, messages):
            return self._answers_by_prefixes(messages, ids, images)

        conv = encode_conversation(self.processor, messages, images)
        conv_ids, answer = conv.ids, conv.mask
        n = min(len(ids), len(conv_ids))
        if conv_ids[:n] != ids[:n]:
            raise ValueError("the prompt's tokens differ from the conversation's; cannot find its assistant turns")
        return answer[:n] + [False] * (len(ids) - n)

    def _answers_by_prefixes(self, messages: list[dict], ids: list[int], images: list | None) -> list[bool]:
        """The earlier answers' tokens in a prompt encoded by :func:`~ddfm.model.chat.encode_chat`
        (no offsets to map a template's answer spans): answer i spans from the conversation
        before it with the generation prompt to the conversation through it."""
        def length(msgs: list[dict], gen: bool) -> int:
            n = sum(isinstance(m["content"], list) and sum(p.get("type") == "image" for p in m["content"])
                    for m in msgs)
            return len(encode_chat(self.processor, msgs, (images or [])[:n] or None, add_generation_prompt=gen).ids)

        answer = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = length(messages[:i], True) if i else 0, length(messages[:i + 1], False)
            answer[start:end] = [True] * (end - start)
        return answer[:len(ids)]

    def target_ids(self, request: Request, target: str, eos_ids: set[int]) -> list[int]:
        """Token ids of ``target`` as the assistant's answer, closing eos included (as trained)."""
        msgs = _messages(request, request.image is not None)
        prompt = render_prompt(self.processor, msgs, add_generation_prompt=True)
        answered = msgs + [{"role": "assistant", "content": [{"type": "text", "text": target}]}]
        full = render_prompt(self.processor, answered, add_generation_prompt=False)
        if full.startswith(prompt):
            answer = full[len(prompt):]
        else:  # the template writes answers differently from its generation prompt (LLaVA-OneVision)
            full, spans = assistant_spans(self.processor, answered)
            answer = full[spans[-1][0]:spans[-1][1]]
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        eos = [j for j, t in enumerate(ids) if t in eos_ids]
        return ids[: eos[0] + 1] if eos else ids


def left_pad(encoded: list[Encoded], pad_id: int, suffixes: list[list[int]] | None = None) -> Batch:
    """Stack prompts (each followed by its suffix, if given) into a left-padded :class:`Batch`.

    A suffix (a reference answer to score) is never evidence.
    """
    seqs = [e.ids + (suffixes[i] if suffixes else []) for i, e in enumerate(encoded)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    evidence = torch.zeros((len(seqs), T), dtype=torch.bool)
    types = {key: torch.zeros((len(seqs), T), dtype=torch.long) for e in encoded for key in e.token_types}
    for i, (s, e) in enumerate(zip(seqs, encoded)):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
        evidence[i, T - len(s):T - len(s) + len(e.ids)] = torch.tensor(e.evidence, dtype=torch.bool)
        for key, value in e.token_types.items():  # a scored suffix is text: type 0
            types[key][i, T - len(s):T - len(s) + len(e.ids)] = value
    return Batch(ids, mask, evidence, [e.vision for e in encoded], [e.image for e in encoded],
                 [len(e.ids) for e in encoded], types)

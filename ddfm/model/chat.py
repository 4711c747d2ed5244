"""The one prompt format: LLaVA turns -> chat messages -> the checkpoint's template -> token ids.

Used by train, the ensemble, eval and serve alike:
LLaVA turns --:func:`to_chat_messages`--> HF chat messages --:func:`render_prompt`--> text
(the checkpoint's own chat template), whose image placeholders the family's processor
expands, each to that image's own tokens (tiles, grids, any resolution).
:func:`encode_conversation` turns a conversation into token ids, the assistant-token mask
used by the loss and the image inputs. A control token spelled in a message's text
(``</s>``, ``<|assistant|>``, ``<image>`` typed by a user) is the text it spells, never a
turn marker (:func:`encode_chat`; ``ddfm train`` refuses data holding them).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ddfm.data import IMAGE_TOKEN
from ddfm.model.families import stack_vision


def get_tokenizer(processor_or_tokenizer):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def image_token(processor_or_tokenizer) -> str | None:
    """The image placeholder string of a processor (``None`` for a text-only tokenizer)."""
    return getattr(processor_or_tokenizer, "image_token", None)


_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def to_chat_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ``[{"from", "value"}]`` -> HF chat messages ``[{"role", "content"}]``.

    ``content`` is a list of parts: ``{"type": "image"}`` where the ``<image>`` placeholder
    stood (the newline LLaVA puts after it is dropped: the template writes its own) and
    ``{"type": "text", "text": ...}``. Messages already in HF form pass through unchanged.
    """
    messages = []
    for turn in conversations:
        if "role" in turn:
            messages.append(turn)
            continue
        value, parts = turn["value"], []
        if IMAGE_TOKEN in value:
            before, after = value.split(IMAGE_TOKEN, 1)
            if before.strip():
                parts.append({"type": "text", "text": before.rstrip("\n")})
            parts.append({"type": "image"})
            value = after[1:] if after.startswith("\n") else after
        if value or not parts:
            parts.append({"type": "text", "text": value})
        messages.append({"role": _ROLE[turn["from"]], "content": parts})
    return messages


def _flatten(messages: list[dict]) -> list[dict]:
    # text-only tokenizers' templates expect string content
    flat = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            if any(p.get("type") == "image" for p in content):
                raise ValueError("a text-only model cannot take an image (message has an image part)")
            content = "".join(p.get("text", "") for p in content)
        flat.append({**m, "content": content})
    return flat


def render_prompt(processor_or_tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages to the prompt text with the checkpoint's own chat template.

    The ONE place that formats prompts (train, ensemble, eval and serve all call it).
    Image parts become the processor's image placeholder; the processor (or
    :func:`encode_conversation`) expands it to the vision tower's image-token count.
    Encode the result with ``add_special_tokens=False`` (the template writes bos).
    """
    is_processor = hasattr(processor_or_tokenizer, "image_processor")
    _require_template(processor_or_tokenizer)
    msgs = messages if is_processor else _flatten(messages)
    return processor_or_tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)


def _require_template(processor_or_tokenizer) -> None:
    if getattr(processor_or_tokenizer, "chat_template", None) is None:
        raise ValueError(f"{type(processor_or_tokenizer).__name__} has no chat template; "
                         "the checkpoint directory needs one (chat_template.jinja)")


def family_name(processor_or_tokenizer) -> str:
    """The family a processor belongs to, for error messages (``Qwen2VL``, ``Llava``, ...)."""
    return type(processor_or_tokenizer).__name__.removesuffix("Processor").removesuffix("TokenizerFast")


@dataclass
class Encoding:
    """A prompt or conversation as the model takes it.

    ``ids`` (T,) with every image placeholder expanded to that image's own tokens (as the
    family's processor expands it: tiles, grids, any resolution); ``mask`` (T,) True on the
    assistant's answers (the LLaVA loss mask); ``vision``: the processor's image inputs
    (``pixel_values`` and whatever else the family returns, e.g. ``image_grid_thw``,
    ``pixel_attention_mask``, ``image_sizes``), each with the image on dim 0, or None;
    ``token_types``: per-token inputs other than the ids (Qwen2-VL's
    ``mm_token_type_ids``), each (T,), or empty.
    """

    ids: list[int]
    mask: list[bool]
    vision: dict | None = None
    token_types: dict = field(default_factory=dict)


def tokenize(processor_or_tokenizer, text: str, images: list | None = None, *, offsets: bool = False) -> dict:
    """Token ids (and the processor's image inputs) of rendered chat-template text.

    A processor expands each image placeholder with its own per-image replacement and
    adds the tokenizer's special tokens unless the text already starts with bos (the rule
    of ``ProcessorMixin.apply_chat_template``); a tokenizer never adds them (as its
    ``apply_chat_template``). ``offsets``: also ``offset_mapping`` (T, 2) and the
    processor's ``text_replacement_offsets``. Returns a dict of (1, ...) tensors / lists.
    """
    tokenizer = get_tokenizer(processor_or_tokenizer)
    extra = {"return_offsets_mapping": True} if offsets else {}
    if image_token(processor_or_tokenizer) is None:
        if images:
            raise ValueError("a text-only model cannot take an image")
        enc = tokenizer(text, add_special_tokens=False, **extra)
        return {k: [v] for k, v in enc.items()}
    placeholder = image_token(processor_or_tokenizer)
    n = text.count(placeholder)
    if n != len(images or []):
        raise ValueError(f"{family_name(processor_or_tokenizer)}: the chat template rendered {n} image placeholder(s) "
                         f"({placeholder!r}) for {len(images or [])} image(s)")
    bos = tokenizer.bos_token
    if offsets:
        extra["return_text_replacement_offsets"] = True
    enc = processor_or_tokenizer(text=text, images=images or None, return_tensors="pt",
                                 add_special_tokens=not (bos is not None and text.startswith(bos)), **extra)
    return dict(enc)


def _vision_and_types(enc: dict) -> tuple[dict | None, dict]:
    skip = {"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets"}
    T = enc["input_ids"].shape[-1]
    vision, types = {}, {}
    for key, value in enc.items():
        if key in skip or not hasattr(value, "shape"):
            continue
        if value.dim() == 2 and tuple(value.shape) == (1, T):
            types[key] = value[0]  # per token
        else:
            vision[key] = value
    return vision or None, types


@dataclass
class ImageExpansion:
    """One image as the family's processor expands its placeholder: ``ids`` of the
    replacement (tiles, grid, row/column markers), ``vision`` (its image inputs, the image
    on dim 0), ``token_types`` (per-token inputs of those ids) and the ``image`` itself."""

    ids: list[int]
    vision: dict
    token_types: dict
    image: Any

    def splices(self, tokenizer) -> bool:
        """True if the replacement begins and ends with added tokens, so its ids inside any
        text are the ids it has alone (tokenizers split text at added tokens)."""
        added = tokenizer.added_tokens_decoder
        return bool(self.ids) and self.ids[0] in added and self.ids[-1] in added


def expand_image(processor, image) -> ImageExpansion:
    """The family's processor run on one image and its placeholder alone (no bos)."""
    enc = dict(processor(text=image_token(processor), images=[image], return_tensors="pt", add_special_tokens=False))
    vision, types = _vision_and_types(enc)
    return ImageExpansion(enc["input_ids"][0].tolist(), vision or {}, {k: v.tolist() for k, v in types.items()}, image)


def encode_prompt(processor_or_tokenizer, text: str, images: list | None = None) -> Encoding:
    """A rendered prompt (``render_prompt``) as the model takes it (``mask`` all False)."""
    enc = tokenize(processor_or_tokenizer, text, images)
    ids = [int(t) for t in (enc["input_ids"][0].tolist() if hasattr(enc["input_ids"], "tolist")
                            else enc["input_ids"][0])]
    vision, types = _vision_and_types(enc) if hasattr(enc["input_ids"], "shape") else (None, {})
    return Encoding(ids, [False] * len(ids), vision, types)


def spells_control_tokens(processor_or_tokenizer, messages: list[dict]) -> bool:
    """True if a message's text holds the string of an added token (``</s>``, ``<image>``, ...)."""
    added = [t for t in get_tokenizer(processor_or_tokenizer).added_tokens_encoder if t.strip()]
    texts = [m["content"] if isinstance(m["content"], str) else part.get("text") or ""
             for m in messages for part in ([m] if isinstance(m["content"], str) else m["content"])]
    return any(t in text for text in texts for t in added)


def encode_chat(processor_or_tokenizer, messages: list[dict], images: list | None = None,
                add_generation_prompt: bool = True) -> Encoding:
    """Chat messages as the model takes them, their text as plain text (``mask`` all False).

    The text is tokenized by transformers' own contract, the tokenizer's
    ``apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)``: control
    tokens spelled inside the messages are encoded as the text they spell (a typed image
    placeholder included); only the control tokens the template writes are control tokens.
    The processor's rule for its special tokens follows (added unless the text starts with
    bos), then each image placeholder the template wrote is replaced by that image's ids
    (:func:`expand_image`, as ``ddfm train`` splices them). ``images`` fill the messages'
    image parts in order. (A processor's own ``apply_chat_template(...,
    sanitize_control_tokens=True)`` counts typed placeholders as images in InternVL and
    Idefics3.) On text that spells no added token this gives the ids and image inputs of
    :func:`encode_prompt` (``tests/test_serve_attacks.py`` checks it for every family);
    :class:`~ddfm.ensemble.prompts.PromptEncoder` uses it only on text that does.
    """
    tokenizer = get_tokenizer(processor_or_tokenizer)
    _require_template(processor_or_tokenizer)
    placeholder = image_token(processor_or_tokenizer)
    msgs = messages if placeholder is not None else _flatten(messages)
    ids = [int(t) for t in tokenizer.apply_chat_template(
        msgs, chat_template=processor_or_tokenizer.chat_template, add_generation_prompt=add_generation_prompt,
        tokenize=True, return_dict=False, sanitize_control_tokens=True)]
    if placeholder is None:
        return Encoding(ids, [False] * len(ids))
    bos = tokenizer.bos_token
    if not (bos is not None and render_prompt(processor_or_tokenizer, messages, add_generation_prompt).startswith(bos)):
        before, after = _special_tokens_added(tokenizer)
        ids = before + ids + after
    return _with_images(processor_or_tokenizer, ids, [expand_image(processor_or_tokenizer, im) for im in images or []])


def _special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text when it adds its special tokens."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    i = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:i], full[i + len(bare):]


def _with_images(processor, ids: list[int], expansions: list[ImageExpansion]) -> Encoding:
    """``ids`` with each image placeholder id replaced by its image's ids, inputs and token types."""
    tokenizer = get_tokenizer(processor)
    placeholder = tokenizer.convert_tokens_to_ids(image_token(processor))
    if ids.count(placeholder) != len(expansions):
        raise ValueError(f"{family_name(processor)}: the chat template rendered {ids.count(placeholder)} image "
                         f"placeholder(s) for {len(expansions)} image(s)")
    if not all(e.splices(tokenizer) for e in expansions):
        raise ValueError(f"{family_name(processor)}: an image's tokens do not begin and end with added tokens; "
                         "they cannot be spliced into text tokenized apart")
    keys = {k for e in expansions for k in e.token_types}
    out, types, it = [], {k: [] for k in keys}, iter(expansions)
    for t in ids:
        e = next(it) if t == placeholder else None
        out += e.ids if e else [t]
        for k in keys:
            types[k] += e.token_types.get(k, [0] * len(e.ids)) if e else [0]
    vision = stack_vision([e.vision for e in expansions]) if expansions else None
    return Encoding(out, [False] * len(out), vision, {k: torch.tensor(v) for k, v in types.items()})


def assistant_spans(processor_or_tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered whole (no generation prompt) and each answer's characters.

    A template with ``{% generation %}`` blocks marks its answers itself (transformers'
    contract for ``return_assistant_tokens_mask``); a span is extended over the eos token
    that directly follows it, so the model learns to stop. Any other template: an answer
    spans the characters between the conversation rendered up to it with the generation
    prompt and rendered through it. A template whose shorter renderings are not prefixes
    of the whole one cannot be read this way: a ``ValueError`` naming the family.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    full = render_prompt(processor_or_tokenizer, messages, add_generation_prompt=False)
    template = processor_or_tokenizer.chat_template
    tokenizer = get_tokenizer(processor_or_tokenizer)
    if isinstance(template, str) and re.search(r"\{%-?\s*generation\s*-?%\}", template):
        msgs = messages if hasattr(processor_or_tokenizer, "image_processor") else _flatten(messages)
        text, indices = render_jinja_template(conversations=[msgs], chat_template=template,
                                              return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
        if text[0] != full:
            raise ValueError(f"{family_name(processor_or_tokenizer)}: the chat template renders differently with "
                             "generation markers; cannot find which tokens are the assistant's")
        eos = tokenizer.eos_token or ""
        return full, [(s, e + len(eos) if eos and full.startswith(eos, e) else e) for s, e in indices[0]]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render_prompt(processor_or_tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render_prompt(processor_or_tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise ValueError(f"{family_name(processor_or_tokenizer)}: the chat template does not render the "
                             f"conversation up to answer {len(spans) + 1} as a prefix of the whole conversation; "
                             "cannot find which tokens are the assistant's (a template with {% generation %} "
                             "blocks marks them itself)")
        spans.append((len(start), len(end)))
    return full, spans


def encode_conversation(processor_or_tokenizer, conversations: list[dict], images: list | None = None) -> Encoding:
    """A whole conversation as the model is trained on it: ids, answer mask, image inputs.

    The text is ``render_prompt(..., add_generation_prompt=False)``; the processor expands
    each image's placeholder to that image's tokens (``images``: PIL images in placeholder
    order, or their :func:`expand_image` — then the text is tokenized alone and each
    placeholder replaced by its image's ids, the same ids for replacements that begin and
    end with added tokens, as every supported family's do; a caller encoding many records
    of one image expands it once). ``mask[i]`` is True for tokens of an assistant answer,
    closing end-of-turn token included; spans (:func:`assistant_spans`) are moved past
    expanded placeholders and matched to tokens by their offsets, as transformers' own
    ``return_assistant_tokens_mask`` does. The ids are those of the full text tokenized
    at once — the ids inference sees.
    """
    messages = to_chat_messages(conversations)
    full, spans = assistant_spans(processor_or_tokenizer, messages)
    tokenizer = get_tokenizer(processor_or_tokenizer)
    if images and all(isinstance(e, ImageExpansion) and e.splices(tokenizer) for e in images):
        return _spliced(processor_or_tokenizer, full, spans, images)
    images = [e.image if isinstance(e, ImageExpansion) else e for e in images or []]
    enc = tokenize(processor_or_tokenizer, full, images, offsets=True)
    offsets = enc["offset_mapping"][0]
    offsets = offsets.tolist() if hasattr(offsets, "tolist") else offsets
    replaced = enc.get("text_replacement_offsets")
    replaced = list(replaced[0]) if replaced is not None and len(replaced) else []
    ends = [r["span"][1] for r in replaced]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replaced]
    shifted = [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in spans]
    mask = [any(t0 < e and t1 > s for s, e in shifted) for t0, t1 in offsets]
    ids = enc["input_ids"][0]
    ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    vision, types = _vision_and_types(enc) if hasattr(enc["input_ids"], "shape") else (None, {})
    return Encoding(ids, mask, vision, types)


def _spliced(processor, full: str, spans: list, expansions: list[ImageExpansion]) -> Encoding:
    """:func:`encode_conversation` of text whose placeholders are replaced by ids."""
    tokenizer = get_tokenizer(processor)
    placeholder = tokenizer.convert_tokens_to_ids(image_token(processor))
    bos = tokenizer.bos_token
    enc = tokenizer(full, add_special_tokens=not (bos is not None and full.startswith(bos)),
                    return_offsets_mapping=True)
    n = enc["input_ids"].count(placeholder)
    if n != len(expansions):
        raise ValueError(f"{family_name(processor)}: the chat template rendered {n} image placeholder(s) for "
                         f"{len(expansions)} image(s)")
    keys = {k for e in expansions for k in e.token_types}
    ids, mask, types, it = [], [], {k: [] for k in keys}, iter(expansions)
    for t, (t0, t1) in zip(enc["input_ids"], enc["offset_mapping"]):
        e = next(it) if t == placeholder else None
        ids += e.ids if e else [t]
        mask += [False] * len(e.ids) if e else [any(t0 < end and t1 > start for start, end in spans)]
        for k in keys:
            types[k] += e.token_types.get(k, [0] * len(e.ids)) if e else [0]
    vision = stack_vision([e.vision for e in expansions])
    return Encoding(ids, mask, vision, {k: torch.tensor(v) for k, v in types.items()})

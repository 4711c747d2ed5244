"""The training data: a shard encoded once, its order as a pure function of (seed, step),
each step's global batch split into ranks, micro-batches and length groups, and collated.

Epoch e visits the shard in the order ``randperm(N, seed + e)`` and step s takes global
samples ``[s·B, (s+1)·B)`` (:func:`sample_order`); only assistant tokens carry labels
(LLaVA convention), the others are :data:`IGNORE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ddfm.data import FailedImage, load_records, open_image
from ddfm.model.chat import encode_conversation, expand_image, get_tokenizer, image_token
from ddfm.model.families import stack_vision
from ddfm.train.config import LOSS_ON

IGNORE = -100  # label of tokens outside the loss


@dataclass
class Example:
    """One encoded record: ``input_ids`` (T,), ``labels`` (T,) with IGNORE outside answers."""

    id: str
    input_ids: list[int]
    labels: list[int]
    image: str | None
    n_loss: int  # tokens in the loss: labels[1:] that are not IGNORE (the first is never predicted)
    token_types: dict = field(default_factory=dict)  # per-token inputs (Qwen2-VL's mm_token_type_ids), each (T,)


def encode_shard(path: str, processor, model, loss_on: str = "answers") -> tuple[list[Example], dict[str, Any],
                                                                                list[FailedImage]]:
    """Load, encode and check a shard against the init checkpoint; raise before training.

    ``loss_on``: the tokens that carry labels, ``"answers"`` (the assistant's, LLaVA's
    convention) or ``"all"`` (every token of the conversation except the image
    placeholders, which the model never predicts: they become image features).

    Returns the examples, a dict of each image's processor inputs keyed by path
    (``pixel_values`` and whatever else the family returns, the image on dim 0; every
    record's placeholder expanded to its own image's tokens) and the records left out
    because their image is missing or unreadable (every record sharing such an image;
    :class:`ddfm.data.FailedImage`, listed in ``ddfm.json``). Errors (ValueError, naming
    the file and records): empty shard, images for a text-only checkpoint, a tokenizer
    that does not fit the model,
    special-token text inside the data, a sequence longer than the model's context.
    """
    loaded = load_records(path)
    records, skipped = loaded.records, list(loaded.missing_images)
    if not records:
        raise ValueError(f"{path}: the shard is empty (no usable records"
                         + (f"; {len(skipped)} left out because their image is missing)" if skipped else ")"))
    tokenizer = get_tokenizer(processor)
    placeholder = image_token(processor)
    with_images = [r for r in records if r.has_image]
    if with_images and placeholder is None:
        raise ValueError(f"{path}: {len(with_images)} record(s) have images (first: {with_images[0].id}) "
                         "but the init checkpoint is text-only (no image token / processor)")
    _check_special_text(path, records, tokenizer)
    config = model.config
    vocab = config.get_text_config().vocab_size
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on {loss_on!r}: one of {', '.join(LOSS_ON)}")
    image_id = tokenizer.convert_tokens_to_ids(placeholder) if placeholder else None
    examples, too_long, expanded, unreadable = [], [], {}, {}
    for r in records:
        key = str(r.image_path) if r.has_image else None
        if key is not None and key not in expanded and key not in unreadable:
            try:
                image = open_image(r.image_path)
            except ValueError as err:  # unreadable bytes: this record and all that share the image
                unreadable[key] = str(err)
            else:  # each image through the family's processor once, its ids spliced into every record
                expanded[key] = expand_image(processor, image)
        if key in unreadable:
            skipped.append(FailedImage.of(r, unreadable[key]))
            continue
        enc = encode_conversation(processor, r.conversations, [expanded[key]] if key else None)
        ids, mask = enc.ids, enc.mask
        if max(ids) >= vocab:
            raise ValueError(f"{path}: record {r.id}: token id {max(ids)} >= the model's vocabulary "
                             f"{vocab}: the checkpoint's tokenizer does not match its model")
        if context and len(ids) > context:
            too_long.append(f"{r.id} ({len(ids)} tokens)")
        if loss_on == "all":
            mask = [t != image_id for t in ids]
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        examples.append(Example(r.id, ids, labels, key, sum(x != IGNORE for x in labels[1:]),
                                {k: v.tolist() for k, v in enc.token_types.items()}))
    if too_long:
        raise ValueError(f"{path}: {len(too_long)} record(s) longer than the model's context of {context} "
                         f"tokens: {', '.join(too_long[:5])}")
    if not examples:
        raise ValueError(f"{path}: no usable records: all {len(skipped)} left out because their image failed "
                         f"(first: {skipped[0]})")
    skipped.sort(key=lambda f: f.line)
    return examples, {k: e.vision for k, e in expanded.items()}, skipped


def _check_special_text(path, records, tokenizer) -> None:
    # text that spells a special token would be read as that token: the data were made
    # for another tokenizer (or need escaping) -- refuse instead of training on it.
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) if t]
    specials += [t for t in getattr(tokenizer, "additional_special_tokens", []) or [] if t]
    for r in records:
        for turn in r.conversations:
            hit = next((s for s in specials if s in turn["value"]), None)
            if hit:
                raise ValueError(f"{path}: record {r.id}: its text contains {hit!r}, a special token of the "
                                 "init checkpoint's tokenizer; the shard does not match this tokenizer")


def sample_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of global samples ``[start, start + count)``: epoch e is ``randperm(n, seed + e)``."""
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = perm[offset: offset + count - len(out)]
        out += take
        pos += len(take)
    return out


def collate(examples: list[Example], pixels: dict, pad_id: int) -> dict:
    """Right-padded batch: ``input_ids``/``labels``/``attention_mask`` (B, T) int64, the
    per-token inputs (B, T) padded with 0, and the image inputs of the examples with an
    image, in order (``ddfm.model.families.stack_vision``: e.g. ``pixel_values`` (n, 3, H, W))."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    for key in {k for e in examples for k in e.token_types}:
        batch[key] = torch.zeros((len(examples), T), dtype=torch.long)
        for i, e in enumerate(examples):
            if key in e.token_types:  # else all text: type 0
                batch[key][i, :len(e.input_ids)] = torch.tensor(e.token_types[key])
    images = [pixels[e.image] for e in examples if e.image is not None]
    if images:
        batch.update(stack_vision(images))
    return batch


def length_groups(examples: list[Example], max_padding: float = 0.25) -> list[list[Example]]:
    """Split a micro-batch into groups of similar length (padding <= ``max_padding`` of tokens).

    A mixed batch (image records of ~40 tokens, text passages of ~400) padded as one would
    spend most of its compute on padding. The loss is a sum over samples normalised by the
    global token count, so running the groups one after another gives the same gradient.
    """
    groups: list[list[Example]] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        g = groups[-1] if groups else None
        if g is not None:
            longest, total = len(g[0].input_ids), sum(len(x.input_ids) for x in g) + len(e.input_ids)
            if longest * (len(g) + 1) <= (1 + max_padding) * total:
                g.append(e)
                continue
        groups.append([e])
    return groups


def rank_groups(batch: list[Example], rank: int, world: int, micro: int, accum: int, sharded: bool,
                ballast: Example | None) -> list[list[Example]]:
    """This rank's share of the global batch, as the groups it runs forward one after another.

    Micro-batch a of rank r is samples ``[(a·world + r)·micro, +micro)``, split by length
    (:func:`length_groups`). Under FSDP (``sharded``) every rank must run the same blocks
    the same number of times, since each block's all-gather is a collective: micro-batches
    stay whole, and one without an image gets ``ballast`` (:func:`ballast_example`) so the
    vision tower and projector run on every rank (LLaVA's training code gives text-only
    samples a blank image).
    """
    groups = []
    for a in range(accum):
        examples = batch[(a * world + rank) * micro:][:micro]
        if not sharded:
            groups += length_groups(examples)
        elif ballast is not None and all(e.image is None for e in examples):
            groups.append(examples + [ballast])
        else:
            groups.append(examples)
    return groups


def ballast_example(examples: list[Example]) -> Example | None:
    """The shortest example with an image, every label IGNORE: it runs the vision tower and
    projector but adds nothing to the loss or the gradients. None for a shard without images."""
    with_image = [e for e in examples if e.image is not None]
    if not with_image:
        return None
    e = min(with_image, key=lambda e: len(e.input_ids))
    return replace(e, id=f"{e.id} (ballast)", labels=[IGNORE] * len(e.labels), n_loss=0)


def pad_token_id(processor) -> int:
    """The tokenizer's padding id (0 where it has none): the filler of :func:`collate`'s ``input_ids``."""
    pad_id = get_tokenizer(processor).pad_token_id
    return 0 if pad_id is None else pad_id

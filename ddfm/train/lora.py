"""LoRA on the language model (``ddfm train --lora R``): peft's adapters, merged back at the end.

With ``--lora R`` the language part of ``--train`` learns through low-rank adapters
(Hu et al. 2021, through the ``peft`` library): each targeted linear layer ``W`` (d_out x
d_in) stays frozen and gains ``(alpha / R) * B @ A`` with ``A`` (R x d_in) and ``B`` (d_out x R),
``B`` starting at zero so that step 0 is the initial checkpoint. The other parts of
``--train`` (projector, vision) still train every weight. The targets are the language
model's linear layers whose last name is in ``--lora-targets`` (attention and MLP
projections by default), found through the family's parts table, so that a vision tower
with layers of the same names (DINOv2's ``q_proj``) is never adapted.

At the end :func:`merge_adapters` folds each adapter into its weight (``W + (alpha / R) B A``)
and removes it: the checkpoint is a plain Hugging Face directory of the original class,
loaded and served like any other, and its experts merge and ensemble as before.
"""

from __future__ import annotations

from typing import Any

import torch

from ddfm.model.families import family_of, part_of

__all__ = ["lora_targets", "add_adapters", "adapter_parameters", "merge_adapters"]


def lora_targets(model, names: tuple[str, ...] | list[str]) -> list[str]:
    """Full names of the language model's ``nn.Linear`` modules whose last name is in
    ``names``; a ``ValueError`` naming what was looked for when there is none."""
    family = family_of(model.config)
    found = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n.rsplit(".", 1)[-1] in names and part_of(family, n + ".weight") == "language"]
    if not found:
        raise ValueError(f"--lora-targets {','.join(names)}: no linear layer of the language model of "
                         f"{type(model).__name__} has one of these names")
    return found


def add_adapters(model, rank: int, alpha: float, dropout: float, targets: tuple[str, ...] | list[str]) -> Any:
    """``model`` wrapped by peft with rank-``rank`` adapters on :func:`lora_targets`; the
    trainable parameters outside the language model stay so (peft would freeze them), and
    every weight of the language model is frozen: it learns through the adapters alone.
    Returns the ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    modules = lora_targets(model, targets)
    family = family_of(model.config)
    language = {n for n, _ in model.named_parameters() if part_of(family, n) == "language"}
    keep = {n for n, p in model.named_parameters() if p.requires_grad and n not in language}
    for name, param in model.named_parameters():  # the adapted language model itself is frozen
        if name in language:
            param.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none")
    wrapped = get_peft_model(model, config)
    for name, param in model.named_parameters():  # get_peft_model froze every non-adapter weight
        if name in keep:
            param.requires_grad_(True)
    return wrapped


def adapter_parameters(wrapped) -> int:
    return sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)


def merge_adapters(wrapped):
    """The base model with every adapter folded into its weight (peft's ``merge_and_unload``)."""
    return wrapped.merge_and_unload()

"""The VLM families ddfm reads, as data: parts, processors, vision inputs, positions, towers.

Every stage loads checkpoints with plain ``transformers``; what differs between families is
written down here once, in :data:`FAMILIES` (keyed by the config's ``model_type``):

* ``parts`` — the parameter-name prefixes of the vision tower, the projector and the
  language model, which ``ddfm train --train`` freezes or trains (LLaVA's recipe trains
  projector + language, InternVL's everything, ``align`` the projector). Qwen2-VL's
  projector (``visual.merger``) sits inside its vision module: the longest matching
  prefix decides.
* ``recipe`` — what ``ddfm train`` trains when ``--train`` is not given: the recipe of the
  family's instruction-tuning stage (a recipe name or a comma list of parts).
* the processor — the family's own class, loaded without its video processor where it has
  one (:func:`images_only`: no torchvision needed), which expands each image placeholder
  to that image's own token count (tiles, grids, any resolution).
* ``mrope`` — Qwen2-VL and Qwen2.5-VL place image tokens on a 3-D (time, height, width)
  grid (M-RoPE); :func:`rope_positions` asks the model's own ``get_rope_index`` for them.
* ``tower`` — the module holding the vision tower, for the router's shared encoder
  (:func:`tower_features`: mean-pooled tower states of each image, before any projector,
  so a frozen tower gives the same features in the initial checkpoint and every expert).
  ``reuse_tower`` marks the family (LLaVA-1.5) whose experts can take those tower states
  instead of running their own tower.

Supported: LLaVA-1.5 (``llava``), LLaVA-OneVision (``llava_onevision``), InternVL
(``internvl``, the transformers-native ``InternVLForConditionalGeneration``), Qwen2-VL
(``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``), Idefics3 (``idefics3``) and SmolVLM
(``smolvlm``); any causal LM is one ``language`` part. Another VLM is refused by
:func:`family_of` with the list of supported ones.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Family", "FAMILIES", "is_vision_language", "family_of", "part_of", "images_only", "load_processor", "stack_vision",
           "rope_positions", "tower_of", "tower_features"]


@dataclass(frozen=True)
class Family:
    """How ddfm reads one family (see the module docstring)."""

    name: str
    parts: dict[str, tuple[str, ...]]  # part -> parameter-name prefixes
    tower: str | None = None  # attribute path of the vision tower from the model class, e.g. "model.vision_tower"
    features: str = "clip"  # how tower_features pools the tower's output (a key of _POOLERS)
    mrope: bool = False
    reuse_tower: bool = False
    kind: str = "vlm"  # "vlm" | "lm"
    recipe: str = "llava"  # train's default --train: a recipe (ddfm.train.RECIPES) or a comma list of parts


_LANGUAGE = ("model.language_model.", "lm_head.")
FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA-1.5", {"vision": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",),
                                  "language": _LANGUAGE}, tower="model.vision_tower", reuse_tower=True,
                       # LLaVA (Liu et al. 2023, §4.2) instruction tuning: projector + LLM, CLIP frozen
                       recipe="llava"),
    "llava_onevision": Family("LLaVA-OneVision", {
        "vision": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.", "model.image_newline"),
        "language": _LANGUAGE}, tower="model.vision_tower", features="anyres",
        recipe="llava"),  # the LLaVA recipe, as LLaVA-1.5
    "internvl": Family("InternVL", {"vision": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",),
                                    "language": _LANGUAGE}, tower="model.vision_tower", features="tiles",
                       # InternVL 1.5 (Chen et al. 2024) stage 2, fine-tuning: ViT + MLP + LLM all train
                       recipe="internvl"),
    "qwen2_vl": Family("Qwen2-VL", {"vision": ("model.visual.",), "projector": ("model.visual.merger.",),
                                    "language": _LANGUAGE}, tower="model.visual", features="grid", mrope=True,
                       # Qwen2-VL (Wang et al. 2024, §2.2) stage 3: ViT locked, LLM fine-tuned; the paper
                       # does not say whether the merger (the projector here) trains: here it does
                       recipe="llava"),
    "qwen2_5_vl": Family("Qwen2.5-VL", {"vision": ("model.visual.",), "projector": ("model.visual.merger.",),
                                        "language": _LANGUAGE}, tower="model.visual", features="grid", mrope=True,
                         recipe="llava"),  # Qwen2.5-VL post-training keeps the ViT frozen, as Qwen2-VL
    "idefics3": Family("Idefics3", {"vision": ("model.vision_model.",), "projector": ("model.connector.",),
                                    "language": ("model.text_model.", "lm_head.")},
                       tower="model.vision_model", features="idefics3",
                       # Idefics3 (Laurençon et al. 2024) fine-tunes with adapters (DoRA) on the backbones,
                       # which no full-parameter recipe matches: projector + LLM, a choice, not the paper's
                       recipe="llava"),
    "smolvlm": Family("SmolVLM", {"vision": ("model.vision_model.",), "projector": ("model.connector.",),
                                  "language": ("model.text_model.", "lm_head.")},
                      tower="model.vision_model", features="idefics3",
                      recipe="llava"),  # as Idefics3, whose architecture it is: a choice, not the paper's
}
CAUSAL_LM = Family("causal LM", {"language": ("",)}, kind="lm", recipe="language")  # its one part: all of it


def is_vision_language(config) -> bool:
    """True if ``config`` belongs to an image-text-to-text model (LLaVA, InternVL, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def family_of(config) -> Family:
    """The :class:`Family` of a model config; a VLM of another family is a ``ValueError``."""
    if config.model_type in FAMILIES:
        return FAMILIES[config.model_type]
    if not is_vision_language(config):
        return CAUSAL_LM
    raise ValueError(f"model type {config.model_type!r} is not a VLM family ddfm supports "
                     f"(supported: {', '.join(f'{k} ({f.name})' for k, f in FAMILIES.items())})")


def part_of(family: Family, name: str) -> str | None:
    """The part (vision / projector / language) of parameter ``name``: longest matching prefix."""
    best, length = None, -1
    for part, prefixes in family.parts.items():
        for prefix in prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = part, len(prefix)
    return best


# --------------------------------------------------------------------------- processors

# Methods a family's processor overrides only to handle videos (SmolVLM: frame-count and
# fps defaults read from its video processor); without one they are ProcessorMixin's.
_VIDEO_ONLY_OVERRIDES = {"SmolVLMProcessor": ("apply_chat_template",)}


@functools.lru_cache(maxsize=None)
def images_only(processor_class: type) -> type:
    """``processor_class`` without its video processor: the same class in every other respect.

    The processors of Qwen2-VL, Qwen2.5-VL, InternVL, LLaVA-OneVision and SmolVLM carry a
    video processor, which needs torchvision; ddfm handles images only, so it builds these
    processors from the checkpoint's tokenizer, chat template and image processor (PIL
    backend) alone. The subclass keeps the family's name, its image-token expansion
    (``replace_image_token``), its options (``image_seq_length``, ``num_image_tokens``, ...)
    and ``from_pretrained``/``save_pretrained``: transformers' ``ProcessorMixin`` takes the
    sub-processors and saved options from ``__init__``, which here is the family's
    without ``video_processor``.
    """
    from transformers.processing_utils import ProcessorMixin

    # ProcessorMixin reads the argument names from __init__'s code object (from_pretrained)
    # and its signature (save_pretrained, sub-processors), so __init__ is compiled with the
    # family's own parameters minus video_processor, defaults included.
    params = [p for name, p in inspect.signature(processor_class.__init__).parameters.items()
              if name != "video_processor"]
    defaults = {f"_default_{p.name}": p.default for p in params if p.default is not inspect.Parameter.empty}

    def declare(p):
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return f"**{p.name}"
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return f"*{p.name}"
        return p.name + (f"=_default_{p.name}" if p.default is not inspect.Parameter.empty else "")

    def forward(p):
        return f"**{p.name}" if p.kind is inspect.Parameter.VAR_KEYWORD else f"{p.name}={p.name}"

    named = [p for p in params[1:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    source = (f"def __init__({', '.join(declare(p) for p in params)}):\n"
              f"    _family_init(self, video_processor=None, {', '.join(forward(p) for p in named)})\n")
    namespace = {"_family_init": processor_class.__init__, **defaults}
    exec(source, namespace)  # noqa: S102 - source built above from the family's own signature
    body = {"__init__": namespace["__init__"], "__module__": processor_class.__module__,
            "__doc__": images_only.__doc__, "images_only": True}
    for name in _VIDEO_ONLY_OVERRIDES.get(processor_class.__name__, ()):
        body[name] = getattr(ProcessorMixin, name)
    return type(processor_class.__name__, (processor_class,), body)


def processor_class(config) -> type | None:
    """The family's processor class for a VLM config (``None`` if transformers names none)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


def load_processor(path: str | os.PathLike, config):
    """The processor of a VLM checkpoint directory, without torchvision.

    Families whose processor has a video processor load as :func:`images_only`; the others
    with ``AutoProcessor``. The image processor is always the PIL one, so an environment
    with torchvision encodes images exactly as one without.
    """
    import transformers
    from transformers import AutoProcessor

    pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    cls = processor_class(config)
    if cls is None or "video_processor" not in cls.get_attributes():
        return AutoProcessor.from_pretrained(path, **pil)
    return images_only(cls).from_pretrained(path, **pil)


# --------------------------------------------------------------------------- vision inputs

def stack_vision(visions: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Vision inputs of several prompts as one batch: each key concatenated on dim 0.

    Every family's processor puts the image (or its tiles / patches) on dim 0:
    ``pixel_values`` (n, C, H, W) for LLaVA-1.5 and InternVL (tiles), (patches, D) and
    ``image_grid_thw`` (n, 3) for Qwen2-VL, (n, tiles, C, H, W) for LLaVA-OneVision and
    Idefics3 / SmolVLM (with ``pixel_attention_mask`` (n, tiles, H, W)). Where the other
    dims differ between prompts (a different number of tiles), they are zero-padded to
    the largest, as the family's own processor pads a batch: the models skip all-zero
    tiles (Idefics3) or count a prompt's tiles from ``image_sizes`` (LLaVA-OneVision).
    """
    out = {}
    for key in visions[0]:
        parts = [v[key] for v in visions]
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        padded = []
        for p in parts:
            pad = []
            for d in range(p.dim() - 1, 0, -1):  # F.pad lists the last dim first
                pad += [0, shape[d - 1] - p.shape[d]]
            padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
        out[key] = torch.cat(padded)
    return out


def rope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict,
                   token_types: dict) -> torch.Tensor | None:
    """3-D M-RoPE position ids (3, n, T) of left-padded prompts, or None for 1-D RoPE.

    Qwen2-VL / Qwen2.5-VL place an image's tokens on a (time, height, width) grid; the
    model's own ``get_rope_index`` computes them from ``mm_token_type_ids`` (the
    processor's) and ``image_grid_thw``. The next token's position is the largest of a
    row's positions plus one (the same as ``generate``'s rope deltas).
    """
    family = FAMILIES.get(model.config.model_type)
    if family is None or not family.mrope or "image_grid_thw" not in vision:
        return None
    dev = model.device
    positions, _ = model.model.get_rope_index(
        input_ids.to(dev), mm_token_type_ids=token_types["mm_token_type_ids"].to(dev),
        image_grid_thw=vision["image_grid_thw"].to(dev), attention_mask=attention_mask.to(dev))
    return positions


# --------------------------------------------------------------------------- vision towers

def tower_of(model):
    """The vision tower module of a VLM (``None`` for a text-only model or ``None`` itself)."""
    if model is None:
        return None
    family = FAMILIES.get(model.config.model_type)
    if family is None or family.tower is None:
        return None
    module = model
    for attr in family.tower.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module


def _layers(config) -> list[int]:
    layer = getattr(config, "vision_feature_layer", -1)
    return list(layer) if isinstance(layer, (list, tuple)) else [layer]


def _clip(config, tower, vision) -> list[torch.Tensor]:
    # LLaVA-1.5: the layer(s) LLaVA projects, CLS dropped under the "default" strategy
    out = tower(vision["pixel_values"], output_hidden_states=True)
    hidden = torch.cat([out.hidden_states[i] for i in _layers(config)], dim=-1)  # (n, T, H)
    if getattr(config, "vision_feature_select_strategy", "full") == "default":
        hidden = hidden[:, 1:]
    return list(hidden)


def _anyres(config, tower, vision) -> list[torch.Tensor]:
    # LLaVA-OneVision: patch 0 of each image is the whole image at the tower's resolution
    base = vision["pixel_values"][:, 0]  # (n, C, H, W)
    return _clip(config, tower, {"pixel_values": base})


def _tiles(config, tower, vision) -> list[torch.Tensor]:
    # InternVL: every tile of an image (the images' tiles one after another on dim 0)
    out = tower(pixel_values=vision["pixel_values"], output_hidden_states=True)
    layer = _layers(config)[0]
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    if getattr(config, "vision_feature_select_strategy", "full") == "default":
        hidden = hidden[:, 1:]
    return [h.flatten(0, 1) for h in torch.split(hidden, vision["tiles"])]


def _grid(config, tower, vision) -> list[torch.Tensor]:
    # Qwen2-VL / 2.5-VL: the blocks' output before the merger (the projector), split per image
    grid = vision["image_grid_thw"]
    out = tower(vision["pixel_values"], grid_thw=grid)
    return list(torch.split(out.last_hidden_state, grid.prod(-1).tolist()))


def _idefics3(config, tower, vision) -> list[torch.Tensor]:
    # Idefics3 / SmolVLM: every real tile of an image (padding tiles are all zeros)
    pixels = vision["pixel_values"]  # (n, tiles, C, H, W)
    mask = vision.get("pixel_attention_mask")
    out = []
    for i in range(pixels.shape[0]):
        real = (pixels[i] != 0).flatten(1).any(1)
        patch = config.vision_config.patch_size
        tile_mask = None
        if mask is not None:
            m = mask[i][real]
            tile_mask = m.unfold(1, patch, patch).unfold(2, patch, patch).sum((-1, -2)) > 0
        hidden = tower(pixel_values=pixels[i][real], patch_attention_mask=tile_mask).last_hidden_state
        out.append(hidden.flatten(0, 1))
    return out


_POOLERS: dict[str, Callable] = {"clip": _clip, "anyres": _anyres, "tiles": _tiles, "grid": _grid,
                                 "idefics3": _idefics3}


def tower_features(config, tower, visions: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Routing features of n images from a VLM's vision tower.

    ``visions``: the family's image-processor outputs of each image (one dict per image,
    as :func:`ddfm.model.chat.encode_prompt` returns them). Returns ``features`` (n, D)
    float32 — each image's tower states (the selected layer, before any projector)
    averaged over its tokens and tiles — and ``states``, each image's token states
    (tokens, D), which LLaVA-1.5 experts take instead of running their own tower.
    """
    family = FAMILIES.get(config.model_type)
    if family is None or family.tower is None:
        raise ValueError(f"model type {config.model_type!r} has no vision tower ddfm can route with")
    dev, dtype = tower.device, tower.dtype
    vision = {k: v.to(dev, dtype) if v.is_floating_point() else v.to(dev) for k, v in stack_vision(visions).items()}
    vision["tiles"] = [int(v["pixel_values"].shape[0]) for v in visions]
    with torch.inference_mode():
        states = _POOLERS[family.features](config, tower, vision)
    return torch.stack([s.float().mean(0) for s in states]), states

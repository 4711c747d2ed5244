"""``image_url`` parts to RGB images, refusing what the server has not enabled.

``data:image/...;base64,...`` is always accepted; ``http(s)://`` only with
``--allow-remote-images``; ``file://`` URLs and plain paths only under ``--image-root``.

An image costs what the model will see, not what the client sent:

* the pixel count (``--max-image-pixels``) and the aspect ratio (``--max-image-aspect``)
  are checked from the image header, before anything is decoded. A processor scales an
  image's short side to its own size and keeps the ratio (CLIP's: shortest edge to 336,
  then a centre crop), so a 1 x 50,000 image would be scaled to 336 x 16.8 M; within the
  ratio limit that intermediate is at most ``ratio`` times the processor's square;
* a decoded image whose short side exceeds ``side`` (:func:`image_side`: the largest size
  the processor resizes or crops to, and never less than :data:`MIN_SIDE`) is shrunk to
  it at once (a JPEG already while decoding, by DCT scaling), so the processor and the
  router work on at most ``side`` x ``ratio * side`` pixels whatever arrived.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Optional

import httpx

from ddfm.data import load_strict
from ddfm.serve.errors import ApiError, bad
from ddfm.serve.memory import release_memory

__all__ = ["load_image_url", "decode_image", "image_side", "MIN_SIDE"]

# Images are never shrunk below this short side: the router's image encoders see no less
# than they would (ddfm.embed: EfficientNet-Lite0 at 128 px by default, CLIP at 224-336,
# SigLIP at up to 512).
MIN_SIDE = 512


def image_side(processor: Any = None) -> int:
    """The short side an image is shrunk to before the processor sees it: the largest size
    in the image processor's ``size``, ``crop_size``, ``max_image_size`` and
    ``image_grid_pinpoints`` (whatever the family resizes or crops to), at least :data:`MIN_SIDE`."""
    ip = getattr(processor, "image_processor", None)
    sides = [MIN_SIDE]
    for name in ("size", "crop_size", "max_image_size", "image_grid_pinpoints"):
        stack = [getattr(ip, name, None)]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                sides.append(v)
    return max(sides)


def load_image_url(url: str, param: str, cfg: Any, side: Optional[int] = None):
    """The RGB PIL image of ``url``; ``cfg`` gives ``max_image_pixels``, ``max_image_aspect``,
    ``allow_remote_images`` and ``image_root`` (a :class:`~ddfm.serve.cli.ServeConfig`);
    ``side``: shrink the image to this short side (:func:`image_side`), None: keep its size."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad(f"{param}: a data URL must look like data:image/png;base64,<data>", param, "invalid_image_url")
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{param}: invalid base64 in data URL", param, "invalid_base64") from None
    elif url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise bad(f"{param}: remote image URLs are disabled on this server (send a base64 data: URL, "
                      "or start the server with --allow-remote-images)", param, "image_url_not_allowed")
        data = _fetch_remote(url, param, max(cfg.max_image_pixels * 4, 1 << 20))
    else:
        data = _read_local(url, param, cfg.image_root)
    return decode_image(data, param, cfg.max_image_pixels, cfg.max_image_aspect, side)


def decode_image(data: bytes, param: str, max_pixels: int, max_aspect: Optional[float] = None,
                 side: Optional[int] = None):
    """An RGB PIL image of ``data`` within the limits (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise bad(f"{param}: the image is empty", param, "invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # from the header: nothing decoded yet
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad(f"{param}: the bytes are not an image PIL can read", param, "invalid_image") from None
    if min(w, h) < 1:
        raise bad(f"{param}: the image is {w}x{h} pixels", param, "invalid_image")
    if w * h > max_pixels:
        raise bad(f"{param}: image is {w}x{h} = {w * h} pixels, more than this server's limit of {max_pixels}",
                  param, "image_too_large")
    if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
        raise bad(f"{param}: image is {w}x{h}, a side ratio of {max(w, h) / min(w, h):.4g}, more than this "
                  f"server's limit of {max_aspect:g} (the processor would scale its short side up)", param,
                  "image_aspect_ratio")
    try:
        out = _shrunk(img, side)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise bad(f"{param}: the image data is corrupt ({err})", param, "invalid_image") from None
    except MemoryError:
        raise ApiError(413, f"{param}: the server has no memory to decode a {w}x{h} image now", param=param,
                       code="image_too_large") from None
    del img
    if out.size != (w, h):  # a large original was decoded and dropped: give its pages back
        release_memory()
    return out


def _shrunk(img, side: Optional[int]):
    """Decode ``img`` as RGB with its short side at most ``side`` (bicubic, as CLIP's processor)."""
    from PIL import Image

    w, h = img.size
    scale = side / min(w, h) if side is not None and min(w, h) > side else 1.0
    if scale < 1.0 and img.format == "JPEG":
        img.draft("RGB", (round(w * scale), round(h * scale)))  # DCT scaling: decodes at 1/2, 1/4 or 1/8
    load_strict(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if side is not None and min(w, h) > side:
        scale = side / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    return img


def _fetch_remote(url: str, param: str, cap: int) -> bytes:
    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise bad(f"{param}: fetching the image gave HTTP {resp.status_code}", param, "image_fetch_failed")
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > cap:
                    raise bad(f"{param}: remote image is larger than {cap} bytes", param, "image_too_large")
            return bytes(data)
    except httpx.HTTPError as err:
        raise bad(f"{param}: could not fetch the image: {err}", param, "image_fetch_failed") from None


def _read_local(url: str, param: str, image_root: str | None) -> bytes:
    if image_root is None:
        raise bad(f"{param}: local image paths are disabled on this server (send a base64 data: URL, or start "
                  "the server with --image-root DIR)", param, "image_url_not_allowed")
    path = url[len("file://"):] if url.startswith("file://") else url
    root = Path(image_root).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise bad(f"{param}: path is outside the server's image root", param, "image_url_not_allowed")
    if not resolved.is_file():
        raise bad(f"{param}: no such image file under the image root: {path}", param, "image_not_found")
    return resolved.read_bytes()

"""``image_url`` parts to RGB images, refusing what the server has not enabled.

``data:image/...;base64,...`` is always accepted; ``http(s)://`` only with
``--allow-remote-images``; ``file://`` URLs and plain paths only under ``--image-root``.
The pixel count is checked from the image header, before the pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import httpx

from ddfm.data import load_strict
from ddfm.serve.errors import bad

__all__ = ["load_image_url", "decode_image"]


def load_image_url(url: str, param: str, cfg: Any):
    """The RGB PIL image of ``url``; ``cfg`` gives ``max_image_pixels``, ``allow_remote_images``
    and ``image_root`` (a :class:`~ddfm.serve.cli.ServeConfig`)."""
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
    return decode_image(data, param, cfg.max_image_pixels)


def decode_image(data: bytes, param: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise bad(f"{param}: the image is empty", param, "invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # from the header: nothing decoded yet
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad(f"{param}: the bytes are not an image PIL can read", param, "invalid_image") from None
    if w * h > max_pixels:
        raise bad(f"{param}: image is {w}x{h} = {w * h} pixels, more than this server's limit of {max_pixels}",
                  param, "image_too_large")
    try:
        load_strict(img)
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise bad(f"{param}: the image data is corrupt ({err})", param, "invalid_image") from None


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

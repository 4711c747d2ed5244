"""Serve-test assets: two tiny experts and a router on real images, and a live ``ddfm serve``.

:func:`make_assets` builds two ``tiny-llava`` experts (``ddfm init``, seeds 0 and 1,
untrained: the protocol is under test, not the answers) and a K=2 router whose centroids
are the pixel features of two Fashion-MNIST images, so which expert a request goes to is
known. :class:`LiveServer` runs the app under real uvicorn on a free loopback port; the
other helpers build requests and check OpenAI-schema error bodies.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image
from safetensors.numpy import save_file

from ddfm.ensemble import Ensemble, EnsembleConfig
from ddfm.features.registry import get_encoder
from ddfm.init import InitConfig, init
from ddfm.serve import ServeConfig
from ddfm.serve.connections import uvicorn_config
from helpers.data import real_images

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
ERROR_KEYS = {"message", "type", "param", "code"}


def write_router(out: Path, centroid_images: list[Image.Image], temperature: float = 20.0) -> Path:
    """A router file in the partition stage's format, centroids = pixel features of real images."""
    enc = get_encoder("pixels")
    centroids = enc.encode(centroid_images).astype(np.float32)  # (K, D) unit rows
    k = len(centroid_images)
    save_file({"centroids": centroids}, str(out / "router.safetensors"))
    (out / "router.json").write_text(json.dumps({
        "k": k, "temperature": temperature, "top_k": 1, "encoder": enc.spec, "modality": "image",
        "dim": int(centroids.shape[1]), "centroids": "router.safetensors", "cluster_shares": [1 / k] * k,
        "algorithm": {"name": "test-fixture"}}))
    return out / "router.json"


def make_assets(root: Path) -> dict:
    """Two tiny-llava experts (ddfm init, seeds 0 and 1), a K=2 router, the images."""
    images, labels = real_images(24)
    (root / "images").mkdir()
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        img.save(root / "images" / f"{i:03d}.png")
        rows.append({"id": f"fm-{i}", "image": f"images/{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": f"A {NAMES[y].lower()}."}]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    experts = [init(InitConfig(preset="tiny-llava", data=str(root / "train.jsonl"), out=str(root / f"expert-{s}"),
                               seed=s, vocab_size=300)) for s in (0, 1)]
    # images 0 and 1 are an ankle boot and a pullover: far apart in pixel space
    router = write_router(root, [images[0], images[1]])
    return {"root": root, "experts": [str(e) for e in experts], "router": str(router), "images": images}


def make_ensemble(assets: dict) -> Ensemble:
    """The two experts of :func:`make_assets` behind its router, centroid mode, top-1."""
    return Ensemble.from_pretrained(assets["experts"], assets["router"], mode="centroid", top_k=1)


def serve_config(assets, *, experts=None, router="default", **overrides) -> ServeConfig:
    """Small limits for the tests (16 output tokens, 64x64 images, 64 KiB bodies), overridable."""
    ens = EnsembleConfig(experts=assets["experts"] if experts is None else experts,
                         router=assets["router"] if router == "default" else router)
    defaults = dict(ensemble=ens, max_output_tokens=16, default_max_tokens=4,
                    max_image_pixels=64 * 64, max_prompt_tokens=200, max_body_bytes=64 * 1024,
                    batch_window_ms=20, max_batch_size=8, log_level="warning")
    return ServeConfig(**{**defaults, **overrides})


class LiveServer:
    """A real uvicorn server in a thread on a free loopback port, configured as ``ddfm serve``
    configures it (:func:`ddfm.serve.connections.uvicorn_config`)."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, app.state.ddfm.cfg))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    """``img`` as a base64 ``data:`` URL, as OpenAI clients send images."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user_message(text: str, img: Image.Image | None = None) -> list[dict]:
    """One OpenAI chat user turn: a text part, and an image part when ``img`` is given."""
    parts = [{"type": "text", "text": text}]
    if img is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(img)}})
    return [{"role": "user", "content": parts}]


def assert_error(resp: httpx.Response, status: int, *, code: str | None = None, mentions: str = "",
                 param: str | None = None) -> dict:
    """Check ``resp`` is an error in OpenAI's schema with this status (and code, param, words); return it."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    if code is not None:
        assert err["code"] == code, body
    if param is not None:
        assert err["param"] == param, body
    assert mentions.lower() in err["message"].lower(), body
    return err


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus exposition text (0 when absent)."""
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0

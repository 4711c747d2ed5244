"""The router: mixture weights of the experts from the partition's centroids (paper §4.3).

    router = Router.load("runs/partition/router.json")
    w = router.route([PIL.Image.open("cat.png")])        # (1, K), top-k renormalised

For features f (unit rows) and the partition's centroids c_k (unit rows),

    w_k(f) = softmax_k(τ · cos(f, c_k))                                   (eq. 29)

with temperature τ; then the ``top_k`` largest weights are kept and renormalised
(top-1 in the paper's main results: the compute of one dense model).

Features come from the encoder the partition used (``router.json["encoder"]``, built with
:func:`ddfm.features.registry.get_encoder` on first use), or from any object with the same
``encode(items) -> (B, D)`` method given to :meth:`Router.use_encoder`, e.g. the experts'
own vision tower (the paper's zero-overhead "shared encoder", see :mod:`ddfm.ensemble`).
File format: docs/ARCHITECTURE.md ("Partition directory").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ddfm.features.registry import get_encoder
from ddfm.io import read_json
from ddfm.mixture import top_k_renormalise

__all__ = ["Router"]


class Router:
    """Centroid router of eq. 29.

    Attributes:
        centroids: (K, D) float32 tensor, unit rows.
        temperature: τ of eq. 29.
        top_k: experts kept per request (the rest get weight 0).
        encoder_spec: spec of the encoder the partition used (``None`` if unknown).
        modality: ``"image"`` or ``"text"`` — what :meth:`route` takes.
        cluster_shares: (K,) float32 tensor π_k, the share of training records per cluster
            (the prior for a request that has no image).
    """

    def __init__(self, centroids, temperature: float, *, top_k: int = 1, encoder_spec: str | None = None,
                 modality: str = "image", cluster_shares: Sequence[float] | None = None,
                 path: str | None = None):
        c = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        if c.dim() != 2 or c.shape[0] < 1:
            raise ValueError(f"router: centroids must be (K, D), got {tuple(c.shape)}")
        if not float(temperature) > 0:
            raise ValueError(f"router: temperature must be > 0, got {temperature}")
        if top_k < 1:
            raise ValueError(f"router: top_k must be >= 1, got {top_k}")
        if modality not in ("image", "text"):
            raise ValueError(f"router: modality must be 'image' or 'text', got {modality!r}")
        K = c.shape[0]
        shares = torch.full((K,), 1.0 / K) if cluster_shares is None else torch.tensor(list(cluster_shares), dtype=torch.float32)
        if shares.shape != (K,) or (shares < 0).any() or shares.sum() <= 0:
            raise ValueError(f"router: cluster_shares must be {K} non-negative numbers, got {shares.tolist()}")
        self.centroids = torch.nn.functional.normalize(c, dim=1)
        self.temperature, self.top_k = float(temperature), int(top_k)
        self.encoder_spec, self.modality, self.path = encoder_spec, modality, path
        self.cluster_shares = shares / shares.sum()
        self._encoder: Any = None

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike, *, top_k: int | None = None, temperature: float | None = None) -> "Router":
        """Read ``router.json`` (or a partition directory holding it) and its centroids.

        ``top_k`` / ``temperature`` override the file's values.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / "router.json"
        if not path.is_file():
            raise FileNotFoundError(f"router file not found: {path} (written by `ddfm partition`)")
        meta = read_json(path)
        for field in ("temperature", "centroids"):
            if field not in meta:
                raise ValueError(f"{path}: missing field {field!r}")
        tensors_path = path.parent / meta["centroids"]
        if not tensors_path.is_file():
            raise FileNotFoundError(f"{path}: centroids file {tensors_path} not found")
        tensors = load_file(str(tensors_path))
        if "centroids" not in tensors:
            raise ValueError(f"{tensors_path}: no tensor named 'centroids' (has {sorted(tensors)})")
        centroids = tensors["centroids"]
        if "k" in meta and int(meta["k"]) != centroids.shape[0]:
            raise ValueError(f"{path}: k={meta['k']} but {tensors_path.name} holds {centroids.shape[0]} centroids")
        if "dim" in meta and int(meta["dim"]) != centroids.shape[1]:
            raise ValueError(f"{path}: dim={meta['dim']} but the centroids have {centroids.shape[1]} columns")
        return cls(centroids, meta["temperature"] if temperature is None else temperature,
                   top_k=int(meta.get("top_k", 1)) if top_k is None else top_k,
                   encoder_spec=meta.get("encoder"), modality=meta.get("modality", "image"),
                   cluster_shares=meta.get("cluster_shares"), path=str(path))

    # ------------------------------------------------------------------ weights
    def probabilities(self, features) -> torch.Tensor:
        """softmax_k(τ · cos(f, c_k)) before top-k (eq. 29). features: (B, D) -> (B, K) float32."""
        f = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"router: features must be (B, {self.dim}) (the centroids' dimension), "
                             f"got {tuple(f.shape)}")
        cos = torch.nn.functional.normalize(f, dim=1) @ self.centroids.T  # (B, K)
        return torch.softmax(self.temperature * cos, dim=1)

    def log_probabilities(self, features) -> torch.Tensor:
        """log softmax_k(τ · cos(f, c_k)) (eq. 29) in float64: (B, D) -> (B, K).

        The ensemble keeps routing weights as float64 logs: at τ = 100 a cosine gap of
        1.1 makes a float32 softmax weight exactly 0, while its log is -110, finite.
        """
        f = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"router: features must be (B, {self.dim}) (the centroids' dimension), "
                             f"got {tuple(f.shape)}")
        cos = torch.nn.functional.normalize(f.double(), dim=1) @ self.centroids.double().T  # (B, K)
        return torch.log_softmax(self.temperature * cos, dim=1)

    def prior_log(self, items: Sequence[Any]) -> torch.Tensor:
        """Log-weights (B, K) float64 of requests before any token: eq. 29 of each request's
        image (or, under a text router, its text); the cluster shares log π_k for a request
        with nothing the encoder can see (``None``: a text request under an image router)."""
        log_w = self.cluster_shares.double().log().expand(len(items), -1).clone()
        rows = [i for i, item in enumerate(items) if item is not None]
        if rows:
            log_w[rows] = self.log_probabilities(self.features([items[i] for i in rows]))
        return log_w

    def weights(self, features, top_k: int | None = None) -> torch.Tensor:
        """Routing weights (B, K): eq. 29, then the ``top_k`` largest kept and renormalised."""
        return top_k_renormalise(self.probabilities(features), top_k or self.top_k)

    # ------------------------------------------------------------------ features
    @property
    def encoder(self):
        """The feature encoder (built from ``encoder_spec`` on first use)."""
        if self._encoder is None:
            if not self.encoder_spec:
                raise ValueError(f"router {self.path or ''}: no encoder recorded; give one with use_encoder()")

            self._encoder = get_encoder(self.encoder_spec)
        return self._encoder

    def use_encoder(self, encoder) -> "Router":
        """Compute features with ``encoder`` (anything with ``encode(items) -> (B, D)``)."""
        self._encoder = encoder
        return self

    def features(self, items: Sequence[Any]) -> np.ndarray:
        """Encoder features of images (PIL or paths) or texts -> (B, D) float32."""
        feats = np.asarray(self.encoder.encode(list(items)), dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"router: encoder {getattr(self.encoder, 'spec', self.encoder)!r} gives features of "
                             f"shape {feats.shape}, but the centroids have dimension {self.dim}; route with the "
                             "encoder the partition used")
        return feats

    def route(self, items: Sequence[Any], top_k: int | None = None) -> torch.Tensor:
        """Weights (B, K) of a batch of images or texts (matching :attr:`modality`)."""
        if len(items) == 0:
            return torch.zeros(0, self.k)
        return self.weights(self.features(items), top_k)

    def __repr__(self) -> str:
        return (f"Router(k={self.k}, dim={self.dim}, temperature={self.temperature:.3g}, top_k={self.top_k}, "
                f"encoder={self.encoder_spec!r})")

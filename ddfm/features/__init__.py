"""The features layer: the router's encoders, their registry, and features directories on disk.

* :mod:`ddfm.features.encoders` — the encoders (``encode(items) -> (B, D)`` unit rows);
* :mod:`ddfm.features.registry` — encoder specs (``efficientnet-lite0@224``, ``clip:PATH``, ...);
* :mod:`ddfm.features.store` — record keys, cache keys, reading a features directory;
* :mod:`ddfm.features.parts` — a features directory written in slices by several workers.

The ``embed`` stage (:mod:`ddfm.embed`) writes features directories; ``partition``, the
router and ``eval`` read them through this layer.
"""

from ddfm.features.encoders import Encoder, l2_normalise
from ddfm.features.registry import ENCODERS, get_encoder, parse_spec
from ddfm.features.store import load_features, record_key

__all__ = ["Encoder", "l2_normalise", "ENCODERS", "get_encoder", "parse_spec", "load_features", "record_key"]

"""The ensemble's one configuration, included by every command that runs the ensemble.

:class:`EnsembleConfig` is included by ``ddfm generate``, ``ddfm eval``, ``ddfm serve`` and
the demo, so every command spells the ensemble's options the same way (``--experts``,
``--router``, ``--mode``, ``--top-k``, ``--router-temperature``, ``--evidence``,
``--shared-encoder``, ``--allow-missing``, ``--device``, ``--dtype``)::

    cfg = EnsembleConfig(experts=["runs/expert-0", "runs/expert-1"], router="runs/partition")
    ens = Ensemble.from_config(cfg)

The routing modes and ``top_k`` spellings are :mod:`ddfm.routing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from ddfm.config import arg
from ddfm.routing import EVIDENCE, parse_top_k, routing_mode
from ddfm.runtime.device import DEVICE_HELP, check_device

__all__ = ["EnsembleConfig", "DTYPES"]

DTYPES = ("auto", "float32", "bfloat16", "float16")

@dataclass
class EnsembleConfig:
    """K experts + router as one model: the options every command that runs the ensemble shares."""

    experts: list[str] = arg("expert checkpoint directories, one per cluster in the router's order "
                             "(one directory: a single model)", default_factory=list)
    router: Optional[str] = arg("router.json or the partition directory holding it (`ddfm partition`)",
                                default=None)
    mode: str = arg("routing: centroid (eq. 29, fixed per request), posterior (running Bayes posterior, "
                    "eq. 26-27), uniform, or expert:J", default="centroid")
    top_k: Union[int, str, None] = arg("experts mixed per token: N or 'all' (default: the router file's top_k "
                                       "under centroid, all otherwise)", default=None, type=parse_top_k)
    router_temperature: Optional[float] = arg("router temperature tau of eq. 29 (default: the router file's)",
                                              default=None)
    evidence: str = arg("posterior: prompt tokens counted as evidence (prompt: every text token; answers: only "
                        "the history's assistant turns, for experts trained on answers only)", default="prompt",
                        choices=EVIDENCE)
    shared_encoder: bool = arg("route with the experts' own vision tower instead of the partition's encoder "
                               "(the paper's zero-overhead shared encoder)", default=False)
    allow_missing: bool = arg("run without experts that are missing or cannot be loaded (their weight is "
                              "renormalised over the others)", default=False)
    device: str = arg(DEVICE_HELP, default="auto")
    dtype: str = arg("dtype of the experts' weights (auto: as saved)", default="auto", choices=DTYPES)

    def __post_init__(self):
        self.experts = [str(e) for e in self.experts]
        self.router = str(self.router) if self.router is not None else None
        routing_mode(self.mode, len(self.experts) or None)
        self.top_k = parse_top_k(self.top_k)
        t = self.router_temperature
        if t is not None and not (t > 0 and math.isfinite(t)):
            raise ValueError(f"--router-temperature must be a positive number, got {t}")
        if self.evidence not in EVIDENCE:
            raise ValueError(f"--evidence must be one of {', '.join(EVIDENCE)}, got {self.evidence!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)

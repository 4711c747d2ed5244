"""The ensemble's one configuration and its routing modes, as data.

:class:`EnsembleConfig` is included by ``ddfm generate``, ``ddfm eval``, ``ddfm serve`` and
the demo, so every command spells the ensemble's options the same way (``--experts``,
``--router``, ``--mode``, ``--top-k``, ``--router-temperature``, ``--evidence``,
``--shared-encoder``, ``--allow-missing``, ``--device``, ``--dtype``)::

    cfg = EnsembleConfig(experts=["runs/expert-0", "runs/expert-1"], router="runs/partition")
    ens = Ensemble.from_config(cfg)

A routing mode is a :class:`Routing` (where the weights start, whether they are updated
token by token, which experts run), looked up by name in :data:`MODES`; ``Ensemble``
never compares mode strings.

``top_k`` has exactly one spelling for "every expert": ``"all"``. ``None`` means the
mode's default, stated in :attr:`Routing.default_top_k`: the router file's ``top_k``
under ``centroid`` (``ddfm partition`` writes 1, the paper's main setting) and ``"all"``
under every other mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from ddfm.config import arg

__all__ = ["EnsembleConfig", "Routing", "MODES", "EVIDENCE", "DTYPES", "ALL", "routing_mode", "parse_top_k",
           "resolve_top_k"]

ALL = "all"  # top_k: every expert
# which prompt tokens the posterior router counts: every text token of the prompt (the
# exact posterior of experts that model whole conversations), or only the assistant
# turns of the history (what LLaVA-style experts are trained on: their loss masks the
# human turns, so those tokens' probabilities carry no information about the cluster)
EVIDENCE = ("prompt", "answers")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Routing:
    """A routing mode: how the mixture weights w of eq. 24 are made (data, not branches).

    Attributes:
        name: the mode as the user spells it (``centroid``, ``posterior``, ``uniform``, ``expert:J``).
        prior: the weights before any token: ``"router"`` (eq. 29 of the request's image or
            text; the cluster shares π_k for a request the router's encoder cannot see, and
            uniform without a router), ``"uniform"`` (1/K) or ``"expert"`` (all on ``expert``).
        update: multiply the weights by every expert's probability of each evidence token of
            the prompt and of each generated token, renormalised: the running posterior
            p(S_k | z) of eq. 26–27.
        runs: which experts run for a request: ``"mixed"`` (those whose mixing weight is > 0,
            so top-1 costs one expert) or ``"all"`` (every expert, at every step: the
            posterior needs each expert's likelihood even where its weight is tiny).
        default_top_k: ``top_k`` when none is given: ``"router"`` (the router file's) or ``"all"``.
        expert: the expert of ``expert:J``.
    """

    name: str
    prior: str
    update: bool = False
    runs: str = "mixed"
    default_top_k: str = ALL
    expert: Optional[int] = None


MODES: dict[str, Routing] = {
    "centroid": Routing("centroid", prior="router", default_top_k="router"),
    "posterior": Routing("posterior", prior="router", update=True, runs="all"),
    "uniform": Routing("uniform", prior="uniform"),
}
MODE_NAMES = (*MODES, "expert:J")


def routing_mode(name: str, k: int | None = None) -> Routing:
    """The :class:`Routing` of a mode name; ``expert:J`` is checked against ``k`` experts."""
    if name in MODES:
        return MODES[name]
    head, _, j = name.partition(":")
    if head == "expert":
        try:
            index = int(j)
        except ValueError:
            index = -1
        if index < 0 or (k is not None and index >= k):
            raise ValueError(f"--mode {name!r}: expert index must be 0..{(k or 1) - 1}")
        return Routing(name, prior="expert", expert=index)
    raise ValueError(f"--mode: unknown routing mode {name!r}; use one of {', '.join(MODE_NAMES)}")


def parse_top_k(value: Union[int, str, None]) -> Union[int, str, None]:
    """``--top-k`` text or value -> a positive int, ``"all"`` or ``None`` (the mode's default)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == ALL:
            return ALL
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"--top-k must be a positive integer or 'all', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--top-k must be a positive integer or 'all', got {value!r}")
    return value


def resolve_top_k(top_k: Union[int, str, None], routing: Routing, k: int, router_top_k: int | None) -> int:
    """The number of experts mixed per token, 1..K (see the module docstring)."""
    if top_k is None:
        top_k = router_top_k if (routing.default_top_k == "router" and router_top_k is not None) else ALL
    return k if top_k == ALL else min(int(top_k), k)


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
    device: str = arg("torch device of the experts: auto (cuda if available), cpu, cuda, cuda:N", default="auto")
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
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

"""The one routing vocabulary: modes (how weights are made) and named settings (what tables show).

A routing *mode* is a :class:`Routing` policy object (where the weights start, whether they
are updated token by token, which experts run), looked up by name in :data:`MODES`
(``--mode``); the ensemble never compares mode strings. A routing *setting* is a mode with
its ``top_k`` and ``evidence``, named as the demo, ``ablate`` and ``theory`` tables name
their columns (:data:`ROUTINGS`: ``top-1``, ``soft``, ``posterior``, ``posterior-answers``,
``uniform``). ``ddfm theory`` evaluates the same names on its exact finite-state problems,
and adds diagnostic routers that no ensemble should run (:data:`DIAGNOSTIC_ROUTERS`).

``top_k`` has exactly one spelling for "every expert": ``"all"``. ``None`` means the
mode's default, stated in :attr:`Routing.default_top_k`: the router file's ``top_k``
under ``centroid`` (``ddfm partition`` writes 1, the paper's main setting) and ``"all"``
under every other mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

__all__ = ["ALL", "EVIDENCE", "Routing", "MODES", "MODE_NAMES", "routing_mode", "parse_top_k", "resolve_top_k",
           "RoutingSetting", "ROUTINGS", "DIAGNOSTIC_ROUTERS", "describe", "check_router_names"]

ALL = "all"  # top_k: every expert
# which prompt tokens the posterior router counts: every text token of the prompt (the
# exact posterior of experts that model whole conversations), or only the assistant
# turns of the history (what LLaVA-style experts are trained on: their loss masks the
# human turns, so those tokens' probabilities carry no information about the cluster)
EVIDENCE = ("prompt", "answers")


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


@dataclass(frozen=True)
class RoutingSetting:
    """A named routing setting: the ``EnsembleConfig`` options of one column of a results table."""

    name: str
    mode: str
    top_k: Union[int, str, None]
    evidence: str = "prompt"
    help: str = ""

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ddfm.ensemble.config.EnsembleConfig` for this setting."""
        return {"mode": self.mode, "top_k": self.top_k, "evidence": self.evidence}


ROUTINGS: dict[str, RoutingSetting] = {s.name: s for s in (
    RoutingSetting("top-1", "centroid", 1, help="eq. 29 centroid router, top-1 (the paper's setting: the compute "
                                                "of one dense model)"),
    RoutingSetting("soft", "centroid", ALL, help="eq. 29 weights over all experts, mixed per token in probability "
                                                 "space (eq. 24)"),
    RoutingSetting("posterior", "posterior", ALL, help="the exact router (eq. 26-27): the running Bayes posterior "
                                                       "with every prompt token as evidence"),
    # LLaVA-style experts never learn the human turns (their loss masks them), so the
    # probabilities they give the question are noise: count only the answers
    RoutingSetting("posterior-answers", "posterior", ALL, evidence="answers",
                   help="the same posterior with only the assistant turns as evidence"),
    RoutingSetting("uniform", "uniform", ALL, help="1/K over all experts, no information"),
)}

# Routers ``ddfm theory`` computes to show what is *not* exact; no ensemble runs them.
DIAGNOSTIC_ROUTERS: dict[str, str] = {
    "running-posterior": "pi_k prod_i p_k(x_i|x_<i), token by token (posterior_update, --mode posterior): exact, "
                         "the posterior computed a second way",
    "posterior/K": "eq. 28 as printed: the posterior with the extra 1/K",
    "prior": "cluster shares pi_k, no information from the sample",
    "context-posterior": "p(S_k | h_t) = pi_k P_k(h_t) / sum_j pi_j P_j(h_t), h_t = last n-1 bytes: exact for n-grams",
    "naive-smoothing": "the context posterior, but every expert smoothed with the full add-k",
}


def describe(name: str) -> str:
    """The one-line description of a routing setting or diagnostic router."""
    if name in ROUTINGS:
        return ROUTINGS[name].help
    if name in DIAGNOSTIC_ROUTERS:
        return DIAGNOSTIC_ROUTERS[name]
    raise ValueError(f"router: unknown name {name!r}; known: {', '.join([*ROUTINGS, *DIAGNOSTIC_ROUTERS])}")


def check_router_names(names: Iterable[str]) -> None:
    """Raise ``ValueError`` unless every name is a routing setting or a diagnostic router: the
    check of a table keyed by router names (``ddfm theory``'s) against this vocabulary."""
    for name in names:
        describe(name)

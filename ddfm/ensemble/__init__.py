"""Ensemble generation: K experts + router decode as one model (paper §3.3, §4.3).

    ddfm generate --experts runs/expert-0 runs/expert-1 --router runs/partition/router.json \\
                  --image cat.png --prompt "What is this?" [--mode posterior] [--top-k all]

At every step the next-token distribution is the mixture

    p(x | z) = Σ_k w_k p_k(x | z)                                          (eq. 24)

taken in probability space (:mod:`ddfm.mixture`), never by averaging logits. Routing
modes (:mod:`ddfm.ensemble.config`, data) give the weights w:

* ``centroid`` — the paper's router, fixed for the whole generation: softmax_k(τ·cos(f, c_k))
  of the image (or prompt) features, top-k renormalised (eq. 29). A request without an
  image under an image router starts from the cluster shares π_k.
* ``posterior`` — Bayes over the whole prefix (eq. 26–27): start from the centroid prior
  (π_k for a request without an image; uniform without a router), multiply by each
  expert's probability of every prompt token and of every generated token, renormalise
  every step; log-weights in float64, so no expert's weight rounds to 0. Exact for experts
  that model whole sequences *if* each expert is its cluster's true distribution and the
  prior is the clusters'; not for every model class (for n-gram experts the exact router
  is the posterior given the context: ``ddfm theory``, docs/theory.md). Runs every
  expert; ``top_k`` < K mixes only the top-k of the current posterior.
  ``evidence="answers"`` counts only the history's assistant turns among the prompt
  tokens (experts trained LLaVA-style never learn the human turns).
* ``uniform`` — w_k = 1/K;  ``expert:J`` — all weight on expert J.

``top_k``: N, ``"all"`` (every expert: the "soft" router), or None for the mode's default
(the router file's top_k under ``centroid``, all otherwise).

Each expert keeps its own KV cache and runs only on the rows of the batch that give it
weight, so experts with zero weight are never run (top-1 costs exactly one expert);
requests join and leave the running batch at token boundaries
(:class:`~ddfm.ensemble.decode.DecodeBatch`). ``shared_encoder=True`` routes with the
experts' own (frozen, identical) vision tower and hands the tower's output to the chosen
expert, so routing costs no extra encoder pass.

Python API::

    ens = Ensemble.from_config(EnsembleConfig(experts=["runs/expert-0", "runs/expert-1"],
                                              router="runs/partition/router.json"))
    [gen] = ens.generate(Request("What is this?", image="cat.png"), max_new_tokens=16)
    gen.text, gen.weights
"""

from ddfm.ensemble.cli import GenerateConfig, generate_cli
from ddfm.ensemble.config import EnsembleConfig
from ddfm.ensemble.core import Ensemble, check_compatible
from ddfm.ensemble.decode import DecodeBatch, Generation
from ddfm.ensemble.prompts import Request
from ddfm.routing import ALL, EVIDENCE, MODES, Routing, routing_mode
from ddfm.sampling import Sampling

__all__ = ["ALL", "EVIDENCE", "MODES", "DecodeBatch", "Ensemble", "EnsembleConfig", "GenerateConfig", "Generation",
           "Request", "Routing", "Sampling", "check_compatible", "generate_cli", "routing_mode"]

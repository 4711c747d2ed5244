"""The paper's theory (§2–3), executable: exact finite-state checks and an exact n-gram equivalence.

    ddfm theory                                  # table of residuals and gaps
    ddfm theory --out runs/theory.json           # ... also written as JSON
    ddfm theory --vocab 3 --length 5 --prompt 1 --k 3 --seeds 0 1 2

Part 1, :mod:`ddfm.theory.identities` (finite state, float64 numpy): every object of §2–3
built exactly over the whole state space — coupling, path, velocities, divergence,
continuity, validity, 1-sparsity, the sampling rule and the expert-flow decomposition with
the posterior router (eq. 9–27) — and the routers that depart from the posterior (eq. 28 as
printed, the time-independent routers of eq. 28–29) run through the same sampling rule, with
their error reported as total variation and KL.

Part 2, :mod:`ddfm.theory.text` (real text): byte-level n-gram experts on the balanced
partition of the Python documentation reproduce the centralised n-gram exactly under
share-split smoothing and the posterior given the context; the posterior given the whole
prefix (``--mode posterior``'s router) is exact for the experts taken as whole-sequence
models, and its departure from the centralised n-gram is measured, like the paper's routers'.

:mod:`ddfm.theory.cli` holds :class:`TheoryConfig`, :func:`theory` and the printed tables.
Routers are named as everywhere else (:mod:`ddfm.routing`: ``posterior``, ``soft``,
``top-1``, and the diagnostic routers of ``DIAGNOSTIC_ROUTERS``). See docs/theory.md for the
derivations in words.
"""

from ddfm.theory.cli import COLUMNS, FINITE_ROWS, TheoryConfig, format_report, format_text, theory, theory_cli
from ddfm.theory.identities import (
    ROUTERS,
    ARProblem,
    Coupling,
    FiniteRouter,
    StateSpace,
    active_positions,
    clusters_follow_prompt,
    conditional_paths,
    conditional_velocities,
    continuity_residual,
    decomposed_velocity,
    divergence,
    divergence_flux,
    finite_checks,
    generate,
    kl_divergence,
    marginal_path,
    marginal_velocity,
    mask_coupling,
    random_problem,
    revealed,
    router_error,
    sample,
    sampling_pmf,
    scheduler,
    total_variation,
    two_sparse_counterexample,
    validity_violation,
)
from ddfm.theory.text import (
    BOUNDARY,
    TEXT_EXACT,
    TEXT_ROUTERS,
    VOCAB,
    DocumentEval,
    NGramCounts,
    SmoothedNGram,
    TextRouter,
    encode,
    ngram_experts,
    partition_documents,
    python_docs_samples,
    router_log_weights,
    score_document,
    text_equivalence,
    text_features,
    window_codes,
)

__all__ = [
    "ARProblem", "BOUNDARY", "COLUMNS", "Coupling", "DocumentEval", "FINITE_ROWS", "FiniteRouter", "NGramCounts",
    "ROUTERS", "SmoothedNGram", "StateSpace", "TEXT_EXACT", "TEXT_ROUTERS", "TextRouter", "TheoryConfig", "VOCAB",
    "active_positions", "clusters_follow_prompt", "conditional_paths", "conditional_velocities",
    "continuity_residual", "decomposed_velocity", "divergence", "divergence_flux", "encode", "finite_checks",
    "format_report", "format_text", "generate", "kl_divergence", "marginal_path", "marginal_velocity",
    "mask_coupling", "ngram_experts", "partition_documents", "python_docs_samples", "random_problem", "revealed",
    "router_error", "router_log_weights", "sample", "sampling_pmf", "scheduler", "score_document", "text_equivalence",
    "text_features", "theory", "theory_cli", "total_variation", "two_sparse_counterexample", "validity_violation",
    "window_codes",
]

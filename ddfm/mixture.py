"""Mixing the experts' next-token distributions (paper §3.3, eq. 24–27).

Pure torch on tensors, no model code: the ensemble and ``ddfm.theory`` share it.

The mixture is taken in probability space,

    p(x | z) = Σ_k w_k p_k(x | z)                                   (eq. 24)
    log p(x | z) = logsumexp_k (log w_k + log p_k(x | z)),

never by averaging logits (that would be a product of experts, a different model).
Experts with weight 0 have ``log w_k = -inf``; their entries are never read, so a
caller may leave them as any finite value (or ``-inf``) without running the expert.

For experts that model whole sequences the exact router is the posterior over clusters
given the prefix (eq. 26–27; for n-gram experts it is the posterior given the context,
see ``ddfm.theory``):

    w_k(x_{1..t}) ∝ w_k(x_{1..t-1}) · p_k(x_t | x_{<t}),

which :func:`posterior_update` applies one token at a time.
"""

from __future__ import annotations

import torch

__all__ = ["mixture_log_probs", "Mixture", "posterior_update", "top_k_renormalise", "top_k_log", "normalise_log"]


def normalise_log(log_weights: torch.Tensor) -> torch.Tensor:
    """Renormalise log-weights over the last axis: ``log w - logsumexp(log w)``.

    Rows that are all ``-inf`` stay all ``-inf`` (no NaN).
    """
    total = torch.logsumexp(log_weights, dim=-1, keepdim=True)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    return log_weights - total


def mixture_log_probs(log_weights: torch.Tensor, expert_log_probs: torch.Tensor) -> torch.Tensor:
    """``log Σ_k w_k p_k`` per row (eq. 24).

    Args:
        log_weights: (B, K) log mixture weights; ``-inf`` marks an expert that was not run.
            Rows need not be normalised: they are renormalised here.
        expert_log_probs: (B, K, V) each expert's log-probabilities over the vocabulary.

    Returns:
        (B, V) log-probabilities of the mixture (rows sum to 1 in probability space).
    """
    return Mixture(log_weights)(expert_log_probs)


class Mixture:
    """Eq. 24 with the weights fixed: ``Mixture(log_w)(lp) == mixture_log_probs(log_w, lp)``.

    Decoding mixes with the same weights at every step (every routing mode but
    ``posterior``), so the checks and the renormalisation of ``log_w`` (B, K) are done
    once here and each call costs one add and one logsumexp over K (no masking when
    every row runs all its experts), or one gather for top-1 rows.
    """

    def __init__(self, log_weights: torch.Tensor):
        if log_weights.dim() != 2:
            raise ValueError(f"expected log_weights (B,K), got {tuple(log_weights.shape)}")
        self.log_weights = log_weights
        finite = torch.isfinite(log_weights)  # (B, K)
        # top-1 routing: each row's mixture is its one expert's distribution, exactly
        # (log 1 + log p); a gather instead of a (B, K, V) logsumexp keeps decoding lean
        self.single = (torch.arange(len(finite)), finite.to(torch.int8).argmax(1)) \
            if bool((finite.sum(1) == 1).all()) else None
        self._dtype = None

    def _prepare(self, dtype: torch.dtype) -> None:
        log_w = normalise_log(self.log_weights.to(dtype))
        skip = torch.isneginf(log_w)  # (B, K): expert not run for this row
        self._log_w = log_w.unsqueeze(-1)  # (B, K, 1)
        self._skip = skip.unsqueeze(-1) if bool(skip.any()) else None
        self._dtype = dtype

    def __call__(self, expert_log_probs: torch.Tensor) -> torch.Tensor:
        """(B, K, V) each expert's log-probabilities -> (B, V) the mixture's."""
        if expert_log_probs.dim() != 3:
            raise ValueError(f"expected log_weights (B,K) and expert_log_probs (B,K,V), got "
                             f"{tuple(self.log_weights.shape)} and {tuple(expert_log_probs.shape)}")
        if expert_log_probs.shape[:2] != self.log_weights.shape:
            raise ValueError(f"log_weights {tuple(self.log_weights.shape)} does not match "
                             f"expert_log_probs {tuple(expert_log_probs.shape)}")
        if self.single is not None:
            return expert_log_probs[self.single]
        if self._dtype != expert_log_probs.dtype:
            self._prepare(expert_log_probs.dtype)
        if self._skip is None:
            return torch.logsumexp(self._log_w + expert_log_probs, dim=1)  # (B, V)
        # zero-weight experts may hold garbage (or -inf) rows; mask them so -inf + -inf
        # and -inf + nan never reach logsumexp.
        lp = expert_log_probs.masked_fill(self._skip, 0.0)
        joint = (self._log_w + lp).masked_fill(self._skip, float("-inf"))
        return torch.logsumexp(joint, dim=1)  # (B, V)


def posterior_update(log_weights: torch.Tensor, token_log_probs: torch.Tensor) -> torch.Tensor:
    """One step of the whole-prefix posterior (eq. 26–27; exact for whole-sequence experts):
    ``log w_k + log p_k(x_t)``, renormalised.

    Args:
        log_weights: (B, K) current log-weights (``-inf`` = expert excluded, stays excluded).
        token_log_probs: (B, K) each expert's log-probability of the token that was emitted.

    Returns:
        (B, K) renormalised log-weights. If every expert gives the token probability 0
        the row keeps its previous weights (the evidence cannot discriminate).
    """
    if log_weights.shape != token_log_probs.shape:
        raise ValueError(f"log_weights {tuple(log_weights.shape)} and token_log_probs "
                         f"{tuple(token_log_probs.shape)} differ")
    skip = torch.isneginf(log_weights)
    joint = log_weights + token_log_probs.masked_fill(skip, 0.0).to(log_weights.dtype)
    dead = torch.isneginf(torch.logsumexp(joint, dim=-1, keepdim=True))  # (B, 1)
    joint = torch.where(dead, log_weights, joint)
    return normalise_log(joint)


def top_k_renormalise(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's ``k`` largest weights, zero the rest and renormalise (paper §4.3).

    Args:
        weights: (B, K) non-negative weights.
        k: number of experts to keep, ``1 <= k``; ``k >= K`` only renormalises.

    Returns:
        (B, K) weights with at most ``k`` non-zeros per row, rows summing to 1. Ties are
        broken towards the lower expert index, so the result is deterministic.
    """
    if weights.dim() != 2:
        raise ValueError(f"weights must be (B, K), got {tuple(weights.shape)}")
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError("weights must be finite and non-negative")
    K = weights.shape[1]
    kept = weights
    if k < K:
        # stable sort: equal weights keep index order, so ties go to the lower index
        order = torch.sort(weights, dim=1, descending=True, stable=True).indices[:, :k]
        mask = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, order, True)
        kept = weights * mask
    total = kept.sum(dim=1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("a row of weights sums to 0; cannot renormalise")
    return kept / total


def top_k_log(log_weights: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`top_k_renormalise` in log space: keep each row's ``k`` largest log-weights,
    set the rest to ``-inf`` and renormalise.

    Working in logs keeps weights that a probability would round to 0 (a float32 softmax
    underflows below ~1e-45, a cosine gap of 1 at τ = 100 is e^-100): they stay finite
    and comparable. Ties go to the lower expert index, as in :func:`top_k_renormalise`.

    Args:
        log_weights: (B, K) log-weights, ``-inf`` for excluded experts (float64 recommended).
        k: experts to keep, ``1 <= k``; ``k >= K`` only renormalises.
    """
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must be (B, K), got {tuple(log_weights.shape)}")
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if torch.isnan(log_weights).any() or torch.isposinf(log_weights).any():
        raise ValueError("log_weights must not be NaN or +inf")
    if k < log_weights.shape[1]:
        order = torch.sort(log_weights, dim=1, descending=True, stable=True).indices[:, k:]
        log_weights = log_weights.scatter(1, order, float("-inf"))
    if torch.isneginf(log_weights).all(1).any():
        raise ValueError("a row of weights is all zero; cannot renormalise")
    return normalise_log(log_weights)

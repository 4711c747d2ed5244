"""The dual prices of the balanced assignment: price-induced labels, Newton steps and sweeps.

Each cluster k has a price λ_k and every point takes argmax_k (s_ik − λ_k); such a plan is
optimal for its own cluster sizes (complementary slackness), so the prices are moved until
the sizes are balanced: damped Newton steps on the dual, whose Jacobian is a graph
Laplacian of boundary densities (Kitagawa, Mérigot & Thibert, "Convergence of a Newton
algorithm for semi-discrete optimal transport", JEMS 2019), then Gauss–Seidel sweeps that
set one λ_k at a time (the auction view: Bertsekas & Castañón, Annals of Operations
Research 20, 1989). :class:`_Limits` keeps the prices where no locked point could change
sides. See docs/partitioning.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddfm.kmeans.kernels import (
    _GAPS,
    _LABELS,
    _OWN_GAPS,
    _in_parts,
    _kth_kernel,
    _locked_room_kernel,
    _near_boundary_kernel,
    _price_sweep_kernel,
    _top2_kernel,
)

# Scores are a torch (K, n) float32 matrix, one contiguous row per cluster: a step that runs
# over the clusters (argmax, top-2, margins, the repair's move costs) is K elementwise,
# vectorised passes over n points, with no transposed copy (a reduction over a short row of
# K is several times slower in torch). Prices are float64 numpy (K,); reduced scores
# s_ki − λ_k are formed in float32, as the scores.


def _bounds(n: int, k: int) -> tuple[int, int]:
    return n // k, -(-n // k)


def _excess(sizes: np.ndarray, lo: int, hi: int) -> int:
    """Points that must move before every size is in [lo, hi]."""
    return int(np.maximum(sizes - hi, 0).sum() + np.maximum(lo - sizes, 0).sum())


def _counts(labels: torch.Tensor, K: int) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=K)


def _range(x: np.ndarray) -> float:
    return float(x.max() - x.min())


def _top2(S: torch.Tensor, prices: np.ndarray, gaps: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Price-induced labels argmax_k (s_ki − λ_k) (n,) int64 (the first maximum on ties)
    and, with ``gaps``, each point's gap between its best and second-best reduced score
    (n,) float32 (inf when K = 1): how far the prices must move to change its label.
    ``S`` is (K, n); one pass over its rows (:func:`_top2_kernel`)."""
    A, p = S.numpy(), prices.astype(np.float32)
    n = A.shape[1]
    labels, out = np.empty(n, dtype=np.int64), np.empty(n if gaps else 0, np.float32)
    _in_parts(lambda a, b: _top2_kernel(A, p, a, b, labels, out, _GAPS if gaps else _LABELS), n)
    return torch.from_numpy(labels), torch.from_numpy(out) if gaps else None


def _argmax(S: torch.Tensor, prices: np.ndarray) -> torch.Tensor:
    """argmax_k (s_ki − λ_k) for every column of S (K, n): the price-induced labels (n,)."""
    return _top2(S, prices, gaps=False)[0]


def _label_gaps(S: torch.Tensor, prices: np.ndarray, labels: torch.Tensor) -> torch.Tensor:
    """Reduced gap of each point to its best *other* cluster, (n,) float32: (s_ai − λ_a) −
    max_{j≠a}(s_ji − λ_j) for its label a (negative when the repair moved it off its best;
    inf when K = 1). ``S`` is (K, n); one pass over its rows."""
    A, p, labels = S.numpy(), prices.astype(np.float32), labels.numpy()
    out = np.empty(A.shape[1], np.float32)
    _in_parts(lambda a, b: _top2_kernel(A, p, a, b, labels, out, _OWN_GAPS), A.shape[1])
    return torch.from_numpy(out)


def _kth_smallest(x: torch.Tensor, k: int) -> float:
    """The k-th smallest of x (n,) float32, 1 ≤ k ≤ n (``x.kthvalue(k)``, 6-10x faster): a
    histogram of the top 12 bits of the float32 values as order-preserving integers (sign
    flipped for positive numbers, all bits for negative ones) finds the bucket that holds
    it, and a selection among that bucket's members the value."""
    values = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    if not 1 <= k <= len(values):
        raise ValueError(f"k = {k} is outside [1, {len(values)}]")
    return float(_kth_kernel(values, k))


def _smallest(gaps: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """The working set: indices (sorted) of every point whose gap is below H, H chosen so
    that there are about ``n`` of them; returns (indices, H). All points and H = inf when
    n ≥ N or the gaps do not separate."""
    N = len(gaps)
    if n < N:
        H = _kth_smallest(gaps, n + 1)
        free = torch.nonzero(gaps < H).squeeze(1)
        if H > 0 and len(free):
            return free, H
    return torch.arange(N), math.inf


class _Limits:
    """How far the prices may move while every *locked* point keeps its label.

    A locked point i of cluster a with reduced gaps g_ij = (s_ia − λ⁰_a) − (s_ij − λ⁰_j) at
    the anchor prices λ⁰ stays in a for as long as δ_a − δ_j < g_ij for all j (δ = λ − λ⁰).
    ``room[a, j]`` is the smallest such gap over the locked members of a (a lower bound is
    enough), so the moves allowed are the difference constraints δ_a − δ_j < room[a, j]:
    a pair of clusters with no locked point near their boundary may move freely. The same
    numbers bound the cost of moving a locked point: s_ia − s_ib ≥ λ⁰_a − λ⁰_b + room[a, b].
    """

    def __init__(self, anchor: np.ndarray, room: np.ndarray):
        self.anchor = anchor.copy()
        self.room = np.array(room, dtype=np.float64) - 1e-6  # float32 rounding of the scores
        np.fill_diagonal(self.room, math.inf)

    def step(self, prices: np.ndarray, delta: np.ndarray) -> float:
        """The largest α in [0, 1] with prices + α·delta inside the limits."""
        d = prices - self.anchor
        used = d[:, None] - d[None, :]
        grow = delta[:, None] - delta[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(grow > 0, (self.room - used) / grow, math.inf)
        return float(np.clip(alpha.min(), 0.0, 1.0))

    def bound(self) -> np.ndarray:
        """(K, K) lower bound on the cost s_ia − s_ib of moving any locked point a → b."""
        return self.anchor[:, None] - self.anchor[None, :] + self.room


def _locked_room(S: torch.Tensor, prices: np.ndarray, labels: torch.Tensor, free: torch.Tensor) -> np.ndarray:
    """``room`` of :class:`_Limits` for the points outside ``free``: the smallest reduced gap
    from a locked member of a to cluster j, (K, K) float64 (computed in float32 as the
    scores; inf where a has no locked member, 0 on the diagonal of a cluster that has one)."""
    A, p, labels = S.numpy(), prices.astype(np.float32), labels.numpy()
    is_free = np.zeros(A.shape[1], dtype=bool)
    is_free[free.numpy()] = True
    parts = _in_parts(lambda a, b: _locked_room_kernel(A, p, labels, is_free, a, b), A.shape[1])
    return np.minimum.reduce(parts).astype(np.float64)


def _price_sweep(S: np.ndarray, prices: np.ndarray, lo: int, hi: int, base: np.ndarray,
                 limits: _Limits | None = None) -> tuple[int, np.ndarray]:
    """One Gauss–Seidel pass over the K prices (updated in place); returns (prices changed,
    labels (n,)).

    ``S`` is (K, n) (rows contiguous); ``base`` (K,) counts points outside S that are
    fixed in each cluster. For cluster k the margin of point i is s_ik − max_{j≠k}(s_ij − λ_j);
    points with margin > λ_k prefer k, and λ_k is set so that base_k plus their number lands
    in [lo, hi], as far as ``limits`` (:class:`_Limits`) allow. The max over j≠k is
    a running max over the already-updated j < k and a suffix max over j > k, so a sweep
    is O(n·K) (:func:`_price_sweep_kernel`).
    """
    K, n = S.shape
    anchor = limits.anchor if limits is not None else prices  # unused without limits
    room = limits.room if limits is not None else np.full((K, K), np.inf)
    labels = np.zeros(n, dtype=np.int64)
    changed = _price_sweep_kernel(S, prices, int(lo), int(hi), np.asarray(base, np.int64), anchor, room,
                                  limits is not None, labels)
    return int(changed), labels


def _near_boundary(S: torch.Tensor, prices: np.ndarray, labels: torch.Tensor, h: float) -> np.ndarray:
    """W[j, a] = #{i in cluster a: (s_ai − λ_a) − (s_ji − λ_j) < h}, j ≠ a, (K, K) float64:
    the points of a within h of the a|j boundary, all in float32. ``S`` is (K, n); one pass."""
    A, p, labels = S.numpy(), prices.astype(np.float32), labels.numpy()
    h32 = np.float32(h)
    return sum(_in_parts(lambda a, b: _near_boundary_kernel(A, p, labels, h32, a, b), A.shape[1]))


def _laplacian(S: torch.Tensor, prices: np.ndarray, labels: torch.Tensor, band: int) -> tuple[np.ndarray, float]:
    """The Jacobian of the cluster sizes in the prices, −L, for the points of ``S`` (K, n)
    with price-induced ``labels`` (n,): L (K, K) is the graph Laplacian of the densities of
    points on each k|j boundary, counted within h of it (h = the ``band``-th smallest gap)
    and divided by h. Also returns the widest gap: beyond it every point could change sides."""
    n = S.shape[1]
    gaps = _label_gaps(S, prices, labels)  # (n,) ≥ 0: how far the nearest other cluster is
    h = _kth_smallest(gaps, min(band, n)) + 1e-9
    W = _near_boundary(S, prices, labels, h) / h
    rho = (W + W.T) / 2
    return np.diag(rho.sum(1)) - rho, float(gaps.max()) + 1e-9


def _newton_prices(S: torch.Tensor, prices: np.ndarray, lo: int, hi: int, base: np.ndarray, n_total: int, *,
                   limits: _Limits | None = None, max_steps: int = 12, stop_when_slow: bool = True,
                   good_enough: int = 0) -> tuple[np.ndarray, torch.Tensor, int, np.ndarray | None]:
    """Damped Newton steps on the dual prices (Kitagawa, Mérigot & Thibert, "Convergence of
    a Newton algorithm for semi-discrete optimal transport", JEMS 2019).

    ``S`` (K, n) are the scores of the free points, ``base`` (K,) the points fixed outside
    them; the target is sizes in [lo, hi] for all ``n_total`` points. The size of cluster k
    as a function of the prices has Jacobian −L, L the graph Laplacian of the densities of
    points on each k|j boundary, estimated from the points within h of that boundary
    (h = a low quantile of the gaps). Each step solves L Δ = sizes − N/K, is capped so that
    no price difference moves by more than the widest gap (beyond it every point could
    change sides), kept inside ``limits`` (:class:`_Limits`), and backtracks until the
    excess falls. Returns (prices, labels (n,), steps, L (K, K) of the last step or None);
    stops when the excess is ≤ max(2K, ``good_enough``) or,
    with ``stop_when_slow``, a step removes less than a third of it (the sweeps and the
    exact repair finish faster).
    """
    K, n = S.shape
    target = n_total / K
    labels = _argmax(S, prices)
    sizes = base + _counts(labels, K)
    excess = _excess(sizes, lo, hi)
    band, steps, L = max(64 * K, n // 10), 0, None
    while steps < max_steps and excess > max(2 * K, good_enough):
        steps += 1
        L, widest = _laplacian(S, prices, labels, band)
        delta = np.linalg.lstsq(L, sizes - target, rcond=None)[0]
        delta -= delta.mean()
        if _range(delta) > widest:
            delta *= widest / _range(delta)
        alpha, accepted = 1.0 if limits is None else limits.step(prices, delta), False
        if alpha <= 0:
            break  # the limits bind: a new working set is needed
        floor = alpha / 20
        while alpha > floor:
            cand_prices = prices + alpha * delta
            cand = _argmax(S, cand_prices)
            cand_sizes = base + _counts(cand, K)
            if _excess(cand_sizes, lo, hi) < excess:
                accepted = True
                break
            alpha /= 2
        if not accepted:
            if band >= n // 3:
                break  # no descent: leave the rest to the sweeps and the exact repair
            band = min(n, band * 4)  # the density estimate was too local: widen it and retry
            continue
        slow = _excess(cand_sizes, lo, hi) > 2 * excess / 3
        prices, labels, sizes, excess = cand_prices, cand, cand_sizes, _excess(cand_sizes, lo, hi)
        if slow and stop_when_slow:
            break
    return prices, labels, steps, L

"""Spherical balanced k-means with exactly balanced final labels (paper §4.2, Table 9).

    from ddfm.kmeans import BalancedKMeans, TwoStageKMeans
    km = BalancedKMeans(16, random_state=0).fit(X)  # X: (N, D) float32
    km.labels_            # (N,) int64, cluster sizes differ by at most one
    km.fit_info_          # objective, sizes and seconds per iteration (data, not log lines)

The paper clusters unique-image features into K clusters "of equal sizes". Its code
balances while fitting but takes the final labels from an unbalanced argmin; here the
final labels, and every assignment step once the warm-up is over, solve the balanced
assignment *exactly*:

    maximise  Σ_i s(x_i, c_{a(i)})   subject to  ⌊N/K⌋ ≤ |{i : a(i) = k}| ≤ ⌈N/K⌉  for all k,

a transportation problem with K sinks (s = cosine similarity when spherical, else
2 x·c − |c|², i.e. −|x − c|² up to a per-row constant). :func:`balanced_assignment`
solves it in two phases:

1. **Dual prices** (the price/auction view of the transportation problem: D. P.
   Bertsekas and D. A. Castañón, "The auction algorithm for the transportation problem",
   Annals of Operations Research 20, 1989). Each cluster k has a price λ_k and every
   point takes argmax_k (s_ik − λ_k); any such price-induced assignment is an *optimal*
   transport plan for its own cluster sizes (complementary slackness). The prices are
   found by damped Newton steps on the dual (Kitagawa, Mérigot & Thibert, "Convergence
   of a Newton algorithm for semi-discrete optimal transport", JEMS 2019: the Jacobian of
   the sizes is a graph Laplacian of boundary densities), then, if still needed,
   Gauss–Seidel coordinate steps that set one λ_k at a time so that the number of points
   preferring k lands in [⌊N/K⌋, ⌈N/K⌉]. Prices are warm-started from the previous
   k-means iteration. Both run on a *working set*, the points nearest a boundary; the
   others are locked, and :class:`_Limits` keeps the prices where no locked point could
   change sides.
2. **Exact repair** by successive shortest paths on the K-node cluster graph (Ahuja,
   Magnanti & Orlin, *Network Flows*, 1993, §9.7): the cost of moving one point from
   cluster a to b is min_{i∈a} (s_ia − s_ib); Bellman–Ford finds the cheapest chain of
   moves from an over-full to an under-full cluster, and shortest-path augmentation keeps
   the plan optimal for the new sizes. Afterwards, while a chain of moves from a cluster
   at ⌈N/K⌉ to one at ⌊N/K⌋ has negative cost, it is applied. Locked points enter with a
   certified lower bound on their cost; a chain that might need one sends the repair to
   every point. The result is an optimal solution of the linear program above (exact up to
   float32 rounding of the scores; the tests check it against
   ``scipy.optimize.linear_sum_assignment`` and the HiGHS LP solver).

:class:`BalancedKMeans` adds two savings around it. While the objective still gains more
than ``warmup_tol`` per iteration, a step may stop at a few misplaced points (at most 1 %;
the price-induced plan, optimal for its own sizes) and skip the repair; every later step
and always the last is exact. And with ``algorithm="bounds"`` a step scores only the
points whose cluster could change (Hamerly's bounds, see :meth:`BalancedKMeans.fit`).

The per-point loops over the K rows of scores (top-2, gaps, boundary counts, the locked
room, the price sweeps) and the whole exact repair (:func:`_repair_kernel`) are numba
kernels that release the GIL (the loops run on a range of points per torch thread, the
repair on one); each does
the float32/float64 operations of the numpy or Python code it replaced, in the same order
(``tests/test_kmeans_kernels.py`` checks them bit for bit, and move for move for the
repair, against that code). Three more are not bit-for-bit replacements, and their tests
compare values: the member sums (:func:`_sums_kernel`, accumulated in float64 where
torch's product summed in float32), k-means++'s distances (:func:`_pp_kernel`, float32
sums reassociated) and the k-th smallest gap (:func:`_kth_smallest`, exact). They compile
on first use (about 22 s, once; cached on disk beside this file, or in numba's user cache
when that is read-only).

Memory: the score matrix is (K, N) float32 (one row per cluster), computed in chunks of
X by matmuls (oneDNN's for K ≥ 8 where torch has it, else the BLAS; :class:`_BlockScores`),
i.e. O(N·D + N·K) with K ≤ D; no (N, K, D) tensor ever exists.
:meth:`BalancedKMeans.predict` with ``balanced=False`` streams in chunks (O(chunk·K)).

Both estimators are scikit-learn estimators (``BaseEstimator``, ``ClusterMixin``,
``TransformerMixin``; ``random_state``; input checked by ``sklearn.utils.validation``) that
pass ``sklearn.utils.estimator_checks.check_estimator``.

:class:`TwoStageKMeans` is the paper's Table 9 variant after McAllister et al. (2025):
unbalanced spherical k-means into m fine clusters (faiss when installed), then balanced
clustering of the m fine centroids into K (by default exactly balanced in fine clusters).
"""

from __future__ import annotations

import functools
import math
import numbers
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin
from sklearn.utils import assert_all_finite, check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, check_scalar, validate_data


# ----------------------------------------------------------------------------- scores
def _tensor(X: np.ndarray, dtype: Any = np.float32) -> torch.Tensor:
    """A C-contiguous (N, D) torch tensor of ``dtype`` on X's memory when X already is one
    (no copy; a read-only array, e.g. a memmap, is only ever read)."""
    X = np.ascontiguousarray(X, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X)


def _unit_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of X (N, D) scaled to unit L2 norm (zero rows stay zero), and the squared norms
    (N,) of the rows returned. X itself when every row already has norm 1 ± 1e-6 (features
    saved normalised): dividing would move each value by at most ~8 float32 ulps, and
    skipping it saves an (N, D) copy."""
    norms = X.norm(dim=1)
    if not bool(torch.isfinite(norms).all()):  # the norms show any NaN or infinity in X
        assert_all_finite(X.numpy(), input_name="X")  # scikit-learn's error naming it
        norms = X.double().norm(dim=1)  # finite values whose squares overflow float32
        return (X.double() / norms.clamp_min(1e-12)[:, None]).to(X.dtype), (norms > 1e-12).to(X.dtype)
    if len(norms) and float((norms - 1).abs().max()) <= 1e-6:
        return X, norms * norms
    return X / norms.clamp_min(1e-12)[:, None], (norms > 1e-12).to(X.dtype)


def _normalise(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


@functools.cache
def _onednn_linear() -> Any:
    """oneDNN's float32 ``x @ w.T`` (the op torch.compile emits for linear layers on the CPU),
    or None where this torch build lacks it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(3, 4), torch.ones(2, 4)
        ok = torch.backends.mkldnn.is_available() and torch.equal(op(x, w, None, "none", [], ""), x @ w.T)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return (lambda x, w: op(x, w, None, "none", [], "")) if ok else None


class _BlockScores:
    """Scores of blocks of points, C @ block.T written into columns of a (K, n) buffer.

    For K ≥ 8 clusters the product runs in oneDNN's kernel where torch has it: 200,000 x
    512 at K = 16 in 27 ms on two threads and 49 ms on one, against 43 and 91 ms for torch's
    BLAS products below. Narrower products are bound by reading X, which the BLAS does
    faster on two threads (K = 2: 12 vs 23 ms).
    Otherwise, on several threads the tall-skinny product block @ C.T (b, K) splits over
    them where the wide C @ block.T does not; it is computed in blocks of 4,096 rows (that
    fit in cache) and transposed into the K-major buffer (200,000 x 512, K = 16, 2 threads:
    41 ms vs 50 ms in blocks of 65,536 and 64 ms wide). On one thread the wide product is
    as fast (86 ms) and needs no copy."""

    TALL_ROWS = 4096
    ONEDNN_MIN_K = 8

    def __init__(self, C: torch.Tensor, rows: int):
        self.C = C.contiguous()
        self.onednn = _onednn_linear() if C.shape[0] >= self.ONEDNN_MIN_K and C.dtype == torch.float32 else None
        self.tall = torch.get_num_threads() > 1 and self.onednn is None
        self.tmp = torch.empty((min(rows, self.TALL_ROWS), C.shape[0]), dtype=torch.float32) if self.tall else None

    def __call__(self, block: torch.Tensor, out: torch.Tensor) -> None:
        """out (K, b) = C @ block.T for block (b, D)."""
        if self.onednn is not None:
            for a in range(0, len(block), self.TALL_ROWS):
                part = block[a:a + self.TALL_ROWS]
                out[:, a:a + len(part)].copy_(self.onednn(part, self.C).T)
            return
        if not self.tall:
            torch.mm(self.C, block.T, out=out)
            return
        for a in range(0, len(block), self.TALL_ROWS):
            part = block[a:a + self.TALL_ROWS]
            t = self.tmp[:len(part)]
            torch.mm(part, self.C.T, out=t)
            out[:, a:a + len(part)].copy_(t.T)


def _scores(C: torch.Tensor, X: torch.Tensor, spherical: bool, chunk_size: int, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Similarity of every centroid to every point, ``(K, N)`` float32 (one row per cluster),
    written into ``out`` when given (a buffer reused across iterations saves the page faults
    of fresh memory), ``chunk_size`` rows of X at a time.

    Spherical: cos(x_i, c_k) = c_k·x_i (unit rows). Euclidean: 2 c_k·x_i − |c_k|², which
    is −|x_i − c_k|² + |x_i|², so argmax and the assignment LP are unchanged.
    """
    K, N = C.shape[0], X.shape[0]
    out = torch.empty((K, N), dtype=torch.float32) if out is None else out
    score = _BlockScores(C, min(chunk_size, N))
    for a in range(0, N, chunk_size):
        block = X[a:a + chunk_size]
        score(block, out[:, a:a + len(block)])  # (K, chunk)
    if not spherical:
        out.mul_(2).sub_((C * C).sum(1)[:, None])
    return out


def _scores_of(C: torch.Tensor, X: torch.Tensor, rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Spherical scores C @ X[rows].T, (K, n) float32, gathering the rows in blocks of
    ``chunk`` into one reused buffer: a fresh (n, D) copy of the rows would cost its page
    faults, more than the product itself."""
    out = torch.empty((C.shape[0], len(rows)), dtype=torch.float32)
    buf = torch.empty((min(chunk, len(rows)), X.shape[1]), dtype=X.dtype)
    score = _BlockScores(C, len(buf))
    for a in range(0, len(rows), chunk):
        block = buf[:len(rows[a:a + chunk])]
        torch.index_select(X, 0, rows[a:a + chunk], out=block)
        score(block, out[:, a:a + len(block)])
    return out


@numba.njit(nogil=True, cache=True)
def _sums_kernel(X: np.ndarray, labels: np.ndarray, weights: np.ndarray, a: int, b: int, out: np.ndarray
                 ) -> None:  # pragma: no cover (compiled; run through _cluster_sums)
    """out[labels[i]] += weights[i] · x_i for a ≤ i < b, in float64 (out (K, D))."""
    for i in range(a, b):
        c, w = labels[i], np.float64(weights[i])
        for d in range(X.shape[1]):
            out[c, d] += w * np.float64(X[i, d])


@numba.njit(nogil=True, cache=True)
def _moves_kernel(X: np.ndarray, labels: np.ndarray, prev: np.ndarray, rows: np.ndarray, a: int, b: int,
                  out: np.ndarray) -> None:  # pragma: no cover (compiled; run through _update_sums)
    """For the points i = rows[a:b]: out[labels[i]] += x_i and out[prev[i]] −= x_i, in float64."""
    for r in range(a, b):
        i = rows[r]
        c, o = labels[i], prev[i]
        for d in range(X.shape[1]):
            v = np.float64(X[i, d])
            out[c, d] += v
            out[o, d] -= v


def _cluster_sums(X: torch.Tensor, labels: torch.Tensor, K: int, weights: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Σ_{i: label k} w_i x_i for every cluster, (K, D) float64, accumulated in float64 by
    :func:`_sums_kernel`, one contiguous range of points per torch thread, summed in order
    (deterministic; one pass over X, 2x torch's sparse product)."""
    Xn, labels = X.numpy(), labels.numpy()
    w = np.ones(len(Xn), Xn.dtype) if weights is None else weights.numpy()

    def part(a: int, b: int) -> np.ndarray:
        out = np.zeros((K, Xn.shape[1]))
        _sums_kernel(Xn, labels, w, a, b, out)
        return out

    return torch.from_numpy(sum(_in_parts(part, len(Xn), min_part=8192)))


def _update_sums(X: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor | None, sums: torch.Tensor | None,
                 K: int) -> torch.Tensor:
    """Member sums Σ_{i: label k} x_i (K, D) float64 for ``labels``, updated from the sums
    for ``prev`` by only the points that changed cluster (after the first iterations a few
    percent), or recomputed when many did. All in float64, so that the running sums do not
    drift."""
    if prev is None or sums is None:
        return _cluster_sums(X, labels, K)
    Xn, new, old = X.numpy(), labels.numpy(), prev.numpy()
    changed = np.flatnonzero(new != old)  # (m,) sorted: the kernel reads these rows of X in place
    if len(changed) > X.shape[0] // 5:  # beyond N/5 scattered rows, one pass over X costs less
        return _cluster_sums(X, labels, K)

    def part(a: int, b: int) -> np.ndarray:  # + x_i to the new cluster, − x_i to the old one
        out = np.zeros((K, Xn.shape[1]))
        _moves_kernel(Xn, new, old, changed, a, b, out)
        return out

    return sums + torch.from_numpy(sum(_in_parts(part, len(changed), min_part=2048)))


def _nearest(C: torch.Tensor, X: torch.Tensor, spherical: bool, chunk_size: int) -> torch.Tensor:
    """argmax_k score, streamed in chunks: O(chunk·K) memory. Returns (N,) int64."""
    labels = torch.empty(X.shape[0], dtype=torch.int64)
    sq = (C * C).sum(1) if not spherical else None
    for a in range(0, X.shape[0], chunk_size):
        s = X[a:a + chunk_size] @ C.T  # (chunk, K)
        if sq is not None:
            s = 2 * s - sq
        labels[a:a + chunk_size] = s.argmax(1)
    return labels


# ------------------------------------------------------------- balanced assignment
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


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _in_parts(fn: Any, n: int, min_part: int = 32768) -> list:
    """``fn(a, b)`` over contiguous ranges [a, b) covering [0, n), one per torch thread when
    n is large (the numpy loops below release the GIL), in order; returns their results."""
    global _POOL
    parts = max(1, min(torch.get_num_threads(), n // min_part))
    if parts == 1:
        return [fn(0, n)]
    if _POOL is None or _POOL[0] < parts:
        _POOL = (parts, ThreadPoolExecutor(parts, thread_name_prefix="ddfm-kmeans"))
    edges = np.linspace(0, n, parts + 1).astype(np.int64)
    return list(_POOL[1].map(fn, edges[:-1], edges[1:]))


_BLOCK = 512  # points per block in _top2_kernel: their K rows of scores stay in L1
_TBLOCK = 256  # points per transposed block (TBLOCK, K) of reduced scores


@numba.njit(nogil=True, cache=True, inline="always")
def _top2_block(A: np.ndarray, p: np.ndarray, s: int, m: int, best: np.ndarray, second: np.ndarray,
                lab: np.ndarray) -> None:  # pragma: no cover (compiled; inlined into the kernels below)
    """For the points s ≤ s+i < s+m of A (K, n) float32 at prices p (K,) float32: the best
    reduced score best[i], its cluster lab[i] (the first on ties) and the largest of the
    others second[i] (−inf when K = 1). The same float32 operations, in the same order, as
    a numpy pass per cluster."""
    for i in range(m):
        best[i] = A[0, s + i] - p[0]
        second[i] = -np.inf
        lab[i] = 0
    for k in range(1, A.shape[0]):
        pk = p[k]
        row = A[k, s:s + m]
        for i in range(m):
            # selects, not branches, so that the loop vectorises (3x); each is the value
            # Python's min/max would return, so the results are the same to the bit
            v = row[i] - pk
            old = best[i]
            low = old if old < v else v  # min(v, old best)
            sec = second[i]
            second[i] = low if low > sec else sec  # the larger of the old second and it
            lab[i] = k if v > old else lab[i]
            best[i] = v if v > old else old


_LABELS, _GAPS, _OWN_GAPS = 0, 1, 2  # what a _top2_kernel pass writes


@numba.njit(nogil=True, cache=True)
def _top2_kernel(A: np.ndarray, p: np.ndarray, a: int, b: int, labels: np.ndarray, gaps: np.ndarray,
                 mode: int) -> None:  # pragma: no cover (compiled; run through _top2 and _label_gaps)
    """For the points a ≤ i < b of A (K, n) float32 at prices p (K,) float32: _LABELS writes
    labels[i], the best reduced score's cluster (the first on ties); _GAPS also gaps[i],
    best − second best; _OWN_GAPS reads labels[i] and writes gaps[i], its own reduced score
    less the best other cluster's, which is the second best when the label is the (first)
    best and the best otherwise (a tie for the best included): the same float32 maximum."""
    best = np.empty(_BLOCK, np.float32)
    second = np.empty(_BLOCK, np.float32)
    lab = np.empty(_BLOCK, np.int32)
    for s in range(a, b, _BLOCK):
        m = min(_BLOCK, b - s)
        _top2_block(A, p, s, m, best, second, lab)
        for i in range(m):
            if mode == _OWN_GAPS:
                c = labels[s + i]
                gaps[s + i] = (A[c, s + i] - p[c]) - (second[i] if lab[i] == c else best[i])
                continue
            labels[s + i] = lab[i]
            if mode == _GAPS:
                gaps[s + i] = best[i] - second[i]


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


@numba.njit(nogil=True, cache=True, inline="always")
def _reduced_block(A: np.ndarray, p: np.ndarray, s: int, m: int, T: np.ndarray
                   ) -> None:  # pragma: no cover (compiled; inlined into the kernels below)
    """T[i, j] = s_{j,s+i} − λ_j for the points s ≤ s+i < s+m (float32): a block of the
    reduced scores transposed, so that a point's K of them are contiguous."""
    for i in range(m):  # writes in order; the K rows are read as K streams
        for j in range(A.shape[0]):
            T[i, j] = A[j, s + i] - p[j]


@numba.njit(nogil=True, cache=True)
def _locked_room_kernel(A: np.ndarray, p: np.ndarray, labels: np.ndarray, free: np.ndarray, a: int, b: int
                        ) -> np.ndarray:  # pragma: no cover (compiled; run through _locked_room)
    K = A.shape[0]
    room = np.full((K, K), np.float32(np.inf))
    T = np.empty((_TBLOCK, K), np.float32)
    for s in range(a, b, _TBLOCK):
        m = min(_TBLOCK, b - s)
        _reduced_block(A, p, s, m, T)
        for i in range(m):
            if not free[s + i]:
                c = labels[s + i]
                own = T[i, c]
                for j in range(K):
                    gap = own - T[i, j]
                    room[c, j] = gap if gap < room[c, j] else room[c, j]  # min(room, gap), as a select
    return room


def _locked_room(S: torch.Tensor, prices: np.ndarray, labels: torch.Tensor, free: torch.Tensor) -> np.ndarray:
    """``room`` of :class:`_Limits` for the points outside ``free``: the smallest reduced gap
    from a locked member of a to cluster j, (K, K) float64 (computed in float32 as the
    scores; inf where a has no locked member, 0 on the diagonal of a cluster that has one)."""
    A, p, labels = S.numpy(), prices.astype(np.float32), labels.numpy()
    is_free = np.zeros(A.shape[1], dtype=bool)
    is_free[free.numpy()] = True
    parts = _in_parts(lambda a, b: _locked_room_kernel(A, p, labels, is_free, a, b), A.shape[1])
    return np.minimum.reduce(parts).astype(np.float64)


def _range(x: np.ndarray) -> float:
    return float(x.max() - x.min())


@numba.njit(nogil=True, cache=True)
def _select_threshold(margins: np.ndarray, t: int, price: float) -> float:  # pragma: no cover (compiled)
    """A price λ with exactly ``t`` margins strictly above it (ties permitting), moved from
    the current ``price``: the midpoint of the t-th and (t+1)-th largest margins, found
    among the margins on one side of the old price only (a selection over them, O(n)).
    In float64 (numba's ``float()`` of a float32 stays float32)."""
    n = margins.shape[0]
    if t >= n:
        return np.float64(margins.min()) - 1.0
    if t <= 0:
        return np.float64(margins.max()) + 1.0
    p32 = np.float32(price)
    c = 0
    for i in range(n):
        c += margins[i] > p32
    if t == c:
        return price
    if t < c:  # raise it: the (c−t)-th and (c−t+1)-th smallest of the c margins above
        side = np.empty(c, np.float32)
        j = 0
        for i in range(n):
            if margins[i] > p32:
                side[j] = margins[i]
                j += 1
        r = c - t - 1
        side = np.partition(side, r)
        return 0.5 * (np.float64(side[r]) + np.float64(side[r + 1:].min()))
    side = np.empty(n - c, np.float32)  # lower it: the (t−c)-th and (t−c+1)-th largest below
    j = 0
    for i in range(n):
        if not margins[i] > p32:
            side[j] = margins[i]
            j += 1
    r = n - c - (t - c)
    side = np.partition(side, r)
    return 0.5 * (np.float64(side[r]) + np.float64(side[:r].max()))


@numba.njit(nogil=True, cache=True)
def _price_sweep_kernel(S: np.ndarray, prices: np.ndarray, lo: int, hi: int, base: np.ndarray, anchor: np.ndarray,
                        room: np.ndarray, limited: bool, labels: np.ndarray) -> int:  # pragma: no cover (via _price_sweep)
    K, n = S.shape
    suffix = np.empty((K, n), np.float32)  # suffix[k] = max_{j>=k} (s_j − λ_j), each rounded to float32
    for i in range(n):
        suffix[K - 1, i] = np.float32(np.float64(S[K - 1, i]) - prices[K - 1])
    for k in range(K - 2, -1, -1):
        for i in range(n):
            suffix[k, i] = max(suffix[k + 1, i], np.float32(np.float64(S[k, i]) - prices[k]))
    running = np.full(n, -np.inf, np.float32)
    margin = np.empty(n, np.float32)
    changed = 0
    for k in range(K):
        count = base[k]
        for i in range(n):
            other = max(running[i], suffix[k + 1, i]) if k + 1 < K else running[i]
            margin[i] = S[k, i] - other
            count += np.float64(margin[i]) > prices[k]
        if count < lo or count > hi:
            price = _select_threshold(margin, min(max(count, lo), hi) - base[k], prices[k])
            if limited:  # λ_k as close to the price as δ_k − δ_j < room[k, j], δ_j − δ_k < room[j, k] allow
                upper, lower = np.inf, -np.inf
                for j in range(K):
                    if j != k:
                        upper = min(upper, prices[j] - anchor[j] + room[k, j])
                        lower = max(lower, prices[j] - anchor[j] - room[j, k])
                price = anchor[k] + min(max(price - anchor[k], lower), upper)
            changed += price != prices[k]
            prices[k] = price
        pk = np.float32(prices[k])
        for i in range(n):
            value = S[k, i] - pk
            if value > running[i]:
                labels[i] = k
            running[i] = max(running[i], value)
    return changed


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


@numba.njit(nogil=True, cache=True)
def _near_boundary_kernel(A: np.ndarray, p: np.ndarray, labels: np.ndarray, h: np.float32, a: int, b: int
                          ) -> np.ndarray:  # pragma: no cover (compiled; run through _near_boundary)
    K = A.shape[0]
    W_t = np.zeros((K, K), np.int32)  # W_t[a, j] = W[j, a] (a part has < 2³¹ points)
    T = np.empty((_TBLOCK, K), np.float32)
    for s in range(a, b, _TBLOCK):
        m = min(_TBLOCK, b - s)
        _reduced_block(A, p, s, m, T)
        for i in range(m):
            c = labels[s + i]
            own = T[i, c]
            for j in range(K):  # branch-free, so that it vectorises; the diagonal is zeroed below
                W_t[c, j] += own - T[i, j] < h
    for c in range(K):
        W_t[c, c] = 0
    return W_t.T.astype(np.float64)


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


@numba.njit(nogil=True, cache=True)
def _cheapest_moves(S: np.ndarray, labels: np.ndarray, E: np.ndarray, who: np.ndarray
                    ) -> None:  # pragma: no cover (compiled; part of _repair_kernel)
    """E[a, b] = min over the points i of cluster a of s_ia − s_ib (float32) and who[a, b]
    the first such i (E inf and who −1 where a has no point; the diagonal stays so)."""
    K, n = S.shape
    zero = np.zeros(K, np.float32)
    T = np.empty((_TBLOCK, K), np.float32)
    for s in range(0, n, _TBLOCK):
        m = min(_TBLOCK, n - s)
        _reduced_block(S, zero, s, m, T)
        for i in range(m):
            c = labels[s + i]
            for j in range(K):
                cost = T[i, c] - T[i, j]
                if j != c and cost < E[c, j]:
                    E[c, j] = cost
                    who[c, j] = s + i


class _Uncertain(Exception):
    """The working set cannot certify the next move: redo the repair on every point."""


@numba.njit(nogil=True, cache=True)
def _relax(E: np.ndarray, dist: np.ndarray, prev: np.ndarray, rounds: int) -> bool:  # pragma: no cover (compiled)
    """Up to ``rounds`` Bellman–Ford rounds on the K-node graph with edge costs E (K, K),
    each from the previous round's distances (reach b through the first a with the least
    dist[a] + E[a, b]; only an improvement by more than 1e-9 counts), updating ``dist`` and
    ``prev`` in place; True when a round changes nothing."""
    K = E.shape[0]
    best = np.empty(K)
    via = np.empty(K, np.int64)
    for _ in range(rounds):
        for b in range(K):
            best[b], via[b] = dist[0] + E[0, b], 0
            for a in range(1, K):
                if dist[a] + E[a, b] < best[b]:
                    best[b], via[b] = dist[a] + E[a, b], a
        changed = False
        for b in range(K):
            if best[b] < dist[b] - 1e-9:
                dist[b], prev[b], changed = best[b], via[b], True
        if not changed:
            return True
    return False


_CERTAIN, _UNCERTAIN, _CYCLE = 0, 1, 2  # what _best_chain found
_DEPTH = 64  # an edge's short list of move candidates: its 64 cheapest (kept ≤ 4·64, cut to 2·64)


@numba.njit(nogil=True, cache=True)
def _build_edge(S: np.ndarray, labels: np.ndarray, a: int, b: int, depth: int, lc: np.ndarray, lp: np.ndarray,
                head: np.ndarray, tail: np.ndarray, built: np.ndarray, complete: np.ndarray
                ) -> None:  # pragma: no cover (compiled; part of _repair_kernel)
    """The short list of edge a→b from the members of a: their ``depth`` cheapest moves
    s_ia − s_ib (float32, kept as float64), sorted by cost and then by point; complete
    when a has no more members than that."""
    n = S.shape[1]
    count = 0
    for i in range(n):
        count += labels[i] == a
    members = np.empty(count, np.int64)
    costs = np.empty(count, np.float32)
    j = 0
    for i in range(n):
        if labels[i] == a:
            members[j], costs[j] = i, S[a, i] - S[b, i]
            j += 1
    m = min(depth, count)
    if count > depth:  # the m cheapest, ties at the m-th cost by point, still in point order
        cut = np.partition(costs.copy(), m - 1)[m - 1]
        keep = np.empty(m, np.int64)
        j = 0
        for r in range(count):
            if costs[r] < cut:
                keep[j] = r
                j += 1
        for r in range(count):
            if j < m and costs[r] == cut:
                keep[j] = r
                j += 1
        members, costs = members[keep], costs[keep]
    order = np.argsort(costs, kind="mergesort")  # stable: ties stay in point order
    for r in range(m):
        lc[a, b, r], lp[a, b, r] = np.float64(costs[order[r]]), members[order[r]]
    head[a, b], tail[a, b], built[a, b], complete[a, b] = 0, m, True, count <= depth


@numba.njit(nogil=True, cache=True)
def _edge_head(S: np.ndarray, labels: np.ndarray, a: int, b: int, depth: int, E: np.ndarray, who: np.ndarray,
               lc: np.ndarray, lp: np.ndarray, head: np.ndarray, tail: np.ndarray, built: np.ndarray,
               complete: np.ndarray) -> None:  # pragma: no cover (compiled; part of _repair_kernel)
    """E[a, b] and who[a, b] after the current head of the edge left cluster a: entries of
    points that left are dropped from the front; a list that runs dry is rebuilt."""
    if not built[a, b]:
        _build_edge(S, labels, a, b, depth, lc, lp, head, tail, built, complete)
    h = head[a, b]
    while h < tail[a, b] and labels[lp[a, b, h]] != a:
        h += 1
    head[a, b] = h
    if h == tail[a, b] and not complete[a, b]:
        _build_edge(S, labels, a, b, depth, lc, lp, head, tail, built, complete)
        h = head[a, b]
    if h < tail[a, b]:
        E[a, b], who[a, b] = lc[a, b, h], lp[a, b, h]
    else:
        E[a, b], who[a, b] = np.inf, -1


@numba.njit(nogil=True, cache=True)
def _move_point(S: np.ndarray, labels: np.ndarray, i: int, a: int, b: int, depth: int, E: np.ndarray,
                who: np.ndarray, lc: np.ndarray, lp: np.ndarray, head: np.ndarray, tail: np.ndarray,
                built: np.ndarray, complete: np.ndarray) -> None:  # pragma: no cover (part of _repair_kernel)
    """Point i leaves cluster a for b: the edges out of a whose head it was get their next
    head, and it enters the lists of the edges out of b (sorted insertion, after equal
    costs) where its cost is within the list; an edge not built yet only keeps its minimum."""
    K = S.shape[0]
    labels[i] = b
    for c in range(K):
        if c != a and who[a, c] == i:
            _edge_head(S, labels, a, c, depth, E, who, lc, lp, head, tail, built, complete)
    for c in range(K):
        if c == b:
            continue
        cost = np.float64(S[b, i]) - np.float64(S[c, i])
        if not built[b, c]:  # built later from the members, i included
            if cost < E[b, c]:
                E[b, c], who[b, c] = cost, i
            continue
        h, t = head[b, c], tail[b, c]
        if not (complete[b, c] or (t > h and cost <= lc[b, c, t - 1])):
            continue
        if t == lc.shape[2]:  # no room behind: move the list to the front
            for r in range(t - h):
                lc[b, c, r], lp[b, c, r] = lc[b, c, h + r], lp[b, c, h + r]
            h, t = 0, t - h
        at, hi = h, t  # bisect right: after the entries of equal cost
        while at < hi:
            mid = (at + hi) // 2
            if cost < lc[b, c, mid]:
                hi = mid
            else:
                at = mid + 1
        for r in range(t, at, -1):
            lc[b, c, r], lp[b, c, r] = lc[b, c, r - 1], lp[b, c, r - 1]
        lc[b, c, at], lp[b, c, at] = cost, i
        t += 1
        if t - h > 4 * depth:  # keep lists short; dropping the tail keeps the invariant
            t = h + 2 * depth
            complete[b, c] = False
        head[b, c], tail[b, c] = h, t
        if at == h:
            E[b, c], who[b, c] = cost, i


@numba.njit(nogil=True, cache=True)
def _best_chain(E: np.ndarray, bound: np.ndarray, has_bound: bool, sources: np.ndarray, sinks: np.ndarray,
                path: np.ndarray) -> tuple[int, float, int]:  # pragma: no cover (compiled; part of _repair_kernel)
    """Cheapest chain of single moves from a source cluster to a sink cluster, written into
    ``path`` (the clusters in order); returns (status, cost, its length; 0 when none), status
    _CERTAIN, _UNCERTAIN or _CYCLE.

    Bellman–Ford on the K-node cluster graph with every source at distance 0. The plan
    stays optimal for its sizes throughout, so there is no negative cycle and K − 1
    relaxation rounds suffice (a chain that visits a cluster twice shows labels that were
    not optimal for their sizes: _CYCLE). With ``has_bound``, ``bound`` (K, K) is a lower bound on the
    cost of moving any point *outside* the working set (the locked points); the search runs
    on min(E, bound), and if the cheapest chain uses an edge where the bound is below the
    working set's own cost — a locked point might be cheaper — or the bounded graph has a
    negative cycle, the chain is *uncertain*. Otherwise it is the true optimum: every real
    chain costs at least its bounded cost.
    """
    K = E.shape[0]
    Eb = np.minimum(E, bound) if has_bound else E  # _relax reads it only
    dist = np.where(sources, 0.0, np.inf)
    prev = np.full(K, -1, np.int64)
    settled = _relax(Eb, dist, prev, K if has_bound else K - 1)
    if has_bound and not settled:
        return _UNCERTAIN, np.inf, 0  # a negative cycle under the locked points' bounds
    b, cost = -1, np.inf
    for k in range(K):  # the first sink reached at the least cost
        if sinks[k] and prev[k] >= 0 and dist[k] < cost:
            b, cost = k, dist[k]
    if b < 0:
        return _CERTAIN, np.inf, 0
    length = 1
    path[0] = b
    while prev[path[length - 1]] >= 0 and length <= K:  # back to a source (prev −1)
        path[length] = prev[path[length - 1]]
        length += 1
    if length > K:
        return _CYCLE, np.inf, 0
    path[:length] = path[:length][::-1].copy()
    if has_bound:
        for r in range(length - 1):
            if E[path[r], path[r + 1]] > bound[path[r], path[r + 1]]:
                return _UNCERTAIN, np.inf, 0  # a locked point may be the cheaper move
    return _CERTAIN, cost, length


@numba.njit(nogil=True, cache=True)
def _repair_kernel(S: np.ndarray, labels: np.ndarray, sizes: np.ndarray, lo: int, hi: int, max_moves: int,
                   bound: np.ndarray, has_bound: bool, depth: int
                   ) -> tuple[int, int, int]:  # pragma: no cover (compiled; run through _repair)
    K = S.shape[0]
    # E[a, b] = min_{i∈a}(s_ia − s_ib) and who[a, b] that point, from one pass over the points;
    # an edge's short list of its cheapest candidates is built on first need (invariant: it
    # holds every member of a whose cost is below its last entry), so that a move costs
    # O(K log depth) instead of O(n); an edge whose list runs dry is rebuilt from its members
    E32 = np.full((K, K), np.float32(np.inf))
    who = np.full((K, K), -1, np.int64)
    _cheapest_moves(S, labels, E32, who)
    E = E32.astype(np.float64)
    lc = np.empty((K, K, 4 * depth + 1))  # the lists: costs, points, live range [head, tail)
    lp = np.empty((K, K, 4 * depth + 1), np.int64)
    head, tail = np.zeros((K, K), np.int64), np.zeros((K, K), np.int64)
    built, complete = np.zeros((K, K), np.bool_), np.zeros((K, K), np.bool_)
    path, chain = np.empty(K + 1, np.int64), np.empty(K, np.int64)
    moves = improving = 0
    while moves + improving < max_moves:
        improve_only = False
        if (sizes < lo).any():  # fill the under-full first, from anyone above lo
            sources, sinks = sizes > lo, sizes < lo
        elif (sizes > hi).any():
            sources, sinks = sizes > hi, sizes < hi
        else:  # feasible: apply only strictly improving chains (possible when hi > lo)
            sources, sinks, improve_only = sizes > lo, sizes < hi, True
        if not sources.any() or not sinks.any():
            break
        if improve_only and has_bound:
            if _best_chain(np.minimum(E, bound), bound, False, sources, sinks, path)[1] >= -1e-6:
                break  # not even the lower bounds allow an improvement: done
        status, cost, length = _best_chain(E, bound, has_bound, sources, sinks, path)
        if status != _CERTAIN:
            return moves, improving, status
        if length == 0 or (improve_only and cost >= -1e-6):
            break
        for r in range(length - 1):  # chosen before any move: distinct points
            chain[r] = who[path[r], path[r + 1]]
        for r in range(length - 1):
            _move_point(S, labels, chain[r], path[r], path[r + 1], depth, E, who, lc, lp, head, tail, built,
                        complete)
        sizes[path[0]] -= 1
        sizes[path[length - 1]] += 1
        improving += improve_only
        moves += not improve_only
    return moves, improving, _CERTAIN


def _repair(S: np.ndarray, labels: np.ndarray, sizes: np.ndarray, lo: int, hi: int, max_moves: int,
            bound: np.ndarray | None = None) -> dict:
    """Successive shortest paths to sizes in [lo, hi], then negative-chain clean-up
    (:func:`_repair_kernel`, compiled).

    ``S`` (K, n) float32 and ``labels`` (n,) int64 are the points that may move (updated in
    place), ``sizes`` (K,) int64 the sizes of all clusters including locked points (updated
    in place), ``bound`` the locked points' lower bounds for :func:`_best_chain`; raises
    :class:`_Uncertain` when a chain may need a locked point (the moves made until then are
    exact and stay made).
    """
    K = S.shape[0]
    has_bound = bound is not None
    bound = np.ascontiguousarray(bound, dtype=np.float64) if has_bound else np.zeros((K, K))
    moves, improving, status = _repair_kernel(np.ascontiguousarray(S, dtype=np.float32), labels, sizes, int(lo),
                                                 int(hi), int(max_moves), bound, has_bound, _DEPTH)
    if status == _UNCERTAIN:
        raise _Uncertain("a chain of moves may need a locked point")
    if status == _CYCLE:
        raise RuntimeError("balanced assignment: a negative cycle of moves, so the labels were not optimal for "
                           "their own sizes (the repair starts from price-induced labels)")
    return {"repair_moves": int(moves), "improving_chains": int(improving)}


class _Outside(Exception):
    """A chain of moves may need a point outside the scored set: score every point."""


def _assign(S: torch.Tensor, prices: np.ndarray | None = None, *, outer: tuple[np.ndarray, float] | None = None,
            tolerance: int = 0, max_sweeps: int = 4, max_moves: int | None = None, max_rounds: int = 6,
            sample: int = 16384, working_set: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact balanced assignment from scores ``S`` (K, n) float32 torch; see
    :func:`balanced_assignment`. Most of the work is done on a *working set* of the points
    nearest a cluster boundary, which is what makes it cheap:

    1. Rounds of: a full pass for the price-induced labels and each point's gap to its
       second-best cluster (one top-2); if the sizes are within 2K of balanced, stop.
       Otherwise the prices are improved by Newton steps (and Gauss–Seidel sweeps when
       they stall) on the points with the smallest gaps, the others *locked*: their labels
       cannot change while the prices stay within :class:`_Limits`. When the sizes are far
       off (and n ≥ 16,384), the first round fits the prices on an evenly strided sample of
       min(``sample``, n/4) points instead, to 1 % (beyond that its sampling noise
       dominates; when the sample alone shows it, the full pass at the warm-started prices
       is skipped), and then up to three *chord* steps, Newton steps on all n points with
       the sample's Jacobian scaled up, one full pass each, remove most of its sampling
       error; a chord step that does not lower the excess is undone.
    2. The exact repair runs on the working set of the last pass; a locked point costs at
       least the :class:`_Limits` bound to move, and if a chain would need one, the repair is
       redone on every point. The result is the exact optimum either way.

    ``outer = (counts (K,), T)`` describes further points that are not in ``S`` at all
    (:meth:`BalancedKMeans.fit` skips scoring points that provably keep their cluster):
    their labels are fixed, ``counts`` per cluster, and each has reduced gap ≥ T at the
    given prices. They enter the sizes and the limits; if a chain would need one of them,
    :class:`_Outside` is raised.

    ``tolerance`` > 0 stops as soon as at most that many points are misplaced and returns
    the price-induced labels, which are an optimal plan for their own (nearly balanced)
    sizes, without the repair: the warm-up steps of :meth:`BalancedKMeans.fit`.
    """
    K, n = S.shape
    prices = np.zeros(K) if prices is None else np.array(prices, dtype=np.float64)
    start = prices.copy()
    outer_counts, T = outer if outer is not None else (np.zeros(K, np.int64), math.inf)
    N = n + int(outer_counts.sum())
    lo, hi = _bounds(N, K)
    stats = {"newton_steps": 0, "chord_steps": 0, "sweeps": 0, "rounds": 0, "working_set": n, "full_repair": False}
    if K == 1:
        return np.zeros(n, dtype=np.int64), prices, {**stats, "repair_moves": 0, "improving_chains": 0}

    def room_outside(p: np.ndarray) -> np.ndarray:  # what the prices moved since ``start`` left of T
        d = p - start
        return T - (d[:, None] - d[None, :])

    min_set = min(n, working_set if working_set is not None else max(4096, n // 32))
    n_free, sampled, grow = min_set, False, False
    chord, before_chord = None, None  # the sample's Jacobian for full-data steps; the state before one
    # an evenly strided sample of the points, (K, m), m = min(sample, n/4)
    sub = S[:, ::n // min(sample, n // 4)].contiguous() if outer is None and n >= 2 * min(sample, n // 4) >= 8192 \
        else None

    def newton_on_sample(prices: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, int] | None]:
        """Prices from Newton steps on the sample, to 1 % of it, and then the chord state: the
        sample's Jacobian scaled to n points and up to 3 chord steps."""
        m = sub.shape[1]
        prices, _, steps, L = _newton_prices(sub, prices, *_bounds(m, K), np.zeros(K, np.int64), m,
                                             stop_when_slow=False, good_enough=m // 100)
        stats["newton_steps"] += steps
        return prices, None if L is None else (L * (n / m), 3)

    if sub is not None:
        # far off by the sample alone (twice the threshold below, for its sampling error): skip
        # the full pass at the warm-started prices and go to the sample's Newton steps at once
        m_lo, m_hi = _bounds(sub.shape[1], K)
        starts = [prices, np.zeros(K)] if prices.any() else [prices]  # a warm start can be worse than none
        off = [_excess(_counts(_argmax(sub, p), K), m_lo, m_hi) * n / sub.shape[1] for p in starts]
        if 8 * min(off) > n // 2:
            sampled = True
            prices, chord = newton_on_sample(starts[int(np.argmin(off))])
    while True:
        stats["rounds"] += 1
        labels, gaps = _top2(S, prices)
        sizes = outer_counts + _counts(labels, K)
        excess = _excess(sizes, lo, hi)
        if stats["rounds"] == 1 and sizes.min() < lo // 2 and prices.any() and outer is None and not sampled:
            cold, cold_gaps = _top2(S, np.zeros(K))  # moved centroids can make a warm start worse than none
            cold_sizes = _counts(cold, K)
            if _excess(cold_sizes, lo, hi) < excess:
                prices, labels, gaps, sizes, excess = np.zeros(K), cold, cold_gaps, cold_sizes, _excess(cold_sizes, lo, hi)
        if before_chord is not None:
            stats["rounds"] -= 1  # a chord step is one pass, not a round of the working set
            if excess >= before_chord[-1]:  # it did not help: undo it and leave the rest to the working set
                (prices, labels, gaps, sizes, excess), chord = before_chord, None
            before_chord = None
        round_prices = prices  # the prices ``gaps`` are for
        if tolerance and excess <= (tolerance if not sampled else tolerance // 2):
            # a warm-up step close enough. Prices that needed the sample's Newton steps must be
            # within half the tolerance, or they are refined to 2K below: they are the next
            # iteration's warm start, and stopping at the tolerance costs later iterations more
            stats["working_set"] = n  # gaps: those of the labels returned, for BalancedKMeans's bounds
            return labels.numpy(), prices, {**stats, "repair_moves": 0, "improving_chains": 0, "excess": excess,
                                            "gaps": gaps}
        if excess <= 2 * K or stats["rounds"] > max_rounds:
            free, H = _smallest(gaps, min(n, max(min_set, 8 * excess)))
            limits = _Limits(prices, np.minimum(H, room_outside(prices)))  # every locked gap is ≥ H
            S_free = S[:, free]  # (K, n_free)
            break
        if chord is not None:
            # a chord step: Newton's step on all n points with the Jacobian of the sample scaled
            # up, one pass to check it; it removes most of the sample's sampling error
            L, left = chord
            delta = np.linalg.lstsq(L, sizes - N / K, rcond=None)[0]
            chord = (L, left - 1) if left > 1 else None
            before_chord = (prices, labels, gaps, sizes, excess)
            prices = prices + (delta - delta.mean())
            stats["chord_steps"] += 1
            continue
        n_free = min(n, max(min_set, 8 * excess, min(n // 4, 2 * n_free) if grow else 0))
        if 8 * excess > n // 4 and sub is not None and not sampled:
            sampled, grow = True, False
            prices, chord = newton_on_sample(prices)
            continue
        free, H = _smallest(gaps, n_free)
        room = _locked_room(S, prices, labels, free) if len(free) < n else np.full((K, K), math.inf)
        limits = _Limits(prices, np.minimum(room, room_outside(prices)))
        S_free = S[:, free]  # (K, n_free), contiguous
        base = sizes - _counts(labels[free], K)
        prices, sub_labels, steps, _ = _newton_prices(S_free, prices, lo, hi, base, N, limits=limits)
        stats["newton_steps"] += steps
        sizes = base + _counts(sub_labels, K)
        if _excess(sizes, lo, hi) > 2 * K and max_sweeps:
            S_kn = S_free.numpy()
            swept = _excess(sizes, lo, hi)
            for _ in range(max_sweeps):
                stats["sweeps"] += 1
                changed, sweep_labels = _price_sweep(S_kn, prices, lo, hi, base, limits)
                sub_labels = torch.from_numpy(sweep_labels)
                sizes = base + np.bincount(sweep_labels, minlength=K)
                now = _excess(sizes, lo, hi)
                if changed == 0 or now <= 2 * K or now > swept - swept // 8:
                    break  # done, or stalled against the limits (a larger working set is needed)
                swept = now
        labels[free] = sub_labels
        if outer is not None and _excess(sizes, lo, hi) > max(2 * K, excess // 2):
            raise _Outside()  # the prices must move further than the unscored points allow
        excess = _excess(sizes, lo, hi)
        if excess <= max(2 * K, tolerance) or stats["rounds"] >= max_rounds:
            break
        grow = True
    stats["working_set"] = len(free)  # S_free holds their scores

    def final_gaps(labels: torch.Tensor) -> torch.Tensor:
        """Each point's gap at the final prices (n,): exact for the working set, and for a
        locked point (its label unchanged) its gap at ``round_prices`` less how far the
        prices moved against it, δ_a − min δ: a lower bound, for BalancedKMeans's bounds."""
        moved = prices - round_prices
        out = gaps - torch.from_numpy(moved - moved.min()).to(gaps.dtype)[labels]
        out[free] = _label_gaps(S_free, prices, labels[free])
        return out

    if tolerance and excess <= tolerance:
        return labels.numpy(), prices, {**stats, "repair_moves": 0, "improving_chains": 0, "excess": excess,
                                        "gaps": final_gaps(labels)}
    bound = limits.bound() if len(free) < n or outer is not None else None
    sub_labels = labels[free].numpy().copy()
    max_moves = max_moves if max_moves is not None else 10 * N
    try:
        stats.update(_repair(S_free.numpy(), sub_labels, sizes.copy(), lo, hi, max_moves, bound))
        labels[free] = torch.from_numpy(sub_labels)
        stats["gaps"] = final_gaps(labels)
    except _Uncertain:
        if outer is not None:
            raise _Outside() from None
        stats["full_repair"] = True
        labels[free] = torch.from_numpy(sub_labels)  # the moves made so far were exact
        labels_np = labels.numpy().copy()
        stats.update(_repair(np.ascontiguousarray(S.numpy()), labels_np, np.bincount(labels_np, minlength=K),
                             lo, hi, max_moves))
        labels = torch.from_numpy(labels_np)
    labels = labels.numpy()
    sizes = outer_counts + np.bincount(labels, minlength=K)
    if sizes.min() < lo or sizes.max() > hi:
        raise RuntimeError(f"balanced assignment failed to reach sizes in [{lo}, {hi}]: {sizes.tolist()}")
    stats["excess"] = 0
    return labels, prices, stats


def _label_gaps(S: torch.Tensor, prices: np.ndarray, labels: torch.Tensor) -> torch.Tensor:
    """Reduced gap of each point to its best *other* cluster, (n,) float32: (s_ai − λ_a) −
    max_{j≠a}(s_ji − λ_j) for its label a (negative when the repair moved it off its best;
    inf when K = 1). ``S`` is (K, n); one pass over its rows."""
    A, p, labels = S.numpy(), prices.astype(np.float32), labels.numpy()
    out = np.empty(A.shape[1], np.float32)
    _in_parts(lambda a, b: _top2_kernel(A, p, a, b, labels, out, _OWN_GAPS), A.shape[1])
    return torch.from_numpy(out)


@numba.njit(nogil=True, cache=True, inline="always")
def _bucket(u: np.uint32) -> np.uint32:  # pragma: no cover (compiled; inlined into _kth_kernel)
    """The top 12 bits of a float32's bits ``u`` made order-preserving: all bits flipped for a
    negative number, the sign bit for a positive one."""
    return (u ^ (np.uint32(0xFFFFFFFF) if u >> np.uint32(31) else np.uint32(0x80000000))) >> np.uint32(20)


@numba.njit(nogil=True, cache=True)
def _kth_kernel(x: np.ndarray, k: int) -> np.float32:  # pragma: no cover (compiled; run through _kth_smallest)
    keys = x.view(np.uint32)
    hist = np.zeros(4096, np.int64)
    for i in range(x.shape[0]):
        hist[_bucket(keys[i])] += 1
    below, bucket = 0, 0
    while below + hist[bucket] < k:
        below += hist[bucket]
        bucket += 1
    members = np.empty(hist[bucket], np.float32)
    j = 0
    for i in range(x.shape[0]):
        if _bucket(keys[i]) == bucket:
            members[j] = x[i]
            j += 1
    return np.partition(members, k - below - 1)[k - below - 1]


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


def balanced_assignment(S: np.ndarray, prices: np.ndarray | None = None, *,
                        max_sweeps: int = 30, max_moves: int | None = None, working_set: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact balanced assignment of N points to K clusters from scores ``S`` (K, N).

    Maximises Σ_i S[a(i), i] subject to every cluster size in [⌊N/K⌋, ⌈N/K⌉] (see the
    module docstring for the method and its optimality). ``prices`` (K,) warm-starts the
    dual; ``working_set`` sets the least number of boundary points the search works on
    (default max(4096, N/32)). Returns ``(labels (N,) int64, prices (K,) float64, stats)``
    with stats ``newton_steps``, ``sweeps``, ``rounds``, ``working_set``, ``full_repair``,
    ``repair_moves``, ``improving_chains``.
    """
    S = np.asarray(S, dtype=np.float32)
    K, N = S.shape
    if K < 1 or N < K:
        raise ValueError(f"balanced assignment needs 1 <= K <= N, got K={K}, N={N}")
    if working_set is not None and working_set < 1:
        raise ValueError(f"working_set: must be a positive number of points, got {working_set}")
    return _assign(torch.from_numpy(np.ascontiguousarray(S)), prices, max_sweeps=max_sweeps,
                   max_moves=max_moves, working_set=working_set)


# ----------------------------------------------------------------------- estimators
def _seed(random_state: Any) -> int:
    """One integer seed (for numpy's Generator and faiss) from scikit-learn's ``random_state``,
    checked by :func:`sklearn.utils.check_random_state`: an int is used as it is; None or a
    RandomState gives a draw from that generator."""
    rng = check_random_state(random_state)
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return int(rng.randint(np.iinfo(np.int32).max))


@numba.njit(nogil=True, cache=True, fastmath=True)
def _pp_kernel(X: np.ndarray, x: np.ndarray, a: int, b: int, d2: np.ndarray
               ) -> None:  # pragma: no cover (compiled; run through _kmeans_pp)
    """d2[i] = min(d2[i], |x_i − x|²) for the rows a ≤ i < b of X, each squared distance
    summed in float32 (reassociated, so that it vectorises) and kept in float64."""
    for i in range(a, b):
        acc = np.float32(0.0)
        for d in range(X.shape[1]):
            diff = X[i, d] - x[d]
            acc += diff * diff
        d2[i] = min(d2[i], np.float64(acc))


def _kmeans_pp(X: torch.Tensor, k: int, spherical: bool, rng: np.random.Generator,
               sample_size: int = 10_000) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on a seeded sample; (k, D). Each
    new centre costs one pass over the sample (:func:`_pp_kernel`), split over the threads,
    and is drawn with probability ∝ d2 by inverse CDF from one ``rng.random()``, the draw of
    numpy's ``Generator.choice(n, p=d2 / d2.sum())`` without its checks of p (the CDF is
    normalised after the sum rather than before, so a draw on a bucket's edge can differ)."""
    N, sample_size = X.shape[0], max(sample_size, 32 * k)
    rows = np.sort(rng.choice(N, size=sample_size, replace=False)) if N > sample_size else np.arange(N)
    Xs = X.numpy()[rows]  # (n, D); numpy's gather, half torch's time here
    d2 = np.full(len(Xs), np.inf)  # (n,) float64: squared distance to the nearest centre so far

    def add(j: int) -> None:
        x = Xs[j].copy()
        _in_parts(lambda a, b: _pp_kernel(Xs, x, a, b, d2), len(Xs), min_part=2048)

    centres = [int(rng.integers(len(Xs)))]
    add(centres[0])
    for _ in range(1, k):
        cdf = np.cumsum(d2)
        if cdf[-1] > 0:
            j = int(np.searchsorted(cdf / cdf[-1], rng.random(), side="right"))
        else:
            j = int(rng.integers(len(d2)))
        centres.append(j)
        add(j)
    C = torch.from_numpy(Xs[centres])
    return _normalise(C) if spherical else C


def _random_init(X: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k distinct rows of X chosen uniformly at random (faiss's initialisation); (k, D)."""
    return X[torch.from_numpy(np.sort(rng.choice(X.shape[0], size=k, replace=False)))].clone()


class _CentroidModel(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator):
    """What both estimators do once fitted, as scikit-learn's ``KMeans``: ``predict`` (the
    nearest centroid), ``transform`` (distances), ``score`` (negative inertia). Parameters,
    ``clone`` and ``repr`` come from ``BaseEstimator``; input checks (2-D, finite, dense,
    ``n_features_in_``) from ``sklearn.utils.validation``."""

    spherical = True  # a parameter of BalancedKMeans; TwoStageKMeans is spherical only

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]  # transform keeps X's dtype
        return tags

    @property
    def _n_features_out(self) -> int:  # transform's columns, named by ClassNamePrefixFeaturesOutMixin
        return self.cluster_centers_.shape[0]

    def _points(self, X: Any, *, reset: bool, dtype: Any = np.float32, unit: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X checked by scikit-learn (2-D, dense: sparse input is refused naming it, finite,
        at least one sample and one feature; ``reset`` records ``n_features_in_``, otherwise
        the model must be fitted and the width is checked) as an (N, D) torch tensor of
        ``dtype`` (no copy when X already is one) with rows of unit norm when spherical and
        ``unit``, and then the squared norms of its rows (N,), else None. Rows that get
        normalised are checked for NaN and infinity by their norms (scikit-learn's own pass
        over X then only runs to name the problem)."""
        if not reset:
            check_is_fitted(self)
        unit = unit and self.spherical
        X = validate_data(self, X, reset=reset, accept_sparse=False, dtype=[np.float64, np.float32], order="C",
                          ensure_all_finite=not unit)
        Xt = _tensor(X, dtype)
        return _unit_rows(Xt) if unit else (Xt, None)

    def predict(self, X: Any, balanced: bool = False) -> np.ndarray:
        """Cluster of each row of X (N, D): the nearest centroid (the router's top-1, eq. 29)
        or, with ``balanced=True``, the exact balanced assignment of X. Returns (N,) int64.

        On the training data the nearest centroid can differ from ``labels_``, which is the
        balanced assignment (cluster sizes within one)."""
        # argmax_k x·c_k is the same for x and x/|x|: the nearest centroid needs no normalising
        Xt, _ = self._points(X, reset=False, unit=balanced)
        C = torch.from_numpy(self.cluster_centers_)
        if not balanced:
            return _nearest(C, Xt, self.spherical, self.chunk_size).numpy()
        return _assign(_scores(C, Xt, self.spherical, self.chunk_size))[0]

    def transform(self, X: Any) -> np.ndarray:
        """Euclidean distance of every row to every centroid, (N, K) in X's float dtype (as
        scikit-learn); rows normalised first when spherical, so it is sqrt(2 − 2 cos)."""
        check_is_fitted(self)
        dtype = np.float32 if getattr(X, "dtype", None) == np.float32 else np.float64
        Xt, _ = self._points(X, reset=False, dtype=dtype)
        C = torch.from_numpy(self.cluster_centers_).to(Xt.dtype)
        d2 = (Xt * Xt).sum(1, keepdim=True) - 2 * Xt @ C.T + (C * C).sum(1)
        return d2.clamp_min(0).sqrt().numpy()

    def score(self, X: Any, y: Any = None) -> float:
        """Negative inertia of X under nearest-centroid routing (scikit-learn's convention)."""
        return -float((self.transform(X).min(1).astype(np.float64) ** 2).sum())


class BalancedKMeans(_CentroidModel):
    """Spherical balanced k-means: every cluster gets ⌊N/K⌋ or ⌈N/K⌉ points.

    A scikit-learn estimator (``BaseEstimator``, ``ClusterMixin``, ``TransformerMixin``; it
    passes ``sklearn.utils.estimator_checks.check_estimator``): ``clone``, ``Pipeline`` and
    ``GridSearchCV`` work with it.

    Parameters
    ----------
    n_clusters : int, K, the number of clusters (experts).
    init : ``"k-means++"`` (Arthur & Vassilvitskii 2007, on a seeded sample of 10,000
        points), ``"random"`` (K distinct points, as faiss) or an array (K, D).
    spherical : bool, cosine similarity with unit-norm centroids (the paper's choice) if
        True, else squared Euclidean distance.
    max_iter, tol : stop after ``max_iter`` assignment steps or when the objective
        improves by less than ``tol`` (relative) or no label changes.
    random_state : None, int or RandomState (scikit-learn's convention): seeds the
        initialisation; the same int and data give the same result.
    chunk_size : rows of X per matmul block.
    max_sweeps : dual price sweeps per assignment before the exact repair.
    algorithm : ``"bounds"`` (default; spherical only, else as "full") skips scoring the
        points that provably keep their cluster (see :meth:`fit`); ``"full"`` scores every
        point every iteration. Both give the same exact assignments.
    warmup_tol : while the objective still improves by more than this (relative) per
        iteration — the first iterations, when the centroids move a lot — an assignment
        step stops once at most 1 % of the points are misplaced, with the price-induced
        labels (an optimal plan for their own, nearly balanced, sizes) and no repair. Every
        later step, and always the last one, is exact, so ``labels_`` is always exactly
        balanced. ``None`` makes every step exact.

    Attributes (after ``fit``)
    --------------------------
    cluster_centers_ : ndarray of shape (K, D) float32, unit rows when spherical.
    labels_ : ndarray of shape (N,) int64, balanced assignment to the final centroids.
    inertia_ : float, Σ_i |x_i − c_{a(i)}|² (rows normalised first when spherical).
    n_iter_ : int, assignment steps run.
    n_features_in_ : int, D.
    fit_info_ : dict with per-iteration ``objective`` (mean similarity), ``seconds``,
        ``newton_steps``, ``sweeps``, ``repair_moves``, ``scored`` (points scored: N, or
        fewer with ``algorithm="bounds"``), ``exact`` (False for warm-up steps), final
        ``sizes`` and ``balance`` (max/min size), and ``seconds_init`` / ``seconds_finish``
        (the initialisation, and the inertia and attributes after the last iteration).
    """

    def __init__(self, n_clusters: int = 2, *, init: Any = "k-means++", spherical: bool = True,
                 max_iter: int = 50, tol: float = 1e-6, random_state: Any = None, chunk_size: int = 65536,
                 max_sweeps: int = 4, algorithm: str = "bounds", warmup_tol: float | None = 1e-3):
        self.n_clusters = n_clusters
        self.init = init
        self.spherical = spherical
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.chunk_size = chunk_size
        self.max_sweeps = max_sweeps
        self.algorithm = algorithm
        self.warmup_tol = warmup_tol

    def _check_params(self, n_samples: int, n_features: int) -> None:
        """Hyper-parameters checked at fit (``__init__`` only stores them), with the names
        and messages of scikit-learn's ``check_scalar`` and ``KMeans``."""
        check_scalar(self.n_clusters, "n_clusters", numbers.Integral, min_val=1)
        if n_samples < self.n_clusters:
            raise ValueError(f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}.")
        check_scalar(self.max_iter, "max_iter", numbers.Integral, min_val=1)
        check_scalar(self.tol, "tol", numbers.Real, min_val=0)
        check_scalar(self.chunk_size, "chunk_size", numbers.Integral, min_val=1)
        check_scalar(self.max_sweeps, "max_sweeps", numbers.Integral, min_val=0)
        if self.algorithm not in ("bounds", "full"):
            raise ValueError(f"algorithm: must be 'bounds' or 'full', got {self.algorithm!r}")
        if self.warmup_tol is not None:
            check_scalar(self.warmup_tol, "warmup_tol", numbers.Real, min_val=0)
        if isinstance(self.init, str):
            if self.init not in ("k-means++", "random"):
                raise ValueError(f"init: must be 'k-means++', 'random' or an array, got {self.init!r}")
        elif np.shape(self.init) != (self.n_clusters, n_features):
            raise ValueError(f"init: an array of shape (n_clusters, n_features) = ({self.n_clusters}, "
                             f"{n_features}) is needed, got shape {np.shape(self.init)}")

    def _initial_centroids(self, X: torch.Tensor, K: int) -> torch.Tensor:
        rng = np.random.default_rng(_seed(self.random_state))
        if isinstance(self.init, str):
            C = _kmeans_pp(X, K, self.spherical, rng) if self.init == "k-means++" else _random_init(X, K, rng)
        else:
            C = torch.from_numpy(check_array(self.init, dtype=np.float32, copy=True))
        return _normalise(C) if self.spherical else C

    def fit(self, X: Any, y: Any = None) -> "BalancedKMeans":
        """Fit on X (N, D); ``y`` is ignored. Returns self.

        Each iteration: score the points against the centroids, solve the balanced
        assignment (:func:`_assign`; exactly once the warm-up of ``warmup_tol`` is over, and
        always in the last iteration), then move each centroid to the (normalised) mean of
        its members. With ``algorithm="bounds"`` (spherical only) an iteration
        scores only the points whose cluster could change: every point keeps a lower bound
        on its reduced gap to its second-best cluster, lowered by how far the centroids and
        prices moved (|Δ(x·c_k)| ≤ |Δc_k| for unit x; Hamerly, "Making k-means even faster",
        SDM 2010), and points whose bound stays above a threshold T are left out with their
        labels fixed, which is exact while no price difference moves by T (:class:`_Limits`).
        """
        t_start = time.perf_counter()
        Xt, sq = self._points(X, reset=True)  # (N, D), and (N,) squared row norms when spherical
        N = Xt.shape[0]
        self._check_params(N, Xt.shape[1])
        K = int(self.n_clusters)
        C = self._initial_centroids(Xt, K)
        use_bounds = self.algorithm == "bounds" and self.spherical and K > 1
        prices, labels, gaps, drift, sums, prev_obj, prev_exact = None, None, None, None, None, -math.inf, False
        last_move = math.inf  # how far the prices moved in the previous iteration
        info: dict[str, Any] = {"objective": [], "seconds": [], "newton_steps": [], "sweeps": [],
                                "repair_moves": [], "scored": [], "exact": [],
                                "seconds_init": time.perf_counter() - t_start}
        warming, gain = self.warmup_tol is not None, math.inf
        S_buffer = torch.empty((K, N), dtype=torch.float32)
        for it in range(1, self.max_iter + 1):
            t0 = time.perf_counter()
            exact = not warming or it == self.max_iter
            old_prices = prices
            tolerance = 0 if exact else max(1, int(N * min(0.01, gain / 10)))
            step = (self._bounded_step(Xt, C, labels, gaps, drift, prices, last_move, tolerance)
                    if gaps is not None else None)
            if step is None:
                S = _scores(C, Xt, self.spherical, self.chunk_size, out=S_buffer)  # (K, N)
                new, prices, stats = _assign(S, prices, max_sweeps=self.max_sweeps, tolerance=tolerance)
                new = torch.from_numpy(new)
                gaps = stats.pop("gaps", None)  # for the next bounded step
                gaps = None if not use_bounds else _label_gaps(S, prices, new) if gaps is None else gaps
                stats["scored"] = N
            else:
                new, prices, gaps, stats = step
            last_move = _range(prices - old_prices) if old_prices is not None else math.inf
            sums = _update_sums(Xt, new, labels, sums, K)
            obj = self._objective(C, sums, new) / N
            gain = (obj - prev_obj) / abs(prev_obj) if labels is not None and prev_obj else math.inf  # relative
            converged = exact and prev_exact and (torch.equal(new, labels) or gain <= self.tol)
            warming = warming and gain > self.warmup_tol  # once the gain is small, every step is exact
            labels, prev_obj, prev_exact = new, obj, exact
            if not converged and it < self.max_iter:
                C_new = self._centroids(sums, labels, C)
                drift = (C_new.double() - C.double()).norm(dim=1).numpy() + 1e-6  # (K,) float32 slack
                C = C_new
            info["objective"].append(obj)
            info["seconds"].append(time.perf_counter() - t0)
            info["newton_steps"].append(stats["newton_steps"])
            info["sweeps"].append(stats["sweeps"])
            info["repair_moves"].append(stats["repair_moves"] + stats["improving_chains"])
            info["scored"].append(stats["scored"])
            info["exact"].append(exact)
            if converged:
                break
        t0 = time.perf_counter()
        self._finish(Xt, sq, C, labels, sums, it, info)
        info["seconds_finish"] = time.perf_counter() - t0
        return self

    def _bounded_step(self, X: torch.Tensor, C: torch.Tensor, labels: torch.Tensor, gaps: torch.Tensor,
                      drift: np.ndarray, prices: np.ndarray, last_move: float, tolerance: int):
        """One assignment scoring only the points whose gap bound falls below T; returns
        (labels (N,), prices, gap bounds (N,), stats), or None when too many points could
        move: then score everything. T leaves room for the prices to move twice as far as
        they did last time; if a repair chain needs an unscored point after all, or the prices
        must move further, every point is scored."""
        N, K = X.shape[0], C.shape[0]
        d = torch.from_numpy(drift).to(gaps.dtype)
        bound = gaps - d[labels] - d.max()
        # T leaves room for twice last time's price move, but for at most N/4 points: a
        # warm-up step's prices can jump (a restart from zero prices) without the next
        # step needing it
        want = max(4096, N // 16, 2 * int((bound <= 0).sum()), min(N // 4, int((bound < 2 * last_move).sum())))
        if 4 * want > N:  # a quarter of the points, gathered, costs half a full pass
            return None
        T = _kth_smallest(bound, want)
        if not T > 0:
            return None
        scored = torch.nonzero(bound < T).squeeze(1)
        S = _scores_of(C, X, scored)  # (K, n)
        outside = _counts(labels, K) - _counts(labels[scored], K)
        try:
            sub, new_prices, stats = _assign(S, prices, outer=(outside, T), max_sweeps=self.max_sweeps,
                                             tolerance=tolerance)
        except _Outside:
            # a chain needs an unscored point, or the prices must move further than T allows:
            # score every point (a larger subset costs nearly as much, its rows gathered from
            # all over X)
            return None
        new = labels.clone()
        new[scored] = torch.from_numpy(sub)
        moved = new_prices - prices  # an unscored point's gap falls by at most δ_a − min δ
        bound -= torch.from_numpy(moved - moved.min()).to(bound.dtype)[labels]
        gaps_scored = stats.pop("gaps", None)
        bound[scored] = _label_gaps(S, new_prices, new[scored]) if gaps_scored is None else gaps_scored
        stats["scored"] = len(scored)
        return new, new_prices, bound, stats

    def _objective(self, C: torch.Tensor, sums: torch.Tensor, labels: torch.Tensor) -> float:
        """Σ_i s(x_i, c_{a(i)}) from the member sums: Σ_k c_k·sums_k, minus Σ_k n_k |c_k|²
        for Euclidean scores (2 x·c − |c|²)."""
        C64 = C.double()
        total = float((C64 * sums).sum())
        if self.spherical:
            return total
        counts = torch.bincount(labels, minlength=len(C)).double()
        return 2 * total - float((counts * (C64 * C64).sum(1)).sum())

    def _centroids(self, sums: torch.Tensor, labels: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """Centroid step from the float64 member sums (K, D): their mean, normalised when
        spherical. A cluster with no members keeps its centroid. (K, D) float32."""
        counts = torch.bincount(labels, minlength=len(sums))
        new = _normalise(sums) if self.spherical else sums / counts.clamp_min(1).to(sums.dtype)[:, None]
        return torch.where((counts > 0)[:, None], new.to(C.dtype), C)

    def _finish(self, X, sq, C, labels, sums, n_iter, info) -> None:
        labels = labels.numpy()
        sizes = np.bincount(labels, minlength=C.shape[0])
        sq = X.norm(dim=1) ** 2 if sq is None else sq  # (N,) squared row norms: one pass, no (N, D) temporary
        self.inertia_ = _inertia(sq, C, sums, sizes)
        self.cluster_centers_ = C.numpy().astype(np.float32, copy=True)
        self.labels_ = labels
        self.n_iter_ = n_iter
        info["sizes"] = sizes.tolist()
        info["balance"] = _max_over_min(sizes)
        self.fit_info_ = info


def _inertia(sq: torch.Tensor, C: torch.Tensor, sums: torch.Tensor, sizes: np.ndarray) -> float:
    """Σ_i |x_i − c_a(i)|² from the squared row norms sq (N,), the centroids (K, D), the
    member sums (K, D) and the sizes (K,): Σ|x|² − 2 Σ_k c_k·sums_k + Σ_k n_k |c_k|², in
    float64 and without an (N, D) temporary."""
    C64 = C.double()
    return (float(sq.double().sum()) - 2 * float((C64 * sums.double()).sum())
            + float((torch.from_numpy(sizes).double() * (C64 * C64).sum(1)).sum()))


def _max_over_min(sizes: np.ndarray) -> float:
    return float(sizes.max()) / float(sizes.min()) if sizes.min() > 0 else math.inf




# --------------------------------------------------------------------- two-stage
FAISS_MIN_POINTS_PER_CENTROID = 39  # faiss warns when k-means gets fewer points per centroid


def spherical_kmeans(X: Any, k: int, *, n_iter: int = 20, random_state: Any = None,
                     use_faiss: bool | None = None, chunk_size: int = 65536
                     ) -> tuple[np.ndarray, np.ndarray, str]:
    """Unbalanced spherical k-means of X (N, D): ``(centroids (k, D), labels (N,), backend)``.

    faiss (``faiss.Kmeans(spherical=True)``) when installed and ``use_faiss`` is not False,
    else a torch Lloyd loop (k-means++ seeding; an empty cluster keeps its centroid).
    """
    Xt = _unit_rows(_tensor(check_array(X, dtype=[np.float32, np.float64], order="C")))[0]
    return _spherical_kmeans(Xt, k, n_iter=n_iter, seed=_seed(random_state), use_faiss=use_faiss,
                             chunk_size=chunk_size)


def _spherical_kmeans(Xt: torch.Tensor, k: int, *, n_iter: int, seed: int, use_faiss: bool | None,
                      chunk_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """:func:`spherical_kmeans` of unit rows ``Xt`` (N, D) float32."""
    if use_faiss is not False:
        try:
            import faiss
        except ImportError:
            if use_faiss:
                raise ImportError("use_faiss=True but faiss is not installed (pip install faiss-cpu)") from None
        else:
            km = faiss.Kmeans(Xt.shape[1], k, niter=n_iter, seed=seed, spherical=True, verbose=False)
            km.train(Xt.numpy())
            C = _normalise(torch.from_numpy(km.centroids.copy()))
            return C.numpy(), _nearest(C, Xt, True, chunk_size).numpy(), "faiss"
    C = _kmeans_pp(Xt, k, True, np.random.default_rng(seed))
    for _ in range(n_iter):
        labels = _nearest(C, Xt, True, chunk_size)
        sums = _cluster_sums(Xt, labels, k)
        empty = torch.from_numpy(np.bincount(labels.numpy(), minlength=k) == 0)
        C = torch.where(empty[:, None], C, _normalise(sums).to(C.dtype))
    return C.numpy(), _nearest(C, Xt, True, chunk_size).numpy(), "torch"


def weighted_balanced_assignment(S: np.ndarray, weights: np.ndarray, *, prices: np.ndarray | None = None,
                                 max_sweeps: int = 50, max_moves: int = 10_000) -> tuple[np.ndarray, dict]:
    """Assign m weighted items (fine clusters) to K clusters with near-equal total weight.

    ``S`` (K, m) scores, ``weights`` (m,) positive. Same dual prices as
    :func:`balanced_assignment`, with a weighted selection (cumulative weight of the sorted
    margins crossing W/K), then a greedy polish: while some item of the heaviest cluster
    weighs less than the gap between the heaviest and the lightest cluster, the cheapest
    such item moves to the lightest. Each move lowers Σ_k size_k² (by 2w(gap − w) > 0), so
    the polish cannot cycle and ends after finitely many moves.

    Guarantee (items are indivisible, so exact balance is impossible in general): when the
    polish completes (``stats["polish_complete"]``; it stops early only after ``max_moves``
    moves), max_k size_k − min_k size_k ≤ ``stats["gap_bound"]``, the weight of the lightest
    item in the heaviest cluster, which is at most the heaviest item. Nothing bounds how far
    the assignment is from the best balanced one by score. Returns ``(labels (m,), stats)``
    with ``polish_moves``, ``polish_complete``, ``gap_bound``, ``weighted_sizes``, ``prices``.
    """
    K, m = S.shape
    w = np.asarray(weights, dtype=np.float64)
    target = w.sum() / K
    prices = np.zeros(K) if prices is None else np.array(prices, dtype=np.float64)
    Sn = np.asarray(S, dtype=np.float64)
    for _ in range(max_sweeps):
        old = prices.copy()
        for k in range(K):
            other = np.delete(Sn - prices[:, None], k, axis=0).max(0) if K > 1 else np.full(m, -np.inf)
            margin = Sn[k] - other
            order = np.argsort(-margin, kind="stable")
            cum = np.cumsum(w[order])
            t = int(np.argmin(np.abs(cum - target)))  # last item taken: cumulative weight nearest W/K
            hi_m = margin[order[t]]
            lo_m = margin[order[t + 1]] if t + 1 < m else hi_m - 1.0
            prices[k] = 0.5 * (hi_m + lo_m)
        if np.allclose(prices, old):
            break
    labels = (Sn - prices[:, None]).argmax(0)
    moves, complete = 0, False
    while moves < max_moves:
        sizes = np.bincount(labels, weights=w, minlength=K)
        a, b = int(sizes.argmax()), int(sizes.argmin())
        gap = sizes[a] - sizes[b]
        cand = np.nonzero((labels == a) & (w < gap))[0]
        if gap <= 0 or cand.size == 0:
            complete = True
            break
        j = cand[np.argmin(Sn[a, cand] - Sn[b, cand])]
        labels[j] = b
        moves += 1
    sizes = np.bincount(labels, weights=w, minlength=K)
    heaviest = labels == int(sizes.argmax())
    return labels, {"polish_moves": moves, "polish_complete": complete,
                    "gap_bound": float(w[heaviest].min()) if heaviest.any() else 0.0,
                    "weighted_sizes": sizes.tolist(), "prices": prices}


class TwoStageKMeans(_CentroidModel):
    """Two-stage balanced spherical k-means (paper §5.3, Table 9, after McAllister et al. 2025).

    Stage 1: unbalanced spherical k-means of X (N, D) into m fine clusters (faiss when
    installed, else torch), m = min(``n_fine``, max(K, N // ``min_fine_size``)): the
    paper's m = 1,024 needs N ≥ 39,936 points to give every fine cluster the 39 points
    below which faiss warns that k-means is ill-determined, so a smaller data set gets
    fewer fine clusters (``fit_info_["n_fine"]`` is the m used). Stage 2 clusters the m
    fine centroids into ``n_clusters`` = K coarse clusters; every sample takes the coarse
    cluster of its fine cluster.

    ``balance_by="centroids"`` (default; the paper's Table 9): stage 2 is
    :class:`BalancedKMeans` of the fine centroids, unweighted, so each coarse cluster gets
    ⌊m/K⌋ or ⌈m/K⌉ fine clusters, exactly. Sample counts are *not* balanced: a coarse
    cluster holds whatever its fine clusters hold (``fit_info_["sizes"]``, ``["balance"]``).

    ``balance_by="samples"``: stage 2 weights each fine centroid by its number of samples
    and balances the weights (:func:`weighted_balanced_assignment`). Fine clusters are never
    split, so equal sample counts are not guaranteed; what is: max − min samples per cluster
    ≤ the smallest fine cluster in the largest coarse cluster (≤ the largest fine cluster),
    whenever the polish completes (``fit_info_["stage2"]["polish_complete"]``,
    ``["gap_bound"]``).

    A scikit-learn estimator like :class:`BalancedKMeans`. ``random_state`` seeds both
    stages. Attributes: ``cluster_centers_`` (K, D) unit rows (the normalised mean of each
    cluster's samples), ``labels_`` (N,), ``fine_centers_`` (m, D), ``fine_labels_`` (N,),
    ``fine_to_coarse_`` (m,) (so ``labels_ == fine_to_coarse_[fine_labels_]``), ``inertia_``, ``n_iter_`` (stage-2 steps), ``n_features_in_``, ``fit_info_``.
    """

    def __init__(self, n_clusters: int = 2, n_fine: int = 1024, *, balance_by: str = "centroids",
                 min_fine_size: int = FAISS_MIN_POINTS_PER_CENTROID, fine_iter: int = 20, max_iter: int = 50,
                 tol: float = 1e-6, random_state: Any = None, use_faiss: bool | None = None,
                 chunk_size: int = 65536):
        self.n_clusters = n_clusters
        self.n_fine = n_fine
        self.balance_by = balance_by
        self.min_fine_size = min_fine_size
        self.fine_iter = fine_iter
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.use_faiss = use_faiss
        self.chunk_size = chunk_size

    def _check_params(self, n_samples: int) -> None:
        check_scalar(self.n_clusters, "n_clusters", numbers.Integral, min_val=1)
        if n_samples < self.n_clusters:
            raise ValueError(f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}.")
        check_scalar(self.n_fine, "n_fine", numbers.Integral, min_val=self.n_clusters)
        check_scalar(self.min_fine_size, "min_fine_size", numbers.Integral, min_val=1)
        check_scalar(self.fine_iter, "fine_iter", numbers.Integral, min_val=1)
        check_scalar(self.max_iter, "max_iter", numbers.Integral, min_val=1)
        check_scalar(self.tol, "tol", numbers.Real, min_val=0)
        check_scalar(self.chunk_size, "chunk_size", numbers.Integral, min_val=1)
        if self.balance_by not in ("samples", "centroids"):
            raise ValueError(f"balance_by: must be 'samples' or 'centroids', got {self.balance_by!r}")

    def fit(self, X: Any, y: Any = None) -> "TwoStageKMeans":
        """Fit on X (N, D); ``y`` is ignored. Returns self."""
        Xt, sq = self._points(X, reset=True)  # (N, D) unit rows, (N,) |x|²
        N = Xt.shape[0]
        self._check_params(N)
        K = int(self.n_clusters)
        m = min(int(self.n_fine), max(K, N // int(self.min_fine_size)))
        seed = _seed(self.random_state)
        t0 = time.perf_counter()
        F, fine_labels, backend = _spherical_kmeans(Xt, m, n_iter=self.fine_iter, seed=seed,
                                                    use_faiss=self.use_faiss, chunk_size=self.chunk_size)
        t_fine = time.perf_counter() - t0
        counts = np.bincount(fine_labels, minlength=m)
        t0 = time.perf_counter()
        if self.balance_by == "centroids":
            coarse = BalancedKMeans(K, max_iter=self.max_iter, tol=self.tol, random_state=seed).fit(F)
            fine_to_coarse, n_iter, extra = coarse.labels_, coarse.n_iter_, {"stage2": coarse.fit_info_}
        else:
            fine_to_coarse, n_iter, extra = self._weighted_stage(F, counts, K, seed)
        labels = torch.from_numpy(fine_to_coarse[fine_labels])
        sums = _cluster_sums(Xt, labels, K)
        C = _normalise(sums).to(Xt.dtype)
        sizes = np.bincount(labels.numpy(), minlength=K)
        self.fine_centers_, self.fine_labels_, self.fine_to_coarse_ = F, fine_labels, fine_to_coarse
        self.cluster_centers_ = C.numpy()
        self.labels_ = labels.numpy()
        self.inertia_ = _inertia(sq, C, sums, sizes)
        self.n_iter_ = n_iter
        self.fit_info_ = {"backend": backend, "n_fine": m, "n_fine_asked": int(self.n_fine),
                          "points_per_fine_cluster": N / m, "balance_by": self.balance_by,
                          "seconds_fine": t_fine, "seconds_coarse": time.perf_counter() - t0,
                          "fine_sizes_min_max": [int(counts.min()), int(counts.max())],
                          "centroids_per_cluster": np.bincount(fine_to_coarse, minlength=K).tolist(),
                          "sizes": sizes.tolist(), "balance": _max_over_min(sizes),
                          **extra}
        return self

    def _weighted_stage(self, F: np.ndarray, counts: np.ndarray, K: int, seed: int):
        """Weighted balanced k-means of the fine centroids (weights = sample counts)."""
        Ft, w = torch.from_numpy(F), counts.astype(np.float64)
        C = _kmeans_pp(Ft, K, True, np.random.default_rng(seed))
        prev, objective, stats = None, [], {}
        for it in range(1, self.max_iter + 1):
            S = (C @ Ft.T).numpy()  # (K, m)
            labels, stats = weighted_balanced_assignment(S, w, prices=stats.get("prices") if it > 1 else None)
            objective.append(float((S[labels, np.arange(len(w))] * w).sum() / w.sum()))
            if prev is not None and np.array_equal(labels, prev):
                break
            prev = labels
            C = _normalise(_cluster_sums(Ft, torch.from_numpy(labels), K, torch.from_numpy(w))).to(Ft.dtype)
        stats.pop("prices", None)
        return labels, it, {"stage2": {"objective": objective, **stats}}

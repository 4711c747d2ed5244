"""Spherical balanced k-means with exactly balanced final labels (paper §4.2, Table 9).

    from ddfm.kmeans import BalancedKMeans, TwoStageKMeans
    km = BalancedKMeans(16, seed=0).fit(X)          # X: (N, D) float32
    km.labels_            # (N,) int64, cluster sizes differ by at most one
    km.fit_info_          # objective, sizes and seconds per iteration (data, not log lines)

The paper clusters unique-image features into K clusters "of equal sizes". Its code
balances while fitting but takes the final labels from an unbalanced argmin; here every
assignment step, including the last, solves the balanced assignment *exactly*:

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
   preferring k lands in [⌊N/K⌋, ⌈N/K⌉] (an O(N) selection). Prices are warm-started from
   the previous k-means iteration.
2. **Exact repair** by successive shortest paths on the K-node cluster graph (Ahuja,
   Magnanti & Orlin, *Network Flows*, 1993, §9.7): the cost of moving one point from
   cluster a to b is min_{i∈a} (s_ia − s_ib); Bellman–Ford finds the cheapest chain of
   moves from an over-full to an under-full cluster, and shortest-path augmentation keeps
   the plan optimal for the new sizes. Afterwards, while a chain of moves from a cluster
   at ⌈N/K⌉ to one at ⌊N/K⌋ has negative cost, it is applied. The result is an optimal
   solution of the linear program above (exact up to float32 rounding of the scores; the
   tests check it against ``scipy.optimize.linear_sum_assignment`` on the expanded
   problem).

Memory: the score matrix is (K, N) float32, computed in row chunks of X by BLAS matmuls,
i.e. O(N·D + N·K) with K ≤ D; no (N, K, D) tensor ever exists.
:meth:`BalancedKMeans.predict` with ``balanced=False`` streams in chunks (O(chunk·K)).

:class:`TwoStageKMeans` is the paper's Table 9 variant after McAllister et al. (2025):
unbalanced spherical k-means into m fine clusters (faiss when installed), then balanced
clustering of the m fine centroids into K.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any

import numpy as np
import torch

_NEG = float("-inf")


# ----------------------------------------------------------------------------- scores
def _as_tensor(X: Any) -> torch.Tensor:
    """A float32 contiguous (N, D) torch view of ``X`` (no copy when already so)."""
    arr = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"X: expected a 2-D array (n_samples, n_features), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("X: contains NaN or infinite values")
    return torch.from_numpy(arr)


def _normalise(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _scores(C: torch.Tensor, X: torch.Tensor, spherical: bool, chunk_size: int) -> np.ndarray:
    """Similarity of every point to every centroid, ``(K, N)`` float32.

    Spherical: cos(x_i, c_k) = c_k·x_i (unit rows). Euclidean: 2 c_k·x_i − |c_k|², which
    is −|x_i − c_k|² + |x_i|², so argmax and the assignment LP are unchanged.
    """
    K, N = C.shape[0], X.shape[0]
    out = torch.empty((K, N), dtype=torch.float32)
    for a in range(0, N, chunk_size):
        torch.mm(C, X[a:a + chunk_size].T, out=out[:, a:a + chunk_size])  # (K, chunk)
    if not spherical:
        out.mul_(2).sub_((C * C).sum(1, keepdim=True))
    return out.numpy()


def _cluster_sums(X: torch.Tensor, labels: torch.Tensor, K: int, weights: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Σ_{i: label k} w_i x_i for every cluster, (K, D), as one sparse (K, N) @ (N, D)
    product (faster than ``index_add_`` on CPU and deterministic)."""
    N = X.shape[0]
    values = torch.ones(N, dtype=X.dtype) if weights is None else weights.to(X.dtype)
    onehot = torch.sparse_coo_tensor(torch.stack([labels, torch.arange(N)]), values, (K, N),
                                     is_coalesced=True, check_invariants=False)
    return torch.sparse.mm(onehot, X)


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
# The assignment works on a numpy (K, N) float32 score matrix: every per-cluster step is
# a contiguous row operation, single-threaded and predictable on a shared machine.
def _bounds(n: int, k: int) -> tuple[int, int]:
    return n // k, -(-n // k)


def _select_threshold(margins: np.ndarray, t: int) -> float:
    """A price λ with exactly ``t`` margins strictly above it (ties permitting), O(N)."""
    n = margins.shape[0]
    if t >= n:
        return float(margins.min()) - 1.0
    if t <= 0:
        return float(margins.max()) + 1.0
    part = np.partition(margins, (n - t - 1, n - t))
    return 0.5 * (float(part[n - t - 1]) + float(part[n - t]))


def _price_sweep(S: np.ndarray, prices: np.ndarray, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """One Gauss–Seidel pass over the K prices; returns (prices changed, labels (N,)).

    For cluster k the margin of point i is s_ik − max_{j≠k}(s_ij − λ_j); points with
    margin > λ_k prefer k. The max over j≠k is a running max over the already-updated
    j < k and a suffix max over j > k, so a sweep is O(N·K). The labels argmax_k(s_ik − λ_k)
    under the new prices come out of the same pass.
    """
    K, N = S.shape
    suffix = np.empty_like(S)  # suffix[k] = max_{j>=k} (s_j − λ_j)
    np.subtract(S[K - 1], prices[K - 1], out=suffix[K - 1])
    for k in range(K - 2, -1, -1):
        np.maximum(suffix[k + 1], S[k] - prices[k], out=suffix[k])
    running = np.full(N, _NEG, dtype=S.dtype)
    labels = np.zeros(N, dtype=np.int64)
    changed = 0
    for k in range(K):
        other = np.maximum(running, suffix[k + 1]) if k + 1 < K else running
        margin = S[k] - other  # (N,)
        count = int(np.count_nonzero(margin > prices[k]))
        if count < lo or count > hi:
            prices[k] = _select_threshold(margin, min(max(count, lo), hi))
            changed += 1
        value = S[k] - np.float32(prices[k])
        labels[value > running] = k
        np.maximum(running, value, out=running)
    return changed, labels


class _MoveCosts:
    """The cheapest single move between every pair of clusters, kept up to date cheaply.

    ``E[a, b] = min_{i∈a}(s_ia − s_ib)`` and ``who[a, b]`` that point. For each edge a
    sorted short list of the ``depth`` cheapest candidates is kept (invariant: it holds
    every member of a whose cost is at most its last entry); a moved point is dropped
    lazily and inserted into its new cluster's lists, so a move costs O(K log depth)
    instead of O(N). An edge whose list runs dry is rebuilt from its members (O(N)).
    """

    def __init__(self, S: np.ndarray, labels: np.ndarray, depth: int = 64):
        self.S, self.labels, self.depth = S, labels, depth
        K = S.shape[0]
        self.E = np.full((K, K), math.inf)
        self.who = np.full((K, K), -1, dtype=np.int64)
        self.lists: dict[tuple[int, int], list] = {}
        for a in range(K):
            self._build_row(a, range(K))

    def _build_row(self, a: int, targets) -> None:
        members = np.flatnonzero(self.labels == a)
        loss = self.S[a, members][None, :] - self.S[:, members]  # (K, n_a)
        for b in targets:
            if b == a:
                continue
            costs = loss[b]
            idx = np.argpartition(costs, self.depth)[:self.depth] if len(costs) > self.depth else np.arange(len(costs))
            idx = idx[np.argsort(costs[idx], kind="stable")]
            # [costs, points, complete?]
            self.lists[a, b] = [costs[idx].astype(np.float64).tolist(), members[idx].tolist(),
                                len(costs) <= self.depth]
            self._head(a, b)

    def _head(self, a: int, b: int) -> None:
        costs, points, complete = self.lists[a, b]
        drop = 0
        while drop < len(points) and self.labels[points[drop]] != a:
            drop += 1
        if drop:
            del costs[:drop], points[:drop]
        if not points and not complete:
            self._build_row(a, [b])
            return
        self.E[a, b] = costs[0] if points else math.inf
        self.who[a, b] = points[0] if points else -1

    def move(self, i: int, a: int, b: int) -> None:
        """Point i leaves cluster a for b."""
        self.labels[i] = b
        K = self.S.shape[0]
        for c in range(K):
            if c != a and self.who[a, c] == i:
                self._head(a, c)
        col = self.S[:, i].astype(np.float64)
        for c in range(K):
            if c == b:
                continue
            cost = col[b] - col[c]
            costs, points, complete = self.lists[b, c]
            if complete or (costs and cost <= costs[-1]):
                at = bisect.bisect_right(costs, cost)
                costs.insert(at, cost)
                points.insert(at, i)
                if len(points) > 4 * self.depth:  # keep lists short; dropping the tail keeps the invariant
                    del costs[2 * self.depth:], points[2 * self.depth:]
                    self.lists[b, c][2] = False
                if at == 0:
                    self.E[b, c], self.who[b, c] = cost, i


def _best_chain(E: np.ndarray, sources: np.ndarray, sinks: np.ndarray) -> tuple[float, list[int]]:
    """Cheapest chain of single moves from a source cluster to a sink cluster.

    Bellman–Ford on the K-node cluster graph with every source at distance 0. The plan
    stays optimal for its sizes throughout, so there is no negative cycle and K − 1
    relaxation rounds suffice.
    """
    K = E.shape[0]
    dist = np.where(sources, 0.0, math.inf)
    prev = np.full(K, -1)
    for _ in range(K - 1):
        cand = dist[:, None] + E  # cand[a, b]: reach b through a
        a_best = cand.argmin(0)
        best = cand[a_best, np.arange(K)]
        better = best < dist - 1e-9
        if not better.any():
            break
        dist = np.where(better, best, dist)
        prev = np.where(better, a_best, prev)
    cost = np.where(sinks & (prev >= 0), dist, math.inf)
    b = int(cost.argmin())
    if not math.isfinite(cost[b]):
        return math.inf, []
    path = [b]
    while prev[path[-1]] >= 0 and len(path) <= K:  # back to a source (prev −1)
        path.append(int(prev[path[-1]]))
    return float(cost[b]), path[::-1]


def _repair(S: np.ndarray, labels: np.ndarray, lo: int, hi: int, max_moves: int) -> dict:
    """Successive shortest paths to sizes in [lo, hi], then negative-chain clean-up.

    :class:`_MoveCosts` keeps the cheapest move between every pair of clusters up to date.
    """
    K = S.shape[0]
    costs = _MoveCosts(S, labels)
    sizes = np.bincount(labels, minlength=K)
    moves = improving = 0
    while moves + improving < max_moves:
        if (sizes < lo).any():  # fill the under-full first, from anyone above lo
            sources, sinks, improve_only = sizes > lo, sizes < lo, False
        elif (sizes > hi).any():
            sources, sinks, improve_only = sizes > hi, sizes < hi, False
        else:  # feasible: apply only strictly improving chains (possible when hi > lo)
            sources, sinks, improve_only = sizes > lo, sizes < hi, True
        if not sources.any() or not sinks.any():
            break
        cost, path = _best_chain(costs.E, sources, sinks)
        if not path or (improve_only and cost >= -1e-6):
            break
        chain = [(int(costs.who[a, b]), a, b) for a, b in zip(path[:-1], path[1:])]
        for i, a, b in chain:  # chosen before any move: distinct points
            costs.move(i, a, b)
        sizes[path[0]] -= 1
        sizes[path[-1]] += 1
        improving += improve_only
        moves += not improve_only
    return {"repair_moves": moves, "improving_chains": improving}


def _excess(sizes: np.ndarray, lo: int, hi: int) -> int:
    """Points that must move before every size is in [lo, hi]."""
    return int(np.clip(sizes - hi, 0, None).sum() + np.clip(lo - sizes, 0, None).sum())


def _argmax_labels(S: np.ndarray, prices: np.ndarray | None = None) -> np.ndarray:
    """argmax_k (S[k] − prices[k]) per column of the (K, N) scores, first maximum on ties.

    A running maximum over the K rows (contiguous, vectorised by torch) instead of
    ``ndarray.argmax(0)``, which strides across rows: ~2x faster at K = 16, and this is
    the inner loop of the price search. Returns (N,) int64.
    """
    St = torch.from_numpy(S)
    shift = torch.zeros(len(S), dtype=St.dtype) if prices is None else torch.from_numpy(
        np.asarray(prices, dtype=S.dtype))
    best = St[0] - shift[0]
    labels = torch.zeros(S.shape[1], dtype=torch.int64)
    for k in range(1, len(S)):
        v = St[k] - shift[k]
        labels[v > best] = k  # strict: the first maximum wins, as argmax
        best = torch.maximum(best, v)
    return labels.numpy()


def _newton_prices(S: np.ndarray, prices: np.ndarray, lo: int, hi: int, max_steps: int = 12,
                   band: float = 0.02) -> tuple[np.ndarray, np.ndarray, int]:
    """Damped Newton steps on the dual prices (Kitagawa, Mérigot & Thibert, "Convergence of
    a Newton algorithm for semi-discrete optimal transport", JEMS 2019).

    The size of cluster k as a function of the prices has Jacobian −L, L the graph
    Laplacian of the densities of points on each k|j boundary (estimated from the points
    whose best-minus-second-best gap lies in the lowest ``band`` fraction). Each step
    solves L Δ = n − N/K and backtracks until the excess falls. Returns (prices, labels,
    steps). O(N·K) per step; typically 3–6 steps take a plan from thousands of misplaced
    points to a few dozen.
    """
    K, N = S.shape
    cols = np.arange(N)
    labels = _argmax_labels(S, prices)
    sizes = np.bincount(labels, minlength=K)
    excess = _excess(sizes, lo, hi)
    if prices.any():  # a warm start from moved centroids can be worse than none (empty clusters)
        cold = _argmax_labels(S)
        cold_sizes = np.bincount(cold, minlength=K)
        if _excess(cold_sizes, lo, hi) < excess:
            prices, labels, sizes, excess = np.zeros(K), cold, cold_sizes, _excess(cold_sizes, lo, hi)
    steps = 0
    for steps in range(1, max_steps + 1):
        if excess <= 2 * K:
            break
        V = S - prices[:, None].astype(S.dtype)  # (K, N)
        first = V[labels, cols]
        V[labels, cols] = _NEG
        second = _argmax_labels(V)
        gap = first - V[second, cols]
        h = float(np.partition(gap, int(band * N))[int(band * N)]) + 1e-12
        near = gap < h
        W = np.zeros((K, K))
        np.add.at(W, (labels[near], second[near]), 1.0 / h)
        rho = (W + W.T) / 2
        L = np.diag(rho.sum(1)) - rho + 1e-9 * np.eye(K)
        delta = np.linalg.lstsq(L, sizes - N / K, rcond=None)[0]
        delta -= delta.mean()
        alpha = 1.0
        while alpha > 1e-3:
            cand = _argmax_labels(S, prices + alpha * delta)
            cand_sizes = np.bincount(cand, minlength=K)
            if _excess(cand_sizes, lo, hi) < excess:
                break
            alpha /= 2
        else:
            if band >= 0.3:
                break  # no descent: leave the rest to the sweeps and the exact repair
            band *= 4  # the density estimate was too local: widen the band and retry
            continue
        prices = prices + alpha * delta
        labels, sizes, excess = cand, cand_sizes, _excess(cand_sizes, lo, hi)
    return prices, labels, steps


def balanced_assignment(S: np.ndarray, prices: np.ndarray | None = None, *,
                        max_sweeps: int = 30, max_moves: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact balanced assignment of N points to K clusters from scores ``S`` (K, N).

    Maximises Σ_i S[a(i), i] subject to every cluster size in [⌊N/K⌋, ⌈N/K⌉] (see the
    module docstring for the method and its optimality). ``prices`` (K,) warm-starts the
    dual. Returns ``(labels (N,) int64, prices (K,) float64, stats dict)`` with stats
    ``newton_steps``, ``sweeps``, ``repair_moves``, ``improving_chains``.
    """
    S = np.ascontiguousarray(S, dtype=np.float32)
    K, N = S.shape
    if K < 1 or N < K:
        raise ValueError(f"balanced assignment needs 1 <= K <= N, got K={K}, N={N}")
    lo, hi = _bounds(N, K)
    prices = np.zeros(K) if prices is None else np.array(prices, dtype=np.float64)
    prices, labels, newton = _newton_prices(S, prices, lo, hi) if K > 1 else (prices, np.zeros(N, np.int64), 0)
    sweeps = 0
    while sweeps < max_sweeps and _excess(np.bincount(labels, minlength=K), lo, hi) > 2 * K:
        sweeps += 1  # the exact repair finishes a nearly balanced plan faster than more sweeps
        changed, labels = _price_sweep(S, prices, lo, hi)
        if changed == 0:
            break
    stats = _repair(S, labels, lo, hi, max_moves if max_moves is not None else 10 * N)
    sizes = np.bincount(labels, minlength=K)
    if sizes.min() < lo or sizes.max() > hi:
        raise RuntimeError(f"balanced assignment failed to reach sizes in [{lo}, {hi}]: {sizes.tolist()}")
    return labels, prices, {"newton_steps": newton, "sweeps": sweeps, **stats}


# ----------------------------------------------------------------------- estimators
def _kmeans_pp(X: torch.Tensor, k: int, spherical: bool, rng: np.random.Generator,
               sample_size: int = 10_000) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on a seeded sample; (k, D)."""
    N, sample_size = X.shape[0], max(sample_size, 32 * k)
    idx = rng.choice(N, size=sample_size, replace=False) if N > sample_size else np.arange(N)
    Xs = X[torch.from_numpy(np.sort(idx))]
    sq = (Xs * Xs).sum(1)
    centres = [int(rng.integers(Xs.shape[0]))]
    d2 = (sq - 2 * Xs @ Xs[centres[0]] + sq[centres[0]]).clamp_min(0).double()
    for _ in range(1, k):
        p = d2.numpy()
        total = p.sum()
        j = int(rng.choice(len(p), p=p / total)) if total > 0 else int(rng.integers(len(p)))
        centres.append(j)
        d2 = torch.minimum(d2, (sq - 2 * Xs @ Xs[j] + sq[j]).clamp_min(0).double())
    C = Xs[centres].clone()
    return _normalise(C) if spherical else C


class _CentroidModel:
    """Shared sklearn-style plumbing: params, predict, transform, score."""

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names}

    def set_params(self, **params) -> "_CentroidModel":
        for name, value in params.items():
            if name not in self._param_names:
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")

    def _prepare(self, X: Any, fitting: bool = False) -> torch.Tensor:
        Xt = _as_tensor(X)
        if not fitting and hasattr(self, "cluster_centers_") and Xt.shape[1] != self.cluster_centers_.shape[1]:
            raise ValueError(f"X has {Xt.shape[1]} features, the model was fitted on {self.cluster_centers_.shape[1]}")
        return _normalise(Xt) if self.spherical else Xt

    def predict(self, X: Any, balanced: bool = False) -> np.ndarray:
        """Cluster of each row of X (N, D): nearest centroid (the router's top-1, eq. 29)
        or, with ``balanced=True``, the exact balanced assignment. Returns (N,) int64."""
        self._check_fitted()
        Xt = self._prepare(X)
        C = torch.from_numpy(self.cluster_centers_)
        if not balanced:
            return _nearest(C, Xt, self.spherical, self.chunk_size).numpy()
        labels, _, _ = balanced_assignment(_scores(C, Xt, self.spherical, self.chunk_size))
        return labels

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        return self.fit(X).labels_

    def transform(self, X: Any) -> np.ndarray:
        """Euclidean distance of every row to every centroid, (N, K) float32 (as sklearn);
        for unit rows it is sqrt(2 − 2 cos)."""
        self._check_fitted()
        Xt = self._prepare(X)
        C = torch.from_numpy(self.cluster_centers_)
        d2 = (Xt * Xt).sum(1, keepdim=True) - 2 * Xt @ C.T + (C * C).sum(1)
        return d2.clamp_min(0).sqrt().numpy()

    def score(self, X: Any, y: Any = None) -> float:
        """Negative inertia of X under nearest-centroid routing (sklearn's convention)."""
        return -float((self.transform(X).min(1).astype(np.float64) ** 2).sum())


class BalancedKMeans(_CentroidModel):
    """Spherical balanced k-means: every cluster gets ⌊N/K⌋ or ⌈N/K⌉ points.

    Parameters
    ----------
    n_clusters : K, the number of clusters (experts).
    spherical : cosine similarity with unit-norm centroids (the paper's choice) if True,
        else squared Euclidean distance.
    max_iter, tol : stop after ``max_iter`` assignment steps or when the objective
        improves by less than ``tol`` (relative) or no label changes.
    seed : seeds k-means++; the same seed and data give the same result.
    chunk_size : rows of X per matmul block.
    max_sweeps : dual price sweeps per assignment before the exact repair.

    Attributes (after ``fit``)
    --------------------------
    cluster_centers_ : (K, D) float32, unit rows when spherical.
    labels_ : (N,) int64, balanced assignment to the final centroids.
    inertia_ : float, Σ_i |x_i − c_{a(i)}|² (rows normalised first when spherical).
    n_iter_ : int, assignment steps run.
    fit_info_ : dict with per-iteration ``objective`` (mean similarity), ``seconds``,
        ``sweeps``, ``repair_moves``, final ``sizes`` and ``balance`` (max/min size).
    """

    _param_names = ("n_clusters", "spherical", "max_iter", "tol", "seed", "chunk_size", "max_sweeps")

    def __init__(self, n_clusters: int = 2, *, spherical: bool = True, max_iter: int = 50,
                 tol: float = 1e-6, seed: int = 0, chunk_size: int = 65536, max_sweeps: int = 4):
        self.n_clusters = n_clusters
        self.spherical = spherical
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.chunk_size = chunk_size
        self.max_sweeps = max_sweeps

    def _validate(self, n: int) -> None:
        if not isinstance(self.n_clusters, (int, np.integer)) or self.n_clusters < 1:
            raise ValueError(f"n_clusters: must be a positive integer, got {self.n_clusters!r}")
        if self.n_clusters > n:
            raise ValueError(f"n_clusters={self.n_clusters} is larger than the number of samples {n}")
        if self.max_iter < 1 or self.chunk_size < 1:
            raise ValueError("max_iter and chunk_size must be >= 1")

    def fit(self, X: Any, y: Any = None, init: np.ndarray | None = None) -> "BalancedKMeans":
        """Fit on X (N, D); ``init`` (K, D) optionally replaces k-means++. Returns self."""
        Xt = self._prepare(X, fitting=True)
        N = Xt.shape[0]
        self._validate(N)
        K = int(self.n_clusters)
        rng = np.random.default_rng(self.seed)
        C = _as_tensor(init).clone() if init is not None else _kmeans_pp(Xt, K, self.spherical, rng)
        if self.spherical:
            C = _normalise(C)
        prices, prev_labels, prev_obj = None, None, -math.inf
        info: dict[str, list] = {"objective": [], "seconds": [], "newton_steps": [], "sweeps": [],
                                 "repair_moves": []}
        for it in range(1, self.max_iter + 1):
            t0 = time.perf_counter()
            S = _scores(C, Xt, self.spherical, self.chunk_size)  # (K, N)
            labels, prices, stats = balanced_assignment(S, prices, max_sweeps=self.max_sweeps)
            obj = float(S[labels, np.arange(N)].mean(dtype=np.float64))
            converged = prev_labels is not None and (
                np.array_equal(labels, prev_labels) or obj - prev_obj <= self.tol * abs(prev_obj))
            if not converged and it < self.max_iter:
                C = self._update(Xt, torch.from_numpy(labels), K, C)
            info["objective"].append(obj)
            info["seconds"].append(time.perf_counter() - t0)
            info["newton_steps"].append(stats["newton_steps"])
            info["sweeps"].append(stats["sweeps"])
            info["repair_moves"].append(stats["repair_moves"] + stats["improving_chains"])
            prev_labels, prev_obj = labels, obj
            if converged:
                break
        self._finish(Xt, C, labels, S, it, info)
        return self

    def _update(self, X: torch.Tensor, labels: torch.Tensor, K: int, C: torch.Tensor) -> torch.Tensor:
        """Centroid step: mean of members (normalised when spherical). (K, D)."""
        sums = _cluster_sums(X, labels, K)
        if self.spherical:
            return _normalise(sums)
        counts = np.bincount(labels.numpy(), minlength=K).clip(1)
        return sums / torch.from_numpy(counts).to(X.dtype)[:, None]

    def _finish(self, X, C, labels, S, n_iter, info) -> None:
        sizes = np.bincount(labels, minlength=C.shape[0])
        assigned = S[labels, np.arange(len(labels))].astype(np.float64)
        sq = (X * X).sum(1).double().numpy()
        self.cluster_centers_ = C.numpy().astype(np.float32, copy=True)
        self.labels_ = labels
        self.inertia_ = float((sq - assigned if not self.spherical else sq - 2 * assigned + 1).sum())
        self.n_iter_ = n_iter
        info["sizes"] = sizes.tolist()
        info["balance"] = float(sizes.max()) / max(1.0, float(sizes.min()))
        self.fit_info_ = info


# --------------------------------------------------------------------- two-stage
def spherical_kmeans(X: np.ndarray, k: int, *, n_iter: int = 20, seed: int = 0,
                     use_faiss: bool | None = None, chunk_size: int = 65536
                     ) -> tuple[np.ndarray, np.ndarray, str]:
    """Unbalanced spherical k-means: ``(centroids (k, D), labels (N,), backend)``.

    faiss (``faiss.Kmeans(spherical=True)``) when installed and ``use_faiss`` is not False,
    else a torch Lloyd loop (k-means++ seeding; an empty cluster keeps its centroid).
    """
    Xt = _normalise(_as_tensor(X))
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
        C = torch.where(empty[:, None], C, _normalise(sums))
    return C.numpy(), _nearest(C, Xt, True, chunk_size).numpy(), "torch"


def weighted_balanced_assignment(S: np.ndarray, weights: np.ndarray, *, prices: np.ndarray | None = None,
                                 max_sweeps: int = 50, max_moves: int = 10_000) -> tuple[np.ndarray, dict]:
    """Assign m weighted items (fine clusters) to K clusters with near-equal total weight.

    Same dual prices as :func:`balanced_assignment`, with a weighted selection (cumulative
    weight of the sorted margins crossing W/K), then a greedy polish that moves the
    cheapest item from the heaviest to the lightest cluster while that shrinks their gap.
    Exact balance is impossible in general (items are indivisible): what is guaranteed is
    that the polish stops only when no single item lighter than the heaviest−lightest gap
    sits in the heaviest cluster; the achieved max/min is returned in the stats.
    ``S`` is (K, m). Returns ``(labels (m,), stats)``.
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
    moves = 0
    for moves in range(max_moves):
        sizes = np.bincount(labels, weights=w, minlength=K)
        a, b = int(sizes.argmax()), int(sizes.argmin())
        gap = sizes[a] - sizes[b]
        cand = np.nonzero((labels == a) & (w < gap))[0]
        if gap <= 0 or cand.size == 0:
            break
        j = cand[np.argmin(Sn[a, cand] - Sn[b, cand])]
        labels[j] = b
    sizes = np.bincount(labels, weights=w, minlength=K)
    return labels, {"polish_moves": moves, "weighted_sizes": sizes.tolist(), "prices": prices}


class TwoStageKMeans(_CentroidModel):
    """Two-stage balanced spherical k-means (paper Table 9; McAllister et al. 2025).

    Stage 1: unbalanced spherical k-means of X (N, D) into ``n_fine`` clusters (faiss
    when installed, else torch). Stage 2: balanced k-means of the fine centroids into
    ``n_clusters``; every sample takes the cluster of its fine centroid.

    ``balance_by="centroids"`` (what the paper's code does): each cluster gets ⌊m/K⌋ or
    ⌈m/K⌉ fine centroids, exactly; sample counts may differ.
    ``balance_by="samples"``: fine centroids weighted by their sample counts, clusters get
    near-equal sample counts; fine clusters are never split, so exact balance is not
    guaranteed (see :func:`weighted_balanced_assignment`); ``fit_info_["balance"]`` reports
    the achieved max/min sample count.

    Attributes: ``cluster_centers_`` (K, D) unit rows (sample-weighted mean of each
    cluster), ``labels_`` (N,), ``fine_centers_`` (m, D), ``fine_labels_`` (N,),
    ``inertia_``, ``n_iter_`` (stage-2 steps), ``fit_info_``.
    """

    _param_names = ("n_clusters", "n_fine", "balance_by", "spherical", "fine_iter", "max_iter",
                    "tol", "seed", "use_faiss", "chunk_size")

    def __init__(self, n_clusters: int = 2, n_fine: int = 1024, *, balance_by: str = "samples",
                 spherical: bool = True, fine_iter: int = 20, max_iter: int = 50, tol: float = 1e-6,
                 seed: int = 0, use_faiss: bool | None = None, chunk_size: int = 65536):
        self.n_clusters = n_clusters
        self.n_fine = n_fine
        self.balance_by = balance_by
        self.spherical = spherical
        self.fine_iter = fine_iter
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.use_faiss = use_faiss
        self.chunk_size = chunk_size

    def fit(self, X: Any, y: Any = None) -> "TwoStageKMeans":
        if self.balance_by not in ("samples", "centroids"):
            raise ValueError(f"balance_by: must be 'samples' or 'centroids', got {self.balance_by!r}")
        if not self.spherical:
            raise ValueError("TwoStageKMeans is spherical only (spherical=False is not supported)")
        Xt = self._prepare(X, fitting=True)
        N, K = Xt.shape[0], int(self.n_clusters)
        m = min(int(self.n_fine), N)
        if K < 1 or K > m:
            raise ValueError(f"n_clusters={K} must be between 1 and the number of fine clusters {m}")
        t0 = time.perf_counter()
        F, fine_labels, backend = spherical_kmeans(Xt.numpy(), m, n_iter=self.fine_iter, seed=self.seed,
                                                   use_faiss=self.use_faiss, chunk_size=self.chunk_size)
        t_fine = time.perf_counter() - t0
        counts = np.bincount(fine_labels, minlength=m)
        t0 = time.perf_counter()
        if self.balance_by == "centroids":
            coarse = BalancedKMeans(K, max_iter=self.max_iter, tol=self.tol, seed=self.seed).fit(F)
            fine_to_coarse, n_iter, extra = coarse.labels_, coarse.n_iter_, {"stage2": coarse.fit_info_}
        else:
            fine_to_coarse, n_iter, extra = self._weighted_stage(F, counts, K)
        labels = torch.from_numpy(fine_to_coarse[fine_labels])
        C = _normalise(_cluster_sums(Xt, labels, K))
        sizes = np.bincount(labels.numpy(), minlength=K)
        self.fine_centers_, self.fine_labels_ = F, fine_labels
        self.cluster_centers_ = C.numpy()
        self.labels_ = labels.numpy()
        cos = (Xt * C[labels]).sum(1).double()
        self.inertia_ = float((2 - 2 * cos).sum())
        self.n_iter_ = n_iter
        self.fit_info_ = {"backend": backend, "n_fine": m, "balance_by": self.balance_by,
                          "seconds_fine": t_fine, "seconds_coarse": time.perf_counter() - t0,
                          "fine_sizes_min_max": [int(counts.min()), int(counts.max())],
                          "centroids_per_cluster": np.bincount(fine_to_coarse, minlength=K).tolist(),
                          "sizes": sizes.tolist(), "balance": float(sizes.max()) / max(1, int(sizes.min())),
                          **extra}
        return self

    def _weighted_stage(self, F: np.ndarray, counts: np.ndarray, K: int):
        """Weighted balanced k-means of the fine centroids (weights = sample counts)."""
        Ft, w = torch.from_numpy(F), counts.astype(np.float64)
        C = _kmeans_pp(Ft, K, True, np.random.default_rng(self.seed))
        prev, objective, stats = None, [], {}
        for it in range(1, self.max_iter + 1):
            S = (C @ Ft.T).numpy()  # (K, m)
            labels, stats = weighted_balanced_assignment(S, w, prices=stats.get("prices") if it > 1 else None)
            objective.append(float((S[labels, np.arange(len(w))] * w).sum() / w.sum()))
            if prev is not None and np.array_equal(labels, prev):
                break
            prev = labels
            C = _normalise(_cluster_sums(Ft, torch.from_numpy(labels), K, torch.from_numpy(w)))
        stats.pop("prices", None)
        return labels, it, {"stage2": {"objective": objective, **stats}}

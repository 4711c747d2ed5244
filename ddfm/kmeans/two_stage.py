"""``TwoStageKMeans``: the paper's Table 9 variant of balanced k-means (after McAllister et al. 2025).

Unbalanced spherical k-means into m fine clusters (faiss when installed, else torch), then
balanced clustering of the m fine centroids into K: exactly balanced in fine clusters
(``balance_by="centroids"``, the paper's choice) or balanced in samples as far as whole
fine clusters allow (``balance_by="samples"``, :func:`weighted_balanced_assignment`). See
docs/partitioning.md.
"""

from __future__ import annotations

import numbers
import time
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_array, check_scalar

from ddfm.kmeans.estimators import BalancedKMeans, _CentroidModel, _inertia, _kmeans_pp, _max_over_min, _seed
from ddfm.kmeans.scores import _cluster_sums, _nearest, _normalise, _tensor, _unit_rows

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
        self._check_shared_params(n_samples)
        check_scalar(self.n_fine, "n_fine", numbers.Integral, min_val=self.n_clusters)
        check_scalar(self.min_fine_size, "min_fine_size", numbers.Integral, min_val=1)
        check_scalar(self.fine_iter, "fine_iter", numbers.Integral, min_val=1)
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

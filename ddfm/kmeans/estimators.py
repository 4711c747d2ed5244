"""``BalancedKMeans``: spherical k-means whose every cluster gets ⌊N/K⌋ or ⌈N/K⌉ points.

A scikit-learn estimator (paper §4.2): each iteration scores the points, solves the
balanced assignment exactly (``assign.py``; during the warm-up to 1 %) and moves each
centroid to the normalised mean of its members; with ``algorithm="bounds"`` only the
points whose cluster could change are scored (Hamerly, "Making k-means even faster", SDM
2010). :class:`_CentroidModel` is what both estimators do once fitted. See
docs/partitioning.md.

    from ddfm.kmeans import BalancedKMeans
    km = BalancedKMeans(16, random_state=0).fit(X)  # X: (N, D) float32
    km.labels_            # (N,) int64, cluster sizes differ by at most one
    km.fit_info_          # objective, sizes and seconds per iteration (data, not log lines)
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, check_scalar, validate_data

from ddfm.kmeans.assign import _assign, _Outside
from ddfm.kmeans.kernels import _in_parts, _pp_kernel
from ddfm.kmeans.prices import _counts, _kth_smallest, _label_gaps, _range
from ddfm.kmeans.scores import _nearest, _normalise, _scores, _scores_of, _tensor, _unit_rows, _update_sums


def _seed(random_state: Any) -> int:
    """One integer seed (for numpy's Generator and faiss) from scikit-learn's ``random_state``,
    checked by :func:`sklearn.utils.check_random_state`: an int is used as it is; None or a
    RandomState gives a draw from that generator."""
    rng = check_random_state(random_state)
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return int(rng.randint(np.iinfo(np.int32).max))


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

    def _check_shared_params(self, n_samples: int) -> None:
        """The hyper-parameters both estimators have, checked at fit with the names and
        messages of scikit-learn's ``check_scalar`` and ``KMeans``."""
        check_scalar(self.n_clusters, "n_clusters", numbers.Integral, min_val=1)
        if n_samples < self.n_clusters:
            raise ValueError(f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}.")
        check_scalar(self.max_iter, "max_iter", numbers.Integral, min_val=1)
        check_scalar(self.tol, "tol", numbers.Real, min_val=0)
        check_scalar(self.chunk_size, "chunk_size", numbers.Integral, min_val=1)

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


@dataclass
class _Lloyd:
    """What :meth:`BalancedKMeans.fit` carries from one iteration to the next."""

    C: torch.Tensor  # (K, D) float32 centroids
    S_buffer: torch.Tensor  # (K, N) float32, the scores' buffer, reused (fresh memory costs page faults)
    use_bounds: bool  # algorithm="bounds": keep the gap bounds and skip points that keep their cluster
    warming: bool  # still in the warm-up (assignments to 1 %)
    prices: np.ndarray | None = None  # (K,) float64 dual prices, the next assignment's warm start
    labels: torch.Tensor | None = None  # (N,) int64
    gaps: torch.Tensor | None = None  # (N,) float32 lower bounds on the reduced gaps, for the bounds
    drift: np.ndarray | None = None  # (K,) how far each centroid moved in the last step
    sums: torch.Tensor | None = None  # (K, D) float64 member sums
    prev_obj: float = -math.inf  # the last objective
    prev_exact: bool = False  # whether the last assignment was exact
    last_move: float = math.inf  # how far the prices moved in the last iteration
    gain: float = math.inf  # the last relative gain of the objective


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
        self._check_shared_params(n_samples)
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
        run = _Lloyd(C=self._initial_centroids(Xt, K), S_buffer=torch.empty((K, N), dtype=torch.float32),
                     use_bounds=self.algorithm == "bounds" and self.spherical and K > 1,
                     warming=self.warmup_tol is not None)
        info: dict[str, Any] = {"objective": [], "seconds": [], "newton_steps": [], "sweeps": [],
                                "repair_moves": [], "scored": [], "exact": [],
                                "seconds_init": time.perf_counter() - t_start}
        for it in range(1, self.max_iter + 1):
            t0 = time.perf_counter()
            exact = not run.warming or it == self.max_iter
            tolerance = 0 if exact else max(1, int(N * min(0.01, run.gain / 10)))
            new, stats = self._assignment_step(Xt, run, tolerance)
            obj, converged = self._centroid_step(Xt, run, new, exact, move=it < self.max_iter)
            for key, value in (("objective", obj), ("seconds", time.perf_counter() - t0),
                               ("newton_steps", stats["newton_steps"]), ("sweeps", stats["sweeps"]),
                               ("repair_moves", stats["repair_moves"] + stats["improving_chains"]),
                               ("scored", stats["scored"]), ("exact", exact)):
                info[key].append(value)
            if converged:
                break
        t0 = time.perf_counter()
        self._finish(Xt, sq, run.C, run.labels, run.sums, it, info)
        info["seconds_finish"] = time.perf_counter() - t0
        return self

    def _assignment_step(self, X: torch.Tensor, run: "_Lloyd", tolerance: int) -> tuple[torch.Tensor, dict]:
        """The balanced assignment to ``run.C``: of the points whose bound could fall (see
        :meth:`_bounded_step`), or of every point; updates the prices, the gap bounds and how
        far the prices moved. Returns the labels (N,) int64 and the assignment's stats."""
        old_prices = run.prices
        step = (self._bounded_step(X, run.C, run.labels, run.gaps, run.drift, run.prices, run.last_move, tolerance)
                if run.gaps is not None else None)
        if step is None:
            S = _scores(run.C, X, self.spherical, self.chunk_size, out=run.S_buffer)  # (K, N)
            new, run.prices, stats = _assign(S, run.prices, max_sweeps=self.max_sweeps, tolerance=tolerance)
            new = torch.from_numpy(new)
            gaps = stats.pop("gaps", None)  # for the next bounded step
            run.gaps = None if not run.use_bounds else _label_gaps(S, run.prices, new) if gaps is None else gaps
            stats["scored"] = X.shape[0]
        else:
            new, run.prices, run.gaps, stats = step
        run.last_move = _range(run.prices - old_prices) if old_prices is not None else math.inf
        return new, stats

    def _centroid_step(self, X: torch.Tensor, run: "_Lloyd", new: torch.Tensor, exact: bool, move: bool
                       ) -> tuple[float, bool]:
        """The member sums and objective of the labels ``new`` (N,), whether the fit has
        converged (two exact steps in a row and no label changed, or a relative gain ≤ tol),
        and, unless converged or not ``move``, the new centroids and how far each moved.
        Returns (objective, converged)."""
        K = run.C.shape[0]
        run.sums = _update_sums(X, new, run.labels, run.sums, K)
        obj = self._objective(run.C, run.sums, new) / X.shape[0]
        gain = (obj - run.prev_obj) / abs(run.prev_obj) if run.labels is not None and run.prev_obj else math.inf
        converged = exact and run.prev_exact and (torch.equal(new, run.labels) or gain <= self.tol)
        run.warming = run.warming and gain > self.warmup_tol  # once the gain is small, every step is exact
        run.labels, run.prev_obj, run.prev_exact, run.gain = new, obj, exact, gain
        if not converged and move:
            C_new = self._centroids(run.sums, run.labels, run.C)
            run.drift = (C_new.double() - run.C.double()).norm(dim=1).numpy() + 1e-6  # (K,) float32 slack
            run.C = C_new
        return obj, converged

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

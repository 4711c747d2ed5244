"""BalancedKMeans / TwoStageKMeans: exact balance, optimality, quality, determinism, sklearn contract."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from ddfm.kmeans import (
    BalancedKMeans,
    TwoStageKMeans,
    balanced_assignment,
    spherical_kmeans,
    weighted_balanced_assignment,
)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(sizes, d=16, spread=0.15, seed=0):
    """Well separated clusters on the sphere: (X (N, d), true labels (N,))."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(len(sizes), d)))
    X = np.concatenate([centres[k] + spread * rng.normal(size=(n, d)) for k, n in enumerate(sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    return unit(X), y


def lsa_objective(S):
    """Optimum of the balanced problem by the Hungarian method on the expanded problem:
    each cluster has ⌊N/K⌋ mandatory slots (large bonus) + 1 optional slot if N % K."""
    K, N = S.shape
    lo, hi = N // K, -(-N // K)
    cols, bonus = [], []
    for k in range(K):
        cols += [k] * lo + ([k] if hi > lo else [])
        bonus += [1e3] * lo + ([0.0] if hi > lo else [])
    cols = np.array(cols)
    S64 = S.astype(np.float64)
    r, c = linear_sum_assignment(-(S64[cols].T + np.array(bonus)))
    return S64[cols[c], r].sum()


@pytest.mark.parametrize("n,k", [(10, 2), (11, 2), (100, 3), (101, 7), (257, 16), (1000, 13), (999, 32), (64, 64)])
def test_final_labels_exactly_balanced(n, k):
    X, _ = blobs([n // 2, n - n // 2], d=8, spread=0.6, seed=n)
    km = BalancedKMeans(k, random_state=1, max_iter=10).fit(X)
    sizes = np.bincount(km.labels_, minlength=k)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    assert km.fit_info_["sizes"] == sizes.tolist()
    assert len(km.fit_info_["objective"]) == km.n_iter_ == len(km.fit_info_["seconds"])


def test_unbalanced_blobs_still_get_balanced_final_labels():
    X, y = blobs([300, 100], seed=3)
    km = BalancedKMeans(2, random_state=0).fit(X)
    assert np.bincount(km.labels_).tolist() == [200, 200]
    # the small blob stays whole in one cluster
    assert len(set(km.labels_[y == 1])) == 1


@pytest.mark.parametrize("seed", range(6))
def test_assignment_matches_hungarian_optimum(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(20, 70)), int(rng.integers(2, 7))
    S = (unit(rng.normal(size=(k, 6))) @ unit(rng.normal(size=(n, 6))).T).astype(np.float32)
    labels, _, stats = balanced_assignment(S)
    ours = S.astype(np.float64)[labels, np.arange(n)].sum()
    assert ours == pytest.approx(lsa_objective(S), abs=1e-4)
    sizes = np.bincount(labels, minlength=k)
    assert sizes.max() - sizes.min() <= 1


def test_assignment_optimal_when_prices_far_off():
    # warm start with absurd prices: the shortest-path repair still has to reach the optimum
    rng = np.random.default_rng(7)
    S = (unit(rng.normal(size=(5, 4))) @ unit(rng.normal(size=(53, 4))).T).astype(np.float32)
    labels, _, stats = balanced_assignment(S, prices=np.array([3.0, -3.0, 0, 1, -1]), max_sweeps=1)
    assert S.astype(np.float64)[labels, np.arange(53)].sum() == pytest.approx(lsa_objective(S), abs=1e-4)
    assert stats["repair_moves"] > 0


def lp_optimum(S):
    """Optimum of the balanced assignment LP (N x K transport problem) by HiGHS."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    K, N = S.shape
    lo, hi = N // K, -(-N // K)
    var = np.arange(N * K).reshape(N, K)  # x[i, k]
    each = coo_matrix((np.ones(N * K), (np.repeat(np.arange(N), K), var.ravel())), shape=(N, N * K))
    size = coo_matrix((np.ones(N * K), (np.tile(np.arange(K), N), var.ravel())), shape=(K, N * K))
    res = linprog(-S.T.astype(np.float64).ravel(), A_ub=np.vstack([size.toarray(), -size.toarray()]),
                  b_ub=np.r_[np.full(K, hi), np.full(K, -lo)], A_eq=each, b_eq=np.ones(N), bounds=(0, 1),
                  method="highs")
    assert res.status == 0
    return -res.fun


@pytest.mark.parametrize("seed", range(4))
def test_working_set_assignment_is_exact(seed):
    # a tiny working set locks most points: the repair must either certify its chains by the
    # locked points' bounds or redo the repair on every point; either way the LP optimum
    rng = np.random.default_rng(seed)
    n, k = 3001, int(rng.integers(3, 9))
    S = (unit(rng.normal(size=(k, 5))) @ unit(rng.normal(size=(n, 5))).T).astype(np.float32)
    _, prices, _ = balanced_assignment(S)
    near = prices + rng.normal(scale=0.005 * (1 + seed), size=k)  # a warm start, as in k-means
    labels, _, stats = balanced_assignment(S, near, working_set=32, max_sweeps=2)
    assert stats["working_set"] < n // 2
    sizes = np.bincount(labels, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    assert S.astype(np.float64)[labels, np.arange(n)].sum() == pytest.approx(lp_optimum(S), abs=1e-3)
    with pytest.raises(ValueError, match="working_set"):
        balanced_assignment(S, working_set=0)


def test_bounds_skip_points_and_match_full_scoring():
    # Hamerly-style bounds leave most points unscored in late iterations, with the very
    # same exact assignments as scoring every point
    X, _ = blobs([2600, 2500, 2500, 2400, 2500, 2500, 2500, 2500], d=16, spread=0.3, seed=6)
    common = dict(random_state=1, max_iter=12, tol=0.0, warmup_tol=None)
    full = BalancedKMeans(8, algorithm="full", **common).fit(X)
    bounded = BalancedKMeans(8, algorithm="bounds", **common).fit(X)
    assert min(bounded.fit_info_["scored"]) < len(X) // 4
    assert set(full.fit_info_["scored"]) == {len(X)}
    assert np.array_equal(full.labels_, bounded.labels_)
    np.testing.assert_allclose(full.cluster_centers_, bounded.cluster_centers_, atol=1e-6)
    np.testing.assert_allclose(full.fit_info_["objective"], bounded.fit_info_["objective"], rtol=1e-9)


def test_warmup_steps_also_skip_the_points_that_cannot_move():
    # once the centroids move little, a warm-up step (balanced to within 1 %) scores only
    # the points whose bound allows a change too, with the same result as scoring all
    X, _ = blobs([2600, 2500, 2500, 2400, 2500, 2500, 2500, 2500], d=16, spread=0.3, seed=6)
    bounded = BalancedKMeans(8, random_state=1).fit(X)
    info = bounded.fit_info_
    assert any(s < len(X) for s, e in zip(info["scored"], info["exact"]) if not e)
    full = BalancedKMeans(8, random_state=1, algorithm="full").fit(X)
    assert np.array_equal(full.labels_, bounded.labels_)
    np.testing.assert_allclose(full.fit_info_["objective"], info["objective"], rtol=1e-9)


@pytest.mark.slow
def test_warmup_steps_then_exact_steps():
    X, _ = blobs([9000, 7000, 4000], d=24, spread=0.7, seed=6)
    warm = BalancedKMeans(8, random_state=1).fit(X)
    exact = warm.fit_info_["exact"]
    assert not exact[0] and exact[-1]  # warm-up first, exact from the switch on
    assert exact == sorted(exact)
    sizes = np.bincount(warm.labels_, minlength=8)
    assert sizes.max() - sizes.min() <= 1
    cold = BalancedKMeans(8, random_state=1, warmup_tol=None).fit(X)
    assert all(cold.fit_info_["exact"])
    # the warm-up changes the path, not the quality
    assert warm.fit_info_["objective"][-1] == pytest.approx(cold.fit_info_["objective"][-1], rel=2e-3)
    # the last step is exact even when max_iter cuts the warm-up short
    short = BalancedKMeans(8, random_state=1, max_iter=2).fit(X)
    assert short.fit_info_["exact"] == [False, True]
    assert np.bincount(short.labels_, minlength=8).max() - np.bincount(short.labels_, minlength=8).min() <= 1
    with pytest.raises(ValueError, match="warmup_tol"):
        BalancedKMeans(2, warmup_tol=-1.0).fit(X[:10])
    with pytest.raises(ValueError, match="algorithm"):
        BalancedKMeans(2, algorithm="elkan").fit(X[:10])


def test_quality_close_to_unbalanced_kmeans_and_recovers_blobs():
    from sklearn.metrics import adjusted_rand_score

    X, y = blobs([150, 150, 150, 150], seed=5)
    km = BalancedKMeans(4, random_state=0).fit(X)
    assert adjusted_rand_score(y, km.labels_) == 1.0
    C, unb, _ = spherical_kmeans(X, 4, n_iter=30, random_state=0)
    unb_obj = (X * C[unb]).sum(1).mean()
    assert km.fit_info_["objective"][-1] >= unb_obj - 1e-3
    assert km.inertia_ == pytest.approx(((X - km.cluster_centers_[km.labels_]) ** 2).sum(), rel=1e-4)


def test_deterministic_and_seed_matters():
    X, _ = blobs([200, 120, 80], d=10, spread=0.5, seed=2)
    a, b = BalancedKMeans(3, random_state=4).fit(X), BalancedKMeans(3, random_state=4).fit(X)
    assert np.array_equal(a.labels_, b.labels_) and np.array_equal(a.cluster_centers_, b.cluster_centers_)


def test_predict_routes_to_nearest_cosine_and_balanced_option():
    X, _ = blobs([90, 60], d=12, spread=0.4, seed=9)
    km = BalancedKMeans(3, random_state=0).fit(X)
    Z = np.random.default_rng(1).normal(size=(41, 12)).astype(np.float32) * 3  # not unit
    cos = unit(Z) @ km.cluster_centers_.T
    assert np.array_equal(km.predict(Z), cos.argmax(1))
    bal = km.predict(Z, balanced=True)
    assert np.bincount(bal, minlength=3).max() - np.bincount(bal, minlength=3).min() <= 1
    assert np.array_equal(km.fit_predict(X), km.labels_)
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1, atol=1e-5)


def test_transform_shape_and_values():
    X, _ = blobs([30, 30], seed=1)
    km = BalancedKMeans(2, random_state=0).fit(X)
    D = km.transform(X[:7])
    assert D.shape == (7, 2)
    np.testing.assert_allclose(D, np.sqrt(np.clip(2 - 2 * X[:7] @ km.cluster_centers_.T, 0, None)), atol=1e-3)


def test_chunking_gives_same_result():
    X, _ = blobs([77, 50, 40], d=8, spread=0.5, seed=4)
    a = BalancedKMeans(3, random_state=2, chunk_size=1 << 16).fit(X)
    b = BalancedKMeans(3, random_state=2, chunk_size=13).fit(X)
    assert np.array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    assert np.array_equal(a.predict(X), b.predict(X))


def test_euclidean_mode_balanced():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (60, 3)), rng.normal(8, 1, (20, 3))]).astype(np.float32)
    km = BalancedKMeans(2, spherical=False, random_state=0).fit(X)
    assert np.bincount(km.labels_).tolist() == [40, 40]
    assert km.inertia_ == pytest.approx(((X - km.cluster_centers_[km.labels_]) ** 2).sum(), rel=1e-4)


@pytest.mark.parametrize("Estimator", [BalancedKMeans, TwoStageKMeans])
def test_passes_sklearn_check_estimator(Estimator, monkeypatch):
    """scikit-learn's own estimator checks, all of them, none expected to fail or skipped."""
    from sklearn.utils.estimator_checks import check_estimator

    monkeypatch.setenv("SCIPY_ARRAY_API", "1")  # else the numpy array-API check is skipped
    results = check_estimator(Estimator(), on_fail=None, on_skip=None)
    assert len(results) > 40
    assert [(r["check_name"], r["status"], r["exception"]) for r in results if r["status"] != "passed"] == []


@pytest.mark.parametrize("Estimator", [BalancedKMeans, TwoStageKMeans])
def test_clone_pipeline_and_grid_search(Estimator):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    X, y = blobs([600, 600, 600], d=8, spread=0.2, seed=3)
    est = Estimator(2, random_state=3, max_iter=7)
    twin = clone(est)
    assert twin.get_params() == est.get_params() and twin is not est
    assert not hasattr(est, "labels_") and not hasattr(twin, "n_features_in_")  # __init__ stores parameters only
    assert "random_state=3" in repr(est) and "seed" not in est.get_params()
    with pytest.raises(TypeError, match="seed"):
        Estimator(2, seed=0)
    fitted = est.fit(X)
    assert clone(fitted).get_params() == est.get_params() and not hasattr(clone(fitted), "labels_")
    pipe = make_pipeline(Normalizer(), Estimator(3, random_state=0)).fit(X)
    assert pipe.predict(X).shape == (1800,) and pipe.transform(X).shape == (1800, 3)
    assert list(pipe.get_feature_names_out()) == [f"{Estimator.__name__.lower()}{k}" for k in range(3)]
    search = GridSearchCV(Estimator(random_state=0), {"n_clusters": [2, 3]}, cv=3).fit(X)
    assert search.best_params_ == {"n_clusters": 3}  # score = −inertia: three blobs want three clusters
    assert search.best_estimator_.cluster_centers_.shape == (3, 8)
    # a RandomState is accepted as scikit-learn's estimators accept it, and an int is reproducible
    a = Estimator(3, random_state=np.random.RandomState(5)).fit(X)
    assert np.bincount(a.labels_).min() > 0
    b, c = Estimator(3, random_state=7).fit(X), Estimator(3, random_state=7).fit(X)
    assert np.array_equal(b.labels_, c.labels_)


def test_unfitted_and_validation_errors():
    from sklearn.exceptions import NotFittedError

    X, _ = blobs([5, 5])
    km = BalancedKMeans(5, random_state=3, max_iter=7)
    with pytest.raises(NotFittedError):
        km.predict(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="n_samples=10 should be >= n_clusters=11"):
        BalancedKMeans(11).fit(X)
    with pytest.raises(ValueError, match="n_clusters"):
        BalancedKMeans(0).fit(X)
    with pytest.raises(ValueError, match="Expected 2D array"):
        BalancedKMeans(2).fit(X[0])
    with pytest.raises(ValueError, match="NaN"):
        BalancedKMeans(2).fit(np.full((4, 2), np.nan))
    with pytest.raises(TypeError, match="[Ss]parse"):
        BalancedKMeans(2).fit(__import__("scipy.sparse").sparse.csr_matrix(X))
    with pytest.raises(ValueError, match="balance_by"):
        TwoStageKMeans(2, n_fine=4, balance_by="tokens").fit(X)
    with pytest.raises(ValueError, match="n_fine"):
        TwoStageKMeans(3, n_fine=2).fit(X)
    with pytest.raises(ValueError, match="init"):
        BalancedKMeans(2, init=np.zeros((3, 16))).fit(X)


def test_float32_float64_and_read_only_input():
    X, _ = blobs([60, 40], d=6, spread=0.4, seed=8)
    a = BalancedKMeans(2, random_state=0).fit(X)
    b = BalancedKMeans(2, random_state=0).fit(X.astype(np.float64))
    assert np.array_equal(a.labels_, b.labels_)
    assert a.transform(X).dtype == np.float32 and a.transform(X.astype(np.float64)).dtype == np.float64
    np.testing.assert_allclose(a.transform(X), a.transform(X.astype(np.float64)), atol=1e-5)
    ro = X.copy()
    ro.setflags(write=False)
    assert np.array_equal(BalancedKMeans(2, random_state=0).fit(ro).labels_, a.labels_)
    # rows whose squared norm overflows float32 are still finite: spherical k-means sees their directions
    huge = BalancedKMeans(2, random_state=0).fit(X * np.float32(1e30))
    assert np.array_equal(huge.labels_, a.labels_)
    with pytest.raises(ValueError, match="Input X contains infinity"):
        BalancedKMeans(2).fit(np.where(np.arange(len(X))[:, None] == 3, np.inf, X))


def test_init_options():
    X, _ = blobs([100, 80, 60], d=10, spread=0.3, seed=4)
    random = BalancedKMeans(3, init="random", random_state=0).fit(X)
    given = BalancedKMeans(3, init=random.cluster_centers_, max_iter=1).fit(X)
    np.testing.assert_array_equal(np.bincount(given.labels_), [80, 80, 80])
    # started at a fixed point, one exact step keeps the labels
    assert np.array_equal(given.labels_, random.labels_)


def test_two_stage_default_is_the_papers_balance_of_centroids():
    """Table 9: unbalanced fine clusters, then *balanced* clustering of the fine centroids."""
    X, _ = blobs([2400, 1200, 400], d=16, spread=0.5, seed=12)
    ts = TwoStageKMeans(4, n_fine=64, random_state=0).fit(X)
    assert ts.balance_by == "centroids" and ts.fit_info_["balance_by"] == "centroids"
    per = ts.fit_info_["centroids_per_cluster"]
    assert per == [16, 16, 16, 16]
    assert np.bincount(ts.fine_to_coarse_, minlength=4).tolist() == per
    # the coarse clusters hold what their fine clusters hold: sample counts are not balanced
    sizes = np.bincount(ts.labels_, minlength=4)
    fine = np.bincount(ts.fine_labels_, minlength=64)
    assert sizes.tolist() == ts.fit_info_["sizes"] == np.bincount(ts.fine_to_coarse_, fine, 4).astype(int).tolist()
    assert np.array_equal(ts.labels_, ts.fine_to_coarse_[ts.fine_labels_])
    assert sizes.max() - sizes.min() > 1


@pytest.mark.parametrize("Estimator", [BalancedKMeans, TwoStageKMeans])
def test_inertia_is_the_sum_of_squared_distances(Estimator):
    """inertia_ = Σ_i |x_i − c_a(i)|² over the normalised rows; a zero row (norm 0 stays 0)
    is at distance 1 from a unit centroid, not sqrt(2 − 2·0)."""
    X, _ = blobs([300, 200, 100], d=12, spread=0.4, seed=7)
    X[5] = 0
    km = Estimator(3, random_state=0).fit(X)
    d2 = ((X - km.cluster_centers_[km.labels_]).astype(np.float64) ** 2).sum()
    assert km.inertia_ == pytest.approx(d2, rel=1e-5)
    assert km.score(X) >= -km.inertia_ - 1e-3  # the nearest centroid is at least as close as the balanced one


@pytest.mark.parametrize("use_faiss", [True, False])
def test_two_stage_both_backends(use_faiss):
    X, y = blobs([400, 250, 150], d=16, spread=0.3, seed=11)
    common = dict(n_fine=40, min_fine_size=20, use_faiss=use_faiss, random_state=0)
    by_centroids = TwoStageKMeans(2, balance_by="centroids", **common).fit(X)
    info = by_centroids.fit_info_
    assert info["backend"] == ("faiss" if use_faiss else "torch") and info["n_fine"] == 40
    per = info["centroids_per_cluster"]
    assert max(per) - min(per) <= 1 and sum(per) == 40
    assert by_centroids.fine_centers_.shape == (40, 16) and by_centroids.cluster_centers_.shape == (2, 16)
    # every sample follows its fine cluster
    for f in range(40):
        assert len(set(by_centroids.labels_[by_centroids.fine_labels_ == f])) <= 1
    by_samples = TwoStageKMeans(2, balance_by="samples", **common).fit(X)
    sizes = np.bincount(by_samples.labels_, minlength=2)
    stage2 = by_samples.fit_info_["stage2"]
    assert by_samples.fit_info_["sizes"] == sizes.tolist()
    # fine clusters are whole, so exact balance is not promised: the stated bound is
    fine = np.bincount(by_samples.fine_labels_, minlength=40)
    assert stage2["polish_complete"] and stage2["gap_bound"] == fine[by_samples.fine_to_coarse_ == sizes.argmax()].min()
    assert sizes.max() - sizes.min() <= stage2["gap_bound"] <= fine.max()
    assert by_samples.fit_info_["balance"] == pytest.approx(sizes.max() / sizes.min())


@pytest.mark.parametrize("seed", range(20))
def test_weighted_assignment_guarantee(seed):
    """The samples variant's stated guarantee: max − min ≤ the lightest item of the heaviest
    cluster (≤ the heaviest item), on instances from easy to lopsided."""
    rng = np.random.default_rng(seed)
    m, K = int(rng.integers(8, 300)), int(rng.integers(2, 9))
    w = np.ceil(rng.pareto(1.0 + seed % 3, size=m) * 5 + 1)  # heavy-tailed fine-cluster sizes
    S = (unit(rng.normal(size=(K, 5))) @ unit(rng.normal(size=(m, 5))).T).astype(np.float32)
    labels, stats = weighted_balanced_assignment(S, w)
    sizes = np.bincount(labels, weights=w, minlength=K)
    assert stats["polish_complete"]
    assert stats["gap_bound"] == w[labels == sizes.argmax()].min()
    assert sizes.max() - sizes.min() <= stats["gap_bound"] <= w.max()
    assert stats["weighted_sizes"] == pytest.approx(sizes.tolist()) and stats["prices"].shape == (K,)
    _, cut = weighted_balanced_assignment(S, w, prices=np.array([5.0] + [0.0] * (K - 1)), max_moves=0)
    assert not cut["polish_complete"] or cut["polish_moves"] == 0


def test_two_stage_adapts_fine_clusters_to_the_data(capfd):
    """The paper's m = 1,024 on 1,760 points would give faiss under 2 points per fine cluster
    (it warns on stderr); m adapts to N // 39 and fit_info_ records it."""
    X, _ = blobs([900, 860], d=32, spread=0.6, seed=2)
    ts = TwoStageKMeans(2, n_fine=1024, random_state=0, use_faiss=True).fit(X)
    assert ts.fit_info_["n_fine"] == 1760 // 39 == 45 and ts.fine_centers_.shape == (45, 32)
    assert ts.fit_info_["n_fine_asked"] == 1024
    assert "WARNING" not in capfd.readouterr().err
    assert TwoStageKMeans(2, n_fine=16, random_state=0).fit(X).fit_info_["n_fine"] == 16  # the cap holds
    small = TwoStageKMeans(4, random_state=0).fit(X[:100])  # under 39 per cluster: m = K, never below
    assert small.fit_info_["n_fine"] == 4


def test_refit_on_other_width_and_predict_width_check():
    km = BalancedKMeans(2, random_state=0).fit(blobs([10, 10], d=4)[0])
    km.fit(blobs([10, 10], d=6)[0])  # a refit may change the width
    assert km.cluster_centers_.shape == (2, 6) and km.n_features_in_ == 6
    with pytest.raises(ValueError, match="X has 4 features, but BalancedKMeans is expecting 6 features"):
        km.predict(np.ones((3, 4), np.float32))


def test_bench_kmeans_times_the_whole_fit_on_both_sides():
    """The benchmark's headline is whole fit / whole fit, and per iteration is total /
    iterations on both sides (not our internal iteration time over faiss's total)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "bench_kmeans.py"
    spec = importlib.util.spec_from_file_location("bench_kmeans", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    X = bench.sphere_mixture(3000, 16, components=8)
    [row] = bench.compare(X, 4, iters=4, seed=0, repeats=1, variants=[("", {})])
    f, o = row["faiss"], row["ours"]
    assert row["ratio_whole_fit"] == o["total"] / f["total"]
    # faiss stops once its objective no longer changes: the iterations it ran, not the cap
    assert f["per_iter"] == f["total"] / f["iters"] and 1 <= f["iters"] <= 4
    separated = bench.sphere_mixture(2000, 16, components=4, noise=0.05)
    assert bench.faiss_run(separated, 4, iters=30, seed=0)["iters"] < 30
    assert o["per_iter"] == o["total"] / o["iters"] and 1 <= o["iters"] <= 4
    assert row["ratio_per_iter"] == o["per_iter"] / f["per_iter"]
    # ours is the whole fit: initialisation, every iteration and the finish are inside it
    assert o["total"] >= o["seconds_init"] + o["seconds_iterations"] + o["seconds_finish"]
    assert o["max"] - o["min"] <= 1 and f["with_labels"] >= f["total"]


def test_scores_are_the_same_whichever_product_the_thread_count_picks():
    """`_scores` multiplies tall-skinny on several threads and wide on one: same (K, N) matrix."""
    import torch

    from ddfm.kmeans.scores import _scores

    gen = torch.Generator().manual_seed(0)
    X, C = torch.randn(1000, 24, generator=gen), torch.randn(5, 24, generator=gen)
    threads = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = _scores(C, X, spherical=False, chunk_size=300).clone()
    finally:
        torch.set_num_threads(threads)
    assert got[1].shape == (5, 1000)
    torch.testing.assert_close(got[1], got[2])
    torch.testing.assert_close(got[1], 2 * C @ X.T - (C * C).sum(1)[:, None])


def test_scores_in_tall_blocks_and_of_gathered_rows():
    """More rows than one tall block (4,096) and gathered rows: the same scores as one product."""
    import torch

    from ddfm.kmeans.scores import _BlockScores, _scores, _scores_of

    gen = torch.Generator().manual_seed(1)
    X, C = torch.randn(9000, 16, generator=gen), torch.randn(6, 16, generator=gen)
    rows = torch.randperm(9000, generator=gen)[:5000].sort().values
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert _BlockScores(C, 9000).tall == (n > 1)
            torch.testing.assert_close(_scores(C, X, spherical=True, chunk_size=8192), C @ X.T)
            torch.testing.assert_close(_scores_of(C, X, rows), C @ X[rows].T)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
def test_scores_at_eight_clusters_or_more_with_and_without_onednn(onednn, threads, monkeypatch):
    """K ≥ 8 multiplies by oneDNN's product where torch has it, else by the BLAS (a torch
    without it, by monkeypatch): either way one pass gives the float64 product's scores up to
    float32 rounding, oneDNN computes them when it is there, and gathered rows get bit for
    bit the scores a full pass gave them (the bounds of BalancedKMeans compare the two)."""
    import torch

    from ddfm.kmeans import scores

    op = scores._onednn_linear()
    if onednn and op is None:
        pytest.skip("this torch build has no oneDNN linear")
    calls = []

    def counted(x, w):
        calls.append(len(x))
        return op(x, w)

    monkeypatch.setattr(scores, "_onednn_linear", lambda: counted if onednn else None)
    gen = torch.Generator().manual_seed(4)
    X, C = torch.randn(9000, 64, generator=gen), torch.randn(12, 64, generator=gen)
    rows = torch.randperm(9000, generator=gen)[:5000].sort().values
    want = (C.double() @ X.double().T).float()  # (K, N)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        block = scores._BlockScores(C, 9000)
        assert (block.onednn is not None) == onednn and block.tall == (threads > 1 and not onednn)
        assert scores._BlockScores(C[:7], 9000).onednn is None  # K < 8: the BLAS either way
        full = scores._scores(C, X, spherical=True, chunk_size=8192)
        torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
        assert sum(calls) == (9000 if onednn else 0)  # every row, once, by oneDNN when it is there
        euclidean = scores._scores(C, X, spherical=False, chunk_size=5000)
        torch.testing.assert_close(euclidean, 2 * want - (C * C).sum(1)[:, None], rtol=1e-5, atol=1e-4)
        assert torch.equal(scores._scores_of(C, X, rows), full[:, rows])
    finally:
        torch.set_num_threads(before)


def test_onednn_linear_is_the_product_or_none_when_onednn_is_unavailable(monkeypatch):
    """The probe returns oneDNN's x @ w.T where torch has it, and None (the BLAS then) where
    oneDNN is unavailable or the op is missing."""
    import torch

    from ddfm.kmeans import scores

    probe = scores._onednn_linear.__wrapped__  # uncached
    op = probe()
    if op is not None:
        x, w = torch.randn(50, 16), torch.randn(9, 16)
        torch.testing.assert_close(op(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert probe() is None
    monkeypatch.undo()

    class NoMkldnn:
        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(torch.ops, "mkldnn", NoMkldnn())
    assert probe() is None


def test_cluster_sums_split_over_threads_are_float64_sums():
    import torch

    from ddfm.kmeans.scores import _cluster_sums

    gen = torch.Generator().manual_seed(2)
    X, labels = torch.randn(70_000, 8, generator=gen), torch.randint(0, 5, (70_000,), generator=gen)
    w = torch.rand(70_000, generator=gen)
    want = torch.zeros(5, 8, dtype=torch.float64).index_add_(0, labels, X.double() * w.double()[:, None])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # 70,000 points: one part on one thread, two on two
            torch.set_num_threads(n)
            got = _cluster_sums(X, labels, 5, w)
            assert got.dtype == torch.float64  # accumulated in float64, not summed in float32 first
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    finally:
        torch.set_num_threads(threads)


def _true_gaps(S, prices, labels):
    """(s_ai − λ_a) − max_{j≠a}(s_ji − λ_j) in float64, (n,)."""
    R = S.astype(np.float64) - np.asarray(prices, dtype=np.float64)[:, None]
    own = R[labels, np.arange(S.shape[1])]
    R[labels, np.arange(S.shape[1])] = -np.inf
    return own - R.max(0)


@pytest.mark.parametrize("tolerance", [0, 200])
def test_far_off_start_sampled_newton_chords_exact_and_gap_bounds(tolerance):
    # unequal blobs and zero prices: far off, so the prices come from Newton steps on a
    # sample and chord steps on every point; the result is still the LP optimum, and the
    # gaps handed to BalancedKMeans's bounds are lower bounds of the true ones
    import torch

    from ddfm.kmeans.assign import _assign

    X, _ = blobs([9000, 4000, 2500, 1000], d=8, spread=0.5, seed=3)
    C = unit(np.random.default_rng(3).normal(size=(4, 8)))
    S = (C @ X.T).astype(np.float32)
    labels, prices, stats = _assign(torch.from_numpy(S), np.zeros(4), tolerance=tolerance)
    assert stats["newton_steps"] > 0 and stats["chord_steps"] >= 1
    gaps = stats["gaps"].numpy()
    assert (gaps <= _true_gaps(S, prices, labels) + 1e-5).all()
    sizes = np.bincount(labels, minlength=4)
    if tolerance:  # a warm-up step: within the tolerance, price-induced (gaps ≥ 0)
        assert stats["excess"] <= tolerance and (gaps >= -1e-6).all()
    else:
        assert sizes.max() - sizes.min() <= 1
        assert S.astype(np.float64)[labels, np.arange(S.shape[1])].sum() == pytest.approx(lp_optimum(S), abs=1e-3)


@pytest.mark.slow
def test_working_set_gap_bounds_after_the_repair():
    # a warm start near the optimum: a working set, the repair, and the gaps returned for
    # every point (exact on the working set, lowered by the price moves elsewhere)
    import torch

    from ddfm.kmeans.assign import _assign

    rng = np.random.default_rng(4)
    S = (unit(rng.normal(size=(6, 5))) @ unit(rng.normal(size=(10_000, 5))).T).astype(np.float32)
    _, prices, _ = balanced_assignment(S)
    labels, new_prices, stats = _assign(torch.from_numpy(S), prices + rng.normal(scale=0.01, size=6))
    assert stats["working_set"] < 10_000 and not stats["full_repair"]
    gaps, true = stats["gaps"].numpy(), _true_gaps(S, new_prices, labels)
    assert (gaps <= true + 1e-5).all()
    assert (gaps < true - 1e-4).any()  # the locked points' bounds are bounds, not the gaps
    assert S.astype(np.float64)[labels, np.arange(10_000)].sum() == pytest.approx(lp_optimum(S), abs=1e-3)

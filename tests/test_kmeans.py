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
    km = BalancedKMeans(k, seed=1, max_iter=10).fit(X)
    sizes = np.bincount(km.labels_, minlength=k)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    assert km.fit_info_["sizes"] == sizes.tolist()
    assert len(km.fit_info_["objective"]) == km.n_iter_ == len(km.fit_info_["seconds"])


def test_unbalanced_blobs_still_get_balanced_final_labels():
    X, y = blobs([300, 100], seed=3)
    km = BalancedKMeans(2, seed=0).fit(X)
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
    common = dict(seed=1, max_iter=12, tol=0.0, warmup_tol=None)
    full = BalancedKMeans(8, algorithm="full", **common).fit(X)
    bounded = BalancedKMeans(8, algorithm="bounds", **common).fit(X)
    assert min(bounded.fit_info_["scored"]) < len(X) // 4
    assert set(full.fit_info_["scored"]) == {len(X)}
    assert np.array_equal(full.labels_, bounded.labels_)
    np.testing.assert_allclose(full.cluster_centers_, bounded.cluster_centers_, atol=1e-6)
    np.testing.assert_allclose(full.fit_info_["objective"], bounded.fit_info_["objective"], rtol=1e-9)


def test_warmup_steps_then_exact_steps():
    X, _ = blobs([9000, 7000, 4000], d=24, spread=0.7, seed=6)
    warm = BalancedKMeans(8, seed=1).fit(X)
    exact = warm.fit_info_["exact"]
    assert not exact[0] and exact[-1]  # warm-up first, exact from the switch on
    assert exact == sorted(exact)
    sizes = np.bincount(warm.labels_, minlength=8)
    assert sizes.max() - sizes.min() <= 1
    cold = BalancedKMeans(8, seed=1, warmup_tol=None).fit(X)
    assert all(cold.fit_info_["exact"])
    # the warm-up changes the path, not the quality
    assert warm.fit_info_["objective"][-1] == pytest.approx(cold.fit_info_["objective"][-1], rel=2e-3)
    # the last step is exact even when max_iter cuts the warm-up short
    short = BalancedKMeans(8, seed=1, max_iter=2).fit(X)
    assert short.fit_info_["exact"] == [False, True]
    assert np.bincount(short.labels_, minlength=8).max() - np.bincount(short.labels_, minlength=8).min() <= 1
    with pytest.raises(ValueError, match="warmup_tol"):
        BalancedKMeans(2, warmup_tol=-1.0).fit(X[:10])
    with pytest.raises(ValueError, match="algorithm"):
        BalancedKMeans(2, algorithm="elkan").fit(X[:10])


def test_quality_close_to_unbalanced_kmeans_and_recovers_blobs():
    from sklearn.metrics import adjusted_rand_score

    X, y = blobs([150, 150, 150, 150], seed=5)
    km = BalancedKMeans(4, seed=0).fit(X)
    assert adjusted_rand_score(y, km.labels_) == 1.0
    C, unb, _ = spherical_kmeans(X, 4, n_iter=30, seed=0)
    unb_obj = (X * C[unb]).sum(1).mean()
    assert km.fit_info_["objective"][-1] >= unb_obj - 1e-3
    assert km.inertia_ == pytest.approx(((X - km.cluster_centers_[km.labels_]) ** 2).sum(), rel=1e-4)


def test_deterministic_and_seed_matters():
    X, _ = blobs([200, 120, 80], d=10, spread=0.5, seed=2)
    a, b = BalancedKMeans(3, seed=4).fit(X), BalancedKMeans(3, seed=4).fit(X)
    assert np.array_equal(a.labels_, b.labels_) and np.array_equal(a.cluster_centers_, b.cluster_centers_)


def test_predict_routes_to_nearest_cosine_and_balanced_option():
    X, _ = blobs([90, 60], d=12, spread=0.4, seed=9)
    km = BalancedKMeans(3, seed=0).fit(X)
    Z = np.random.default_rng(1).normal(size=(41, 12)).astype(np.float32) * 3  # not unit
    cos = unit(Z) @ km.cluster_centers_.T
    assert np.array_equal(km.predict(Z), cos.argmax(1))
    bal = km.predict(Z, balanced=True)
    assert np.bincount(bal, minlength=3).max() - np.bincount(bal, minlength=3).min() <= 1
    assert np.array_equal(km.fit_predict(X), km.labels_)
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1, atol=1e-5)


def test_transform_shape_and_values():
    X, _ = blobs([30, 30], seed=1)
    km = BalancedKMeans(2, seed=0).fit(X)
    D = km.transform(X[:7])
    assert D.shape == (7, 2)
    np.testing.assert_allclose(D, np.sqrt(np.clip(2 - 2 * X[:7] @ km.cluster_centers_.T, 0, None)), atol=1e-3)


def test_chunking_gives_same_result():
    X, _ = blobs([77, 50, 40], d=8, spread=0.5, seed=4)
    a = BalancedKMeans(3, seed=2, chunk_size=1 << 16).fit(X)
    b = BalancedKMeans(3, seed=2, chunk_size=13).fit(X)
    assert np.array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    assert np.array_equal(a.predict(X), b.predict(X))


def test_euclidean_mode_balanced():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (60, 3)), rng.normal(8, 1, (20, 3))]).astype(np.float32)
    km = BalancedKMeans(2, spherical=False, seed=0).fit(X)
    assert np.bincount(km.labels_).tolist() == [40, 40]
    assert km.inertia_ == pytest.approx(((X - km.cluster_centers_[km.labels_]) ** 2).sum(), rel=1e-4)


def test_sklearn_contract():
    from sklearn.base import clone

    km = BalancedKMeans(5, seed=3, max_iter=7)
    assert clone(km).get_params() == km.get_params()
    assert km.set_params(n_clusters=4).n_clusters == 4
    assert not hasattr(km, "labels_")  # __init__ stores hyper-parameters only
    ts = TwoStageKMeans(3, n_fine=64, balance_by="centroids")
    assert clone(ts).get_params() == ts.get_params()
    with pytest.raises(ValueError, match="not fitted"):
        km.predict(np.zeros((2, 3), np.float32))


def test_bad_input():
    X, _ = blobs([5, 5])
    with pytest.raises(ValueError, match="larger than the number of samples"):
        BalancedKMeans(11).fit(X)
    with pytest.raises(ValueError, match="n_clusters"):
        BalancedKMeans(0).fit(X)
    with pytest.raises(ValueError, match="2-D"):
        BalancedKMeans(2).fit(X[0])
    with pytest.raises(ValueError, match="NaN"):
        BalancedKMeans(2).fit(np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="balance_by"):
        TwoStageKMeans(2, n_fine=4, balance_by="tokens").fit(X)


@pytest.mark.parametrize("use_faiss", [True, False])
def test_two_stage_both_backends(use_faiss):
    X, y = blobs([400, 250, 150], d=16, spread=0.3, seed=11)
    by_centroids = TwoStageKMeans(2, n_fine=40, balance_by="centroids", use_faiss=use_faiss, seed=0).fit(X)
    info = by_centroids.fit_info_
    assert info["backend"] == ("faiss" if use_faiss else "torch")
    per = info["centroids_per_cluster"]
    assert max(per) - min(per) <= 1 and sum(per) == 40
    assert by_centroids.fine_centers_.shape == (40, 16) and by_centroids.cluster_centers_.shape == (2, 16)
    # every sample follows its fine cluster
    for f in range(40):
        assert len(set(by_centroids.labels_[by_centroids.fine_labels_ == f])) <= 1
    by_samples = TwoStageKMeans(2, n_fine=40, balance_by="samples", use_faiss=use_faiss, seed=0).fit(X)
    sizes = np.bincount(by_samples.labels_, minlength=2)
    assert by_samples.fit_info_["sizes"] == sizes.tolist()
    # fine clusters are whole, so exact balance is not promised; within the largest fine cluster
    assert sizes.max() - sizes.min() <= max(np.bincount(by_samples.fine_labels_))
    assert by_samples.fit_info_["balance"] == pytest.approx(sizes.max() / sizes.min())


def test_weighted_assignment_near_equal():
    rng = np.random.default_rng(0)
    w = rng.integers(1, 20, size=200).astype(float)
    S = (unit(rng.normal(size=(4, 5))) @ unit(rng.normal(size=(200, 5))).T).astype(np.float32)
    labels, stats = weighted_balanced_assignment(S, w)
    sizes = np.bincount(labels, weights=w, minlength=4)
    assert sizes.max() - sizes.min() <= w.max()
    assert stats["weighted_sizes"] == pytest.approx(sizes.tolist()) and stats["prices"].shape == (4,)


def test_refit_on_other_width_and_predict_width_check():
    km = BalancedKMeans(2, seed=0).fit(blobs([10, 10], d=4)[0])
    km.fit(blobs([10, 10], d=6)[0])  # a refit may change the width
    assert km.cluster_centers_.shape == (2, 6)
    with pytest.raises(ValueError, match="fitted on 6"):
        km.predict(np.ones((3, 4), np.float32))

"""The compiled per-point kernels of ddfm.kmeans against plain numpy references: bit for bit,
on random scores with ties, one cluster, a few points, and ranges split over threads."""

import numpy as np
import pytest
import torch

from ddfm.kmeans import (
    _cluster_sums,
    _kmeans_pp,
    _kth_smallest,
    _label_gaps,
    _Limits,
    _locked_room,
    _MoveCosts,
    _near_boundary,
    _pp_kernel,
    _price_sweep,
    _relax,
    _select_threshold,
    _top2,
    _update_sums,
)

CASES = [(1, 50), (2, 7), (3, 1000), (16, 70_000), (64, 3000)]  # (K, n); 70,000: two threads' ranges


def scores(K, n, seed, ties=False):
    rng = np.random.default_rng(seed)
    S = rng.random((K, n), dtype=np.float32)
    if ties:  # equal scores and equal reduced scores
        S = np.round(S * 16).astype(np.float32) / 16
    prices = np.round(rng.random(K) * 8) / 64 if ties else rng.random(K) * 0.2
    return S, prices, rng


def reduced(S, prices):
    return S - prices.astype(np.float32)[:, None]  # float32, as the kernels


@pytest.mark.parametrize("K,n", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_top2_and_label_gaps_match_numpy(K, n, ties):
    S, prices, rng = scores(K, n, K * n, ties)
    V = reduced(S, prices)
    labels, gaps = _top2(torch.from_numpy(S), prices)
    srt = np.sort(V, axis=0)
    np.testing.assert_array_equal(labels.numpy(), V.argmax(0))  # the first maximum on ties
    np.testing.assert_array_equal(gaps.numpy(), srt[-1] - srt[-2] if K > 1 else np.full(n, np.inf, np.float32))
    np.testing.assert_array_equal(_top2(torch.from_numpy(S), prices, gaps=False)[0].numpy(), V.argmax(0))

    some = torch.from_numpy(rng.integers(0, K, n))
    own = V[some.numpy(), np.arange(n)]
    others = V.copy()
    others[some.numpy(), np.arange(n)] = -np.inf
    np.testing.assert_array_equal(_label_gaps(torch.from_numpy(S), prices, some).numpy(), own - others.max(0))


@pytest.mark.parametrize("K,n", CASES)
def test_near_boundary_and_locked_room_match_numpy(K, n):
    S, prices, rng = scores(K, n, 7 * K + n, ties=True)
    V = reduced(S, prices)
    labels = rng.integers(0, K, n)
    own = V[labels, np.arange(n)]
    G = own[None, :] - V  # (K, n) float32: how far each point is from each other cluster
    h = 0.1
    W = np.zeros((K, K))
    for j in range(K):
        near = (G[j] < np.float32(h)) & (labels != j)
        W[j] = np.bincount(labels[near], minlength=K)
    np.testing.assert_array_equal(_near_boundary(torch.from_numpy(S), prices, torch.from_numpy(labels), h), W)

    free = np.sort(rng.choice(n, n // 3, replace=False))
    locked = np.ones(n, bool)
    locked[free] = False
    room = np.full((K, K), np.inf, np.float32)
    for a in range(K):
        members = locked & (labels == a)
        if members.any():
            room[a] = G[:, members].min(1)
    got = _locked_room(torch.from_numpy(S), prices, torch.from_numpy(labels), torch.from_numpy(free))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, room.astype(np.float64))


def numpy_price_sweep(S, prices, lo, hi, base, limits=None):
    """The Gauss–Seidel sweep in numpy, as ddfm had it before its kernel: the reference."""
    K, n = S.shape
    suffix = np.empty_like(S)
    np.subtract(S[K - 1], prices[K - 1], out=suffix[K - 1])
    for k in range(K - 2, -1, -1):
        np.maximum(suffix[k + 1], S[k] - prices[k], out=suffix[k])
    running = np.full(n, -np.inf, dtype=S.dtype)
    labels = np.zeros(n, dtype=np.int64)
    changed = 0
    for k in range(K):
        other = np.maximum(running, suffix[k + 1]) if k + 1 < K else running
        margin = S[k] - other
        count = base[k] + int(np.count_nonzero(margin > prices[k]))
        if count < lo or count > hi:
            t = int(min(max(count, lo), hi) - base[k])
            srt = np.sort(margin)[::-1].astype(np.float64)
            if t >= n:
                price = float(margin.min()) - 1.0
            elif t <= 0:
                price = float(margin.max()) + 1.0
            elif t == int((margin > np.float32(prices[k])).sum()):
                price = float(prices[k])
            else:
                price = 0.5 * (srt[t - 1] + srt[t])
            if limits is not None:  # as close as δ_k − δ_j < room[k, j] and δ_j − δ_k < room[j, k] allow
                d = prices - limits.anchor
                others = np.arange(K) != k
                upper = (d[others] + limits.room[k, others]).min()
                lower = (d[others] - limits.room[others, k]).max()
                price = float(limits.anchor[k] + min(max(price - limits.anchor[k], lower), upper))
            changed += price != prices[k]
            prices[k] = price
        value = S[k] - np.float32(prices[k])
        labels[value > running] = k
        np.maximum(running, value, out=running)
    return changed, labels


@pytest.mark.parametrize("seed", range(40))
def test_price_sweep_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    K, n = int(rng.integers(2, 20)), int(rng.integers(20, 3000))
    S, prices, _ = scores(K, n, seed, ties=seed % 3 == 0)
    N = n + int(rng.integers(0, 100))
    base = np.bincount(rng.integers(0, K, N - n), minlength=K).astype(np.int64)
    lo, hi = N // K, -(-N // K)
    limits = None
    if seed % 2:
        room = rng.random((K, K)) * 0.1
        room[rng.random((K, K)) < 0.3] = np.inf
        limits = _Limits(prices, room)
    mine, ref = prices.copy(), prices.copy()
    for _ in range(3):
        changed, labels = _price_sweep(S, mine, lo, hi, base, limits)
        want_changed, want_labels = numpy_price_sweep(S, ref, lo, hi, base, limits)
        assert changed == want_changed
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(mine, ref)


def test_select_threshold_edges_and_ties():
    m = np.array([0.5, 0.25, 0.25, 0.75, 0.0], np.float32)
    assert _select_threshold(m, 5, 0.3) == -1.0  # everything above
    assert _select_threshold(m, 0, 0.3) == 1.75  # nothing above
    assert _select_threshold(m, 2, 0.3) == 0.3  # already two above: the price stays
    assert _select_threshold(m, 1, 0.3) == 0.625  # raised between 0.75 and 0.5
    assert _select_threshold(m, 4, 0.3) == 0.125  # lowered between 0.25 and 0.0
    assert _select_threshold(m, 3, 0.3) == 0.25  # a tie: as close as the ties permit
    third = np.float32(1 / 3)  # float64 midpoints of float32 margins, not float32 ones
    assert _select_threshold(np.array([third, 0.0], np.float32), 1, 1.0) == 0.5 * float(third)


def test_incremental_sums_over_threads_match_a_recount():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(50_000, 8, generator=gen)
    prev = torch.randint(0, 6, (50_000,), generator=gen)
    sums = torch.zeros(6, 8, dtype=torch.float64).index_add_(0, prev, X.double())
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for moved in (10, 3000):  # one part; a part per thread (each at least 2,048 changes)
                labels = prev.clone()
                rows = torch.randperm(50_000, generator=gen)[:moved]
                labels[rows] = (labels[rows] + 1) % 6
                want = torch.zeros(6, 8, dtype=torch.float64).index_add_(0, labels, X.double())
                torch.testing.assert_close(_update_sums(X, labels, prev, sums, 6), want, rtol=1e-5, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("K,n", [(1, 5), (3, 40), (16, 5000)])
def test_cheapest_moves_match_numpy(K, n):
    S, _, rng = scores(K, n, 11 * K + n, ties=True)
    labels = rng.integers(0, max(1, K - 1), n)  # the last cluster (K > 1) is empty
    costs = _MoveCosts(S, labels.copy())
    E, who = np.full((K, K), np.inf), np.full((K, K), -1)
    for a in range(K):
        members = np.flatnonzero(labels == a)
        if len(members):
            loss = S[a, members][None, :] - S[:, members]  # (K, n_a) float32
            best = loss.argmin(1)  # the first (lowest-numbered) point on ties
            E[a], who[a] = loss[np.arange(K), best], members[best]
            E[a, a], who[a, a] = np.inf, -1
    np.testing.assert_array_equal(costs.E, E)
    np.testing.assert_array_equal(costs.who, who)


def numpy_relax(E, dist, prev, rounds):
    """Bellman–Ford rounds as ddfm had them in numpy: the reference for _relax."""
    for _ in range(rounds):
        cand = dist[:, None] + E
        a_best = cand.argmin(0)
        best = cand[a_best, np.arange(len(dist))]
        better = best < dist - 1e-9
        if not better.any():
            return dist, prev, True
        dist, prev = np.where(better, best, dist), np.where(better, a_best, prev)
    return dist, prev, False


@pytest.mark.parametrize("seed", range(30))
def test_relax_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 12))
    E = np.round(rng.random((K, K)) * 4, 1) - (0.3 if seed % 2 else 0)  # ties; some negative edges
    E[rng.random((K, K)) < 0.3] = np.inf
    np.fill_diagonal(E, np.inf)
    sources = rng.random(K) < 0.3
    for rounds in (K - 1, K, 2):
        dist, prev = np.where(sources, 0.0, np.inf), np.full(K, -1)
        want = numpy_relax(E, dist.copy(), prev.copy(), max(rounds, 0))
        settled = _relax(E, dist, prev, max(rounds, 0))
        np.testing.assert_array_equal(dist, want[0])
        np.testing.assert_array_equal(prev, want[1])
        assert settled == want[2]


@pytest.mark.parametrize("seed", range(40))
def test_kth_smallest_matches_a_sort(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
    if seed % 3 == 0:
        x[: n // 2] = 0  # one bucket holds half the values
    if seed % 5 == 0:
        x[::3] = np.inf if seed % 2 else -np.inf
    if seed % 7 == 0:
        x[::2] = -0.0
    if seed % 11 == 0:
        x[:] = 1.5  # all equal
    ks = {1, n, int(rng.integers(1, n + 1))}
    for k in ks:
        assert _kth_smallest(torch.from_numpy(x), k) == float(np.sort(x)[k - 1]) == float(torch.from_numpy(x).kthvalue(k).values)
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match="outside"):
            _kth_smallest(torch.from_numpy(x), bad)


def test_kmeans_pp_distances_match_numpy():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3000, 37)).astype(np.float32)
    d2 = np.full(3000, np.inf)
    d2[::2] = 0.5
    want = np.minimum(d2, ((X.astype(np.float64) - X[7].astype(np.float64)) ** 2).sum(1))
    _pp_kernel(X, X[7].copy(), 0, 1000, d2)
    _pp_kernel(X, X[7].copy(), 1000, 3000, d2)  # two ranges, as on two threads
    np.testing.assert_allclose(d2, want, rtol=1e-5, atol=1e-5)
    C = _kmeans_pp(torch.from_numpy(X), 6, False, np.random.default_rng(0))
    assert len({tuple(c) for c in C.numpy().tolist()}) == 6  # distinct points of X: d2 = 0 is never drawn again
    assert all(np.any(np.all(X == c, axis=1)) for c in C.numpy())


def test_cluster_sums_are_float64_and_weighted():
    rng = np.random.default_rng(6)
    X = torch.from_numpy(rng.standard_normal((20_000, 9)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, 20_000))
    w = torch.from_numpy(rng.random(20_000))
    got = _cluster_sums(X, labels, 4, w)
    assert got.dtype == torch.float64
    want = torch.zeros(4, 9, dtype=torch.float64).index_add_(0, labels, X.double() * w[:, None])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)

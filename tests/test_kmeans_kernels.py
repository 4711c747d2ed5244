"""The compiled kernels of ddfm/kmeans/kernels.py against plain numpy references: bit for bit,
on random scores with ties, one cluster, a few points, and ranges split over threads."""

import bisect

import numpy as np
import pytest
import torch

from ddfm.kmeans.assign import _repair, _Uncertain
from ddfm.kmeans.estimators import _kmeans_pp
from ddfm.kmeans.kernels import _cheapest_moves, _pp_kernel, _relax, _repair_kernel, _select_threshold
from ddfm.kmeans.prices import (
    _kth_smallest,
    _label_gaps,
    _Limits,
    _locked_room,
    _near_boundary,
    _price_sweep,
    _top2,
)
from ddfm.kmeans.scores import _update_sums

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
            for moved in (10, 3000, 20_000):  # one part; a part per thread (≥ 2,048 changes each); > N/5: a recount
                labels = prev.clone()
                rows = torch.randperm(50_000, generator=gen)[:moved]
                labels[rows] = (labels[rows] + 1) % 6
                want = torch.zeros(6, 8, dtype=torch.float64).index_add_(0, labels, X.double())
                got = _update_sums(X, labels, prev, sums, 6)
                assert got.dtype == torch.float64
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)  # float64 throughout
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("K,n", [(1, 5), (3, 40), (16, 5000)])
def test_cheapest_moves_match_numpy(K, n):
    S, _, rng = scores(K, n, 11 * K + n, ties=True)
    labels = rng.integers(0, max(1, K - 1), n)  # the last cluster (K > 1) is empty
    got_E, got_who = np.full((K, K), np.float32(np.inf)), np.full((K, K), -1)
    _cheapest_moves(S, labels, got_E, got_who)
    E, who = np.full((K, K), np.inf), np.full((K, K), -1)
    for a in range(K):
        members = np.flatnonzero(labels == a)
        if len(members):
            loss = S[a, members][None, :] - S[:, members]  # (K, n_a) float32
            best = loss.argmin(1)  # the first (lowest-numbered) point on ties
            E[a], who[a] = loss[np.arange(K), best], members[best]
            E[a, a], who[a, a] = np.inf, -1
    np.testing.assert_array_equal(got_E, E)
    np.testing.assert_array_equal(got_who, who)


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


class NumpyMoveCosts:
    """The repair's move costs as ddfm had them in Python (the reference for _repair_kernel):
    E[a, b] = min_{i∈a}(s_ia − s_ib), who[a, b] that point, and per edge a sorted short list
    of its cheapest candidates, built on first need."""

    def __init__(self, S, labels, depth=64):
        self.S, self.labels, self.depth = S, labels, depth
        K = S.shape[0]
        E32, self.who = np.full((K, K), np.float32(np.inf)), np.full((K, K), -1, dtype=np.int64)
        _cheapest_moves(S, labels, E32, self.who)
        self.E, self.lists = E32.astype(np.float64), {}

    def build(self, a, b):
        members = np.flatnonzero(self.labels == a)
        costs = self.S[a, members] - self.S[b, members]
        idx = np.argsort(costs, kind="stable")[:self.depth]
        self.lists[a, b] = [costs[idx].astype(np.float64).tolist(), members[idx].tolist(), len(costs) <= self.depth]

    def head(self, a, b):
        if (a, b) not in self.lists:
            self.build(a, b)
        costs, points, complete = self.lists[a, b]
        while points and self.labels[points[0]] != a:
            del costs[0], points[0]
        if not points and not complete:
            self.build(a, b)
            costs, points, complete = self.lists[a, b]
        self.E[a, b], self.who[a, b] = (costs[0], points[0]) if points else (np.inf, -1)

    def move(self, i, a, b):
        self.labels[i] = b
        K = self.S.shape[0]
        for c in range(K):
            if c != a and self.who[a, c] == i:
                self.head(a, c)
        col = self.S[:, i].astype(np.float64)
        for c in range(K):
            if c == b:
                continue
            cost, entry = col[b] - col[c], self.lists.get((b, c))
            if entry is None:
                if cost < self.E[b, c]:
                    self.E[b, c], self.who[b, c] = cost, i
                continue
            costs, points, complete = entry
            if complete or (costs and cost <= costs[-1]):
                at = bisect.bisect_right(costs, cost)
                costs.insert(at, cost)
                points.insert(at, i)
                if len(points) > 4 * self.depth:
                    del costs[2 * self.depth:], points[2 * self.depth:]
                    entry[2] = False
                if at == 0:
                    self.E[b, c], self.who[b, c] = cost, i


def numpy_best_chain(E, sources, sinks, bound=None):
    K = len(E)
    Eb = E if bound is None else np.minimum(E, bound)
    dist, prev, settled = numpy_relax(Eb, np.where(sources, 0.0, np.inf), np.full(K, -1), K if bound is not None else K - 1)
    if bound is not None and not settled:
        raise _Uncertain()
    cost = np.where(sinks & (prev >= 0), dist, np.inf)
    b = int(cost.argmin())
    if not np.isfinite(cost[b]):
        return np.inf, []
    path = [b]
    while prev[path[-1]] >= 0 and len(path) <= K:
        path.append(int(prev[path[-1]]))
    path = path[::-1]
    if bound is not None and any(E[a, c] > bound[a, c] for a, c in zip(path[:-1], path[1:])):
        raise _Uncertain()
    return float(cost[b]), path


def numpy_repair(S, labels, sizes, lo, hi, max_moves, bound=None, depth=64):
    costs = NumpyMoveCosts(S, labels, depth)
    moves = improving = 0
    while moves + improving < max_moves:
        if (sizes < lo).any():
            sources, sinks, improve_only = sizes > lo, sizes < lo, False
        elif (sizes > hi).any():
            sources, sinks, improve_only = sizes > hi, sizes < hi, False
        else:
            sources, sinks, improve_only = sizes > lo, sizes < hi, True
        if not sources.any() or not sinks.any():
            break
        if improve_only and bound is not None and numpy_best_chain(np.minimum(costs.E, bound), sources, sinks)[0] >= -1e-6:
            break
        cost, path = numpy_best_chain(costs.E, sources, sinks, bound)
        if not path or (improve_only and cost >= -1e-6):
            break
        for i, a, b in [(int(costs.who[a, b]), a, b) for a, b in zip(path[:-1], path[1:])]:
            costs.move(i, a, b)
        sizes[path[0]] -= 1
        sizes[path[-1]] += 1
        improving += improve_only
        moves += not improve_only
    return {"repair_moves": moves, "improving_chains": improving}


@pytest.mark.parametrize("seed", range(24))
def test_repair_matches_the_python_repair(seed):
    """The same moves, in the same order, as the Python successive-shortest-paths repair:
    from far-off and nearly balanced price-induced labels, with ties, with N not a multiple
    of K (improving chains), a move budget, and locked points' bounds (the same uncertain
    verdict)."""
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 12))
    n = int(rng.integers(K, 3000 if seed % 4 else 400))
    S = rng.random((K, n), dtype=np.float32)
    if seed % 3 == 0:
        S = np.round(S * 8).astype(np.float32) / 8  # ties everywhere
    # price-induced labels, optimal for their own sizes (the repair's precondition: no
    # negative cycle): nearly balanced as after the price steps, or far off
    prices = np.zeros(K, np.float32) if seed % 2 else (rng.random(K) * 0.8).astype(np.float32)
    labels = (S - prices[:, None]).argmax(0)
    lo, hi = n // K, -(-n // K)
    bound = None
    if seed % 5 == 4:
        bound = (rng.random((K, K)) * (0.5 if seed % 10 == 4 else 3.0)).astype(np.float64)
    max_moves = 10 * n if seed % 7 else 5
    got_labels, want_labels = labels.copy(), labels.copy()
    got_sizes = np.bincount(labels, minlength=K).astype(np.int64)
    want_sizes = got_sizes.copy()
    try:
        want = numpy_repair(S, want_labels, want_sizes, lo, hi, max_moves, bound)
    except _Uncertain:
        want = "uncertain"
    try:
        got = _repair(S, got_labels, got_sizes, lo, hi, max_moves, bound)
    except _Uncertain:
        got = "uncertain"
    assert got == want
    np.testing.assert_array_equal(got_labels, want_labels)  # the moves made, also before an uncertain chain
    np.testing.assert_array_equal(got_sizes, want_sizes)
    if want != "uncertain" and max_moves > 5:
        assert got_sizes.min() >= lo and got_sizes.max() <= hi
        np.testing.assert_array_equal(got_sizes, np.bincount(got_labels, minlength=K))


@pytest.mark.parametrize("seed", range(12))
def test_repair_with_short_lists_matches_the_python_repair(seed):
    """Lists of depth 2: they run dry and are rebuilt, outgrow four times their depth and are
    cut, and move to the front of their buffer, all often; the same moves as in Python."""
    rng = np.random.default_rng(100 + seed)
    K, n = int(rng.integers(3, 8)), int(rng.integers(200, 2000))
    S = rng.random((K, n), dtype=np.float32)
    labels = (S - (rng.random(K) * 0.8).astype(np.float32)[:, None]).argmax(0)
    sizes = np.bincount(labels, minlength=K).astype(np.int64)
    want_labels, want_sizes = labels.copy(), sizes.copy()
    want = numpy_repair(S, want_labels, want_sizes, n // K, -(-n // K), 10 * n, depth=2)
    moves, improving, uncertain = _repair_kernel(S, labels, sizes, n // K, -(-n // K), 10 * n, np.zeros((K, K)),
                                                 False, 2)
    assert (moves, improving, uncertain) == (want["repair_moves"], want["improving_chains"], 0)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(sizes, want_sizes)


def test_repair_lists_run_dry():
    """4,000 moves out of one cluster at depth 64: its edges' short lists run dry and are
    rebuilt from the members, again and again (lists of depth 2 are cut and compacted in the
    test above)."""
    rng = np.random.default_rng(1)
    K, n = 3, 6000
    S = rng.random((K, n), dtype=np.float32)
    labels = (S - np.array([-1, 0, 0], np.float32)[:, None]).argmax(0)  # price-induced: all in cluster 0
    sizes = np.bincount(labels, minlength=K).astype(np.int64)
    want_labels, got_labels = labels.copy(), labels.copy()
    want = numpy_repair(S, want_labels, sizes.copy(), n // K, n // K, 10 * n)
    got = _repair(S, got_labels, sizes, n // K, n // K, 10 * n)
    assert got == want and got["repair_moves"] > 3000
    np.testing.assert_array_equal(got_labels, want_labels)


def test_repair_refuses_labels_with_a_negative_cycle():
    """Labels that are not optimal for their own sizes (not price-induced) can hold a
    negative cycle of moves; the chain search sees a cluster twice and says so, rather than
    moving points that are not where it thinks."""
    rng = np.random.default_rng(2)
    K, n = 10, 792
    S = rng.random((K, n), dtype=np.float32)
    labels = rng.integers(0, K // 2, n)  # random: not optimal for their sizes
    with pytest.raises(RuntimeError, match="negative cycle"):
        _repair(S, labels, np.bincount(labels, minlength=K).astype(np.int64), n // K, -(-n // K), 10 * n)

"""The numba kernels of the balanced k-means, and the thread pool that runs them.

Every loop over points that the other modules hand to compiled code is here: the member
sums, the top-2 of each point's K reduced scores, the locked room and boundary counts of
the dual prices, the Gauss–Seidel price sweep, the k-th smallest gap, k-means++'s
distances, and the whole exact repair by successive shortest paths (Ahuja, Magnanti &
Orlin, *Network Flows*, 1993, §9.7). They release the GIL, and :func:`_in_parts` runs one
on a range of points per torch thread. Each does the float32/float64 operations of the
numpy or Python code it replaced, in the same order (``tests/test_kmeans_kernels.py``
checks them bit for bit against that code). They are kept in this one file because
numba's on-disk cache (``cache=True``, in ``__pycache__`` beside this file, or numba's
user cache when that is read-only) checks only the file of the function it compiled: a
kernel that calls or inlines one from another file would keep stale machine code when
that file changes. The design is in docs/partitioning.md.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import torch

_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _in_parts(fn: Any, n: int, min_part: int = 32768) -> list:
    """``fn(a, b)`` over contiguous ranges [a, b) covering [0, n), one per torch thread when
    n is large (the kernels release the GIL), in order; returns their results."""
    global _POOL
    parts = max(1, min(torch.get_num_threads(), n // min_part))
    if parts == 1:
        return [fn(0, n)]
    if _POOL is None or _POOL[0] < parts:
        _POOL = (parts, ThreadPoolExecutor(parts, thread_name_prefix="ddfm-kmeans"))
    edges = np.linspace(0, n, parts + 1).astype(np.int64)
    return list(_POOL[1].map(fn, edges[:-1], edges[1:]))


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

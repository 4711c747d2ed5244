"""Exact balanced assignment: the prices on a working set, then the exact repair.

Solves  maximise Σ_i s(x_i, c_{a(i)})  subject to  ⌊N/K⌋ ≤ |{i : a(i) = k}| ≤ ⌈N/K⌉,
a transportation problem with K sinks, in two phases: dual prices (``prices.py``) on a
working set of the points nearest a boundary, the others locked, and then the exact repair
by successive shortest paths on the K-node cluster graph (Ahuja, Magnanti & Orlin,
*Network Flows*, 1993, §9.7; :func:`ddfm.kmeans.kernels._repair_kernel`). The result is an
optimum of the linear program (up to float32 rounding of the scores). See
docs/partitioning.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddfm.kmeans.kernels import _CYCLE, _DEPTH, _UNCERTAIN, _repair_kernel
from ddfm.kmeans.prices import (
    _argmax,
    _bounds,
    _counts,
    _excess,
    _label_gaps,
    _Limits,
    _locked_room,
    _newton_prices,
    _price_sweep,
    _smallest,
    _top2,
)


class _Uncertain(Exception):
    """The working set cannot certify the next move: redo the repair on every point."""


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
    run = _Assignment.start(S, prices, outer, tolerance, max_sweeps, max_rounds)
    if K == 1:
        return np.zeros(n, dtype=np.int64), run.prices, {**run.stats, "repair_moves": 0, "improving_chains": 0}
    run.prepare(sample, working_set)
    while (step := run.round()) == _AGAIN:
        pass
    if step == _WARM_UP:  # a warm-up step close enough, straight from a full pass
        return run.labels.numpy(), run.prices, {**run.stats, "repair_moves": 0, "improving_chains": 0,
                                                "excess": run.excess, "gaps": run.gaps}
    return run.exact(max_moves)


_AGAIN, _WARM_UP, _REPAIR = 0, 1, 2  # what a round of _Assignment found: go on, stop, repair


@dataclass
class _Assignment:
    """The working state of one :func:`_assign`, from round to round.

    Scores ``S`` (K, n) of the points that may move; ``N`` = n plus the ``outer`` points
    fixed outside S (``outer_counts`` (K,) per cluster, each with reduced gap ≥ ``T`` at the
    ``start`` prices); target sizes in [``lo``, ``hi``]. After a round: ``labels`` (n,)
    int64 and ``gaps`` (n,) float32 of its full pass at ``round_prices``, ``sizes`` (K,),
    ``excess``, and the working set ``free`` (its scores ``S_free``, (K, n_free)) with the
    ``limits`` that keep the locked points in place.
    """

    S: torch.Tensor
    prices: np.ndarray
    start_prices: np.ndarray
    outer_counts: np.ndarray
    T: float
    has_outer: bool
    lo: int
    hi: int
    N: int
    tolerance: int
    max_sweeps: int
    max_rounds: int
    stats: dict
    min_set: int = 0
    n_free: int = 0
    sampled: bool = False  # the prices came from Newton steps on the sample
    grow: bool = False  # the last round's working set was too small: double it
    chord: tuple[np.ndarray, int] | None = None  # the sample's Jacobian for full-data steps, steps left
    before_chord: tuple | None = None  # the state before a chord step, to undo it
    sub: torch.Tensor | None = None  # (K, m) an evenly strided sample of the points
    labels: torch.Tensor | None = None
    gaps: torch.Tensor | None = None
    sizes: np.ndarray | None = None
    excess: int = 0
    round_prices: np.ndarray | None = None  # the prices ``gaps`` are for
    free: torch.Tensor | None = None
    limits: _Limits | None = None
    S_free: torch.Tensor | None = None

    @classmethod
    def start(cls, S: torch.Tensor, prices: np.ndarray | None, outer: tuple[np.ndarray, float] | None,
              tolerance: int, max_sweeps: int, max_rounds: int) -> "_Assignment":
        K, n = S.shape
        prices = np.zeros(K) if prices is None else np.array(prices, dtype=np.float64)
        outer_counts, T = outer if outer is not None else (np.zeros(K, np.int64), math.inf)
        N = n + int(outer_counts.sum())
        lo, hi = _bounds(N, K)
        stats = {"newton_steps": 0, "chord_steps": 0, "sweeps": 0, "rounds": 0, "working_set": n,
                 "full_repair": False}
        return cls(S, prices, prices.copy(), outer_counts, T, outer is not None, lo, hi, N, tolerance, max_sweeps,
                   max_rounds, stats)

    def prepare(self, sample: int, working_set: int | None) -> None:
        """The least working set, the sample, and when the sample alone shows the sizes far
        off (twice the threshold of :meth:`round`, for its sampling error), the prices from
        its Newton steps at once, skipping the full pass at the warm-started prices."""
        K, n = self.S.shape
        self.min_set = min(n, working_set if working_set is not None else max(4096, n // 32))
        self.n_free = self.min_set
        m = min(sample, n // 4)
        self.sub = self.S[:, ::n // m].contiguous() if not self.has_outer and n >= 2 * m >= 8192 else None
        if self.sub is None:
            return
        m_lo, m_hi = _bounds(self.sub.shape[1], K)
        starts = [self.prices, np.zeros(K)] if self.prices.any() else [self.prices]  # a warm start can be worse
        off = [_excess(_counts(_argmax(self.sub, p), K), m_lo, m_hi) * n / self.sub.shape[1] for p in starts]
        if 8 * min(off) > n // 2:
            self.sampled = True
            self.prices, self.chord = self.newton_on_sample(starts[int(np.argmin(off))])

    def room_outside(self, p: np.ndarray) -> np.ndarray:
        """(K, K) what the prices moved since the start left of T for the outer points."""
        d = p - self.start_prices
        return self.T - (d[:, None] - d[None, :])

    def newton_on_sample(self, prices: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, int] | None]:
        """Prices from Newton steps on the sample, to 1 % of it, and then the chord state: the
        sample's Jacobian scaled to n points and up to 3 chord steps."""
        K, n = self.S.shape
        m = self.sub.shape[1]
        prices, _, steps, L = _newton_prices(self.sub, prices, *_bounds(m, K), np.zeros(K, np.int64), m,
                                             stop_when_slow=False, good_enough=m // 100)
        self.stats["newton_steps"] += steps
        return prices, None if L is None else (L * (n / m), 3)

    def round(self) -> int:
        """One round: a full pass, then stop (_WARM_UP), go to the repair (_REPAIR), or move
        the prices by a chord step, the sample's Newton steps or the working set's (_AGAIN)."""
        K, n = self.S.shape
        self.stats["rounds"] += 1
        self.full_pass()
        self.round_prices = self.prices
        if self.tolerance and self.excess <= (self.tolerance if not self.sampled else self.tolerance // 2):
            # a warm-up step close enough. Prices that needed the sample's Newton steps must be
            # within half the tolerance, or they are refined to 2K below: they are the next
            # iteration's warm start, and stopping at the tolerance costs later iterations more
            self.stats["working_set"] = n  # gaps: those of the labels returned, for BalancedKMeans's bounds
            return _WARM_UP
        if self.excess <= 2 * K or self.stats["rounds"] > self.max_rounds:
            self.free, H = _smallest(self.gaps, min(n, max(self.min_set, 8 * self.excess)))
            self.limits = _Limits(self.prices, np.minimum(H, self.room_outside(self.prices)))  # locked gaps ≥ H
            self.S_free = self.S[:, self.free]  # (K, n_free)
            return _REPAIR
        if self.chord is not None:
            self.chord_step()
            return _AGAIN
        self.n_free = min(n, max(self.min_set, 8 * self.excess, min(n // 4, 2 * self.n_free) if self.grow else 0))
        if 8 * self.excess > n // 4 and self.sub is not None and not self.sampled:
            self.sampled, self.grow = True, False
            self.prices, self.chord = self.newton_on_sample(self.prices)
            return _AGAIN
        self.working_set_prices()
        if self.has_outer and _excess(self.sizes, self.lo, self.hi) > max(2 * K, self.excess // 2):
            raise _Outside()  # the prices must move further than the unscored points allow
        self.excess = _excess(self.sizes, self.lo, self.hi)
        if self.excess <= max(2 * K, self.tolerance) or self.stats["rounds"] >= self.max_rounds:
            return _REPAIR
        self.grow = True
        return _AGAIN

    def full_pass(self) -> None:
        """Labels, gaps, sizes and excess at the current prices; on the first round a cold
        start when it is better, and after a chord step, the step undone when it did not help."""
        K = self.S.shape[0]
        lo, hi = self.lo, self.hi
        self.labels, self.gaps = _top2(self.S, self.prices)
        self.sizes = self.outer_counts + _counts(self.labels, K)
        self.excess = _excess(self.sizes, lo, hi)
        if (self.stats["rounds"] == 1 and self.sizes.min() < lo // 2 and self.prices.any() and not self.has_outer
                and not self.sampled):
            cold, cold_gaps = _top2(self.S, np.zeros(K))  # moved centroids can make a warm start worse than none
            cold_sizes = _counts(cold, K)
            if _excess(cold_sizes, lo, hi) < self.excess:
                self.prices, self.labels, self.gaps = np.zeros(K), cold, cold_gaps
                self.sizes, self.excess = cold_sizes, _excess(cold_sizes, lo, hi)
        if self.before_chord is not None:
            self.stats["rounds"] -= 1  # a chord step is one pass, not a round of the working set
            if self.excess >= self.before_chord[-1]:  # it did not help: undo it, leave the rest to the working set
                (self.prices, self.labels, self.gaps, self.sizes, self.excess), self.chord = self.before_chord, None
            self.before_chord = None

    def chord_step(self) -> None:
        """Newton's step on all n points with the Jacobian of the sample scaled up, checked by
        the next full pass: it removes most of the sample's sampling error."""
        K = self.S.shape[0]
        L, left = self.chord
        delta = np.linalg.lstsq(L, self.sizes - self.N / K, rcond=None)[0]
        self.chord = (L, left - 1) if left > 1 else None
        self.before_chord = (self.prices, self.labels, self.gaps, self.sizes, self.excess)
        self.prices = self.prices + (delta - delta.mean())
        self.stats["chord_steps"] += 1

    def working_set_prices(self) -> None:
        """Newton steps, then sweeps if they stall, on the ``n_free`` points of smallest gap,
        the others locked by :class:`_Limits`; updates the prices, labels and sizes."""
        K, n = self.S.shape
        lo, hi = self.lo, self.hi
        free, _ = _smallest(self.gaps, self.n_free)
        room = _locked_room(self.S, self.prices, self.labels, free) if len(free) < n else np.full((K, K), math.inf)
        limits = _Limits(self.prices, np.minimum(room, self.room_outside(self.prices)))
        S_free = self.S[:, free]  # (K, n_free), contiguous
        base = self.sizes - _counts(self.labels[free], K)
        prices, sub_labels, steps, _ = _newton_prices(S_free, self.prices, lo, hi, base, self.N, limits=limits)
        self.stats["newton_steps"] += steps
        sizes = base + _counts(sub_labels, K)
        if _excess(sizes, lo, hi) > 2 * K and self.max_sweeps:
            sub_labels, sizes = self.sweeps(S_free.numpy(), prices, base, limits, sub_labels, sizes)
        self.labels[free] = sub_labels
        self.free, self.limits, self.S_free, self.prices, self.sizes = free, limits, S_free, prices, sizes

    def sweeps(self, S_kn: np.ndarray, prices: np.ndarray, base: np.ndarray, limits: _Limits,
               sub_labels: torch.Tensor, sizes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Up to ``max_sweeps`` Gauss–Seidel sweeps of the prices (moved in place) on the
        working set's scores ``S_kn`` (K, n_free); returns its labels and all sizes."""
        K = S_kn.shape[0]
        lo, hi = self.lo, self.hi
        swept = _excess(sizes, lo, hi)
        for _ in range(self.max_sweeps):
            self.stats["sweeps"] += 1
            changed, sweep_labels = _price_sweep(S_kn, prices, lo, hi, base, limits)
            sub_labels = torch.from_numpy(sweep_labels)
            sizes = base + np.bincount(sweep_labels, minlength=K)
            now = _excess(sizes, lo, hi)
            if changed == 0 or now <= 2 * K or now > swept - swept // 8:
                break  # done, or stalled against the limits (a larger working set is needed)
            swept = now
        return sub_labels, sizes

    def final_gaps(self, labels: torch.Tensor) -> torch.Tensor:
        """Each point's gap at the final prices (n,): exact for the working set, and for a
        locked point (its label unchanged) its gap at ``round_prices`` less how far the
        prices moved against it, δ_a − min δ: a lower bound, for BalancedKMeans's bounds."""
        moved = self.prices - self.round_prices
        out = self.gaps - torch.from_numpy(moved - moved.min()).to(self.gaps.dtype)[labels]
        out[self.free] = _label_gaps(self.S_free, self.prices, labels[self.free])
        return out

    def exact(self, max_moves: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
        """The exact repair on the working set (on every point when a chain may need a locked
        one), or the price-induced labels of a warm-up step within the tolerance; returns
        ``(labels (n,), prices (K,), stats)``."""
        K, n = self.S.shape
        stats, labels, free, lo, hi = self.stats, self.labels, self.free, self.lo, self.hi
        stats["working_set"] = len(free)  # S_free holds their scores
        if self.tolerance and self.excess <= self.tolerance:
            return labels.numpy(), self.prices, {**stats, "repair_moves": 0, "improving_chains": 0,
                                                 "excess": self.excess, "gaps": self.final_gaps(labels)}
        bound = self.limits.bound() if len(free) < n or self.has_outer else None
        sub_labels = labels[free].numpy().copy()
        max_moves = max_moves if max_moves is not None else 10 * self.N
        try:
            stats.update(_repair(self.S_free.numpy(), sub_labels, self.sizes.copy(), lo, hi, max_moves, bound))
            labels[free] = torch.from_numpy(sub_labels)
            stats["gaps"] = self.final_gaps(labels)
        except _Uncertain:
            if self.has_outer:
                raise _Outside() from None
            stats["full_repair"] = True
            labels[free] = torch.from_numpy(sub_labels)  # the moves made so far were exact
            labels_np = labels.numpy().copy()
            stats.update(_repair(np.ascontiguousarray(self.S.numpy()), labels_np,
                                 np.bincount(labels_np, minlength=K), lo, hi, max_moves))
            labels = torch.from_numpy(labels_np)
        labels = labels.numpy()
        sizes = self.outer_counts + np.bincount(labels, minlength=K)
        if sizes.min() < lo or sizes.max() > hi:
            raise RuntimeError(f"balanced assignment failed to reach sizes in [{lo}, {hi}]: {sizes.tolist()}")
        stats["excess"] = 0
        return labels, self.prices, stats


def balanced_assignment(S: np.ndarray, prices: np.ndarray | None = None, *,
                        max_sweeps: int = 30, max_moves: int | None = None, working_set: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact balanced assignment of N points to K clusters from scores ``S`` (K, N).

    Maximises Σ_i S[a(i), i] subject to every cluster size in [⌊N/K⌋, ⌈N/K⌉] (see
    docs/partitioning.md for the method and its optimality). ``prices`` (K,) warm-starts the
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

"""The paper's theory (§2–3), executable: exact finite-state checks and an exact n-gram equivalence.

    ddfm theory                                  # table of residuals and gaps
    ddfm theory --out runs/theory.json           # ... also written as JSON
    ddfm theory --vocab 3 --length 5 --prompt 1 --k 3 --seeds 0 1 2

Part 1 (finite state, float64 numpy): for a target PMF q over [d]^N, a prompt length P and
a partition of supp q into K clusters, every object of §2–3 is built *exactly* over the
whole state space ([d] ∪ {m})^N (m = mask token): the mask coupling (eq. 18), the
autoregressive path and scheduler (eq. 19–20), the conditional velocity (eq. 21), the
marginal velocity (eq. 9), the discrete divergence (eq. 11–12), the continuity residual
(eq. 17), PMF validity (eq. 15–16), 1-sparsity, the sampling rule (eq. 13) and the
expert-flow decomposition with the posterior router (eq. 24–27), computed both as Bayes over
the revealed prefix and token by token with the neural ensemble's update
(:func:`ddfm.mixture.posterior_update`, ``--mode posterior``): for experts that model whole
sequences the two agree and are exact. Routers that depart from the posterior (eq. 28 as
printed, the time-independent prompt router of eq. 28–29) are run through the same sampling
rule and their error is reported as total variation and KL.

Part 2 (real text): byte-level n-gram experts trained on the balanced partition of the
Python documentation reproduce the centralised n-gram model exactly when the smoothing
pseudo-counts are split by cluster share and the router is the posterior given the
model's state, its context h_t (the last n−1 bytes). The posterior given the whole prefix
(``--mode posterior``'s router) is exact for a different model — the experts taken as
whole-sequence models, Σ_k π_k Π_t p_k(x_t | h_t) — and its departure from the centralised
n-gram is measured (max |Δp|, KL, perplexity), like the paper's routers'.

See docs/theory.md for the derivations in words.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from ddfm.config import arg

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Part 1: the finite state space and the objects of §2–3
# --------------------------------------------------------------------------------------

class StateSpace:
    """All sequences of length N over the vocabulary [d] plus the mask token m = d.

    ``states`` is ``(S, N)`` int with S = (d+1)^N in lexicographic order, so a state's
    index is its base-(d+1) number (:meth:`index`). ``targets`` are the d^N unmasked
    sequences (the support of X_1), also lexicographic.
    """

    def __init__(self, d: int, n_positions: int):
        if d < 1 or n_positions < 1:
            raise ValueError(f"StateSpace needs d >= 1 and N >= 1, got d={d}, N={n_positions}")
        self.d, self.N, self.mask = d, n_positions, d
        self.states = np.indices((d + 1,) * n_positions).reshape(n_positions, -1).T  # (S, N)
        self.powers = (d + 1) ** np.arange(n_positions - 1, -1, -1)                # (N,)
        self.targets = np.indices((d,) * n_positions).reshape(n_positions, -1).T    # (d^N, N)

    @property
    def size(self) -> int:
        return len(self.states)

    def index(self, x: np.ndarray) -> np.ndarray:
        """State index of sequences ``x`` of shape (..., N)."""
        return np.asarray(x) @ self.powers

    def one_hot(self, x: np.ndarray) -> np.ndarray:
        """(..., N) tokens -> (..., N, d+1) float64 one-hot, i.e. δ_x(·) per position."""
        return (np.asarray(x)[..., None] == np.arange(self.d + 1)).astype(np.float64)

    @cached_property
    def hamming(self) -> tuple[np.ndarray, np.ndarray]:
        """agree[x, z, i]: x and z agree at every position except possibly i, (S, S, N) bool;
        differ[x, z, i]: ... and differ at i (z is a neighbour of x through position i)."""
        eq = self.states[:, None, :] == self.states[None, :, :]                  # (S, S, N)
        agree = (eq.sum(-1, keepdims=True) - eq) == self.N - 1
        return agree, agree & ~eq

    def embed_target(self, q: np.ndarray) -> np.ndarray:
        """A PMF over [d]^N (d^N,) as a PMF over all states (S,)."""
        out = np.zeros(self.size)
        out[self.index(self.targets)] = q
        return out


@dataclass
class Coupling:
    """The support of π(x0, x1) (eq. 18): M pairs, their probabilities and clusters.

    x0, x1: (M, N) int; pi: (M,) float64 summing to 1; cluster: (M,) int in [0, K).
    """

    x0: np.ndarray
    x1: np.ndarray
    pi: np.ndarray
    cluster: np.ndarray

    def restrict(self, k: int) -> "Coupling":
        """The coupling of cluster S_k, renormalised: π(x0, x1 | S_k)."""
        keep = self.cluster == k
        return Coupling(self.x0[keep], self.x1[keep], self.pi[keep] / self.pi[keep].sum(),
                        self.cluster[keep])


def mask_coupling(space: StateSpace, q: np.ndarray, prompt_len: int,
                  labels: np.ndarray | None = None) -> Coupling:
    """Eq. 18: X_0 = I ⊙ X_1 + (1 - I) ⊙ (m, ..., m) with I = (1,..,1, 0,..,0), P ones.

    q: (d^N,) target PMF over ``space.targets``; labels: (d^N,) cluster of each target
    (ignored outside supp q; all 0 when None). Only pairs with π > 0 are kept.
    """
    if not 0 <= prompt_len <= space.N:
        raise ValueError(f"prompt length P={prompt_len} must be in [0, N={space.N}]")
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (len(space.targets),) or (q < 0).any() or abs(q.sum() - 1) > 1e-12:
        raise ValueError(f"target q must be a PMF of shape ({len(space.targets)},)")
    support = q > 0
    x1 = space.targets[support]
    x0 = x1.copy()
    x0[:, prompt_len:] = space.mask
    cluster = np.zeros(len(q), int) if labels is None else np.asarray(labels)
    return Coupling(x0, x1, q[support], cluster[support])


def scheduler(t: int, n_positions: int, prompt_len: int) -> np.ndarray:
    """Eq. 20, κ_t^i for i = 1..N as (N,) float64: position i is revealed once t ≥ i − P.

    The paper prints ``t ≥ P + i``; its own reading ("after timestep t exactly t+P tokens
    are revealed", and the velocity living at position P+t+1) needs ``t ≥ i − P``.
    """
    i = np.arange(1, n_positions + 1)
    return (t >= i - prompt_len).astype(np.float64)


def revealed(coupling: Coupling, t: int, prompt_len: int) -> np.ndarray:
    """x_t, the single outcome of p_t(·|x0, x1) (eq. 19): (M, N) int."""
    kappa = scheduler(t, coupling.x1.shape[1], prompt_len).astype(bool)
    return np.where(kappa, coupling.x1, coupling.x0)


def conditional_paths(space: StateSpace, t: int, coupling: Coupling, prompt_len: int) -> np.ndarray:
    """Eq. 19 with eq. 2: p_t(x | x0, x1) = Π_i κ_t^i δ_{x1}(x^i) + (1 − κ_t^i) δ_{x0}(x^i).

    Returns (M, S): one conditional path per pair of the coupling.
    """
    kappa = scheduler(t, space.N, prompt_len)                                   # (N,)
    s = space.states[None]                                                      # (1, S, N)
    per_position = (kappa * (s == coupling.x1[:, None])
                    + (1 - kappa) * (s == coupling.x0[:, None]))                # (M, S, N)
    return per_position.prod(-1)


def marginal_path(space: StateSpace, t: int, coupling: Coupling, prompt_len: int) -> np.ndarray:
    """Eq. 1: p_t(x) = Σ_{x0,x1} p_t(x | x0, x1) π(x0, x1), (S,)."""
    return coupling.pi @ conditional_paths(space, t, coupling, prompt_len)


def conditional_velocities(space: StateSpace, t: int, coupling: Coupling, prompt_len: int) -> np.ndarray:
    """Eq. 21: u_t^i(x^i, z | x0, x1) = δ_{x_{t+1}}(x^i) − δ_{x_t}(x^i) if z = x_t, else 0.

    Returns (M, S, N, d+1): pair, state z, position i, token value x^i.
    """
    x_t, x_next = revealed(coupling, t, prompt_len), revealed(coupling, t + 1, prompt_len)
    at_xt = space.index(x_t)[:, None] == np.arange(space.size)                   # (M, S)
    jump = space.one_hot(x_next) - space.one_hot(x_t)                            # (M, N, d+1)
    return at_xt[:, :, None, None] * jump[:, None]


def marginal_velocity(space: StateSpace, t: int, coupling: Coupling, prompt_len: int) -> np.ndarray:
    """Eq. 9: u_t^i(x^i, z) = Σ u_t^i(x^i, z | x0, x1) p_t(z | x0, x1) π(x0, x1) / p_t(z).

    Returns (S, N, d+1); zero at states with p_t(z) = 0 (no flow where there is no mass).
    """
    cond = conditional_paths(space, t, coupling, prompt_len)                     # (M, S)
    flow = np.einsum("msnv,ms,m->snv", conditional_velocities(space, t, coupling, prompt_len),
                     cond, coupling.pi)
    p_t = coupling.pi @ cond
    return np.divide(flow, p_t[:, None, None], out=np.zeros_like(flow), where=p_t[:, None, None] > 0)


def _velocity_at(u: np.ndarray, space: StateSpace) -> np.ndarray:
    """G[x, z, i] = u^i(x^i, z) as (S, S, N) (the token of x at position i, state z)."""
    S, N = space.size, space.N
    return u[np.arange(S)[None, :, None], np.arange(N)[None, None, :], space.states[:, None, :]]


def divergence(space: StateSpace, p_t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Eq. 12: div_x(p_t u_t) = −Σ_z p_t(z) Σ_i δ_z(x^ī) u_t^i(x^i, z), (S,)."""
    agree, _ = space.hamming
    return -np.einsum("xzn,z->x", agree * _velocity_at(u, space), p_t)


def divergence_flux(space: StateSpace, p_t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Eq. 11: div_x(v) = Σ_z v(z, x) − v(x, z), the flux out of x minus the flux into x.

    v(z, x) = p_t(x) u^i(z^i, x) for neighbours z of x through position i (the diagonal
    terms v(x, x) cancel). Equals eq. 12 whenever eq. 15 holds.
    """
    _, differ = space.hamming
    G = _velocity_at(u, space)                                                   # G[x,z,i] = u^i(x^i, z)
    outflow = p_t[:, None, None] * np.swapaxes(G, 0, 1)                          # p_t(x) u^i(z^i, x)
    inflow = p_t[None, :, None] * G                                              # p_t(z) u^i(x^i, z)
    return (differ * (outflow - inflow)).sum((1, 2))


def continuity_residual(space: StateSpace, p_t: np.ndarray, p_next: np.ndarray, u: np.ndarray) -> float:
    """Eq. 17: max_x |p_{t+1}(x) − p_t(x) + div_x(p_t u_t)|."""
    return float(np.abs(p_next - p_t + divergence(space, p_t, u)).max())


def sampling_pmf(space: StateSpace, p_t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Eq. 13, the PMF of X_{t+1} ~ δ_{X_t}(·) + u_t(·, X_t), every position sampled
    independently: Σ_z p_t(z) Π_i (δ_z(x^i) + u_t^i(x^i, z)). Returns (S,).

    Computed with the full product over positions, without assuming 1-sparsity.
    """
    step = space.one_hot(space.states) + u                                       # (S, N, d+1)
    return (_velocity_at(step, space).prod(-1)) @ p_t


def validity_violation(u: np.ndarray, p_t: np.ndarray, space: StateSpace) -> float:
    """Eq. 15–16 at states with mass: Σ_x u^i(x|z) = 0, −1 ≤ u^i(z^i|z) ≤ 0, 0 ≤ u^i(x|z) ≤ 1.

    Returns the largest violation (0.0 when the velocity defines proper PMFs).
    """
    u = u[p_t > 0]
    z = space.one_hot(space.states[p_t > 0]).astype(bool)
    sums = np.abs(u.sum(-1)).max(initial=0)
    diag, off = u[z], u[~z]
    bounds = max(np.maximum(diag, 0).max(initial=0), np.maximum(-1 - diag, 0).max(initial=0),
                 np.maximum(-off, 0).max(initial=0), np.maximum(off - 1, 0).max(initial=0))
    return float(max(sums, bounds))


def active_positions(u: np.ndarray, p_t: np.ndarray, tol: float = 0.0) -> list[int]:
    """Positions i (0-based) where u_t^i is non-zero at some state with mass (1-sparsity: ≤ 1)."""
    return np.flatnonzero((np.abs(u[p_t > 0]) > tol).any(axis=(0, 2))).tolist()


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) in nats; inf when q misses mass of p."""
    m = p > 0
    if (q[m] <= 0).any():
        return math.inf
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


# ---- decomposition into expert flows (eq. 24–27) and the routers of eq. 28–29 ----------

@dataclass
class ARProblem:
    """A target q over [d]^N (d^N,), a prompt length P and cluster labels (d^N,) in [0, K)."""

    space: StateSpace
    q: np.ndarray
    prompt_len: int
    labels: np.ndarray
    k: int

    @cached_property
    def coupling(self) -> Coupling:
        return mask_coupling(self.space, self.q, self.prompt_len, self.labels)

    @property
    def n_steps(self) -> int:
        return self.space.N - self.prompt_len

    @cached_property
    def cluster_shares(self) -> np.ndarray:
        """π_k = q(S_k), (K,)."""
        return np.bincount(self.coupling.cluster, self.coupling.pi, minlength=self.k)

    def path(self, t: int) -> np.ndarray:
        return marginal_path(self.space, t, self.coupling, self.prompt_len)

    def velocity(self, t: int) -> np.ndarray:
        return marginal_velocity(self.space, t, self.coupling, self.prompt_len)

    def expert_paths(self, t: int) -> np.ndarray:
        """p_t(z | S_k), (K, S); zero rows for empty clusters."""
        return np.stack([marginal_path(self.space, t, self.coupling.restrict(k), self.prompt_len)
                         if self.cluster_shares[k] > 0 else np.zeros(self.space.size)
                         for k in range(self.k)])

    def expert_velocities(self, t: int) -> np.ndarray:
        """Expert flows u_t(·, z | S_k) (eq. 26, inner sum), each the marginal velocity of its
        own cluster's target, (K, S, N, d+1); zero where the expert has no mass."""
        shape = (self.space.size, self.space.N, self.space.d + 1)
        return np.stack([marginal_velocity(self.space, t, self.coupling.restrict(k), self.prompt_len)
                         if self.cluster_shares[k] > 0 else np.zeros(shape)
                         for k in range(self.k)])

    def posterior_router(self, t: int) -> np.ndarray:
        """p_t(S_k | z) = π_k p_t(z | S_k) / p_t(z), (S, K); the prior π at states without mass."""
        joint = self.cluster_shares[:, None] * self.expert_paths(t)              # (K, S)
        total = joint.sum(0)
        post = np.divide(joint, total, out=np.repeat(self.cluster_shares[:, None], self.space.size, 1),
                         where=total > 0)
        return post.T

    @cached_property
    def running_posterior(self) -> np.ndarray:
        """The router of the neural ensemble's ``--mode posterior`` on this problem, (S, K).

        Each expert is a whole-sequence autoregressive model p_k(x_1..x_L) = Π_i p_k(x_i | x_<i):
        its next-token distribution at position i is read off its own velocity on the P = 0
        problem (eq. 21, 9: u^i(·, z | S_k) + δ_m at the state z with positions ≥ i masked).
        Start from log π_k and, for every revealed token of a state (prompt included), apply
        :func:`ddfm.mixture.posterior_update` with log p_k(x_i | x_<i) — the ensemble's update,
        one token at a time. At a state z = (x_1..x_{P+t}, m, ..) with mass this is
        π_k Π_i p_k(x_i | x_<i) / Σ_j (...) = π_k p_t(z | S_k) / p_t(z) = p_t(S_k | z) (eq. 26–27).
        """
        import torch

        from ddfm.mixture import posterior_update
        sp = self.space
        whole = ARProblem(sp, self.q, 0, self.labels, self.k)        # every position is a step
        log_w = torch.log(torch.as_tensor(self.cluster_shares)).expand(sp.size, self.k).clone()
        for i in range(sp.N):
            before = sp.states.copy()
            before[:, i:] = sp.mask                                   # the state x_<i, rest masked
            token = sp.states[:, i]
            probs = whole.expert_velocities(i)[:, sp.index(before), i, token]      # (K, S)
            with np.errstate(divide="ignore"):                        # log 0 = -inf: expert excluded
                token_lp = np.log(np.where(token == sp.mask, 1.0, probs))           # masked: no evidence
            log_w = posterior_update(log_w, torch.as_tensor(token_lp.T))
        return log_w.exp().numpy()

    def prompt_of(self, states: np.ndarray) -> np.ndarray:
        """Index of each state's prompt (first P tokens kept, the rest masked), (S,)."""
        prompt = states.copy()
        prompt[:, self.prompt_len:] = self.space.mask
        return self.space.index(prompt)


def decomposed_velocity(weights: np.ndarray, expert_velocities: np.ndarray) -> np.ndarray:
    """Eq. 27 with normalised experts: Σ_k w_k(z) u_t(·, z | S_k). weights (S, K) -> (S, N, d+1)."""
    return np.einsum("sk,ksnv->snv", weights, expert_velocities)


def _top1(w: np.ndarray) -> np.ndarray:
    return np.eye(w.shape[1])[w.argmax(1)]


# Routers as data: name -> (weights(problem, t) -> (S, K), what it is). "posterior" and
# "running-posterior" are the same weights computed two ways; both are exact, the rest are not.
ROUTERS: dict[str, tuple[Callable[[ARProblem, int], np.ndarray], str]] = {
    "posterior": (lambda pb, t: pb.posterior_router(t),
                  "p_t(S_k|z) = pi_k p_t(z|S_k)/p_t(z), Bayes over the revealed prefix z (eq. 24-27): exact"),
    "running-posterior": (lambda pb, t: pb.running_posterior,
                          "pi_k prod_i p_k(x_i|x_<i), token by token (posterior_update, --mode posterior): exact"),
    "posterior/K": (lambda pb, t: pb.posterior_router(t) / pb.k,
                    "eq. 28 as printed: the extra 1/K"),
    "prompt": (lambda pb, t: pb.posterior_router(0)[pb.prompt_of(pb.space.states)],
               "time-independent p(S_k|prompt), the image prior of eq. 28-29"),
    "prompt-top1": (lambda pb, t: _top1(pb.posterior_router(0)[pb.prompt_of(pb.space.states)]),
                    "the same, top-1 (the paper's main setting)"),
    "prior": (lambda pb, t: np.broadcast_to(pb.cluster_shares, (pb.space.size, pb.k)),
              "cluster shares pi_k, no information"),
}


def generate(problem: ARProblem, router: str = "posterior") -> np.ndarray:
    """Run the sampling rule (eq. 13) from p_0 for N − P steps with the velocity
    Σ_k w_k(z) u_t(·, z | S_k) of ``router``; returns the PMF of X_n over all states (S,)."""
    weights_fn = ROUTERS[router][0]
    p = problem.path(0)
    for t in range(problem.n_steps):
        u = decomposed_velocity(weights_fn(problem, t), problem.expert_velocities(t))
        p = sampling_pmf(problem.space, p, u)
    return p


def sample(problem: ARProblem, n_samples: int, rng: np.random.Generator,
           router: str = "posterior") -> np.ndarray:
    """Draw sequences with the sampling rule itself (eq. 13): X_0 from the coupling, then at
    every step each position independently from δ_{X_t}(·) + u_t^i(·, X_t) with the velocity
    of ``router``. Returns (n_samples,) final state indices."""
    c, sp = problem.coupling, problem.space
    x = c.x0[rng.choice(len(c.pi), size=n_samples, p=c.pi)]                      # (B, N)
    for t in range(problem.n_steps):
        u = decomposed_velocity(ROUTERS[router][0](problem, t), problem.expert_velocities(t))
        step = sp.one_hot(x) + u[sp.index(x)]                                     # (B, N, d+1)
        cdf = np.cumsum(step, -1)
        x = (rng.random(x.shape)[..., None] > cdf).sum(-1).clip(max=sp.d)         # inverse CDF
    return sp.index(x)


def router_error(problem: ARProblem, router: str) -> dict[str, float]:
    """How far generation with ``router`` lands from q: TV and KL(q ‖ generated) of the final
    PMF, and the largest velocity error Σ_k w_k u_k − u at states with mass."""
    weights_fn = ROUTERS[router][0]
    target = problem.space.embed_target(problem.q)
    vel_err = 0.0
    for t in range(problem.n_steps):
        p_t = problem.path(t)
        u = decomposed_velocity(weights_fn(problem, t), problem.expert_velocities(t))
        vel_err = max(vel_err, float(np.abs(u - problem.velocity(t))[p_t > 0].max(initial=0)))
    final = generate(problem, router)
    return {"tv": total_variation(target, final), "kl": kl_divergence(target, final),
            "velocity_error": vel_err}


def random_problem(rng: np.random.Generator, d: int, n_positions: int, prompt_len: int, k: int,
                   support: float = 1.0) -> ARProblem:
    """A random target (Dirichlet(1) on a random support of ~``support`` · d^N sequences,
    at least K of them) and a random partition of its support into K non-empty clusters."""
    space = StateSpace(d, n_positions)
    n_targets = len(space.targets)
    if k > n_targets:
        raise ValueError(f"K={k} clusters need at least K sequences, [d]^N has {n_targets}")
    size = max(k, int(round(support * n_targets)))
    chosen = rng.choice(n_targets, size=size, replace=False)
    q = np.zeros(n_targets)
    q[chosen] = rng.dirichlet(np.ones(size))
    labels = np.zeros(n_targets, int)
    labels[chosen] = np.concatenate([np.arange(k), rng.integers(0, k, size - k)])[rng.permutation(size)]
    return ARProblem(space, q, prompt_len, labels, k)


def clusters_follow_prompt(problem: ARProblem) -> bool:
    """True when every prompt's continuations lie in one cluster (then p(S_k|z) = p(S_k|prompt))."""
    c = problem.coupling
    prompts = problem.space.index(c.x0)
    return all(len(set(c.cluster[prompts == p])) == 1 for p in np.unique(prompts))


def two_sparse_counterexample() -> dict[str, float]:
    """Why 1-sparsity is needed in discrete time: a velocity that moves two positions at
    once, valid (eq. 15–16) and satisfying the continuity equation for the path it defines,
    yet sampling (eq. 13) does not produce that path (cross terms u^1 u^2 survive at h = 1).

    d = 2, N = 2, p_t = δ_(m,m); each position jumps to token 0 with probability 1/2.
    """
    space = StateSpace(2, 2)
    p_t = np.zeros(space.size)
    start = space.index([space.mask, space.mask])
    p_t[start] = 1.0
    u = np.zeros((space.size, 2, 3))
    u[start, :, 0], u[start, :, space.mask] = 0.5, -0.5
    p_next = p_t - divergence(space, p_t, u)        # the path for which eq. 17 holds exactly
    sampled = sampling_pmf(space, p_t, u)
    return {"continuity": continuity_residual(space, p_t, p_next, u),
            "validity": validity_violation(u, p_t, space),
            "path_is_pmf": float(abs(p_next.sum() - 1) + np.maximum(-p_next, 0).sum()),
            "generation_tv": total_variation(sampled, p_next)}


def finite_checks(problem: ARProblem) -> dict[str, float]:
    """Every identity of §2–3 on one problem; each value is a residual (≈ 0 means it holds),
    except ``sparsity`` (1.0 when each step moves exactly the position P+t+1)."""
    sp, c, P = problem.space, problem.coupling, problem.prompt_len
    out = {"coupling": 0.0, "endpoints": 0.0, "conditional_degenerate": 0.0,
           "conditional_continuity": 0.0, "continuity": 0.0, "divergence_11_vs_12": 0.0,
           "validity": 0.0, "sparsity": 1.0, "generation": 0.0,
           "decomposition": 0.0, "decomposed_generation": 0.0, "router_sum": 0.0, "running_posterior": 0.0}
    p0 = problem.path(0)
    prompt_pmf = np.zeros(sp.size)
    np.add.at(prompt_pmf, sp.index(c.x0), c.pi)                      # law of X_0 under eq. 18
    out["coupling"] = float(np.abs(p0 - prompt_pmf).max())
    out["endpoints"] = float(np.abs(problem.path(problem.n_steps) - sp.embed_target(problem.q)).max())
    for t in range(problem.n_steps):
        p_t, p_next, u = problem.path(t), problem.path(t + 1), problem.velocity(t)
        cond_t = conditional_paths(sp, t, c, P)
        cond_next = conditional_paths(sp, t + 1, c, P)
        point = np.eye(sp.size)[sp.index(revealed(c, t, P))]
        out["conditional_degenerate"] = max(out["conditional_degenerate"], float(np.abs(cond_t - point).max()))
        for m, u_m in enumerate(conditional_velocities(sp, t, c, P)):            # eq. 22
            out["conditional_continuity"] = max(out["conditional_continuity"],
                                                continuity_residual(sp, cond_t[m], cond_next[m], u_m))
        out["continuity"] = max(out["continuity"], continuity_residual(sp, p_t, p_next, u))
        out["divergence_11_vs_12"] = max(out["divergence_11_vs_12"], float(np.abs(
            divergence(sp, p_t, u) - divergence_flux(sp, p_t, u)).max()))
        out["validity"] = max(out["validity"], validity_violation(u, p_t, sp))
        if active_positions(u, p_t, 1e-15) != [P + t]:
            out["sparsity"] = 0.0
        out["generation"] = max(out["generation"], float(np.abs(sampling_pmf(sp, p_t, u) - p_next).max()))
        w = problem.posterior_router(t)
        u_dec = decomposed_velocity(w, problem.expert_velocities(t))
        out["router_sum"] = max(out["router_sum"], float(np.abs(w.sum(1) - 1).max()))
        out["running_posterior"] = max(out["running_posterior"], float(
            np.abs(problem.running_posterior - w)[p_t > 0].max(initial=0)))
        out["decomposition"] = max(out["decomposition"], float(np.abs(u_dec - u)[p_t > 0].max()))
        out["decomposed_generation"] = max(out["decomposed_generation"], float(
            np.abs(sampling_pmf(sp, p_t, u_dec) - p_next).max()))
    return out


# --------------------------------------------------------------------------------------
# Part 2: the same identity on real text, with count-based n-gram experts
# --------------------------------------------------------------------------------------

BOUNDARY = 256          # byte-level vocabulary: 256 byte values + one document boundary symbol
VOCAB = 257
PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources"


def encode(text: str, order: int) -> np.ndarray:
    """UTF-8 bytes with n−1 boundary symbols before and one after: (len + n,) int64."""
    body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.concatenate([np.full(order - 1, BOUNDARY), body, [BOUNDARY]])


def window_codes(tokens: np.ndarray, order: int) -> np.ndarray:
    """Every n-token window (h, w) of one encoded document as one int64, h·V + w: (T,)."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, order)          # (T, n)
    return windows @ (VOCAB ** np.arange(order - 1, -1, -1, dtype=np.int64))


class NGramCounts:
    """The window counts c(h, w) of one corpus (the whole training set or one cluster).

    ``codes``/``counts``: sorted unique window codes h·V + w and their counts;
    ``total`` = N, the number of windows (= tokens predicted).
    """

    def __init__(self, documents: list[np.ndarray], order: int):
        codes = np.concatenate([window_codes(d, order) for d in documents]) if documents \
            else np.zeros(0, np.int64)
        self.order = order
        self.codes, self.counts = np.unique(codes, return_counts=True)
        self.total = int(self.counts.sum())

    def table(self, contexts: np.ndarray) -> np.ndarray:
        """c(h, ·) for each context code h: (H,) int64 -> (H, V) float64."""
        lo = np.searchsorted(self.codes, contexts * VOCAB)
        hi = np.searchsorted(self.codes, (contexts + 1) * VOCAB)
        lens = hi - lo
        rows = np.repeat(np.arange(len(contexts)), lens)
        idx = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens - lo, lens)  # lo..hi-1 per row
        out = np.zeros((len(contexts), VOCAB))
        out[rows, self.codes[idx] % VOCAB] = self.counts[idx]      # (row, token) pairs are unique
        return out


@dataclass
class SmoothedNGram:
    """Add-k smoothing written as a pseudo-count mass ``a`` per context, spread evenly
    over the V next tokens (k = a/V per cell):

        p(w | h) = (c(h, w) + a/V) / (c(h) + a)
        P(h)     = (c(h) + a) / (N + a·V^{n−1})        # the model's probability of context h

    i.e. the smoothed window distribution (c(h, w) + a/V) / (N + a·V^{n−1}).
    """

    counts: NGramCounts
    pseudo_count: float

    def next_token_probs(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H,) context codes -> (p(· | h) (H, V), log P(h) (H,))."""
        c = self.counts.table(contexts)
        c_h = c.sum(1)
        probs = (c + self.pseudo_count / VOCAB) / (c_h + self.pseudo_count)[:, None]
        n_contexts = float(VOCAB) ** (self.counts.order - 1)
        log_ctx = np.log(c_h + self.pseudo_count) - np.log(self.counts.total + self.pseudo_count * n_contexts)
        return probs, log_ctx


def ngram_experts(documents: list[np.ndarray], labels: np.ndarray, k: int, order: int, add_k: float,
                  split: str = "share") -> tuple[SmoothedNGram, list[SmoothedNGram], np.ndarray]:
    """The centralised model (all documents, add-k ``add_k``) and one expert per cluster.

    ``split="share"`` gives expert k the pseudo-counts a_k = π_k · a with π_k = N_k / N, its
    share of the training windows: then Σ_k π_k q_k = q exactly (docs/theory.md).
    ``split="full"`` gives every expert the full add-k (the naive choice: K times too much
    smoothing in the mixture). Returns (central, experts, π (K,)).
    """
    a = add_k * VOCAB
    central = SmoothedNGram(NGramCounts(documents, order), a)
    shards = [NGramCounts([d for d, lab in zip(documents, labels) if lab == j], order) for j in range(k)]
    shares = np.array([s.total for s in shards], dtype=np.float64) / central.counts.total
    masses = {"share": shares * a, "full": np.full(k, a)}[split]
    return central, [SmoothedNGram(s, m) for s, m in zip(shards, masses)], shares


def python_docs_samples(seed: int = 0, prompt_bytes: int = 512, doc_bytes: int = 4608,
                        root: str = PYTHON_DOCS) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) samples of the Python documentation as (prompt, answer) texts.

    With ``ddfm.prepare`` installed these are its ``build_source("python-docs")`` records
    (prompt = the human turn, answer = the passage), so theory and the pipeline see the same
    split. Without it, one sample per ``*.rst.txt`` file (seeded 90/10 split): the first
    ``prompt_bytes`` are the prompt and the file up to ``doc_bytes`` the answer.
    """
    try:
        from ddfm.prepare import build_source
    except ImportError:
        build_source = None
    if build_source is not None:
        train, test = build_source("python-docs", seed=seed)
        return [_record_sample(r) for r in train], [_record_sample(r) for r in test]
    from pathlib import Path
    files = sorted(Path(root).rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.rst.txt files (install the Debian package python3.11-doc)")
    samples = []
    for f in files:
        data = f.read_bytes()[:doc_bytes]
        samples.append((data[:prompt_bytes].decode("utf-8", "ignore"), data[prompt_bytes:].decode("utf-8", "ignore")))
    order = np.random.default_rng(seed).permutation(len(samples))
    n_test = max(1, len(samples) // 10)
    return [samples[i] for i in order[n_test:]], [samples[i] for i in order[:n_test]]


def _record_sample(record) -> tuple[str, str]:
    """A canonical record as (prompt, answer): every turn before the last joined, the last turn."""
    turns = [t["value"].replace("<image>", "").strip() for t in record.conversations]
    return "\n".join(turns[:-1]), turns[-1]


def _sample_tokens(sample: tuple[str, str], order: int) -> tuple[np.ndarray, int]:
    """Encoded "prompt\nanswer" and the number of prompt windows (not scored)."""
    prompt, answer = sample
    return encode(prompt + "\n" + answer, order), len((prompt + "\n").encode("utf-8"))


def text_features(fit_texts: list[str], texts: list[list[str]], kind: str = "tfidf") -> list[np.ndarray]:
    """Unit-norm feature rows for each list in ``texts``: tf-idf + LSA fitted on ``fit_texts``, or the
    ``minilm`` sentence encoder (ddfm.embed). Returns one (M_i, D) float32 array per list."""
    if kind == "minilm":
        from ddfm.features.registry import get_encoder
        encoder = get_encoder("minilm")
        return [encoder.encode(t) for t in texts]
    if kind != "tfidf":
        raise ValueError(f"features: unknown kind {kind!r}, expected 'tfidf' or 'minilm'")
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    # tf-idf then a 128-d LSA projection: dense rows small enough for k-means on ~20k samples
    vec = TfidfVectorizer(sublinear_tf=True, max_features=8192, token_pattern=r"(?u)\b[A-Za-z_]\w+\b")
    x_fit = vec.fit_transform(fit_texts)
    svd = TruncatedSVD(n_components=max(1, min(128, x_fit.shape[1] - 1, len(fit_texts) - 1)), random_state=0)
    svd.fit(x_fit)
    out = []
    for t in texts:
        x = svd.transform(vec.transform(t)).astype(np.float32)
        out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return out


def partition_documents(features: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Balanced clusters of the training documents: (labels (M,), centroids (K, D) unit rows,
    algorithm). Spherical balanced k-means (ddfm.kmeans) when available, otherwise a seeded
    equal random split with the clusters' mean features as centroids."""
    try:
        from ddfm.kmeans import BalancedKMeans
    except ImportError:
        BalancedKMeans = None
    if BalancedKMeans is not None:
        km = BalancedKMeans(n_clusters=k, random_state=seed).fit(features)
        labels, algorithm = np.asarray(km.labels_), "balanced-kmeans"
    else:
        labels = np.random.default_rng(seed).permutation(np.arange(len(features)) % k)
        algorithm = "random-equal-split"
    centroids = np.stack([features[labels == j].mean(0) for j in range(k)])
    return labels, centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12), algorithm


@dataclass
class DocumentEval:
    """One test sample, encoded, with what the time-independent routers see.

    tokens: (T + n,) int64 encoded "prompt\nanswer"; prompt_len: windows of the prompt (not scored);
    centroid_weights: (K,) softmax(τ · cos(f(prompt), c_k)) (eq. 29).
    """

    tokens: np.ndarray
    prompt_len: int
    centroid_weights: np.ndarray


def _torch_mixture():
    from ddfm import mixture  # the shared mixture code of the neural ensemble
    return mixture


def router_log_weights(name: str, doc: DocumentEval, shares: np.ndarray, log_ctx: np.ndarray,
                       token_logp: np.ndarray):
    """log router weights (T, K) at every scored position of one document, as a torch tensor.

    log_ctx: (T, K) log P_k(h_t), each expert's probability of the current context;
    token_logp: (T, K) log p_k(x_t | h_t) of the token actually at each position.
    """
    import torch
    mix = _torch_mixture()
    T, K = token_logp.shape
    prior = torch.log(torch.as_tensor(shares, dtype=torch.float64)).expand(T, K)
    if name in ("context-posterior", "naive-smoothing"):          # p(S_k | h_t): exact for n-grams
        return mix.posterior_update(prior, torch.as_tensor(log_ctx))
    if name == "prefix-posterior":                                # p(S_k | x_<t): exact for sequences
        seen = np.vstack([np.zeros((1, K)), np.cumsum(token_logp, 0)[:-1]])
        return mix.posterior_update(prior, torch.as_tensor(seen))
    if name in ("centroid", "centroid-top1"):                     # eq. 29, time-independent
        w = torch.as_tensor(doc.centroid_weights, dtype=torch.float64)[None]
        if name == "centroid-top1":
            w = mix.top_k_renormalise(w, 1)
        return torch.log(w).expand(T, K)
    if name == "prior":
        return prior
    raise ValueError(f"router: unknown name {name!r}, expected one of {list(TEXT_ROUTERS)}")


TEXT_ROUTERS = {
    "context-posterior": "p(S_k | h_t) = pi_k P_k(h_t) / sum_j pi_j P_j(h_t), h_t = last n-1 bytes",
    "naive-smoothing": "the same router, but every expert smoothed with the full add-k",
    "prefix-posterior": "p(S_k | x_<t) from pi_k: Bayes over the whole sample so far (--mode posterior's update)",
    "centroid": "softmax(tau cos(f(prompt), c_k)), time-independent (eq. 29)",
    "centroid-top1": "the same, top-1 and renormalised (the paper's setting)",
    "prior": "cluster shares pi_k",
}

# Which router is exact for which kind of expert (docs/theory.md §3, "Which posterior"):
# router -> (the experts' state, the model it reproduces exactly, the key of that comparison).
TEXT_EXACT = {
    "context-posterior": ("n-gram experts (state = the last n-1 bytes)", "the centralised n-gram",
                          "max_abs_diff"),
    "prefix-posterior": ("whole-sequence experts (state = the whole prefix)",
                         "the sequence mixture sum_k pi_k p_k(x)", "seq_mixture_dll"),
}


def score_document(doc: DocumentEval, central: SmoothedNGram, experts: dict[str, list[SmoothedNGram]],
                   shares: np.ndarray, order: int) -> dict[str, dict[str, float]]:
    """Per router, on the scored (answer) positions of one sample:

    ``nll``: summed −log p(x_t | ·) (nats); ``tokens``: their count; ``max_abs_diff``: the
    largest |p_router(w | ·) − p_central(w | ·)| over positions and all V next tokens;
    ``kl_sum``: Σ_t KL(p_central(· | h_t) ‖ p_router(· | ·)) (nats); ``seq_mixture_dll``:
    |log p_router(answer | prompt) − log p_seq(answer | prompt)| (nats), where
    p_seq(x) = Σ_k π_k Π_t p_k(x_t | h_t) is the mixture of the share-smoothed experts taken as
    whole-sequence models (one cluster drawn per sample).
    """
    import torch
    mix = _torch_mixture()
    codes = window_codes(doc.tokens, order)             # every window; the prompt's are not scored
    contexts, targets = codes // VOCAB, codes % VOCAB
    rows, scored = np.arange(len(codes)), slice(doc.prompt_len, None)
    p_central, _ = central.next_token_probs(contexts[scored])                     # (T, V)
    log_central = np.log(p_central)
    n_scored = len(p_central)
    tables = {}
    for split, models in experts.items():
        probs, log_ctx = zip(*(m.next_token_probs(contexts) for m in models))
        tables[split] = np.log(np.stack(probs, 1)), np.stack(log_ctx, 1)          # (T_all, K, V), (T_all, K)
    seq_ll = _sequence_mixture_ll(np.log(shares), tables["share"][0][rows, :, targets], doc.prompt_len)

    def scores(logp: np.ndarray, p: np.ndarray) -> dict[str, float]:             # (T, V) log p, p
        nll = float(-logp[rows[:n_scored], targets[scored]].sum())
        return {"nll": nll, "tokens": n_scored, "max_abs_diff": float(np.abs(p - p_central).max()),
                "kl_sum": float(np.sum(p_central * (log_central - logp))), "seq_mixture_dll": abs(-nll - seq_ll)}

    out = {"central": scores(log_central, p_central)}
    for name in TEXT_ROUTERS:
        expert_logp, log_ctx = tables["full" if name == "naive-smoothing" else "share"]
        token_logp = expert_logp[rows, :, targets]                                # (T_all, K)
        log_w = router_log_weights(name, doc, shares, log_ctx, token_logp)[scored]
        logp = mix.mixture_log_probs(log_w, torch.as_tensor(expert_logp[scored])).numpy()  # (T, V)
        out[name] = scores(logp, np.exp(logp))
    return out


def _sequence_mixture_ll(log_prior: np.ndarray, token_logp: np.ndarray, prompt_len: int) -> float:
    """log p_seq(answer | prompt) for p_seq(x) = Σ_k π_k Π_t p_k(x_t | h_t): the log of
    Σ_k π_k p_k(prompt, answer) minus the log of Σ_k π_k p_k(prompt). token_logp: (T_all, K)."""
    from scipy.special import logsumexp
    return float(logsumexp(log_prior + token_logp.sum(0)) - logsumexp(log_prior + token_logp[:prompt_len].sum(0)))


def _add_perplexities(totals: dict[str, dict[str, float]]) -> None:
    """ppl = exp(NLL / tokens), gap = ppl / ppl_central − 1 and kl = kl_sum / tokens (the mean
    KL(p_central ‖ p) per scored byte, nats) for every model, in place."""
    ppl_central = math.exp(totals["central"]["nll"] / totals["central"]["tokens"])
    for acc in totals.values():
        acc["ppl"] = math.exp(acc["nll"] / acc["tokens"])
        acc["gap"] = acc["ppl"] / ppl_central - 1
        acc["kl"] = acc["kl_sum"] / acc["tokens"]


def text_equivalence(k: int = 4, order: int = 3, add_k: float = 0.01, temperature: float | None = None,
                     features: str = "tfidf", seed: int = 0, max_train: int | None = None,
                     max_test: int | None = 400) -> dict:
    """Train a centralised byte-level n-gram model and K cluster experts on the Python docs
    and score the answers of the test samples with every router of :data:`TEXT_ROUTERS`.

    Partition: features of each training sample's whole text; routing (eq. 29): features of
    the test prompt only, τ = ``temperature`` or, when None, calibrated on the partition like
    ``ddfm partition`` does (:func:`ddfm.partition.calibrate_temperature`). ``max_train`` / ``max_test`` cap the samples (seeded subsets).
    Returns {"setup": ..., "routers": {name: {"ppl", "gap", "max_abs_diff", "kl", "seq_mixture_dll",
    "nll", "kl_sum", "tokens"}}, "exact": ...}: ``gap`` = ppl / ppl_central − 1; ``max_abs_diff`` =
    max |p_router − p_central| over all scored positions and all V next tokens; ``kl`` = mean
    KL(p_central ‖ p_router) per scored byte (nats); ``seq_mixture_dll`` = max over samples of
    |log p_router(answer | prompt) − log p_seq(answer | prompt)| (nats, :func:`score_document`).
    ``exact`` names, per router of :data:`TEXT_EXACT`, the experts it is exact for, the model it
    reproduces and the measured residual of that claim.
    """
    train, test = python_docs_samples(seed)
    rng = np.random.default_rng(seed)
    train, test = _subset(train, max_train, rng), _subset(test, max_test, rng)
    if len(train) < k or not test:
        raise ValueError(f"python-docs: {len(train)} training and {len(test)} test samples are too few for K={k}")
    train_texts = [p + "\n" + a for p, a in train]
    f_train, f_prompt = text_features(train_texts, [train_texts, [p for p, _ in test]], features)
    labels, centroids, algorithm = partition_documents(f_train, k, seed)
    log.info("theory: %d training samples in %d clusters (%s, %s features), %d test samples",
             len(train), k, algorithm, features, len(test))
    central, experts, shares = ngram_experts([encode(t, order) for t in train_texts], labels, k, order, add_k)
    naive = [SmoothedNGram(e.counts, central.pseudo_count) for e in experts]
    if temperature is None:
        from ddfm.partition import calibrate_temperature
        temperature = calibrate_temperature(f_train, centroids, labels, seed=seed)["temperature"]
    from ddfm.router import Router  # the neural ensemble's router: eq. 29 on the prompt's features
    router = Router(centroids, temperature, top_k=k, modality="text", cluster_shares=shares)
    weights = router.probabilities(f_prompt).double().numpy()                  # (Q, K)
    totals: dict[str, dict[str, float]] = {}
    with _one_torch_thread():
        _score_all(test, weights, central, {"share": experts, "full": naive}, shares, order, totals)
    _add_perplexities(totals)
    setup = {"source": "python-docs", "order": order, "add_k": add_k, "k": k, "algorithm": algorithm,
             "features": features, "temperature": temperature, "train_samples": len(train),
             "test_samples": len(test), "samples_per_cluster": np.bincount(labels, minlength=k).tolist(),
             "cluster_shares": shares.tolist(), "top1_choices": np.bincount(weights.argmax(1), minlength=k).tolist()}
    exact = {name: {"experts": experts_kind, "reproduces": model, "residual_key": key,
                    "residual": totals[name][key]}
             for name, (experts_kind, model, key) in TEXT_EXACT.items()}
    return {"setup": setup, "routers": totals, "exact": exact}


def _score_all(test, weights, central, experts, shares, order, totals) -> None:
    """Score every test sample (:func:`score_document`): NLL, tokens and KL add up, the
    max differences are maxima over samples."""
    for i, (sample, w) in enumerate(zip(test, weights)):
        doc = DocumentEval(*_sample_tokens(sample, order), w)
        for name, r in score_document(doc, central, experts, shares, order).items():
            acc = totals.setdefault(name, {"nll": 0.0, "tokens": 0, "kl_sum": 0.0, "max_abs_diff": 0.0,
                                           "seq_mixture_dll": 0.0})
            for key in ("nll", "tokens", "kl_sum"):
                acc[key] += r[key]
            for key in ("max_abs_diff", "seq_mixture_dll"):
                acc[key] = max(acc[key], r[key])
        if (i + 1) % 100 == 0 or i + 1 == len(test):
            log.info("theory: scored %d/%d test samples", i + 1, len(test))


@contextlib.contextmanager
def _one_torch_thread():
    """Per-sample tensors are small (≈1k x K x 257): intra-op threads cost far more than they
    give, and on a shared machine they made torch.logsumexp ~50x slower in one measurement."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _subset(items: list, n: int | None, rng: np.random.Generator) -> list:
    if n is None or n >= len(items):
        return items
    return [items[i] for i in np.sort(rng.choice(len(items), size=n, replace=False))]


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------

@dataclass
class TheoryConfig:
    """``ddfm theory``: the paper's identities checked exactly, residuals and gaps as a table."""

    vocab: int = arg("d, vocabulary size of the finite checks", 3)
    length: int = arg("N, sequence length of the finite checks", 4)
    prompt: int = arg("P, prompt tokens revealed at t = 0 in the finite checks", 1)
    k: int = arg("K, clusters of the finite checks", 3)
    support: float = arg("fraction of [d]^N in the support of each random target", 0.6)
    seeds: list[int] = arg("seeds of the random finite problems", default_factory=lambda: [0, 1, 2])
    text: bool = arg("also run the n-gram equivalence on the real Python docs", True)
    text_k: int = arg("K, expert n-gram models for the text check", 4)
    order: int = arg("n of the byte-level n-gram models", 3)
    add_k: float = arg("add-k smoothing of the centralised n-gram (pseudo-count per cell)", 0.01)
    temperature: float | None = arg("tau of the centroid router (eq. 29); default: calibrated on the "
                                    "partition as ddfm partition does", None)
    features: str = arg("document features for partition and centroid routing", "tfidf",
                        choices=("tfidf", "minilm"))
    max_train: int | None = arg("use at most this many training samples (quick runs)", None)
    max_test: int | None = arg("score at most this many test samples (seeded subset)", 400)
    seed: int = arg("seed of the text split and the partition", 0)
    out: str | None = arg("also write the results as JSON to this file", None)

    def __post_init__(self):
        if self.vocab < 1 or self.length < 1:
            raise ValueError(f"--vocab and --length must be >= 1, got {self.vocab} and {self.length}")
        if (self.vocab + 1) ** self.length > 4096:
            raise ValueError(f"--vocab {self.vocab} --length {self.length}: (d+1)^N = "
                             f"{(self.vocab + 1) ** self.length} states, at most 4096 are enumerated")
        if not 0 <= self.prompt < self.length:
            raise ValueError(f"--prompt must be in [0, --length), got {self.prompt}")
        if not 1 <= self.k <= self.vocab ** self.length:
            raise ValueError(f"--k must be in [1, d^N = {self.vocab ** self.length}], got {self.k}")
        if not 0 < self.support <= 1:
            raise ValueError(f"--support must be in (0, 1], got {self.support}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if self.text_k < 1 or self.order < 1 or self.add_k <= 0:
            raise ValueError("--text-k and --order must be >= 1 and --add-k > 0 (smoothing keeps every "
                             "test token possible)")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


FINITE_ROWS = [  # (key, equation, what it checks)
    ("coupling", "eq. 18", "p_0 is the law of the masked prompt X_0"),
    ("endpoints", "eq. 4", "p_n equals the target q"),
    ("conditional_degenerate", "eq. 19-20", "p_t(.|x0,x1) is the point mass at x_t"),
    ("conditional_continuity", "eq. 21-22", "conditional velocity satisfies continuity"),
    ("continuity", "eq. 9, 17", "marginal velocity satisfies continuity"),
    ("divergence_11_vs_12", "eq. 11-12", "flux divergence = pointwise divergence"),
    ("validity", "eq. 15-16", "velocity defines proper PMFs"),
    ("generation", "eq. 13-14", "sampled PMF of X_{t+1} = p_{t+1}"),
    ("decomposition", "eq. 24-27", "u = sum_k p_t(S_k|z) u_k"),
    ("decomposed_generation", "eq. 27, 13", "sampling the expert mixture gives p_{t+1}"),
    ("router_sum", "eq. 27", "posterior weights sum to 1"),
    ("running_posterior", "eq. 26-27", "token-by-token Bayes (--mode posterior's update) = p_t(S_k|z)"),
]


def theory(cfg: TheoryConfig) -> dict:
    """Run every check; returns {"finite": ..., "routers": ..., "two_sparse": ..., "text": ...}."""
    finite: dict[str, float] = {}
    routers: dict[str, dict[str, float]] = {}
    for seed in cfg.seeds:
        problem = random_problem(np.random.default_rng(seed), cfg.vocab, cfg.length, cfg.prompt,
                                 cfg.k, cfg.support)
        for key, value in finite_checks(problem).items():
            finite[key] = min(finite.get(key, 1.0), value) if key == "sparsity" else max(finite.get(key, 0.0), value)
        for name in ROUTERS:
            acc = routers.setdefault(name, {"tv": 0.0, "kl": 0.0, "velocity_error": 0.0})
            for key, value in router_error(problem, name).items():
                acc[key] = max(acc[key], value)
    result = {"setup": {"d": cfg.vocab, "N": cfg.length, "P": cfg.prompt, "K": cfg.k,
                        "support": cfg.support, "seeds": cfg.seeds},
              "finite": finite, "routers": routers, "two_sparse": two_sparse_counterexample()}
    if cfg.text:
        result["text"] = text_equivalence(cfg.text_k, cfg.order, cfg.add_k, cfg.temperature, cfg.features,
                                          cfg.seed, cfg.max_train, cfg.max_test)
    return result


def format_report(result: dict) -> str:
    """The results as plain-text tables."""
    s = result["setup"]
    lines = [f"Finite checks: d={s['d']} N={s['N']} P={s['P']} K={s['K']}, "
             f"{len(s['seeds'])} random targets (max over them; 0 up to rounding = holds)",
             f"  {'check':<24}{'equation':<12}{'residual':>10}  what"]
    for key, eq, what in FINITE_ROWS:
        lines.append(f"  {key:<24}{eq:<12}{result['finite'][key]:>10.1e}  {what}")
    ok = "yes" if result["finite"]["sparsity"] == 1.0 else "NO"
    lines.append(f"  {'1-sparsity':<24}{'§3.2':<12}{ok:>10}  only position P+t+1 moves at step t")
    lines += ["", "Routers in the sampling rule (final PMF vs q, worst target)",
              f"  {'router':<19}{'TV':>10}{'KL(q|.)':>10}{'max |du|':>10}  what"]
    for name, r in result["routers"].items():
        lines.append(f"  {name:<19}{r['tv']:>10.2e}{r['kl']:>10.3g}{r['velocity_error']:>10.2e}  {ROUTERS[name][1]}")
    ts = result["two_sparse"]
    lines += ["", f"2-sparse velocity: continuity residual {ts['continuity']:.1e}, validity {ts['validity']:.1e}, "
              f"yet TV(sampled, path) = {ts['generation_tv']:.2f}: continuity implies generation only with 1-sparsity"]
    if "text" in result:
        lines += ["", format_text(result["text"])]
    return "\n".join(lines)


COLUMNS = {"max_abs_diff": "max|p-p_c|", "kl": "KL(p_c|p)", "seq_mixture_dll": "max|dLL_seq|"}


def format_text(text: dict) -> str:
    """The n-gram check (:func:`text_equivalence`) as a table, which router is exact for which
    experts with the measured residual, and what each column means."""
    t, r, ex = text["setup"], text["routers"], text["exact"]
    lines = [f"Real text: byte-level {t['order']}-gram, add-k {t['add_k']}, python-docs "
             f"({t['train_samples']} train / {t['test_samples']} test samples), K={t['k']} "
             f"({t['algorithm']}, {t['features']}, tau {t['temperature']:.3g}), {r['central']['tokens']} scored bytes",
             f"  {'model':<18}{'ppl':>9}{'gap':>9}{'max|p-p_c|':>12}{'KL(p_c|p)':>11}{'max|dLL_seq|':>14}  what"]
    for name, acc in r.items():
        what = "the centralised n-gram (all data)" if name == "central" else TEXT_ROUTERS[name]
        lines.append(f"  {name:<18}{acc['ppl']:>9.4f}{acc['gap']:>+9.2%}{acc['max_abs_diff']:>12.1e}"
                     f"{acc['kl']:>11.2e}{acc['seq_mixture_dll']:>14.1e}  {what}")
    ctx, pre = r["context-posterior"], r["prefix-posterior"]
    lines += ["", "Which router is exact depends on the experts' state (eq. 24-27: the weight is p(S_k | state)):"]
    for name, e in ex.items():
        lines.append(f"  {e['experts']}: {name} reproduces {e['reproduces']}, "
                     f"{COLUMNS[e['residual_key']]} {e['residual']:.1e}")
    lines += [f"  prefix-posterior (the update of the ensemble's --mode posterior) with n-gram experts is not the "
              f"centralised n-gram: max|p-p_c| {pre['max_abs_diff']:.2g}, KL(p_c|p) {pre['kl']:.2e} nats/byte, "
              f"ppl gap {pre['gap']:+.2%}",
              f"  context-posterior is not the sequence mixture: max|dLL_seq| {ctx['seq_mixture_dll']:.3g} nats",
              "",
              "  ppl: exp(mean NLL) of the scored answer bytes; gap = ppl / ppl_central - 1",
              "  max|p-p_c|: largest |p(w|.) - p_central(w|.)| over every scored position and all 257 next bytes",
              "  KL(p_c|p): KL(p_central(.|h_t) || p(.|.)) averaged over the scored positions, nats per byte",
              "  max|dLL_seq|: largest |log p(answer|prompt) - log p_seq(answer|prompt)| over the test samples,",
              "    nats; p_seq(x) = sum_k pi_k prod_t p_k(x_t|h_t), the experts as whole-sequence models"]
    return "\n".join(lines)


def _finite_json(obj):
    """JSON has no infinity: write an infinite KL as the string "inf"."""
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    return obj


def theory_cli(cfg: TheoryConfig) -> dict:
    """``ddfm theory``: print the tables; write JSON when ``--out`` is given."""
    result = theory(cfg)
    print(format_report(result))
    if cfg.out:
        from ddfm.io import write_json
        write_json(cfg.out, _finite_json(result))
        print(f"\nwrote {cfg.out}")
    return result

"""The paper's §2–3 on a finite state space: every object built exactly, every identity checked.

For a target PMF q over [d]^N, a prompt length P and a partition of supp q into K clusters,
every object of §2–3 is built *exactly* (float64 numpy) over the whole state space
([d] ∪ {m})^N (m = mask token): the mask coupling (eq. 18), the autoregressive path and
scheduler (eq. 19–20), the conditional velocity (eq. 21), the marginal velocity (eq. 9),
the discrete divergence (eq. 11–12), the continuity residual (eq. 17), PMF validity
(eq. 15–16), 1-sparsity, the sampling rule (eq. 13) and the expert-flow decomposition with
the posterior router (eq. 24–27), computed both as Bayes over the revealed prefix and token
by token with the neural ensemble's update (:func:`ddfm.mixture.posterior_update`,
``--mode posterior``): for experts that model whole sequences the two agree and are exact.

The routers run through the sampling rule (:data:`ROUTERS`) carry the names of the shared
routing vocabulary (:mod:`ddfm.routing`): the settings ``posterior``, ``soft`` and ``top-1``
as they are realised on a finite problem, and the diagnostic routers of
:data:`ddfm.routing.DIAGNOSTIC_ROUTERS` (``running-posterior``, ``posterior/K`` of eq. 28 as
printed, ``prior``). :func:`router_error` reports how far each lands from q (TV and KL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple, Union

import numpy as np
import torch

from ddfm.mixture import posterior_update
from ddfm.routing import ALL, ROUTINGS, check_router_names


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


def _top_k(w: np.ndarray, top_k: Union[int, str]) -> np.ndarray:
    """The weights (S, K) of a setting's ``top_k``: unchanged for ``"all"``; for top-1 all the
    weight on the largest (the first of equal ones), as ``ddfm.mixture.top_k_renormalise`` does."""
    if top_k == ALL:
        return w
    if top_k != 1:
        raise ValueError(f"top_k={top_k!r}: the finite routers are top-1 or all")
    return np.eye(w.shape[1])[w.argmax(1)]


def _time_independent(setting: str) -> Callable[[ARProblem, int], np.ndarray]:
    """The router of a time-independent setting (``soft``, ``top-1``) on a finite problem.

    The best weights that are fixed once, before any token is generated (eq. 28–29, routing
    from the image), are the posterior given the prompt alone, p(S_k | first P tokens): our
    stand-in for the centroid router's p(S_k | image). The setting's ``top_k`` is applied.
    """
    top_k = ROUTINGS[setting].top_k

    def weights(pb: ARProblem, t: int) -> np.ndarray:
        return _top_k(pb.posterior_router(0)[pb.prompt_of(pb.space.states)], top_k)

    return weights


class FiniteRouter(NamedTuple):
    """A router of the finite problems: its weights (problem, t) -> (S, K) and what it is there."""

    weights: Callable[[ARProblem, int], np.ndarray]
    help: str


# Routers as data, keyed by the shared routing names. "posterior" and "running-posterior"
# are the same weights computed two ways; both are exact, the rest are not.
ROUTERS: dict[str, FiniteRouter] = {
    "posterior": FiniteRouter(
        lambda pb, t: pb.posterior_router(t),
        "p_t(S_k|z) = pi_k p_t(z|S_k)/p_t(z), Bayes over the revealed prefix z (eq. 24-27): exact"),
    "running-posterior": FiniteRouter(
        lambda pb, t: pb.running_posterior,
        "pi_k prod_i p_k(x_i|x_<i), token by token (posterior_update, --mode posterior): exact"),
    "posterior/K": FiniteRouter(lambda pb, t: pb.posterior_router(t) / pb.k, "eq. 28 as printed: the extra 1/K"),
    "soft": FiniteRouter(_time_independent("soft"),
                         "time-independent p(S_k|prompt), the image prior of eq. 28-29"),
    "top-1": FiniteRouter(_time_independent("top-1"), "the same, top-1 (the paper's main setting)"),
    "prior": FiniteRouter(lambda pb, t: np.broadcast_to(pb.cluster_shares, (pb.space.size, pb.k)),
                          "cluster shares pi_k, no information"),
}
check_router_names(ROUTERS)


def generate(problem: ARProblem, router: str = "posterior") -> np.ndarray:
    """Run the sampling rule (eq. 13) from p_0 for N − P steps with the velocity
    Σ_k w_k(z) u_t(·, z | S_k) of ``router``; returns the PMF of X_n over all states (S,)."""
    weights_fn = ROUTERS[router].weights
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
    weights_fn = ROUTERS[router].weights
    x = c.x0[rng.choice(len(c.pi), size=n_samples, p=c.pi)]                      # (B, N)
    for t in range(problem.n_steps):
        u = decomposed_velocity(weights_fn(problem, t), problem.expert_velocities(t))
        step = sp.one_hot(x) + u[sp.index(x)]                                     # (B, N, d+1)
        cdf = np.cumsum(step, -1)
        x = (rng.random(x.shape)[..., None] > cdf).sum(-1).clip(max=sp.d)         # inverse CDF
    return sp.index(x)


def router_error(problem: ARProblem, router: str) -> dict[str, float]:
    """How far generation with ``router`` lands from q: TV and KL(q ‖ generated) of the final
    PMF, and the largest velocity error Σ_k w_k u_k − u at states with mass."""
    weights_fn = ROUTERS[router].weights
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
        # eq. 27's weights sum to 1 because the experts' paths mix to the marginal one:
        # Σ_k π_k p_t(z | S_k) = p_t(z), each side computed from its own coupling
        mixed = problem.cluster_shares @ problem.expert_paths(t)
        out["router_sum"] = max(out["router_sum"], float(np.abs(mixed - p_t).max()))
        out["running_posterior"] = max(out["running_posterior"], float(
            np.abs(problem.running_posterior - w)[p_t > 0].max(initial=0)))
        out["decomposition"] = max(out["decomposition"], float(np.abs(u_dec - u)[p_t > 0].max()))
        out["decomposed_generation"] = max(out["decomposed_generation"], float(
            np.abs(sampling_pmf(sp, p_t, u_dec) - p_next).max()))
    return out

"""The paper's identities (§2–3), checked exactly on random finite problems (hypothesis),
and the n-gram equivalence on the real Python documentation."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddfm import theory as th

TOL = 1e-12
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, min_steps=1, min_k=1, support=None):
    """Random target over [d]^N, prompt length P < N, random partition into K clusters."""
    d = draw(st.integers(2, 3))
    n = draw(st.integers(max(1, min_steps), 4 if d == 2 else 3))
    p = draw(st.integers(0, n - min_steps))
    k = draw(st.integers(min_k, min(3, d ** n)))
    frac = support if support is not None else draw(st.sampled_from([0.3, 0.6, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return th.random_problem(np.random.default_rng(seed), d, n, p, k, support=frac)


@FAST
@given(problems())
def test_every_identity_holds_exactly(problem):
    r = th.finite_checks(problem)
    assert r.pop("sparsity") == 1.0                      # only position P+t+1 moves at step t
    for name, residual in r.items():
        assert residual < TOL, (name, residual)


@FAST
@given(problems())
def test_posterior_router_generates_the_target(problem):
    err = th.router_error(problem, "posterior")
    assert err["tv"] < TOL and abs(err["kl"]) < TOL and err["velocity_error"] < TOL


@FAST
@given(problems(min_steps=1, min_k=2))
def test_extra_one_over_k_of_eq28_is_wrong(problem):
    # u/K is still a valid velocity but only moves with probability 1/K per step:
    # after n steps a mass of 1 - K^-n is still (partly) masked.
    err = th.router_error(problem, "posterior/K")
    assert err["tv"] == pytest.approx(1 - problem.k ** -problem.n_steps, abs=1e-12)


@FAST
@given(problems(min_steps=2, min_k=2, support=1.0))
def test_time_independent_router_is_exact_only_when_clusters_follow_the_prompt(problem):
    err = th.router_error(problem, "prompt")
    if th.clusters_follow_prompt(problem):
        assert err["tv"] < TOL
    else:
        assert err["tv"] > 1e-9 and err["kl"] > 1e-9 and err["velocity_error"] > 1e-9


@FAST
@given(problems(min_steps=1))
def test_sampling_rule_matches_flux_and_pointwise_divergence(problem):
    t = problem.n_steps - 1
    p_t, u = problem.path(t), problem.velocity(t)
    sp = problem.space
    np.testing.assert_allclose(th.divergence(sp, p_t, u), th.divergence_flux(sp, p_t, u), atol=TOL)
    # with 1-sparsity the product over positions collapses to p_t - div (the paper's last display)
    np.testing.assert_allclose(th.sampling_pmf(sp, p_t, u), p_t - th.divergence(sp, p_t, u), atol=TOL)


def test_single_step_prompt_router_is_the_posterior():
    # N - P = 1: the state never changes before the only step, so p(S_k|prompt) = p_0(S_k|z).
    problem = th.random_problem(np.random.default_rng(3), 3, 3, 2, 3)
    assert th.router_error(problem, "prompt")["tv"] < TOL


def test_top1_prompt_router_loses_mass_of_other_clusters():
    problem = th.random_problem(np.random.default_rng(0), 2, 3, 0, 2)
    err = th.router_error(problem, "prompt-top1")
    assert math.isinf(err["kl"]) and err["tv"] > 0.1


def test_two_sparse_velocity_satisfies_continuity_but_does_not_generate():
    r = th.two_sparse_counterexample()
    assert r["continuity"] == 0 and r["validity"] == 0 and r["path_is_pmf"] == 0
    assert r["generation_tv"] == pytest.approx(0.5)


def test_scheduler_reveals_p_plus_t_tokens():
    for t in range(4):
        assert th.scheduler(t, 5, 1).sum() == min(5, 1 + t)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="prompt length"):
        th.mask_coupling(th.StateSpace(2, 2), np.full(4, 0.25), 3)
    with pytest.raises(ValueError, match="PMF"):
        th.mask_coupling(th.StateSpace(2, 2), np.full(4, 0.3), 0)

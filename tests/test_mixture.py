"""ddfm.mixture: probability-space mixing, the exact posterior router, top-k."""

import math

import pytest
import torch

from ddfm.mixture import mixture_log_probs, posterior_update, top_k_renormalise


def _random_experts(B=3, K=4, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(B, K, V, generator=g, dtype=torch.float64) * 3, -1)
    w = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), -1)
    return w, lp


def test_mixture_equals_explicit_sum():
    w, lp = _random_experts()
    got = mixture_log_probs(w.log(), lp).exp()
    want = (w.unsqueeze(-1) * lp.exp()).sum(1)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones(3, dtype=torch.float64))


def test_mixture_is_not_logit_averaging():
    w = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    lp = torch.log(torch.tensor([[[0.9, 0.1], [0.1, 0.9]]], dtype=torch.float64))
    got = mixture_log_probs(w.log(), lp).exp()
    assert torch.allclose(got, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    lp2 = torch.log(torch.tensor([[[0.99, 0.01], [0.4, 0.6]]], dtype=torch.float64))
    mix = mixture_log_probs(w.log(), lp2).exp()
    geo = torch.softmax(lp2.mean(1), -1)  # averaged logits: a product of experts
    assert torch.allclose(mix, torch.tensor([[0.695, 0.305]], dtype=torch.float64))
    assert not torch.allclose(mix, geo, atol=1e-3)


def test_zero_weight_expert_is_never_read():
    w, lp = _random_experts(K=3)
    w[:, 1] = 0
    w = w / w.sum(1, keepdim=True)
    lp_garbage = lp.clone()
    lp_garbage[:, 1] = float("nan")
    got = mixture_log_probs(w.log(), lp_garbage)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, mixture_log_probs(w.log(), lp))


def test_unnormalised_weights_are_renormalised_and_one_hot_is_the_expert():
    w, lp = _random_experts(K=3)
    assert torch.allclose(mixture_log_probs((5 * w).log(), lp), mixture_log_probs(w.log(), lp))
    one_hot = torch.tensor([[0.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    assert torch.equal(mixture_log_probs(one_hot.log(), lp), lp[:, 1])


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="does not match"):
        mixture_log_probs(torch.zeros(2, 3), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="differ"):
        posterior_update(torch.zeros(2, 3), torch.zeros(2, 4))


def test_posterior_is_bayes_rule_over_a_sequence():
    w, lp = _random_experts(B=1, K=3, V=5)
    tokens = [0, 3, 3, 1]
    log_w = w.log()
    for t in tokens:
        log_w = posterior_update(log_w, lp[:, :, t])
    unnorm = w * torch.stack([lp[:, :, t] for t in tokens]).sum(0).exp()
    assert torch.allclose(log_w.exp(), unnorm / unnorm.sum(1, keepdim=True), atol=1e-12)


def test_posterior_keeps_excluded_experts_out_and_survives_impossible_tokens():
    log_w = torch.tensor([[0.0, -math.inf]]).log_softmax(-1)
    out = posterior_update(log_w, torch.tensor([[-1.0, 0.0]]))
    assert out[0, 1] == -math.inf and out[0, 0] == 0
    same = posterior_update(torch.tensor([[-0.5, -1.0]]).log_softmax(-1),
                            torch.tensor([[-math.inf, -math.inf]]))
    assert torch.allclose(same, torch.tensor([[-0.5, -1.0]]).log_softmax(-1))


def test_top_k_renormalise():
    w = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    assert torch.allclose(top_k_renormalise(w, 1), torch.tensor([[0.0, 1, 0], [0, 0, 1]]))
    assert torch.allclose(top_k_renormalise(w, 2), torch.tensor([[0, 2 / 3, 1 / 3], [3 / 7, 0, 4 / 7]]))
    assert torch.allclose(top_k_renormalise(w, 5), w / w.sum(1, keepdim=True))
    tie = top_k_renormalise(torch.tensor([[0.5, 0.5]]), 1)
    assert torch.equal(tie, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="top_k"):
        top_k_renormalise(w, 0)


def test_top1_rows_are_their_expert_exactly():
    _, lp = _random_experts(B=3, K=4)
    lp[0, 2] = float("nan")  # a row an expert was never run on may hold garbage
    log_w = torch.full((3, 4), float("-inf"), dtype=torch.float64)
    log_w[0, 1], log_w[1, 3], log_w[2, 0] = 0.0, -0.7, 0.0  # one finite weight per row
    got = mixture_log_probs(log_w, lp)
    assert torch.equal(got, lp[torch.arange(3), torch.tensor([1, 3, 0])])
    log_w[1, 0], log_w[1, 3] = math.log(1e-3), math.log(1 - 1e-3)  # two experts in one row: the general path
    mixed = mixture_log_probs(log_w, lp)
    want = torch.log((1 - 1e-3) * lp[1, 3].exp() + 1e-3 * lp[1, 0].exp())
    assert torch.allclose(mixed[1], want, atol=1e-12) and torch.equal(mixed[0], got[0])

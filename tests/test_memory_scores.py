"""heads/memory_scores.py: value and gradients computed in the forward equal autograd through the plain formulas.

The plain formulas here are written from the module docstring (float64, autograd on [N, K] tensors). The cases
reach every branch: arguments clamped on both sides (masks), unwritten columns, samples whose positive is on
another rank (target -1) or unwritten, a shard with no columns, no gradient wanted. The multi-rank agreement of
the terms is proven in tests/test_losses_exact.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads.margins import AdaptiveMargin, CombinedMargin
from heads.memory_scores import bce_sum, softmax_mean, with_gradients

D64 = torch.float64


def problem(n=7, k=9, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g, dtype=D64), dim=1)
    rows = F.normalize(torch.randn(k, d, generator=g, dtype=D64), dim=1)
    valid = torch.ones(k, dtype=torch.bool)
    valid[[2, 5]] = False
    target = torch.tensor([0, 2, -1, 4, 4, 8, 1])[:n]  # 2: unwritten positive, -1: another rank's class
    return u, rows, valid, target


def plain_bce(u, rows, valid, target, s, m, b, clamp):
    cos = u @ rows.T
    n, k = cos.shape
    has = target >= 0
    onehot = torch.zeros(n, k, dtype=torch.bool)
    onehot[has.nonzero().squeeze(1), target[has]] = True
    bias = b if b.ndim == 0 else b.unsqueeze(0)
    z = torch.where(onehot, -(s * (cos - m) - bias), s * cos - bias)
    if clamp is not None:
        z = z.clamp(-clamp, clamp)
    return (F.softplus(z) * valid.unsqueeze(0)).sum()


def plain_softmax(u, rows, valid, target, s, margin, world_positive_written):
    cos = u @ rows.T
    n, k = cos.shape
    has = (target >= 0).nonzero().squeeze(1)
    logits = s * cos
    logits = logits.index_put((has, target[has]), s * margin(cos[has, target[has]]))
    logits = logits.masked_fill(~valid.unsqueeze(0), float("-inf"))
    keep = has[valid[target[has]]]
    per = torch.logsumexp(logits[keep], 1) - logits[keep, target[keep]]
    return per.sum() / world_positive_written


def grads(value, inputs):
    return torch.autograd.grad(value, inputs, allow_unused=True)


@pytest.mark.parametrize("bias_kind", ["scalar", "per_column"])
@pytest.mark.parametrize("clamp", [None, 64.0, 2.0])
def test_bce_sum_value_and_gradients_equal_autograd_through_the_formula(bias_kind, clamp):
    u, rows, valid, target = problem()
    s, m = 8.0, 0.1
    g = torch.Generator().manual_seed(1)
    b0 = torch.tensor(1.5, dtype=D64) if bias_kind == "scalar" else torch.randn(rows.shape[0], generator=g, dtype=D64)
    if bias_kind == "per_column":
        b0[0] = -9.0  # s cos - b_0 > 2: the upper clamp is reached
    u1, b1 = u.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    u2, b2 = u.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ours = bce_sum(u1, rows, valid, target, s, m, b1, clamp)
    ref = plain_bce(u2, rows, valid, target, s, m, b2, clamp)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    for a, r in zip(grads(ours * 3.0, (u1, b1)), grads(ref * 3.0, (u2, b2))):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-14)
    if clamp == 2.0:  # both masks really were used
        z = s * (u @ rows.T) - (b0 if b0.ndim == 0 else b0.unsqueeze(0))
        assert bool((z > clamp).any()) and bool((z < -clamp).any())


@pytest.mark.parametrize("margin", [CombinedMargin(1.0, 0.0, 0.1), AdaptiveMargin(0.7)], ids=["cosface_m", "epl_k"])
def test_softmax_mean_value_and_gradients_equal_autograd_through_the_formula(margin):
    u, rows, valid, target = problem()
    s = 8.0
    u1, u2 = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
    ours = softmax_mean(u1, rows, valid, target, s, margin)
    kept = int(((target >= 0) & valid[target.clamp_min(0)]).sum())
    ref = plain_softmax(u2, rows, valid, target, s, margin, kept)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    (a,), (r,) = grads(ours, (u1,)), grads(ref, (u2,))
    assert torch.allclose(a, r, rtol=1e-10, atol=1e-14)


def test_softmax_mean_without_any_written_positive_is_zero_with_zero_gradient():
    u, rows, valid, target = problem()
    valid[:] = False
    u1 = u.clone().requires_grad_(True)
    loss = softmax_mean(u1, rows, valid, target, 8.0, CombinedMargin(1.0, 0.0, 0.1))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    (g,) = grads(loss, (u1,))
    assert torch.equal(g, torch.zeros_like(u))


def test_a_shard_without_columns_contributes_nothing():
    u, rows, valid, _ = problem()
    target = torch.full((u.shape[0],), -1)
    u1 = u.clone().requires_grad_(True)
    b = torch.tensor(1.0, dtype=D64, requires_grad=True)
    total = bce_sum(u1, rows[:0], valid[:0], target, 8.0, 0.1, b, 64.0)
    assert float(total.detach()) == 0.0
    gu, gb = grads(total, (u1, b))
    assert torch.equal(gu, torch.zeros_like(u)) and float(gb) == 0.0


def test_without_gradient_the_value_is_the_same_and_carries_no_graph():
    u, rows, valid, target = problem()
    b = torch.tensor(1.5, dtype=D64, requires_grad=True)
    with_grad = bce_sum(u.clone().requires_grad_(True), rows, valid, target, 8.0, 0.1, b, 64.0)
    with torch.no_grad():
        plain = bce_sum(u, rows, valid, target, 8.0, 0.1, b, 64.0)
    assert not plain.requires_grad and torch.equal(plain, with_grad.detach())


def test_with_gradients_scales_the_stored_gradients_by_the_upstream_one_and_skips_constant_inputs():
    a = torch.tensor([1.0, 2.0], dtype=D64, requires_grad=True)
    c = torch.tensor(3.0, dtype=D64)  # no gradient wanted: left out
    v = with_gradients(torch.tensor(5.0, dtype=D64), [(a, torch.tensor([0.5, -1.0], dtype=D64)), (c, torch.ones(()))])
    (2.0 * v).backward()
    assert float(v.detach()) == 5.0 and a.grad.tolist() == [1.0, -2.0]
    assert with_gradients(torch.tensor(1.0), [(c, torch.ones(()))]).grad_fn is None

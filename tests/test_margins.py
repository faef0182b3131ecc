"""Margins on cosine logits (heads/margins.py): values and gradients against the formulas, written out here."""
import math

import pytest
import torch

from heads.margins import (
    NORM_EPS,
    CombinedMargin,
    arcface,
    clamped_arccos,
    combined_margin,
    cosface,
    interclass_filter,
    margin_logits,
    normalize,
    target_mask,
)

D64 = torch.float64


def grad_of(fn, c: torch.Tensor) -> torch.Tensor:
    c = c.clone().requires_grad_(True)
    fn(c).sum().backward()
    return c.grad


def test_normalize_divides_by_norm_and_floors_it_at_eps():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [3e-6, 4e-6]], dtype=D64)
    y = normalize(x)
    assert torch.allclose(y[0], torch.tensor([0.6, 0.8], dtype=D64))
    assert torch.equal(y[1], torch.zeros(2, dtype=D64))  # no NaN for a zero vector
    assert torch.allclose(y[2], x[2] / NORM_EPS)  # |x| = 5e-6 < eps: divided by eps, not by |x|
    g = grad_of(lambda t: normalize(t)[:, 0], x)
    assert torch.isfinite(g).all()


def test_cosface_value_and_gradient():
    c = torch.tensor([-0.3, 0.2, 0.9], dtype=D64)
    assert torch.allclose(cosface(c, 0.4), c - 0.4)
    assert torch.allclose(grad_of(lambda t: cosface(t, 0.4), c), torch.ones(3, dtype=D64))


def test_arcface_exact_value_and_gradient_follow_cos_theta_plus_m():
    c = torch.tensor([-0.7, -0.1, 0.3, 0.95], dtype=D64)
    m = 0.5
    expected = torch.tensor([math.cos(math.acos(v) + m) for v in c.tolist()], dtype=D64)
    assert torch.allclose(arcface(c, m), expected, atol=1e-12)
    # d/dc cos(acos(c) + m) = sin(acos(c) + m) / sqrt(1 - c^2)
    slope = torch.tensor([math.sin(math.acos(v) + m) / math.sqrt(1 - v * v) for v in c.tolist()], dtype=D64)
    assert torch.allclose(grad_of(lambda t: arcface(t, m), c), slope, atol=1e-10)


def test_straight_through_keeps_the_value_and_passes_the_gradient_of_cos():
    c = torch.tensor([-0.7, 0.3, 0.95], dtype=D64)
    assert torch.allclose(arcface(c, 0.5, straight_through=True), arcface(c, 0.5), atol=1e-14)
    assert torch.equal(grad_of(lambda t: arcface(t, 0.5, straight_through=True), c), torch.ones(3, dtype=D64))
    exact = grad_of(lambda t: arcface(t, 0.5), c)
    assert not torch.allclose(exact, torch.ones(3, dtype=D64))  # the two options really differ


@pytest.mark.parametrize("m1,m2,m3", [(1.2, 0.1, 0.05), (0.9, 0.3, 0.2), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0)])
def test_general_combined_margin_uses_all_three_margins(m1, m2, m3):
    c = torch.tensor([-0.6, 0.0, 0.4, 0.8], dtype=D64)
    expected = torch.tensor([math.cos(m1 * math.acos(v) + m2) - m3 for v in c.tolist()], dtype=D64)
    assert torch.allclose(combined_margin(c, m1, m2, m3), expected, atol=1e-12)
    slope = torch.tensor([m1 * math.sin(m1 * math.acos(v) + m2) / math.sqrt(1 - v * v) for v in c.tolist()],
                         dtype=D64)
    assert torch.allclose(grad_of(lambda t: combined_margin(t, m1, m2, m3), c), slope, atol=1e-10)
    assert torch.allclose(CombinedMargin(m1, m2, m3)(c), expected, atol=1e-12)


def test_special_cases_of_the_combined_margin():
    c = torch.linspace(-0.9, 0.9, 7, dtype=D64)
    assert torch.allclose(combined_margin(c, 1.0, 0.0, 0.4), cosface(c, 0.4))
    assert torch.allclose(combined_margin(c, 1.0, 0.5, 0.0), arcface(c, 0.5))
    assert torch.equal(CombinedMargin()(c), c)  # defaults: plain normalised softmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arccos_is_clamped_and_its_gradient_finite_at_the_ends(dtype):
    c = torch.tensor([-1.0 - 1e-6, -1.0, 0.0, 1.0, 1.0 + 1e-6], dtype=dtype)
    theta = clamped_arccos(c)
    assert torch.allclose(theta, torch.tensor([math.pi, math.pi, math.pi / 2, 0.0, 0.0], dtype=dtype))
    g = grad_of(clamped_arccos, c)
    assert torch.isfinite(g).all()
    assert g[0] == 0 and g[-1] == 0  # outside [-1, 1]: the clamp's zero gradient
    assert g[2] == -1.0
    assert g[1] < -1e3 and g[3] < -1e3  # steep but finite at +-1
    for m in [(1.0, 0.5, 0.0), (1.2, 0.1, 0.05)]:
        assert torch.isfinite(grad_of(lambda t: combined_margin(t, *m), c)).all()


def test_target_mask_marks_only_valid_targets():
    cos = torch.zeros(3, 4)
    mask = target_mask(cos, torch.tensor([2, -1, 0]))
    assert mask.tolist() == [[False, False, True, False], [False] * 4, [True, False, False, False]]
    assert target_mask(torch.zeros(2, 0), torch.tensor([-1, -1])).shape == (2, 0)


def test_interclass_filtering_zeroes_only_non_target_cosines_above_threshold():
    cos = torch.tensor([[0.5, 0.3, 0.45], [0.9, 0.41, -0.2]], dtype=D64, requires_grad=True)
    is_target = target_mask(cos, torch.tensor([0, -1]))
    out = interclass_filter(cos, is_target, 0.4)
    assert out.tolist() == [[0.5, 0.3, 0.0], [0.0, 0.0, -0.2]]
    out.sum().backward()
    assert cos.grad.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # filtered entries get no gradient
    assert interclass_filter(cos, is_target, 0.0) is cos  # 0 = off


def test_margin_logits_scale_margin_on_target_and_filtering():
    cos = torch.tensor([[0.5, 0.3, 0.45], [0.9, 0.41, -0.2], [0.1, 0.2, 0.7]], dtype=D64)
    target = torch.tensor([0, -1, 2])
    out = margin_logits(cos, target, CombinedMargin(1.0, 0.0, 0.4), scale=10.0, filter_threshold=0.4)
    expected = 10 * torch.tensor([[0.1, 0.3, 0.0], [0.0, 0.0, -0.2], [0.1, 0.2, 0.3]], dtype=D64)
    assert torch.allclose(out, expected)
    arc = margin_logits(cos, target, CombinedMargin(1.0, 0.5, 0.0), scale=2.0)
    assert torch.isclose(arc[2, 2], torch.tensor(2 * math.cos(math.acos(0.7) + 0.5), dtype=D64))
    assert torch.equal(arc[1], 2 * cos[1])
    empty = margin_logits(torch.zeros(3, 0), torch.full((3,), -1), CombinedMargin(), scale=64.0)
    assert empty.shape == (3, 0)

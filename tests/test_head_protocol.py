"""Every loss heads.build_head knows builds a heads.Head: forward, the epoch hook, learned thresholds, per-class
buffers (what a checkpoint reshards), partition, state_dict."""
import math

import pytest
import torch
from torch import nn

import heads
from heads import build_head, loss_names
from heads.partition import ClassPartition

C, D, B = 10, 8, 6


def head_of(loss: str):
    cfg = {"loss": loss}
    if loss == "combined":
        cfg["margin"] = [1.0, 0.3, 0.2]
    return build_head(cfg, C, D, ClassPartition(C, 1, 0), seed=1)


@pytest.mark.parametrize("loss", loss_names())
def test_every_built_head_is_a_head(loss):
    head = head_of(loss)
    assert isinstance(head, heads.Head) and isinstance(head, nn.Module)
    assert isinstance(head.partition, ClassPartition) and head.partition.num_local == C
    g = torch.Generator().manual_seed(0)
    head.train()
    for epoch in range(4):  # across every start epoch of the presets (USS from 1, EPL from 3)
        assert head.set_epoch(epoch) is None
        x = torch.randn(B, D, generator=g, requires_grad=True)
        loss_value, logs = head(x, torch.randint(0, C, (B,), generator=g))
        assert loss_value.ndim == 0 and math.isfinite(float(loss_value.detach())) and isinstance(logs, dict)
        if isinstance(head, heads.EmbeddedLoss):  # the hook switches the memory term on at its start epoch
            assert ("loss_s2s" in logs) == (epoch >= head.start_epoch)
        loss_value.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    thresholds = head.learned_thresholds()
    assert isinstance(thresholds, dict)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in thresholds.items())
    state = head.state_dict()
    names = head.per_class_buffers()
    assert names and len(set(names)) == len(names)
    for name in names:
        assert name in state, f"{loss}: per-class buffer {name!r} not in the state dict"
        assert state[name].shape[0] == head.partition.num_local
    head.load_state_dict(state)


def test_build_head_refuses_a_builder_that_returns_no_head():
    heads.register_head("not_a_head")(lambda *a: nn.Linear(D, C))
    try:
        with pytest.raises(TypeError, match="not_a_head.*Head protocol"):
            build_head({"loss": "not_a_head"}, C, D, ClassPartition(C, 1, 0), seed=0)
    finally:
        del heads.HEADS["not_a_head"]


def test_a_plain_object_is_not_a_head():
    assert not isinstance(object(), heads.Head)
    assert not isinstance(nn.Linear(2, 2), heads.Head)

"""A skipped step leaves the head exactly as it was; a memory loaded with bad rows cannot poison a gradient."""
import pytest
import torch

from heads import build_head, loss_names
from heads.journal import HeadTransaction
from heads.memory import MemoryStateError
from heads.partition import ClassPartition

C, D = 13, 8
STATEFUL = {"unitsface", "cosface_s2s_bce", "cosface_s2s_softmax", "epl", "gb_cosface", "arcface_uss", "uce_epl",
            "arcface_epl"}  # losses whose training forward writes state (memories, data-set biases, p_v)


def head_of(loss: str, **extra):
    cfg = {"loss": loss, **extra}
    if loss == "combined":
        cfg["margin"] = [1.0, 0.3, 0.2]
    if loss in STATEFUL - {"gb_cosface"}:
        cfg["s2s_start_epoch"] = 0
    return build_head(cfg, C, D, ClassPartition(C, 1, 0), seed=1)


def snapshot(head) -> dict:
    return {k: v.detach().clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", loss_names())
def test_rollback_restores_every_buffer_and_parameter_bit_exactly(loss):
    head = head_of(loss)
    head.train()
    g = torch.Generator().manual_seed(0)
    txn = HeadTransaction(head)
    for _ in range(2):  # a committed step first: memories, biases and p_v are set
        head(torch.randn(10, D, generator=g), torch.randint(0, C, (10,), generator=g))
        txn.commit()
    before = snapshot(head)
    x = torch.randn(10, D, generator=g)
    x[3] = float("nan")  # a diverged step: NaN embeddings reach the memory writes
    head(x, torch.randint(0, C, (10,), generator=g))
    assert same(before, snapshot(head)) == (loss not in STATEFUL)  # the forward wrote state iff the loss has some
    txn.rollback()
    assert same(before, snapshot(head))
    assert len(txn.journal) == 0


@pytest.mark.parametrize("loss", ["unitsface", "epl", "gb_cosface"])
def test_recording_is_off_without_a_transaction_and_after_close(loss):
    head = head_of(loss)
    head.train()
    head(torch.randn(6, D), torch.arange(6))
    txn = HeadTransaction(head)
    head(torch.randn(6, D), torch.arange(6))
    assert len(txn.journal) > 0
    txn.commit()
    txn.close()
    head(torch.randn(6, D), torch.arange(6))
    assert len(txn.journal) == 0


@pytest.mark.parametrize("loss,buffer", [("unitsface", "s2s.memory.features"), ("epl", "s2s.memory.prototypes")])
def test_unwritten_rows_holding_nan_never_reach_a_gradient(loss, buffer):
    head = head_of(loss)
    head.train()
    head(torch.randn(4, D), torch.tensor([0, 1, 2, 3]))  # rows 0..3 written, the others not
    state = head.state_dict()
    valid = state[buffer.rsplit(".", 1)[0] + ".valid"]
    assert not bool(valid.all())
    state[buffer][~valid] = float("nan")  # what a damaged or foreign checkpoint may hold there
    fresh = head_of(loss)
    fresh.load_state_dict(state)
    fresh.train()
    x = torch.randn(6, D, requires_grad=True)
    loss_value, _ = fresh(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    loss_value.backward()
    assert torch.isfinite(loss_value) and torch.isfinite(x.grad).all()


def test_non_finite_written_rows_are_refused_on_load_with_the_tensor_named():
    head = head_of("unitsface")
    head.train()
    head(torch.randn(4, D), torch.tensor([0, 1, 2, 3]))
    state = head.state_dict()
    state["s2s.memory.features"][2, 0] = float("inf")
    with pytest.raises(MemoryStateError, match=r"s2s\.memory\.features: 1 written row\(s\) .*local rows \[2\]"):
        head_of("unitsface").load_state_dict(state)

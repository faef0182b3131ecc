"""How many [N, K] and [K, D] tensors a head step allocates (aten level, every op of forward, backward, optimizer).

The counts are what heads/blocks.py and heads/optim.py promise: the [N, K] block of a loss is made in two buffers
(cosines; logits -> exp -> dL/dcos, in place), a memory term's in one, the BCE sums add one row-chunked softplus
temporary (here the whole block: it is small); the head optimizer allocates nothing of the sampled rows' size.
Before this design (commit 97994ad, counted the same way) a CosFace step allocated 11 [N, K] tensors (UCE,
GB-CosFace, USS 13) and its optimizer 3 [K, D] (the rows gathered again, d, the momentum rows).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import heads
from heads import EmbeddedLoss, build_head
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition

C, D, N = 200, 16, 24


class NewTensors(TorchDispatchMode):
    """Shapes of the tensors each aten op returns in new storage (not a view or an in-place result of an input)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
        return out

    def count(self, shape: tuple[int, ...]) -> int:
        return sum(s == shape for s in self.shapes)


def head_step(loss: str, rate: float, **cfg):
    head = build_head({"loss": loss, "sample_rate": rate, **cfg}, C, D, ClassPartition(C, 1, 0), seed=0)
    if isinstance(head, EmbeddedLoss):
        memory = head.s2s.memory
        rows = memory.features if hasattr(memory, "features") else memory.prototypes
        rows.copy_(torch.nn.functional.normalize(torch.randn(rows.shape), dim=1))
        memory.valid.fill_(True)
        head.set_epoch(head.start_epoch)
    heads.set_collect_stats(head, False)
    opt = HeadOptimizer(head, lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step is the one counted
        x = torch.randn(N, D, generator=g).requires_grad_(True)
        y = torch.randint(0, C, (N,), generator=g)
        with NewTensors() as fb:
            loss_value, _ = head(x, y)
            loss_value.backward()
        k = (C if rate >= 1 else int(rate * C))
        with NewTensors() as op:
            opt.step()
            opt.zero_grad()
    return fb.count((N, k)), op.count((k, D)), fb.count((k, D))


# family: [N, K] float tensors allocated by forward + backward
EXPECTED_NK = {"softmax": 2, "cosface": 2, "arcface": 2, "combined": 2, "gb_cosface": 2, "uce": 3, "uce_diverse": 3,
               "cosface_s2s_softmax": 3, "epl": 3, "unitsface": 4, "cosface_s2s_bce": 4}


@pytest.mark.parametrize("loss", sorted(EXPECTED_NK))
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_block_buffers_and_no_optimizer_copy_of_the_sampled_rows(loss, rate):
    extra = {"margin": [1.1, 0.2, 0.1]} if loss == "combined" else {}
    nk, opt_kd, fb_kd = head_step(loss, rate, **extra)
    assert nk <= EXPECTED_NK[loss], (loss, nk)
    assert opt_kd == 0, (loss, opt_kd)  # d, the momentum rows and w live in the gradient's and the leaf's buffers
    if rate < 1:  # the gathered centre rows (the leaf) and their gradient, and a memory term's rows; nothing else
        assert fb_kd <= (3 if loss in ("unitsface", "cosface_s2s_bce", "cosface_s2s_softmax", "epl") else 2), \
            (loss, fb_kd)

"""A training step of every head makes no host sync on a non-log step (bench/sync_count.py counts them on the CPU).

One step = forward + backward + the head optimizer's step + zero_grad, with the statistics off
(``heads.set_collect_stats(head, False)``: what the trainer does between log steps), after a first step (which checks
the shapes across ranks once). Memory terms run with a full memory and switched on. Sampling as in training
(r = 0.1 here: more sampled classes than the batch has samples, the sync-free case; heads/partial_fc.py says when
one sync stays), and r = 1.

A log step (statistics on) may sync: the trainer reads the logs then anyway; its count is reported, not limited.
"""
import pytest
import torch

import heads
from bench.head_cases import FAMILIES, fill_memory
from bench.sync_count import count_syncs
from heads import build_head
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from tests.distributed import run_ranks

C, D, B = 1000, 16, 12


def step_syncs(rank: int, world_size: int, cfg: dict, steps: int = 3, stats_last: bool = False) -> dict:
    """Syncs of each step (forward + backward, then the optimizer) after one warm-up step."""
    head = build_head(cfg, C, D, ClassPartition(C, world_size, rank), seed=0)
    fill_memory(head, torch.Generator().manual_seed(rank))  # the steady state after the first epoch, s2s on
    head.train()
    opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(10 + rank)
    out = {"forward_backward": [], "optimizer": [], "sites": []}
    for step in range(steps + 1):
        stats = stats_last and step == steps
        heads.set_collect_stats(head, stats)
        x = torch.randn(B, D, generator=g).requires_grad_(True)
        y = torch.randint(0, C, (B,), generator=g)
        with count_syncs() as fb:
            loss, logs = head(x, y)
            loss.backward()
        with count_syncs() as op:
            opt.step()
            opt.zero_grad()
        if step:  # the first step checks the shapes across ranks (once)
            out["forward_backward"].append(fb.total)
            out["optimizer"].append(op.total)
            out["sites"].append(fb.report() + "\n" + op.report())
        assert torch.isfinite(loss)
    out["logs"] = sorted(logs)
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("rate", [0.1, 1.0])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_training_step_makes_no_host_sync(world_size, rate):
    def run(rank, world_size):
        return {name: step_syncs(rank, world_size, {**cfg, "sample_rate": rate}) for name, cfg in FAMILIES.items()}

    for rank, per_family in enumerate(run_ranks(run, world_size)):
        for name, got in per_family.items():
            where = f"{name}, r={rate}, W={world_size}, rank {rank}"
            assert got["forward_backward"] == [0, 0, 0], (where, got["sites"])
            assert got["optimizer"] == [0, 0, 0], (where, got["sites"])
            assert "accuracy" not in got["logs"] and "memory_filled" not in got["logs"], (where, got["logs"])


def test_without_torch_distributed_too():
    for name, cfg in FAMILIES.items():
        got = step_syncs(0, 1, {**cfg, "sample_rate": 0.1}, steps=2)
        assert got["forward_backward"] == [0, 0] and got["optimizer"] == [0, 0], (name, got["sites"])


def test_statistics_come_back_when_asked():
    """A log step returns the accuracy (and the memory fill) again; it may sync, the trainer reads the logs then."""
    for name in ("cosface", "unitsface", "gb_cosface"):
        got = step_syncs(0, 1, {**FAMILIES[name], "sample_rate": 0.1}, steps=1, stats_last=True)
        assert "accuracy" in got["logs"], name
        assert ("memory_filled" in got["logs"]) == (name == "unitsface"), name


def test_set_collect_stats_reaches_every_submodule_and_defaults_to_on():
    head = build_head({"loss": "unitsface"}, C, D, ClassPartition(C, 1, 0), seed=0)
    assert all(heads.collects_stats(m) for m in head.modules())
    heads.set_collect_stats(head, False)
    assert not any(heads.collects_stats(m) for m in head.modules())
    with pytest.raises(TypeError, match="enabled"):
        heads.set_collect_stats(head, 1)


def test_the_counter_sees_what_it_claims():
    """No test that cannot fail: each kind of sync the heads used to make is counted."""
    x = torch.randn(6, 3)
    with count_syncs() as s:
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 0]
        torch.unique(x)
        (x > 0).nonzero()
        torch.tensor([1.0, 2.0], device=x.device)
        f"{x.sum():.3f}"
        x.tolist()
        with s.pause():
            float(x.sum())
    assert s.by_op() == {"Tensor.item": 1, "Tensor.__bool__": 1, "Tensor.__getitem__": 1, "torch.unique": 1,
                         "Tensor.nonzero": 1, "torch.tensor": 1, "Tensor.__format__": 1, "Tensor.tolist": 1}
    with count_syncs() as s:
        x[torch.tensor([0, 2])]
        torch.where(x > 0, x, 0.0)
        x.index_select(0, torch.tensor([1]))
        torch.tensor([1.0])  # host data staying on the host
    assert s.total == 0, s.report()
    assert torch.Tensor.__bool__ is torch._C.TensorBase.__bool__  # patches undone


def test_sampling_with_fewer_sampled_classes_than_samples_makes_its_one_documented_sync():
    """int(r * C_local) <= min(N, C_local): the positives may outnumber the sample size, their count sets the output
    size (heads/partial_fc.py): exactly one sync per step, in sample_classes."""
    got = step_syncs(0, 1, {"loss": "cosface", "sample_rate": 0.01}, steps=2)  # 10 sampled classes, N = 12
    assert got["forward_backward"] == [1, 1] and got["optimizer"] == [0, 0], got["sites"]
    assert "sample_classes" in got["sites"][0] and "Tensor.__int__" in got["sites"][0]

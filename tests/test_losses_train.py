"""A short 2-rank CPU training run per loss family on synthetic identities: finite, decreasing loss.

Synthetic data: 24 identities, each a Gaussian cluster in a 32-d input space; a small MLP backbone (data-parallel:
its gradients are averaged over ranks as DeepSpeed / DDP do), the head stepped by HeadOptimizer, paper defaults
for the scales and margins. 40 steps, 8 steps per epoch (``set_epoch`` each epoch), so the memory terms run from
step 8 (USS, s2s) or step 24 (EPL). The loss must stay finite and fall within the last phase (the loss changes
definition when a term starts), and the UniTSFace run must log its learned unified threshold t = b/s.
"""
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from heads import build_head
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from tests.distributed import run_ranks

C, IN, D, B = 24, 32, 32, 12
STEPS, STEPS_PER_EPOCH = 40, 8
FAMILIES = {  # one run per loss family (the variants are proven exact in test_losses_exact.py)
    "cosface": {"loss": "cosface"},
    "uce": {"loss": "uce"},
    "uce_diverse": {"loss": "uce_diverse"},
    "gb_cosface": {"loss": "gb_cosface", "scale": 32.0},
    "unitsface": {"loss": "unitsface"},
    "unitsface_sampled": {"loss": "unitsface", "sample_rate": 0.5},
    "s2s_softmax": {"loss": "cosface_s2s_softmax"},
    "s2s_bce": {"loss": "cosface_s2s_bce"},
    "epl": {"loss": "epl"},
}


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(C, IN, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 * step + rank)
    labels = torch.randint(0, C, (B,), generator=g)
    return centres[labels] + 0.6 * torch.randn(B, IN, generator=g), labels


def _train(rank, world_size):
    out = {}
    for name, cfg in FAMILIES.items():
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Linear(IN, 64), nn.PReLU(), nn.Linear(64, D), nn.BatchNorm1d(D))
        head = build_head(cfg, C, D, ClassPartition(C, world_size, rank), seed=0)
        opt = torch.optim.SGD(backbone.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        head_opt = HeadOptimizer(head, lr=0.05, momentum=0.9, weight_decay=5e-4)
        losses, logs_seen = [], {}
        for step in range(STEPS):
            if step % STEPS_PER_EPOCH == 0:
                head.set_epoch(step // STEPS_PER_EPOCH)
            x, labels = batch(step, rank)
            loss, logs = head(backbone(x), labels)
            loss.backward()
            grads = [p.grad for p in backbone.parameters()]  # data-parallel averaging, one all_reduce
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g) / world_size)
                offset += g.numel()
            opt.step()
            head_opt.step()
            opt.zero_grad()
            head_opt.zero_grad()
            losses.append(loss.item())
            logs_seen = {k: float(v) for k, v in logs.items()}
        out[name] = (losses, logs_seen, head.learned_thresholds())
    return out


@pytest.fixture(scope="module")
def trained():
    return run_ranks(_train, 2, timeout=300)


def phase_start(name: str) -> int:
    if name == "epl":
        return 3 * STEPS_PER_EPOCH
    return STEPS_PER_EPOCH if FAMILIES[name]["loss"] in ("unitsface", "cosface_s2s_softmax", "cosface_s2s_bce") else 0


@pytest.mark.multirank
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_ends_with_a_finite_decreasing_loss(trained, name):
    losses = trained[0][name][0]
    assert losses == trained[1][name][0], "the loss is identical on both ranks"
    assert all(math.isfinite(v) for v in losses)
    phase = losses[phase_start(name):]
    first, last = sum(phase[:4]) / 4, sum(phase[-4:]) / 4
    assert last < 0.8 * first, (name, first, last, phase)


@pytest.mark.multirank
def test_unitsface_logs_its_learned_unified_threshold(trained):
    _, logs, thresholds = trained[0]["unitsface"]
    assert {"t_uss", "b_uss", "loss_s2c", "loss_s2s", "memory_filled"} <= set(logs)
    assert logs["memory_filled"] == 1.0  # every identity written during epoch 0
    assert 0.0 < logs["t_uss"] < 1.0 and logs["t_uss"] == pytest.approx(logs["b_uss"] / 64.0)
    assert thresholds["t_uss"] == pytest.approx(trained[1]["unitsface"][2]["t_uss"])  # the same b on both ranks
    assert 0.5 <= trained[0]["gb_cosface"][1]["p_v"] <= 0.7
    assert "t_uce" in trained[0]["uce"][1]

"""sample_rate < 1 on 2 gloo ranks: every loss equals the reference restricted to the sampled classes, and nothing
that was not sampled moves.

40 classes (20 per rank), 2 ranks x 6 samples with duplicate labels, sample rates 0.25 and 0 (positives only), two
steps (epochs 0 and 1: the memory terms run in the second). Per step, the union S of both ranks' sampled classes is
read back from the heads; the reference (tests/losses_reference.py) computes the loss over the columns S only: the
centres of S, the memory rows / prototypes of S, the biases of S. Checked per step: loss, x.grad; after each step:
rows of centres, momentum and class biases change only where sampled, memory rows / prototypes only for the classes
in the batch; after both steps the whole state equals the reference's (whose SGD also leaves unsampled rows alone).
"""
import pytest
import torch

from heads import EmbeddedLoss, build_head
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from tests.distributed import run_ranks
from tests.losses_reference import Reference, as_head_state
from tests.test_losses_exact import CANONICAL, close

D64 = torch.float64
C, D, W, B = 40, 8, 2, 6
EPOCHS = [0, 1]
LR, MOMENTUM, WD = 0.2, 0.9, 5e-4
LABELS = [torch.tensor([3, 7, 3, 20, 25, 11, 31, 38, 39, 20, 7, 5]),   # 3, 7 and 20 twice
          torch.tensor([3, 5, 22, 22, 30, 7, 11, 12, 3, 38, 21, 30])]   # meets rows written at step 0, and new ones

CASES = {
    "unitsface": {"loss": "unitsface", "scale": 16.0, "s2s_scale": 16.0},
    "s2s_bce": {"loss": "cosface_s2s_bce", "scale": 16.0, "s2s_scale": 16.0},
    "s2s_softmax": {"loss": "cosface_s2s_softmax", "scale": 16.0, "s2s_scale": 16.0},
    "epl": {"loss": "epl", "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 1},
    "uce_diverse_epl": {"loss": "uce_epl", "diverse": True, "bias_init": 4.0, "scale": 16.0, "s2s_scale": 16.0,
                        "s2s_start_epoch": 1},
    "uce": {"loss": "uce", "bias_init": 4.0, "scale": 16.0},
    "gb_cosface": {"loss": "gb_cosface", "scale": 16.0},
}


def centres0() -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(2), dtype=D64)


def step_x(t: int) -> torch.Tensor:
    return torch.randn(W * B, D, generator=torch.Generator().manual_seed(200 + t), dtype=D64)


def canonical_state(head) -> dict:
    sd, state = head.state_dict(), {}
    for k, v in sd.items():
        if k == "s2s.memory.valid":
            state["prototypes_valid" if "s2s.memory.prototypes" in sd else "memory_valid"] = v.clone()
        elif k in CANONICAL or k.endswith("class_bias.weight_momentum"):
            state[CANONICAL.get(k, k)] = v.clone()
    return state


def _run(rank, world_size, rate):
    part = ClassPartition(C, world_size, rank)
    out = {}
    for name, cfg in CASES.items():
        head = build_head({**cfg, "sample_rate": rate}, C, D, part, seed=3).double()
        s2c = head.s2c if isinstance(head, EmbeddedLoss) else head
        s2c.weight.copy_(centres0()[part.start:part.end])
        opt = HeadOptimizer(head, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        steps = []
        for t, epoch in enumerate(EPOCHS):
            head.set_epoch(epoch)
            before = canonical_state(head)
            x = step_x(t)[rank * B:(rank + 1) * B].clone().requires_grad_(True)
            loss, _ = head(x, LABELS[t][rank * B:(rank + 1) * B])
            loss.backward()
            sampled = part.to_global(s2c.last_sampled)
            opt.step()
            opt.zero_grad()
            steps.append((loss.detach(), x.grad.clone(), sampled, before, canonical_state(head)))
        out[name] = steps
    return out


@pytest.fixture(scope="module", params=[0.25, 0.0])
def sampled_runs(request):
    return request.param, run_ranks(_run, W, request.param)


@pytest.mark.multirank
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampled_losses_equal_the_reference_on_the_sampled_classes(sampled_runs, case):
    rate, runs = sampled_runs
    ref = Reference(CASES[case], centres0(), LR, MOMENTUM, WD)
    for t, epoch in enumerate(EPOCHS):
        S = torch.cat([runs[r][case][t][2] for r in range(W)])
        assert len(S) < C, "some classes are left out"
        assert set(LABELS[t].tolist()) <= set(S.tolist()), "every positive is sampled"
        if rate == 0.0:
            assert set(S.tolist()) == set(LABELS[t].tolist())
        expected = ref.step(step_x(t), LABELS[t], epoch, columns=S)
        for rank in range(W):
            loss, grad_x = runs[rank][case][t][0], runs[rank][case][t][1]
            assert close(loss, expected["loss"]), (case, rate, t, rank, float(loss), float(expected["loss"]))
            assert close(grad_x, W * expected["x"][rank * B:(rank + 1) * B]), (case, rate, t, rank)
    final = ref.state()
    for rank in range(W):
        part = ClassPartition(C, W, rank)
        for name, value in runs[rank][case][-1][4].items():
            if name not in final:
                continue
            expected = as_head_state(name, final[name])
            if name not in ("b", "s2s_b", "p_v"):
                expected = expected[part.start:part.end]
            if value.dtype == torch.bool:
                assert torch.equal(value, expected), (case, rank, name)
            else:
                assert close(value, expected, rtol=1e-9), (case, rate, rank, name)


@pytest.mark.multirank
@pytest.mark.parametrize("case", sorted(CASES))
def test_nothing_unsampled_moves(sampled_runs, case):
    _, runs = sampled_runs
    for rank in range(W):
        part = ClassPartition(C, W, rank)
        for t in range(len(EPOCHS)):
            _, _, sampled, before, after = runs[rank][case][t]
            is_sampled = torch.zeros(part.num_local, dtype=torch.bool)
            is_sampled[sampled - part.start] = True
            in_batch = torch.zeros(part.num_local, dtype=torch.bool)
            owned = part.to_local(LABELS[t])
            in_batch[owned[owned >= 0]] = True
            for name, value in after.items():
                if value.ndim == 0 or name in ("b", "s2s_b"):
                    continue
                moved = (value != before[name]).reshape(part.num_local, -1).any(1)
                allowed = in_batch if name.startswith(("memory", "prototypes")) else is_sampled
                if name == "s2s_class_bias" and t == 1:  # the first step with the s2s term
                    # the one-time data-driven initialisation adds the same value to every class bias
                    shift = value[~allowed] - before[name][~allowed]
                    assert torch.allclose(shift, shift[:1].expand_as(shift)) and shift[0] > 0, (case, rank, t)
                    continue
                assert not (moved & ~allowed).any(), (case, rank, t, name, moved.nonzero().flatten().tolist())
                if name in ("centres", "memory", "prototypes"):
                    assert moved[allowed].any(), (case, rank, t, name)  # and something did move

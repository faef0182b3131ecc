"""Every loss on W gloo ranks == the plain single-process reference (tests/losses_reference.py), step by step.

float64, sample_rate = 1, the same global batch of N = 12 samples (11 classes: duplicates in every batch, uneven
shards) on W = 1, 2, 3, 4 ranks and without torch.distributed. Four consecutive training steps, epochs [0, 1, 1, 1]
(the sample-to-sample terms start at epoch 1 here), each followed by the head optimizer's SGD step. Per step:

    loss                    == reference loss                             (identical on every rank)
    x_r.grad                == W * dL/dx_r                               (the gather's x W)
    centre rows' gradient   == dL/dW[own classes]
    b.grad (replicated b)   summed over ranks == dL/db                    (each rank holds its shard's part)
    class biases' gradient  == dL/db_j[own classes]

and after the four steps the whole state: centres + momentum, memory rows + written mask, prototypes, b, the class
biases, p_v. So memory writes, prototype updates, the data-driven b initialisation and the p_v EMA evolve exactly as
on one rank.
"""
import pytest
import torch

from heads import EmbeddedLoss, build_head
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from heads.rows import ClassBias
from tests.distributed import run_ranks
from tests.losses_reference import Reference, as_head_state, expand

D64 = torch.float64
C, D, N = 11, 8, 12
EPOCHS = [0, 1, 1, 1]
LR, MOMENTUM, WD = 0.2, 0.9, 5e-4

CASES = {
    "uce": {"loss": "uce", "scale": 16.0, "margin": 0.3},
    "uce_no_clamp_l_binit": {"loss": "uce", "scale": 16.0, "clamp": False, "neg_weight": 0.5, "bias_init": 3.0},
    "uce_diverse": {"loss": "uce_diverse", "scale": 16.0},
    "uce_s64_clamped": {"loss": "uce"},  # s = 64: the [-s, s] clamp cuts some terms
    "gb_cosface": {"loss": "gb_cosface", "scale": 16.0, "margin": 0.2},
    "gb_cosface_default": {"loss": "gb_cosface", "scale": 32.0},
    "unitsface": {"loss": "unitsface", "scale": 16.0, "s2s_scale": 16.0},
    "unitsface_s64": {"loss": "unitsface"},
    "unitsface_weighted_mean": {"loss": "unitsface", "scale": 16.0, "s2s_scale": 12.0, "s2s_margin": 0.2,
                                "s2c_weight": 0.5, "s2s_weight": 2.0, "s2s_combine": "mean", "s2s_clamp": False},
    "uss_alone": {"loss": "unitsface", "scale": 16.0, "s2s_scale": 16.0, "s2c_weight": 0.0},
    "arcface_uss": {"loss": "arcface_uss", "scale": 16.0, "s2s_scale": 16.0},
    "s2s_bce": {"loss": "cosface_s2s_bce", "scale": 16.0, "s2s_scale": 16.0},
    "s2s_softmax": {"loss": "cosface_s2s_softmax", "scale": 16.0, "s2s_scale": 16.0},
    "epl": {"loss": "epl", "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 1},
    "epl_noise_init": {"loss": "epl", "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 1, "s2s_init": "noise"},
    "arcface_epl": {"loss": "arcface_epl", "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 1},
    "uce_epl": {"loss": "uce_epl", "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 1},
}

# head state-dict names -> the reference's canonical names
CANONICAL = {"weight": "centres", "weight_momentum": "centres_momentum", "s2c.weight": "centres",
             "s2c.weight_momentum": "centres_momentum", "bias": "b", "s2c.bias": "b",
             "class_bias.weight": "class_bias", "s2c.class_bias.weight": "class_bias",
             "s2s.memory.features": "memory", "s2s.memory.valid": "memory_valid",
             "s2s.memory.prototypes": "prototypes", "s2s.bias": "s2s_b", "s2s.class_bias.weight": "s2s_class_bias",
             "p_v": "p_v", "s2c.p_v": "p_v"}


def centres0() -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(1), dtype=D64)


def step_data(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(N, D, generator=g, dtype=D64), torch.randint(0, C, (N,), generator=g)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    """|a - b| <= rtol * max|b| elementwise (relative to the tensor's scale)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and bool(((a - b).abs() <= rtol * b.abs().max().clamp_min(1e-30)).all())


def peek_row_grad(table) -> torch.Tensor | None:
    """The gradient of a row-sparse table's leaf (sample_rate 1: one leaf of every row), without popping it."""
    grads = [leaf.grad for _, leaf in table._pending if leaf.grad is not None]
    assert len(grads) <= 1
    return grads[0].clone() if grads else None


def noise_prototypes() -> torch.Tensor:
    head = build_head(CASES["epl_noise_init"], C, D, ClassPartition(C, 1, 0), seed=0).double()
    return head.s2s.memory.prototypes.clone()


def _run(rank: int, world_size: int) -> dict:
    out = {}
    B = N // world_size
    for name, cfg in CASES.items():
        part = ClassPartition(C, world_size, rank)
        head = build_head(cfg, C, D, part, seed=0).double()
        s2c = head.s2c if isinstance(head, EmbeddedLoss) else head
        s2c.weight.copy_(centres0()[part.start:part.end])
        opt = HeadOptimizer(head, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        steps = []
        for t, epoch in enumerate(EPOCHS):
            X, Y = step_data(t)
            head.set_epoch(epoch)
            x = X[rank * B:(rank + 1) * B].clone().requires_grad_(True)
            loss, logs = head(x, Y[rank * B:(rank + 1) * B])
            loss.backward()
            grads = {"x": x.grad.clone(), "centres": peek_row_grad(s2c)}
            for pname, p in head.named_parameters():
                grads[CANONICAL[pname]] = None if p.grad is None else p.grad.clone()
            for mname, module in head.named_modules():
                if isinstance(module, ClassBias):
                    grads[CANONICAL[f"{mname}.weight"]] = peek_row_grad(module)
            opt.step()
            opt.zero_grad()
            steps.append((loss.detach(), grads, {k: float(v) for k, v in logs.items()}))
        sd, state = head.state_dict(), {}
        for k, v in sd.items():
            if k == "s2s.memory.valid":
                state["prototypes_valid" if "s2s.memory.prototypes" in sd else "memory_valid"] = v.clone()
            elif k in CANONICAL:
                state[CANONICAL[k]] = v.clone()
        out[name] = (steps, state)
    return out


@pytest.fixture(scope="module")
def runs():
    return {"no_dist": [_run(0, 1)], **{w: run_ranks(_run, w) for w in (1, 2, 3, 4)}}


@pytest.fixture(scope="module")
def references():
    out = {}
    for name, cfg in CASES.items():
        protos = noise_prototypes() if expand(cfg).get("s2s_init") == "noise" else None
        ref = Reference(cfg, centres0(), LR, MOMENTUM, WD, prototypes=protos)
        steps = [ref.step(*step_data(t), epoch) for t, epoch in enumerate(EPOCHS)]
        out[name] = (steps, ref.state())
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("setting", ["no_dist", 1, 2, 3, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_w_ranks_equal_the_single_process_reference_over_four_steps(runs, references, setting, case):
    W = 1 if setting == "no_dist" else setting
    B = N // W
    ref_steps, ref_state = references[case]
    for rank, per_case in enumerate(runs[setting]):
        steps, state = per_case[case]
        part = ClassPartition(C, W, rank)
        own = slice(part.start, part.end)
        for t, ((loss, grads, _), ref) in enumerate(zip(steps, ref_steps)):
            where = f"{case}, W={W}, rank {rank}, step {t}"
            assert close(loss, ref["loss"]), (where, float(loss), float(ref["loss"]))
            assert close(grads["x"], W * ref["x"][rank * B:(rank + 1) * B]), where
            if ref["centres"] is None:
                assert grads["centres"] is None, where
            else:
                assert close(grads["centres"], ref["centres"][own]), where
            for name in ("class_bias", "s2s_class_bias"):
                if name in ref:
                    assert (grads.get(name) is None) == (ref[name] is None), (where, name)
                    if ref[name] is not None:
                        assert close(grads[name], ref[name][own]), (where, name)
        for name in ("b", "s2s_b"):  # replicated scalars: the ranks' shard parts sum to the gradient
            if name in ref_steps[0]:
                for t, ref in enumerate(ref_steps):
                    parts = [runs[setting][r][case][0][t][1][name] for r in range(W)]
                    if ref[name] is None:
                        assert all(p is None for p in parts), (case, name, t)
                    else:
                        total = sum(p if p is not None else torch.zeros((), dtype=D64) for p in parts)
                        assert close(total, ref[name]), (case, W, name, t, float(total), float(ref[name]))
        for name, value in state.items():
            expected = as_head_state(name, ref_state[name])
            if name in ("b", "s2s_b", "p_v"):
                assert close(value, expected, rtol=1e-9), (case, W, rank, name)
            elif value.dtype == torch.bool:
                assert torch.equal(value, expected[own]), (case, W, rank, name)
            else:
                assert close(value, expected[own], rtol=1e-9), (case, W, rank, name)


def test_the_cases_exercise_what_they_claim(references):
    """The stateful parts really do something in these problems (no test that cannot fail)."""
    steps, state = references["unitsface"]
    assert float(state["s2s_b"]) > 0 and steps[0]["s2s_b"] is None and steps[1]["s2s_b"] is not None
    seen0, labels1 = set(step_data(0)[1].tolist()), set(step_data(1)[1].tolist())
    assert len(seen0) < C and labels1 - seen0  # step 1 meets unwritten rows, positives included: masks matter
    assert state["memory_valid"].all()
    steps, state = references["gb_cosface"]
    assert 0.49 < float(state["p_v"]) < 0.5  # batch means below the clamp: clamped to 0.5, then the EMA pulls down
    steps, state = references["s2s_bce"]
    assert state["s2s_class_bias"].mean() > 0
    steps, state = references["epl"]
    assert torch.allclose(state["prototypes"][state["prototypes_valid"]].norm(dim=1), torch.ones(1, dtype=D64))
    clamp_on, _ = references["uce_s64_clamped"]
    cfg = {**CASES["uce_s64_clamped"], "clamp": False}
    ref = Reference(cfg, centres0(), LR, MOMENTUM, WD)
    clamp_off = ref.step(*step_data(0), 0)
    assert not torch.allclose(clamp_on[0]["x"], clamp_off["x"])  # s = 64: the clamp changes the gradient

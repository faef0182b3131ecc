"""Partial FC against a plain full-FC reference: W ranks (gloo) x B samples must equal 1 process x W*B samples.

The reference below is written from the formulas (normalise, cosines, filtering, target margin, scale, softmax
cross-entropy over ALL classes, mean over the global batch) and shares no code with heads/. What is compared, per rank
r of W (x_r = this rank's B embeddings, L = the reference loss over the W*B samples):
    loss                       == L                               (the same value on every rank)
    x_r.grad                   == W * dL/dx_r                     (the gather's x W; DeepSpeed/DDP then divide by W)
    gradient of the centre rows == dL/dW[rows this rank sampled]  (exact, no scaling)
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import heads
from heads import HeadConfigError, build_head
from heads.comm import shard_sum
from heads.optim import HeadOptimizer, HeadOptimizerError
from heads.partial_fc import HeadInputError, PartialFC
from heads.partition import ClassPartition
from tests.distributed import run_ranks

D64 = torch.float64
C, D, B = 11, 8, 5  # 11 classes: uneven on 2, 3 and 4 ranks

CASES = {
    "softmax": {"loss": "softmax", "scale": 16.0},
    "cosface": {"loss": "cosface", "scale": 16.0, "margin": 0.35},
    "cosface_s64": {"loss": "cosface"},
    "arcface": {"loss": "arcface", "scale": 16.0, "margin": 0.5},
    "arcface_straight_through": {"loss": "arcface", "scale": 16.0, "margin": 0.5, "straight_through": True},
    "combined_general": {"loss": "combined", "scale": 16.0, "margin": [1.2, 0.1, 0.05]},
    "combined_m1_below_1": {"loss": "combined", "scale": 16.0, "margin": [0.9, 0.3, 0.2]},
    "cosface_filtering": {"loss": "cosface", "scale": 16.0, "margin": 0.35, "interclass_filtering_threshold": 0.2},
    "arcface_filtering": {"loss": "arcface", "scale": 16.0, "interclass_filtering_threshold": 0.2},
}


# --- the reference: one process, all classes, float64, straight from the formulas --------------------------------
def reference_logits(X: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, cfg: dict):
    """(logits [N, C], cosines [N, C], number of filtered entries)."""
    s = cfg.get("scale", 64.0)
    loss = cfg["loss"]
    m = cfg.get("margin", {"cosface": 0.4, "arcface": 0.5}.get(loss))
    m1, m2, m3 = {"softmax": (1, 0, 0), "cosface": (1, 0, m), "arcface": (1, m, 0)}.get(loss) or m
    xn = X / X.norm(dim=1, keepdim=True).clamp_min(1e-5)
    wn = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-5)
    cos = xn @ wn.T
    raw_cos = cos
    is_target = F.one_hot(labels, centres.shape[0]).bool()
    t = cfg.get("interclass_filtering_threshold", 0.0)
    filtered = (cos > t) & ~is_target if t > 0 else torch.zeros_like(is_target)
    cos = torch.where(filtered, torch.zeros_like(cos), cos)
    cos_y = cos[torch.arange(len(labels)), labels]
    z_y = torch.cos(m1 * torch.acos(cos_y) + m2) - m3
    if cfg.get("straight_through", False):
        z_y = cos_y + (z_y - cos_y).detach()
    logits = s * torch.where(is_target, z_y[:, None], cos)
    return logits, raw_cos, int(filtered.sum())


def reference(X, centres, labels, cfg):
    """(loss, dL/dX, dL/dcentres, top-1 accuracy, number of filtered entries) of the mean softmax CE."""
    X = X.clone().requires_grad_(True)
    centres = centres.clone().requires_grad_(True)
    logits, cos, n_filtered = reference_logits(X, centres, labels, cfg)
    per_sample = torch.logsumexp(logits, dim=1) - logits[torch.arange(len(labels)), labels]
    loss = per_sample.mean()
    gX, gW = torch.autograd.grad(loss, (X, centres))
    accuracy = (cos.argmax(1) == labels).double().mean()
    return loss.detach(), gX, gW, accuracy, n_filtered


def problem(seed: int, world_size: int, num_classes: int = C):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(world_size * B, D, generator=g, dtype=D64)
    centres = torch.randn(num_classes, D, generator=g, dtype=D64)
    labels = torch.randint(0, num_classes, (world_size * B,), generator=g)
    return X, centres, labels


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    """|a - b| <= rtol * max|b| elementwise (relative to the tensor's scale)."""
    return a.shape == b.shape and bool(((a - b).abs() <= rtol * b.abs().max().clamp_min(1e-30)).all())


# --- W ranks, sample_rate = 1 --------------------------------------------------------------------------------------
def _all_cases(rank, world_size):
    X, centres, labels = problem(0, world_size)
    part = ClassPartition(C, world_size, rank)
    out = {}
    for name, cfg in CASES.items():
        head = build_head(cfg, C, D, part, seed=0).double()
        head.weight.copy_(centres[part.start:part.end])
        x = X[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss, logs = head(x, labels[rank * B:(rank + 1) * B])
        loss.backward()
        rows, grad_w = head.pop_row_grads()
        assert rows is None  # sample_rate 1: every row, no index
        out[name] = (loss.detach(), x.grad, grad_w, logs["accuracy"], logs["num_sampled"])
    return out


@pytest.fixture(scope="module")
def runs():
    """Per setting, per rank: {case: (loss, x.grad, centre grad, accuracy, num_sampled)}."""
    return {
        "no_dist": [_all_cases(0, 1)],  # torch.distributed not initialised: identities
        1: run_ranks(_all_cases, 1),
        2: run_ranks(_all_cases, 2),
        3: run_ranks(_all_cases, 3),
        4: run_ranks(_all_cases, 4),
    }


@pytest.mark.multirank
@pytest.mark.parametrize("setting", ["no_dist", 1, 2, 3, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_equal_the_full_fc_reference(runs, setting, case):
    W = 1 if setting == "no_dist" else setting
    X, centres, labels = problem(0, W)
    ref_loss, ref_gX, ref_gW, ref_acc, n_filtered = reference(X, centres, labels, CASES[case])
    if "filtering" in case:
        assert n_filtered > 0  # the threshold really removes some negatives in this problem
    for rank, per_case in enumerate(runs[setting]):
        loss, grad_x, grad_w, accuracy, num_sampled = per_case[case]
        part = ClassPartition(C, W, rank)
        assert close(loss, ref_loss), (loss, ref_loss)
        assert close(grad_x, W * ref_gX[rank * B:(rank + 1) * B]), "x.grad must be W * dL/dx_r"
        assert close(grad_w, ref_gW[part.start:part.end])
        assert float(accuracy) == pytest.approx(float(ref_acc))
        assert num_sampled == part.num_local


def _tiny_world(rank, world_size, rate):
    X, centres, labels = problem(1, world_size, num_classes=2)
    part = ClassPartition(2, world_size, rank)
    head = build_head({"loss": "arcface", "scale": 16.0, "sample_rate": rate}, 2, D, part, seed=0).double()
    head.weight.copy_(centres[part.start:part.end])
    x = X[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    loss, logs = head(x, labels[rank * B:(rank + 1) * B])
    loss.backward()
    HeadOptimizer(head, lr=0.1).step()
    return loss.detach(), x.grad, logs["num_sampled"]


@pytest.mark.multirank
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_more_ranks_than_classes_leaves_a_rank_with_an_empty_shard(rate):
    W = 3  # 2 classes: rank 2 owns none
    X, centres, labels = problem(1, W, num_classes=2)
    ref_loss, ref_gX, _, _, _ = reference(X, centres, labels, {"loss": "arcface", "scale": 16.0})
    out = run_ranks(_tiny_world, W, rate)
    assert out[2][2] == 0
    for rank, (loss, grad_x, _) in enumerate(out):
        assert close(loss, ref_loss)
        assert close(grad_x, W * ref_gX[rank * B:(rank + 1) * B])


def test_low_precision_embeddings_are_scored_in_the_centres_precision():
    head = PartialFC(ClassPartition(C, 1, 0), D, margin=heads.CombinedMargin(1.0, 0.0, 0.4), scale=64.0)
    x = torch.randn(4, D).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = head(x, torch.tensor([0, 1, 2, 3]))
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    expected, _, _, _, _ = reference(x.detach().double(), head.weight.double(), torch.tensor([0, 1, 2, 3]),
                                     {"loss": "cosface"})
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_exact_and_straight_through_arcface_really_differ(runs):
    exact, st = runs["no_dist"][0]["arcface"], runs["no_dist"][0]["arcface_straight_through"]
    assert torch.equal(exact[0], st[0])  # same value
    assert not torch.allclose(exact[1], st[1])  # different gradient


# --- several optimizer steps: 2 ranks + data-parallel averaging == 1 rank with torch.optim.SGD -------------------
LR, MOMENTUM, WD, STEPS, IN = 0.5, 0.9, 5e-4, 4, 6
TRAIN_CFG = {"loss": "arcface", "scale": 8.0, "margin": 0.3}


def _step_data(step, world_size):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(world_size * B, IN, generator=g, dtype=D64), torch.randint(0, C, (world_size * B,), generator=g)


def _initial_models():
    torch.manual_seed(7)
    backbone = nn.Linear(IN, D).double()
    centres = torch.randn(C, D, dtype=D64)
    return backbone, centres


def _lr(step):
    return LR * (1.0 - step / (2 * STEPS))


def _train_ranks(rank, world_size):
    backbone, centres = _initial_models()
    part = ClassPartition(C, world_size, rank)
    head = build_head(TRAIN_CFG, C, D, part, seed=0).double()
    head.weight.copy_(centres[part.start:part.end])
    opt_backbone = torch.optim.SGD(backbone.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    opt_head = HeadOptimizer(head, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    losses = []
    for step in range(STEPS):
        for opt in (opt_backbone, opt_head):  # the trainer's way; HeadOptimizer.set_lr does the same
            for group in opt.param_groups:
                group["lr"] = _lr(step)
        inputs, labels = _step_data(step, world_size)
        x = backbone(inputs[rank * B:(rank + 1) * B])
        loss, _ = head(x, labels[rank * B:(rank + 1) * B])
        loss.backward()
        for p in backbone.parameters():  # what DDP / DeepSpeed do with backbone gradients: the mean over ranks
            dist.all_reduce(p.grad)
            p.grad /= world_size
        opt_backbone.step()
        opt_head.step()
        opt_backbone.zero_grad()
        opt_head.zero_grad()
        losses.append(loss.item())
    return backbone.state_dict(), head.weight.clone(), head.weight_momentum.clone(), losses


@pytest.mark.multirank
def test_optimizer_steps_on_two_ranks_equal_sgd_on_one():
    W = 2
    backbone, centres = _initial_models()
    centres = nn.Parameter(centres)
    opt = torch.optim.SGD([*backbone.parameters(), centres], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    ref_losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = _lr(step)
        inputs, labels = _step_data(step, W)
        logits, _, _ = reference_logits(backbone(inputs), centres, labels, TRAIN_CFG)
        loss = (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    momentum = opt.state[centres]["momentum_buffer"]
    for rank, (state, weight, weight_momentum, losses) in enumerate(run_ranks(_train_ranks, W)):
        part = ClassPartition(C, W, rank)
        assert losses == pytest.approx(ref_losses, rel=1e-9)
        for name, p in backbone.state_dict().items():
            assert close(state[name], p, rtol=1e-9), name
        assert close(weight, centres.detach()[part.start:part.end], rtol=1e-9)
        assert close(weight_momentum, momentum[part.start:part.end], rtol=1e-9)
    initial = _initial_models()[1]
    assert (centres.detach() - initial).abs().max() > 0.01  # the steps really move the centres


# --- class sampling (r < 1) on 2 ranks -----------------------------------------------------------------------------
SC = 40  # 20 classes per rank
# rank 0 owns 0..19, rank 1 owns 20..39: positives per rank: rank 0 {3, 7, 11} (3 twice), rank 1 {20, 25, 31, 38, 39}
SAMPLING_LABELS = torch.tensor([3, 7, 3, 20, 25, 11, 31, 38, 39, 20])  # 2 ranks x B = 5


def _sampling(rank, world_size, rate):
    part = ClassPartition(SC, world_size, rank)
    head = build_head({"loss": "cosface", "scale": 16.0, "sample_rate": rate}, SC, D, part, seed=3).double()
    g = torch.Generator().manual_seed(11)
    X = torch.randn(world_size * B, D, generator=g, dtype=D64)
    head.weight_momentum.copy_(torch.randn(part.num_local, D, generator=g, dtype=D64))  # nonzero history
    x = X[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    w0, m0 = head.weight.clone(), head.weight_momentum.clone()
    loss, logs = head(x, SAMPLING_LABELS[rank * B:(rank + 1) * B])
    loss.backward()
    index = head.last_sampled
    grad_size = tuple(head._pending[0][1].grad.shape)
    HeadOptimizer(head, lr=0.1).step()
    w_changed = (head.weight != w0).any(1)
    m_changed = (head.weight_momentum != m0).any(1)
    return (part.to_global(index), loss.detach(), x.grad, grad_size, logs["num_sampled"], w_changed, m_changed,
            w0, X)


@pytest.mark.multirank
@pytest.mark.parametrize("rate,expected_counts", [(0.5, [10, 10]), (0.1, [3, 5]), (0.0, [3, 5]), (0.3, [6, 6])])
def test_sampling_keeps_positives_fills_randomly_and_updates_only_sampled_rows(rate, expected_counts):
    W = 2
    out = run_ranks(_sampling, W, rate)
    positives = [{3, 7, 11}, {20, 25, 31, 38, 39}]
    sampled_global = []
    for rank, (index, _, _, grad_size, num_sampled, w_changed, m_changed, _, _) in enumerate(out):
        part = ClassPartition(SC, W, rank)
        assert num_sampled == expected_counts[rank] == max(int(rate * part.num_local), len(positives[rank]))
        assert index.tolist() == sorted(set(index.tolist())), "sorted, no duplicates"
        assert positives[rank] <= set(index.tolist()), "every positive class is kept"
        assert all(part.start <= c < part.end for c in index.tolist())
        if rate == 0.0 or expected_counts[rank] == len(positives[rank]):
            assert set(index.tolist()) == positives[rank]  # positives only
        assert grad_size == (num_sampled, D), "the gradient covers the sampled rows only"
        sampled = torch.zeros(part.num_local, dtype=torch.bool)
        sampled[index - part.start] = True
        assert torch.equal(w_changed, sampled) and torch.equal(m_changed, sampled)
        sampled_global.append(index)
    # the loss is the full-FC reference restricted to the union of the sampled classes
    S = torch.cat(sampled_global)
    centres = torch.cat([out[0][7], out[1][7]])[S]
    relabel = {c: i for i, c in enumerate(S.tolist())}
    labels = torch.tensor([relabel[c] for c in SAMPLING_LABELS.tolist()])
    X = out[0][8]
    ref_loss, ref_gX, _, _, _ = reference(X, centres, labels, {"loss": "cosface", "scale": 16.0})
    for rank, (_, loss, grad_x, *_rest) in enumerate(out):
        assert close(loss, ref_loss)
        assert close(grad_x, W * ref_gX[rank * B:(rank + 1) * B])


def _head(rate=0.25, seed=5, num_classes=40):
    return PartialFC(ClassPartition(num_classes, 1, 0), D, sample_rate=rate, seed=seed).double()


def test_sampler_is_seeded_and_its_state_checkpoints():
    labels = torch.tensor([1, 2, 3])
    a, b = _head(), _head()
    assert torch.equal(a.sample_classes(labels), b.sample_classes(labels))  # same (seed, rank): same stream
    other = _head(seed=6)
    draws = [other.sample_classes(labels) for _ in range(3)]
    assert any(not torch.equal(d, a.sample_classes(labels)) for d in draws)
    state = a.state_dict()
    expected = [a.sample_classes(labels) for _ in range(3)]
    fresh = _head()
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.sample_classes(labels), e) for e in expected)
    # a state saved under another partition (resharded checkpoint) restarts the stream from (seed, rank)
    moved = dict(state)
    moved["_extra_state"] = {**state["_extra_state"], "world_size": 2}
    restarted = _head()
    restarted.load_state_dict(moved)
    assert torch.equal(restarted.sample_classes(labels), _head().sample_classes(labels))


def test_accumulated_forwards_step_the_union_of_sampled_rows():
    head = _head(rate=0.1)
    x = torch.randn(4, D, dtype=D64)
    grads = []
    for labels in (torch.tensor([0, 1, 2, 3]), torch.tensor([3, 30, 31, 32])):
        loss, _ = head(x, labels)
        loss.backward()
        dense = torch.zeros(40, D, dtype=D64)
        dense[head.last_sampled] = head._pending[-1][1].grad
        grads.append(dense)
    rows, grad = head.pop_row_grads()
    assert rows.tolist() == sorted({0, 1, 2, 3, 30, 31, 32})
    assert torch.allclose(grad, (grads[0] + grads[1])[rows])
    assert head.pop_row_grads() is None  # popped
    head.eval()
    head(x, torch.tensor([0, 1, 2, 3]))
    assert head.pop_row_grads() is None  # eval mode records nothing


def test_initial_centres_do_not_depend_on_the_number_of_ranks():
    num_classes = 5000  # more than one init block
    one = PartialFC(ClassPartition(num_classes, 1, 0), 4).weight
    three = torch.cat([PartialFC(ClassPartition(num_classes, 3, r), 4).weight for r in range(3)])
    assert torch.equal(one, three)
    assert one.std().item() == pytest.approx(0.01, rel=0.05)
    assert not torch.equal(one, PartialFC(ClassPartition(num_classes, 1, 0), 4, seed=1).weight)
    head = PartialFC(ClassPartition(num_classes, 1, 0), 4)
    assert head.per_class_buffers() == ["weight", "weight_momentum"]
    assert set(head.state_dict()) == {"weight", "weight_momentum", "_extra_state"}
    assert list(head.parameters()) == []  # centres are buffers: no dense gradient, no DDP/ZeRO involvement


def test_head_rejects_bad_inputs():
    head = _head(rate=1.0)
    x = torch.randn(3, D, dtype=D64)
    with pytest.raises(HeadInputError, match=r"labels must lie in \[0, 40\)"):
        head(x, torch.tensor([0, 40, 1]))
    with pytest.raises(HeadInputError, match=r"labels must lie"):
        head(x, torch.tensor([0, -1, 1]))
    with pytest.raises(HeadInputError, match=r"embeddings must be \[B, 8\]"):
        head(torch.randn(3, 5, dtype=D64), torch.tensor([0, 1, 2]))
    with pytest.raises(HeadInputError, match=r"labels must be \[B\] = \[3\]"):
        head(x, torch.tensor([0, 1]))
    with pytest.raises(HeadInputError, match="integer"):
        head(x, torch.tensor([0.0, 1.0, 2.0]))


# --- dense replicated head parameters: their shard parts are all-reduced before the SGD step ---------------------
class _HeadWithBias(nn.Module):
    """A PartialFC plus a replicated scalar whose loss term is split over ranks (like UCE's bias)."""

    def __init__(self, part):
        super().__init__()
        self.pfc = PartialFC(part, D).double()
        self.b = nn.Parameter(torch.tensor(0.5, dtype=D64))
        self.unused_on_rank_1 = nn.Parameter(torch.tensor(1.0, dtype=D64))

    def forward(self, x, y, rank):
        loss, _ = self.pfc(x, y)
        term = (rank + 1.0) * self.b ** 2  # this rank's summand of sum_r (r + 1) b^2
        if rank == 0:
            term = term + 3.0 * self.unused_on_rank_1
        return loss + shard_sum(term)


def _dense(rank, world_size):
    head = _HeadWithBias(ClassPartition(C, world_size, rank))
    opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=0.0)
    x = torch.randn(B, D, dtype=D64)
    for _ in range(2):
        head(x, torch.arange(B), rank).backward()
        opt.step()
        opt.zero_grad()
    return head.b.item(), head.unused_on_rank_1.item(), opt.state_dict()


@pytest.mark.multirank
def test_dense_head_parameters_get_the_sum_of_shard_gradients():
    out = run_ranks(_dense, 2)
    # d/db sum_r (r + 1) b^2 = 2 * (1 + 2) * b = 6b; SGD momentum 0.9, lr 0.1, two steps
    b, buf = 0.5, 0.0
    u, ubuf = 1.0, 0.0
    for _ in range(2):
        buf = 0.9 * buf + 6 * b if buf else 6 * b
        b -= 0.1 * buf
        ubuf = 0.9 * ubuf + 3.0 if ubuf else 3.0
        u -= 0.1 * ubuf
    for got_b, got_u, state in out:
        assert got_b == pytest.approx(b, rel=1e-12)
        assert got_u == pytest.approx(u, rel=1e-12)
        assert state["lr"] == 0.1 and state["dense"] is not None


def test_head_optimizer_state_dict_roundtrip_and_errors():
    head = _HeadWithBias(ClassPartition(C, 1, 0))
    opt = HeadOptimizer(head, lr=0.1)
    head(torch.randn(B, D, dtype=D64), torch.arange(B), 0).backward()
    opt.step()
    opt.set_lr(0.05)
    state = opt.state_dict()
    other = HeadOptimizer(_HeadWithBias(ClassPartition(C, 1, 0)), lr=1.0)
    other.load_state_dict(state)
    assert other.lr == 0.05
    assert torch.equal(other._sgd.state_dict()["state"][0]["momentum_buffer"],
                       opt._sgd.state_dict()["state"][0]["momentum_buffer"])
    with pytest.raises(HeadOptimizerError, match="dense"):
        HeadOptimizer(_head(), lr=0.1).load_state_dict(state)
    with pytest.raises(HeadOptimizerError, match="'lr' missing"):
        other.load_state_dict({"dense": None})
    with pytest.raises(HeadOptimizerError, match="momentum"):
        HeadOptimizer(_head(), lr=0.1, momentum=-1)


def test_step_divides_out_the_loss_scale():
    x, labels = torch.randn(B, D, dtype=D64), torch.arange(B)
    plain, scaled = _HeadWithBias(ClassPartition(C, 1, 0)), _HeadWithBias(ClassPartition(C, 1, 0))
    plain(x, labels, 0).backward()
    (8.0 * scaled(x, labels, 0)).backward()  # what fp16 loss scaling hands the head
    HeadOptimizer(plain, lr=0.1).step()
    HeadOptimizer(scaled, lr=0.1).step(grad_scale=8.0)
    assert torch.allclose(plain.pfc.weight, scaled.pfc.weight, rtol=1e-12, atol=0)
    assert torch.allclose(plain.b, scaled.b, rtol=1e-12)
    assert not torch.equal(plain.pfc.weight, PartialFC(ClassPartition(C, 1, 0), D).double().weight)


# --- the registry ---------------------------------------------------------------------------------------------------
def _build(cfg, num_classes=C):
    return build_head(cfg, num_classes, D, ClassPartition(num_classes, 1, 0), seed=0)


def test_registry_builds_each_margin_with_its_defaults():
    assert set(heads.HEADS) >= {"softmax", "cosface", "arcface", "combined"}
    m = _build({"loss": "cosface"}).margin
    assert (m.m1, m.m2, m.m3, m.straight_through) == (1.0, 0.0, 0.4, False)
    m = _build({"loss": "arcface", "straight_through": True}).margin
    assert (m.m1, m.m2, m.m3, m.straight_through) == (1.0, 0.5, 0.0, True)
    m = _build({"loss": "combined", "margin": [1.1, 0.2, 0.3]}).margin
    assert (m.m1, m.m2, m.m3) == (1.1, 0.2, 0.3)
    head = _build({"loss": "softmax", "scale": 30, "sample_rate": 0.5, "interclass_filtering_threshold": 0.4,
                   "init_std": 0.02})
    assert (head.scale, head.sample_rate, head.interclass_filtering_threshold) == (30.0, 0.5, 0.4)
    assert (head.margin.m1, head.margin.m2, head.margin.m3) == (1.0, 0.0, 0.0)
    assert head.embedding_size == D and head.num_classes == C and head.partition.num_local == C


@pytest.mark.parametrize("cfg,match", [
    ({"loss": "cosfce"}, "unknown loss 'cosfce'"),
    ({"scale": 64}, "needs key 'loss'"),
    ({"loss": "cosface", "scael": 64}, r"head\.scael: not a key"),
    ({"loss": "cosface", "scale": 0}, r"head\.scale: must be > 0"),
    ({"loss": "cosface", "scale": "64"}, r"head\.scale: expected a finite number"),
    ({"loss": "cosface", "margin": float("nan")}, r"head\.margin: expected a finite number"),
    ({"loss": "cosface", "sample_rate": 1.5}, r"head\.sample_rate: must be <= 1"),
    ({"loss": "cosface", "interclass_filtering_threshold": -0.1}, r"head\.interclass_filtering_threshold"),
    ({"loss": "cosface", "init_std": 0}, r"head\.init_std"),
    ({"loss": "arcface", "straight_through": "yes"}, r"head\.straight_through: expected true or false"),
    ({"loss": "combined"}, r"head\.margin: loss 'combined' needs \[m1, m2, m3\]"),
    ({"loss": "combined", "margin": [1, 0.5]}, r"needs \[m1, m2, m3\]"),
    ({"loss": "combined", "margin": [0, 0.5, 0]}, r"head\.margin\[0\]: m1 must be > 0"),
    ({"loss": "combined", "margin": [1, "a", 0]}, r"head\.margin\[1\]"),
    ({"loss": "softmax", "margin": 0.3}, "softmax' takes no margin"),
])
def test_registry_rejects_bad_configs_naming_the_key(cfg, match):
    with pytest.raises(HeadConfigError, match=match):
        _build(cfg)


def test_registry_checks_the_partition_and_refuses_duplicate_names():
    with pytest.raises(HeadConfigError, match="num_classes=12"):
        build_head({"loss": "cosface"}, 12, D, ClassPartition(C, 1, 0), seed=0)
    with pytest.raises(HeadConfigError, match="registered twice"):
        heads.register_head("cosface")(lambda *a: None)
    assert math.isfinite(_build({"loss": "cosface"})(torch.randn(2, D), torch.tensor([0, 1]))[0].item())


def test_a_dense_parameter_no_rank_used_keeps_its_value_and_momentum():
    """torch.optim.SGD skips a parameter without gradient; the head optimizer decides that on the device (no sync),
    steps every dense parameter and puts the unused ones back: the same result, weight decay included."""
    head = _HeadWithBias(ClassPartition(C, 1, 0))
    opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(B, D, dtype=D64)
    for _ in range(2):
        head.pfc(x, torch.arange(B))[0].backward()  # b and unused_on_rank_1 take no part
        opt.step()
        opt.zero_grad()
    assert float(head.b.detach()) == 0.5 and float(head.unused_on_rank_1.detach()) == 1.0
    for p in (head.b, head.unused_on_rank_1):
        buf = opt._sgd.state.get(p, {}).get("momentum_buffer")
        assert buf is None or float(buf) == 0.0
    head(x, torch.arange(B), 0).backward()  # now used: SGD's first momentum step, buf = d
    opt.step()
    d = 2 * 0.5 + 0.1 * 0.5  # d/db (rank + 1) b^2 at rank 0, plus weight decay
    assert float(head.b.detach()) == pytest.approx(0.5 - 0.1 * d, rel=1e-12)

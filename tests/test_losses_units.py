"""The loss families piece by piece: GB-CosFace's alpha = 0 identity, memory rules, eval mode, configs, resharding."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import heads
from heads import EmbeddedLoss, HeadConfigError, build_head
from heads.memory import LatestFeatureMemory, PrototypeMemory, last_occurrence
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from tests.distributed import run_ranks
from tests.test_losses_exact import close

D64 = torch.float64
C, D = 11, 8
REPO = Path(__file__).resolve().parent.parent


def one_rank(cfg: dict, num_classes: int = C, seed: int = 0):
    return build_head(cfg, num_classes, D, ClassPartition(num_classes, 1, 0), seed=seed).double()


# --- GB-CosFace ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s,m", [(32.0, 0.16), (16.0, 0.3)])
def test_gb_cosface_with_alpha_0_is_cosface_with_twice_the_margin(s, m):
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(9, D, generator=g, dtype=D64), torch.randint(0, C, (9,), generator=g)
    out = []
    for cfg in ({"loss": "gb_cosface", "scale": s, "margin": m, "alpha": 0.0},
                {"loss": "cosface", "scale": s, "margin": 2 * m}):
        head = one_rank(cfg, seed=4)
        xi = x.clone().requires_grad_(True)
        loss, _ = head(xi, labels)
        loss.backward()
        out.append((loss.detach(), xi.grad, head.pop_row_grads()[1]))
    (gb_loss, gb_x, gb_w), (cf_loss, cf_x, cf_w) = out
    assert close(gb_loss, cf_loss, rtol=1e-12)
    assert close(gb_x, cf_x, rtol=1e-10) and close(gb_w, cf_w, rtol=1e-10)


def test_gb_cosface_alpha_pulls_towards_the_boundary_and_p_v_follows_the_official_order():
    head = one_rank({"loss": "gb_cosface", "scale": 16.0})
    assert head.learned_thresholds() == {}
    x, labels = torch.randn(6, D, dtype=D64), torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        cos = F.normalize(x) @ F.normalize(head.weight).T
        c_p = cos[torch.arange(6), labels]
        c_n = torch.logsumexp(16.0 * cos.masked_fill(F.one_hot(labels, C).bool(), -math.inf), 1) / 16.0
        v_mean = ((c_p + c_n) / 2).mean()
    _, logs = head(x, labels)
    first = v_mean.clamp(0.5, 0.7)
    assert float(logs["p_v"]) == pytest.approx(float(first))  # the first batch's mean(v), clamped before use
    assert float(head.p_v) == pytest.approx(float(0.99 * first + 0.01 * v_mean))  # clamped value, then the EMA
    assert bool(head.p_v_started)


# --- the class memory -----------------------------------------------------------------------------------------------
def test_last_occurrence_is_the_last_sample_of_each_owned_class():
    classes, last = last_occurrence(torch.tensor([2, -1, 0, 2, 5, 0, -1, 2]))
    assert classes.tolist() == [0, 2, 5] and last.tolist() == [5, 7, 4]
    classes, last = last_occurrence(torch.tensor([-1, -1]))
    assert classes.numel() == 0 and last.numel() == 0


def test_latest_feature_memory_writes_the_last_occurrence_of_own_classes_only():
    part = ClassPartition(10, 2, 1)  # owns 5..9
    mem = LatestFeatureMemory(part, 3).double()
    X = torch.arange(18, dtype=D64).reshape(6, 3)
    Y = torch.tensor([7, 2, 7, 9, 5, 9])
    mem.write(X, part.to_local(Y))
    assert mem.valid.tolist() == [True, False, True, False, True]
    U = X / X.norm(dim=1, keepdim=True)  # stored as unit rows: the losses use only cosines to them
    assert torch.allclose(mem.features[2], U[2]) and torch.allclose(mem.features[4], U[5])
    assert torch.allclose(mem.features[0], U[4])
    assert mem.features[1].abs().sum() == 0 and int(mem.filled()) == 3
    assert mem.per_class_buffers() == ["features", "valid"]


def test_latest_feature_memory_normalises_raw_rows_of_an_older_checkpoint_and_leaves_unit_rows_bitwise():
    part = ClassPartition(4, 1, 0)
    mem = LatestFeatureMemory(part, 3).double()
    mem.write(torch.tensor([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]], dtype=D64), torch.tensor([0, 2]))
    unit_rows = mem.features.clone()
    raw = {"features": torch.tensor([[3.0, 4.0, 0.0], [0, 0, 0], [1.0, 2.0, 2.0], [0, 0, 0]], dtype=D64),
           "valid": torch.tensor([True, False, True, False])}
    fresh = LatestFeatureMemory(part, 3).double()
    fresh.load_state_dict(raw)
    assert torch.allclose(fresh.features, unit_rows) and fresh.features[1].abs().sum() == 0
    again = LatestFeatureMemory(part, 3).double()
    again.load_state_dict(mem.state_dict())
    assert torch.equal(again.features, mem.features)  # a resume stays bit-exact


def test_prototype_update_is_the_softsign_rule_on_unit_rows():
    part = ClassPartition(4, 1, 0)
    mem = PrototypeMemory(part, 3).double()
    first = torch.tensor([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]], dtype=D64)
    mem.update(first, torch.tensor([1, 1]))  # first sight: the last sample's unit vector
    assert torch.allclose(mem.prototypes[1], torch.tensor([0.0, 1.0, 0.0], dtype=D64))
    assert mem.valid.tolist() == [False, True, False, False]
    for x in (torch.tensor([[1.0, 1.0, 0.0]], dtype=D64), torch.tensor([[0.0, -1.0, 0.2]], dtype=D64)):
        P = mem.prototypes[1].clone()
        xh = x[0] / x[0].norm()
        c = torch.dot(P, xh)
        a = c / (1 + c.abs())  # negative for the second x: the prototype moves past x's direction
        expected = a * P + (1 - a) * xh
        mem.update(x, torch.tensor([1]))
        assert torch.allclose(mem.prototypes[1], expected / expected.norm())
    assert mem.prototypes[1].norm().item() == pytest.approx(1.0)


def test_noise_prototypes_are_official_randn_rows_the_same_on_any_number_of_ranks():
    one = PrototypeMemory(ClassPartition(5000, 1, 0), 16, init="noise", seed=3).prototypes
    three = torch.cat([PrototypeMemory(ClassPartition(5000, 3, r), 16, init="noise", seed=3).prototypes
                       for r in range(3)])
    assert torch.equal(one, three)
    assert one.norm(dim=1).mean().item() == pytest.approx(4.0, rel=0.1)  # unnormalised: about sqrt(16)
    with pytest.raises(ValueError, match="init must be one of"):
        PrototypeMemory(ClassPartition(5, 1, 0), 4, init="zeros")


def test_uss_never_scores_a_sample_against_itself_and_starts_b_from_data():
    head = one_rank({"loss": "unitsface", "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 0})
    x, labels = torch.randn(5, D, dtype=D64), torch.tensor([0, 1, 2, 3, 4])
    _, logs = head(x, labels)
    assert float(logs["loss_s2s"]) == 0.0 and float(head.s2s.bias.detach()) == 0.0  # empty memory before the write
    assert head.s2s.memory.valid[:5].all() and not head.s2s.memory.valid[5:].any()
    _, logs = head(x, labels)  # the same samples again: the memory now holds them
    xn = F.normalize(x)
    lse = torch.logsumexp(16.0 * (xn @ xn.T).masked_fill(torch.eye(5, dtype=torch.bool), -math.inf), 1)
    b = float(head.s2s.bias.detach())
    assert b == pytest.approx(float(lse.mean()))  # b <- mean logsumexp over written negatives
    t = b / 16.0
    assert float(logs["t_uss"]) == pytest.approx(t) and head.learned_thresholds() == {"t_uss": pytest.approx(t)}


def test_eval_mode_changes_no_state():
    for cfg in ({"loss": "unitsface", "s2s_start_epoch": 0}, {"loss": "epl", "s2s_start_epoch": 0},
                {"loss": "gb_cosface"}, {"loss": "cosface_s2s_bce", "s2s_start_epoch": 0}):
        head = one_rank(cfg)
        head.train()
        head(torch.randn(4, D, dtype=D64), torch.tensor([0, 1, 2, 3]))
        before = {k: v.clone() for k, v in head.state_dict().items() if torch.is_tensor(v)}
        head.eval()
        with torch.no_grad():
            loss, _ = head(torch.randn(4, D, dtype=D64), torch.tensor([4, 5, 1, 0]))
        assert math.isfinite(loss.item())
        after = head.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), cfg


def test_low_precision_embeddings_keep_a_float32_memory():
    head = build_head({"loss": "unitsface", "s2s_start_epoch": 0}, C, D, ClassPartition(C, 1, 0), seed=0)
    for _ in range(2):
        x = torch.randn(4, D).to(torch.bfloat16).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = head(x, torch.tensor([0, 1, 2, 3]))
        loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert head.s2s.memory.features.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


# --- the registry and the shipped configs -----------------------------------------------------------------------------
def test_presets_and_per_term_defaults():
    h = one_rank({"loss": "unitsface"})
    assert isinstance(h, EmbeddedLoss) and isinstance(h.s2s, heads.USS) and type(h.s2c) is heads.PartialFC
    assert (h.s2c.scale, h.s2c.margin.m3, h.s2s.scale, h.s2s.margin, h.s2s.clamp) == (64.0, 0.4, 64.0, 0.1, True)
    assert (h.start_epoch, h.combine, h.s2c_weight, h.s2s_weight) == (1, "sum", 1.0, 1.0)
    h = one_rank({"loss": "epl"})
    assert isinstance(h.s2s, heads.EPL) and (h.start_epoch, h.combine, h.s2s.margin.k) == (3, "mean", 0.7)
    assert h.s2s.memory.init == "feature"
    h = one_rank({"loss": "arcface_uss", "margin": 0.45})
    assert h.s2c.margin.m2 == 0.45
    h = one_rank({"loss": "uce_epl"})
    assert isinstance(h.s2c, heads.UniformBCE)
    h = one_rank({"loss": "gb_cosface"})
    assert (h.scale, h.margin.m3, h.alpha, h.pv_momentum, h.pv_low, h.pv_high) == (32.0, 0.16, 0.15, 0.01, 0.5, 0.7)
    h = one_rank({"loss": "uce_diverse"})
    assert h.diverse and h.class_bias.weight[0].item() == pytest.approx(math.log(10 * C))
    assert "class_bias.weight" in h.per_class_buffers()
    h = one_rank({"loss": "uce", "sample_rate": 0.5})
    assert h.bias.item() == pytest.approx(math.log(10 * C * 0.5), rel=1e-6)
    h = one_rank({"loss": "cosface", "s2s": "s2s_bce", "s2c_weight": 0.0})
    assert isinstance(h.s2s, heads.S2SBCE) and h.s2c_weight == 0.0
    assert set(heads.loss_names()) >= {"cosface", "uce", "gb_cosface", "unitsface", "epl", "uce_diverse"}


@pytest.mark.parametrize("cfg,match", [
    ({"loss": "cosface", "s2s_margin": 0.2}, r"head\.s2s_margin: only used with a sample-to-sample term"),
    ({"loss": "cosface", "s2c_weight": 0.5}, r"head\.s2c_weight: only used with"),
    ({"loss": "cosface", "s2s": "usss"}, r"head\.s2s: unknown sample-to-sample term 'usss'"),
    ({"loss": "epl", "s2s_margin": 0.1}, r"head\.s2s_margin: not a key of 'epl'"),
    ({"loss": "unitsface", "s2s_combine": "max"}, r"head\.s2s_combine: expected one of sum, mean"),
    ({"loss": "unitsface", "s2s_start_epoch": -1}, r"head\.s2s_start_epoch: must be >= 0"),
    ({"loss": "unitsface", "s2s_start_epoch": 1.5}, r"head\.s2s_start_epoch: expected an integer"),
    ({"loss": "unitsface", "s2s_weight": -1}, r"head\.s2s_weight: must be >= 0"),
    ({"loss": "epl", "s2s_init": "randn"}, r"head\.s2s_init: expected one of feature, noise"),
    ({"loss": "epl", "s2s_weight": 0.0, "s2c_weight": 0.0}, r"combine 'mean' needs"),
    ({"loss": "uce", "alpha": 0.1}, r"head\.alpha: not a key of 'uce'"),
    ({"loss": "uce", "diverse": "yes"}, r"head\.diverse: expected true or false"),
    ({"loss": "uce", "margin": [1.0, 0.2]}, r"head\.margin: expected \[m1, m2, m3\]"),
    ({"loss": "gb_cosface", "pv_clamp": [0.7, 0.5]}, r"head\.pv_clamp: low must be <= high"),
    ({"loss": "gb_cosface", "pv_clamp": 0.5}, r"head\.pv_clamp: expected \[low, high\]"),
    ({"loss": "gb_cosface", "alpha": 2}, r"head\.alpha: must be <= 1"),
    ({"loss": "cosface", "clamp": True}, r"head\.clamp: not a key of 'cosface'"),
    ({"loss": "unitsfac"}, r"unknown loss 'unitsfac'.*unitsface"),
])
def test_bad_keys_are_named(cfg, match):
    with pytest.raises(HeadConfigError, match=match):
        one_rank(cfg)


def test_every_shipped_config_builds_its_head_through_the_trainer_config():
    from trainer.config import load_config
    from trainer.engine import head_config
    configs = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "base.yaml")
    assert len(configs) >= 10
    built = {}
    for path in configs:
        cfg = load_config(path, ["data.root=/tmp/nowhere"])
        head = build_head(head_config(cfg), 50, 8, ClassPartition(50, 2, 0), seed=0)
        built[path.stem] = type(head).__name__
    assert built["unitsface_r50_casia"] == "EmbeddedLoss" and built["gb_cosface_r100_ms1mv2"] == "GBCosFace"
    assert built["uce_r50_casia"] == "UniformBCE" and built["epl_r50_casia"] == "EmbeddedLoss"
    base = load_config(None, ["data.root=/tmp/nowhere"])  # base.yaml's head section takes every loss name
    for loss in heads.loss_names():
        if loss != "combined":
            build_head({**head_config(base), "loss": loss}, 50, 8, ClassPartition(50, 1, 0), seed=0)


# --- resharding: a checkpoint of 2 ranks continues on 1 rank exactly --------------------------------------------------
RESHARD_CFG = {"loss": "cosface_s2s_bce", "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 0}
EPL_CFG = {"loss": "uce_epl", "diverse": True, "scale": 16.0, "s2s_scale": 16.0, "s2s_start_epoch": 0}


def _steps(rank, world_size, cfg, steps):
    head = build_head(cfg, C, D, ClassPartition(C, world_size, rank), seed=0).double()
    opt = HeadOptimizer(head, lr=0.1)
    B = 12 // world_size
    losses = []
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        X, Y = torch.randn(12, D, generator=g, dtype=D64), torch.randint(0, C, (12,), generator=g)
        checkpoint = {k: v.clone() if torch.is_tensor(v) else v for k, v in head.state_dict().items()}
        loss, _ = head(X[rank * B:(rank + 1) * B], Y[rank * B:(rank + 1) * B])
        if t == 2:  # the step after the checkpoint
            return checkpoint, losses, loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    raise AssertionError("unreachable")


@pytest.mark.multirank
@pytest.mark.parametrize("cfg", [RESHARD_CFG, EPL_CFG])
def test_per_class_state_reshards_from_two_ranks_to_one(cfg):
    from trainer.checkpoint import reshard_head_state
    out = run_ranks(_steps, 2, cfg, 3)
    states = [o[0] for o in out]
    head = build_head(cfg, C, D, ClassPartition(C, 1, 0), seed=0).double()
    names = head.per_class_buffers()
    assert any("memory" in n for n in names) and any("class_bias" in n for n in names)
    head.load_state_dict(reshard_head_state(states, head))
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(12, D, generator=g, dtype=D64), torch.randint(0, C, (12,), generator=g)
    loss, _ = head(X, Y)
    assert loss.item() == pytest.approx(out[0][2], rel=1e-12) and out[0][2] == pytest.approx(out[1][2], rel=1e-12)
    fresh = build_head(cfg, C, D, ClassPartition(C, 1, 0), seed=0).double()
    assert fresh(X, Y)[0].item() != pytest.approx(out[0][2], rel=1e-6)  # the restored state matters


# --- the fused autograd functions the heads use --------------------------------------------------------------------
def test_fused_cosine_and_margin_logits_have_exact_gradients():
    from heads.margins import cosine, margin_logits, normalize
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, generator=g, dtype=D64).requires_grad_(True)
    w = torch.randn(7, 4, generator=g, dtype=D64)
    w[2] *= 1e-7  # below the eps floor: 1 / eps, no gradient through the norm
    w.requires_grad_(True)
    assert torch.allclose(cosine(x, w), normalize(x) @ normalize(w).T, atol=1e-15)
    assert torch.autograd.gradcheck(cosine, (x, w))
    cos = (torch.rand(6, 5, generator=g, dtype=D64) * 1.8 - 0.9).requires_grad_(True)
    target = torch.tensor([0, -1, 4, 2, 2, -1])
    for margin in (heads.CombinedMargin(1.0, 0.5, 0.0), heads.CombinedMargin(1.2, 0.1, 0.05),
                   heads.CombinedMargin(1.0, 0.0, 0.4)):
        assert torch.autograd.gradcheck(lambda c: margin_logits(c, target, margin, 3.0), (cos,))
    # straight-through / adaptive margins: value of the margin, gradient of s * cos
    for margin in (heads.CombinedMargin(1.0, 0.5, 0.0, straight_through=True), heads.AdaptiveMargin(0.7)):
        c = cos.detach().clone().requires_grad_(True)
        margin_logits(c, target, margin, 3.0).sum().backward()
        assert torch.allclose(c.grad, torch.full_like(c, 3.0))

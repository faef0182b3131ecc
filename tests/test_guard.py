"""The step guard through real DeepSpeed on gloo ranks: a non-finite step changes nothing anywhere, identically on
every rank (ZeRO 0 and 1); a finite step after it trains exactly as if the bad one never came; stop/checkpoint
requests of one rank reach all."""
import pytest
import torch

from tests.distributed import run_ranks

B, C, D = 4, 10, 16


def _state(engine, head, head_opt) -> dict:
    out = {f"backbone.{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    out.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)})
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0:
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum.{i}"] = buf.clone()
    else:
        for i, group in enumerate(opt.single_partition_of_fp32_groups):
            out[f"zero.fp32.{i}"] = group.detach().clone()
            st = opt.optimizer.state.get(group, {})
            if "momentum_buffer" in st and st["momentum_buffer"] is not None:
                out[f"zero.momentum.{i}"] = st["momentum_buffer"].clone()
    for j, p in enumerate(head_opt.dense):
        out[f"head_param.{j}"] = p.detach().clone()
    return out


def _engine_and_head(rank, world, head_cfg, *overrides, head_seed=0, seed=None):
    """What every run here builds on its gloo rank: DeepSpeed around a tiny backbone on the CPU (config: the base
    file with ``overrides`` beside the batch size) and the head with its optimizer (lr 0.1, momentum 0.9, wd 5e-4).
    ``seed``: torch.manual_seed before the backbone is made, for runs that are compared with another."""
    import os

    import backbones
    import heads
    from heads.optim import HeadOptimizer
    from heads.partition import ClassPartition
    from trainer.config import load_config
    from trainer.distributed import prepare_deepspeed
    from trainer.engine import build_engine

    os.environ["LOCAL_RANK"] = str(rank)
    prepare_deepspeed(torch.device("cpu"))
    if seed is not None:
        torch.manual_seed(seed)
    backbone = backbones.get_model("iresnet_tiny", num_features=D, depths=(1, 1, 1, 1))
    cfg = load_config(None, ["data.root=unused", f"train.batch_size={B}", *overrides])
    engine, _ = build_engine(backbone, cfg, world)
    head = heads.build_head(head_cfg, num_classes=C, embedding_size=D, partition=ClassPartition(C, world, rank),
                            seed=head_seed)
    return engine, head, HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _guarded_case(rank, world, zero_stage, loss_name):
    """The set-up of the bad-step test and its reference run (no clipping: see the clipping test)."""
    head_cfg = {"loss": loss_name, "scale": 16.0, **({"s2s_start_epoch": 0} if loss_name == "unitsface" else {})}
    return _engine_and_head(rank, world, head_cfg, f"deepspeed.zero_stage={zero_stage}",
                            "deepspeed.gradient_clipping=0", head_seed=3, seed=0)


def _run(rank, world, zero_stage, loss_name, bad_rank):
    from trainer.guard import StepGuard

    engine, head, head_opt = _guarded_case(rank, world, zero_stage, loss_name)
    guard = StepGuard(engine, head, head_opt, max_consecutive=2)
    g = torch.Generator().manual_seed(10 + rank)
    batches = [(torch.rand(B, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, C, (B,), generator=g))
               for _ in range(3)]

    def step(images, labels, stop=False, ckpt=False):
        guard.before_forward()
        loss, _ = head(engine(images), labels)
        engine.backward(loss)
        flags = guard.agree(loss, stop=stop, checkpoint=ckpt)
        return flags, guard.apply(flags)

    engine.train()
    step(*batches[0])  # a good step first: momentum, memory and biases exist
    before = _state(engine, head, head_opt)
    bad = batches[1][0].clone()
    if rank == bad_rank:
        bad[0, 0, 0, 0] = float("nan")  # one pixel of one rank: NaN reaches every rank through the gather
    flags, applied = step(bad, batches[1][1], stop=rank == 1, ckpt=rank == 0)
    after_bad = _state(engine, head, head_opt)
    consecutive = guard.consecutive
    flags2, applied2 = step(*batches[2])
    final = _state(engine, head, head_opt)
    return {"flags": (flags.nonfinite, flags.stop, flags.checkpoint), "applied": (applied, applied2),
            "unchanged": [k for k in before if not torch.equal(before[k], after_bad[k])],
            "consecutive": (consecutive, guard.consecutive), "skipped": guard.skipped_total,
            "final": final, "journal": len(guard.txn.journal)}


def _reference(rank, world, zero_stage, loss_name):
    """The same run without the bad step: steps 0 and 2 only."""
    engine, head, head_opt = _guarded_case(rank, world, zero_stage, loss_name)
    g = torch.Generator().manual_seed(10 + rank)
    batches = [(torch.rand(B, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, C, (B,), generator=g))
               for _ in range(3)]
    engine.train()
    for images, labels in (batches[0], batches[2]):
        loss, _ = head(engine(images), labels)
        engine.backward(loss)
        engine.step()
        head_opt.step()
        head_opt.zero_grad()
    return _state(engine, head, head_opt)


@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage,loss_name", [(0, "unitsface"), (1, "gb_cosface")])
def test_a_non_finite_step_changes_nothing_and_the_next_one_trains_as_if_it_never_came(zero_stage, loss_name):
    results = run_ranks(_run, 2, zero_stage, loss_name, 1, timeout=300)
    reference = run_ranks(_reference, 2, zero_stage, loss_name, timeout=300)
    for rank, (r, ref) in enumerate(zip(results, reference)):
        assert r["flags"] == (True, True, True)  # NaN on rank 1, stop asked on rank 1, checkpoint on rank 0: all agree
        assert r["applied"] == (False, True)
        assert r["unchanged"] == [], f"rank {rank}: the skipped step changed {r['unchanged'][:5]}"
        assert r["consecutive"] == (1, 0) and r["skipped"] == 1 and r["journal"] == 0
        assert r["final"].keys() == ref.keys()
        for k in ref:
            assert torch.equal(r["final"][k], ref[k]), f"rank {rank}: {k} differs from the run without the bad step"


def _nan_every_step(rank, world):
    from trainer.guard import NonFiniteError, StepGuard

    engine, head, head_opt = _engine_and_head(rank, world, {"loss": "cosface"})
    guard = StepGuard(engine, head, head_opt, max_consecutive=3)
    for k in range(5):
        guard.before_forward()
        loss, _ = head(engine(torch.full((B, 3, 112, 112), float("nan"))), torch.arange(B))
        engine.backward(loss)
        assert not guard.apply(guard.agree(loss, stop=False, checkpoint=False))
        try:
            guard.check_consecutive(f"step {k + 1}", [100 + rank, 200 + rank])
        except NonFiniteError as e:
            return k + 1, str(e)
    return None


@pytest.mark.multirank
def test_k_non_finite_steps_in_a_row_end_the_run_naming_the_step_and_the_records():
    for rank, (steps, message) in enumerate(run_ranks(_nan_every_step, 2, timeout=300)):
        assert steps == 3
        assert "3 non-finite steps in a row" in message and "the last at step 3" in message
        assert f"[{100 + rank}, {200 + rank}]" in message


def _count_step_syncs(rank, world, loss_name, clipping):
    import heads
    from bench.sync_count import count_syncs
    from trainer.guard import StepGuard

    engine, head, head_opt = _engine_and_head(rank, world, {"loss": loss_name, "scale": 16.0},
                                              f"deepspeed.gradient_clipping={clipping}")
    guard = StepGuard(engine, head, head_opt)
    g = torch.Generator().manual_seed(rank)
    counts = []
    for k in range(3):  # the first step settles shape checks and the data-set biases
        x, y = torch.rand(B, 3, 112, 112, generator=g), torch.randint(0, C, (B,), generator=g)
        heads.set_collect_stats(head, False)  # a step that is not a log step
        with count_syncs() as syncs:
            guard.before_forward()
            loss, _ = head(engine(x), y)
            engine.backward(loss)
            assert guard.apply(guard.agree(loss, stop=False, checkpoint=False))
        counts.append((syncs.total, syncs.report()))
    return counts[1:]


@pytest.mark.multirank
@pytest.mark.parametrize("loss_name", ["cosface", "unitsface", "epl", "gb_cosface", "cosface_s2s_bce"])
def test_a_training_step_that_is_not_a_log_step_makes_one_host_sync(loss_name):
    """The guard's agreed flags are the step's only host sync: backbone forward/backward through DeepSpeed (ZeRO 0,
    gradient clipping as shipped), the head, the non-finite check, both optimizer steps."""
    for rank, counts in enumerate(run_ranks(_count_step_syncs, 2, loss_name, 5.0, timeout=300)):
        for total, report in counts:
            assert total == 1, f"rank {rank}: {report}"


def _clipped(rank, world, use_guard):
    from trainer.guard import StepGuard

    engine, head, head_opt = _engine_and_head(rank, world, {"loss": "cosface", "scale": 16.0},
                                              "deepspeed.gradient_clipping=0.05", seed=0)
    guard = StepGuard(engine, head, head_opt) if use_guard else None
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x, y = torch.rand(B, 3, 112, 112, generator=g), torch.randint(0, C, (B,), generator=g)
        loss, _ = head(engine(x), y)
        engine.backward(loss)
        if use_guard:
            assert guard.apply(guard.agree(loss, stop=False, checkpoint=False))
        else:
            engine.step()
            head_opt.step()
            head_opt.zero_grad()
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.multirank
def test_the_guard_clips_the_backbone_gradient_as_deepspeed_does():
    """ZeRO 0: the clip moved from DeepSpeed into the guard (device-side, no host sync) keeps DeepSpeed's rule
    min(1, max_norm / (norm + 1e-6)); a max_norm of 0.05 clips every step here."""
    mine = run_ranks(_clipped, 2, True, timeout=300)
    theirs = run_ranks(_clipped, 2, False, timeout=300)
    for a, b in zip(mine, theirs):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def _scaled_run(rank, world, loss_scale, steps):
    from trainer.guard import StepGuard

    engine, head, head_opt = _engine_and_head(rank, world, {"loss": "unitsface", "scale": 16.0, "s2s_start_epoch": 0},
                                              head_seed=3, seed=0)
    guard = StepGuard(engine, head, head_opt, max_consecutive=2, loss_scale=loss_scale, growth_interval=2)
    g = torch.Generator().manual_seed(10 + rank)
    applied, scales = [], []
    for _ in range(steps):
        x, y = torch.rand(B, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, C, (B,), generator=g)
        guard.before_forward()
        loss, _ = head(engine(x), y)
        engine.backward(guard.scale_loss(loss))
        applied.append(guard.apply(guard.agree(loss, stop=False, checkpoint=False)))
        scales.append(None if guard.scale is None else float(guard.scale))
    return applied, scales, _state(engine, head, head_opt), guard.state_dict(), guard.consecutive


@pytest.mark.multirank
def test_fp16_loss_scaling_trains_bit_exactly_like_fp32_and_grows_the_scale():
    """A power-of-two loss scale is exact: the unscaled gradients, and so the whole run, equal the unscaled run
    bit for bit (on CPU the trunk stays fp32, so only the scaling differs). The scale doubles every 2 good steps."""
    plain = run_ranks(_scaled_run, 2, None, 4, timeout=300)
    scaled = run_ranks(_scaled_run, 2, 1024.0, 4, timeout=300)
    for (a_applied, _, a_state, _, _), (b_applied, b_scales, b_state, b_saved, _) in zip(plain, scaled):
        assert a_applied == b_applied == [True] * 4
        assert b_scales == [1024.0, 2048.0, 2048.0, 4096.0]
        assert float(b_saved["loss_scale"]) == 4096.0
        for k in a_state:
            assert torch.equal(a_state[k], b_state[k]), k


@pytest.mark.multirank
def test_fp16_overflow_skips_the_whole_step_and_halves_the_scale_without_counting_as_an_error():
    results = run_ranks(_scaled_run, 2, 2.0 ** 126, 8, timeout=300)
    for applied, scales, _, _, consecutive in results:
        first = applied.index(True)
        assert first >= 1 and not any(applied[:first]) and all(applied[first:first + 2])
        assert scales[:first] == [2.0 ** (126 - k - 1) for k in range(first)]  # halved at every overflow
        assert consecutive == 0
    assert results[0][0] == results[1][0]  # every rank skipped the same steps

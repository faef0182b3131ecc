"""W ranks x B samples through real DeepSpeed + the sharded head train exactly like 1 rank x W*B.

BatchNorm is frozen (eval mode) so the backbone is a per-sample function. DeepSpeed all-reduces only 16/32-bit
gradients, so this runs in float32 (the head's float64 exactness is proven in test_partial_fc.py); differences left
are summation order. What is
compared after several optimizer steps: the loss, every backbone parameter, and the concatenated class centres.
This is the end-to-end check of the gradient convention: the gather's x W cancelling DeepSpeed's data-parallel
averaging, the head stepping beside the engine, and the lr reaching both optimizers.
"""
import pytest
import torch

from tests.distributed import run_ranks

B_TOTAL, C, D, STEPS = 8, 10, 16, 3


def _train(rank, world, zero_stage, batches, lrs):
    import os

    import backbones
    import heads
    from heads.optim import HeadOptimizer
    from heads.partition import ClassPartition
    from trainer.config import load_config
    from trainer.distributed import prepare_deepspeed
    from trainer.engine import build_engine, set_lr
    os.environ["LOCAL_RANK"] = str(rank)  # what the launchers export; DeepSpeed checks it
    prepare_deepspeed(torch.device("cpu"))
    torch.manual_seed(0)
    backbone = backbones.get_model("iresnet_tiny", num_features=D, depths=(1, 1, 1, 1))
    B = B_TOTAL // world
    zero = [f"deepspeed.config={zero_stage}"] if str(zero_stage).endswith(".json") else \
        [f"deepspeed.zero_stage={zero_stage}"]
    cfg = load_config(None, ["data.root=unused", f"train.batch_size={B}", *zero,
                             "deepspeed.gradient_clipping=1.0", "optim.weight_decay=0.01"])
    engine, sgd = build_engine(backbone, cfg, world)
    engine.eval()  # frozen BatchNorm: running statistics, so samples do not interact
    head = heads.build_head({"loss": "arcface", "scale": 16.0}, num_classes=C, embedding_size=D,
                            partition=ClassPartition(C, world, rank), seed=3)
    head_opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=0.01)
    losses = []
    for (x, y), lr in zip(batches, lrs):
        set_lr(lr, sgd, head_opt)
        xs, ys = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
        loss, _ = head(engine(xs), ys)
        engine.backward(loss)
        engine.step()
        assert engine.was_step_applied()
        head_opt.step()
        head_opt.zero_grad()
        losses.append(loss.item())
    params = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, params, head.weight.detach().clone()


@pytest.mark.multirank
def test_two_ranks_train_like_one_rank_with_twice_the_batch():
    g = torch.Generator().manual_seed(1)
    batch = (torch.rand(B_TOTAL, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, C, (B_TOTAL,), generator=g))
    batches = [batch] * STEPS  # the same batch: its loss must fall
    lrs = [0.1, 0.05, 0.02]
    (ref_losses, ref_params, ref_w), = run_ranks(_train, 1, 0, batches, lrs, timeout=300)
    for zero_stage in (0, 1, "ds_config_zero2.json"):  # the last: the GPU recipe, ZeRO 2 with overlap_comm
        results = run_ranks(_train, 2, zero_stage, batches, lrs, timeout=300)
        for losses, params, _ in results:
            assert losses == pytest.approx(ref_losses, rel=1e-5)
            for k, v in ref_params.items():
                torch.testing.assert_close(params[k], v, rtol=1e-4, atol=1e-6, msg=f"zero {zero_stage}: {k}")
        torch.testing.assert_close(torch.cat([r[2] for r in results]), ref_w, rtol=1e-4, atol=1e-6)
    # and training did move the model, by far more than the tolerance
    assert ref_losses[-1] < ref_losses[0] - 1e-3

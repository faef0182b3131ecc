"""The class partition, the collectives of the gradient convention (heads/comm.py) and the distributed softmax
(heads/dist_softmax.py), on 1 process and on real gloo ranks."""
import pytest
import torch
import torch.nn.functional as F

from heads.comm import (
    DistributedInputError,
    all_reduce_sum_,
    gather_embeddings,
    gather_labels,
    global_max,
    rank_mean,
    shard_sum,
)
from heads.dist_softmax import (
    LogitsError,
    dist_cross_entropy,
    dist_log_softmax_target,
    dist_logsumexp,
    dist_logsumexp_nontarget,
    dist_top1_correct,
)
from heads.partition import ClassPartition, PartitionError, reshard
from tests.distributed import RankError, run_ranks

D64 = torch.float64


# --- partition ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C,W", [(10, 1), (10, 2), (10, 3), (11, 4), (3, 5), (1000, 7)])
def test_partition_follows_arcface_torch_formula_and_tiles_the_classes(C, W):
    parts = [ClassPartition(C, W, r) for r in range(W)]
    for r, p in enumerate(parts):
        assert p.num_local == C // W + (r < C % W)
        assert p.start == C // W * r + min(r, C % W)
    assert parts[0].start == 0 and parts[-1].end == C
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
    assert parts[0].sizes() == [p.num_local for p in parts]
    labels = torch.arange(C)
    owners = parts[0].owner(labels)
    for r, p in enumerate(parts):
        owned = p.owns(labels)
        assert torch.equal(owned, owners == r)
        local = p.to_local(labels)
        assert torch.equal(local[owned], torch.arange(p.num_local))
        assert (local[~owned] == -1).all()
        assert torch.equal(p.to_global(local[owned]), labels[owned])


def test_partition_rejects_bad_arguments():
    for args in [(0, 1, 0), (5, 0, 0), (5, 2, 2), (5, 2, -1), (5.0, 2, 0), (5, True, 0)]:
        with pytest.raises(PartitionError):
            ClassPartition(*args)


@pytest.mark.parametrize("C,W,W2", [(11, 2, 3), (11, 3, 1), (7, 1, 4), (5, 4, 2)])
def test_reshard_moves_rows_to_the_new_owners(C, W, W2):
    full = torch.arange(C * 3, dtype=torch.float32).view(C, 3)
    shards = [full[p.start:p.end].clone() for p in (ClassPartition(C, W, r) for r in range(W))]
    new = ClassPartition(C, W, 0).reshard(shards, W2)
    assert len(new) == W2
    for r, shard in enumerate(new):
        p = ClassPartition(C, W2, r)
        assert torch.equal(shard, full[p.start:p.end])
    assert torch.equal(torch.cat(reshard(new, W)), full)
    new[0].add_(1)  # the shards own their memory
    assert torch.equal(shards[0][:1], full[:1])


def test_reshard_names_the_bad_shard():
    with pytest.raises(PartitionError, match=r"shard sizes \[3, 4\].*\[4, 3\]"):
        reshard([torch.zeros(3, 2), torch.zeros(4, 2)], 2)
    with pytest.raises(PartitionError, match="shard 1"):
        reshard([torch.zeros(4, 2), torch.zeros(3, 5)], 2)
    with pytest.raises(PartitionError, match="no shards"):
        reshard([], 2)
    with pytest.raises(PartitionError, match="new_world_size"):
        reshard([torch.zeros(4, 2)], 0)


# --- single process: every primitive is an identity --------------------------------------------------------------
def test_primitives_are_identities_without_torch_distributed():
    x = torch.randn(4, 3, dtype=D64, requires_grad=True)
    X = gather_embeddings(x)
    X.sum().backward()
    assert X is x and torch.equal(x.grad, torch.ones(4, 3, dtype=D64))
    y = torch.tensor([1, 2])
    assert gather_labels(y) is y
    assert torch.equal(shard_sum(x), x) and torch.equal(global_max(x), x.detach())
    assert torch.equal(rank_mean(x), x.detach()) and torch.equal(all_reduce_sum_(y.clone()), y)


def test_dist_softmax_on_one_process_equals_torch():
    z = torch.randn(6, 5, dtype=D64, requires_grad=True)
    t = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.allclose(dist_logsumexp(z), torch.logsumexp(z, 1))
    loss = dist_cross_entropy(z, t)
    ref = F.cross_entropy(z, t)
    assert torch.allclose(loss, ref)
    g, = torch.autograd.grad(loss, z)
    g_ref, = torch.autograd.grad(ref, z)
    assert torch.allclose(g, g_ref)
    masked = z.detach().clone()
    masked[torch.arange(6), t] = float("-inf")
    assert torch.allclose(dist_logsumexp_nontarget(z, t), torch.logsumexp(masked, 1))
    assert torch.equal(dist_top1_correct(z, t), z.argmax(1) == t)
    half = z.detach().to(torch.bfloat16)
    assert dist_logsumexp(half).dtype == torch.float32  # low precision is promoted


def test_dist_softmax_rejects_bad_targets():
    z = torch.zeros(3, 4)
    with pytest.raises(LogitsError, match=r"\[-1, 4\)"):
        dist_cross_entropy(z, torch.tensor([0, 4, 1]))
    with pytest.raises(LogitsError, match="target must be"):
        dist_cross_entropy(z, torch.tensor([0, 1]))
    with pytest.raises(LogitsError, match="logits must be"):
        dist_log_softmax_target(torch.zeros(3), torch.tensor([0, 1, 2]))


# --- real gloo ranks ----------------------------------------------------------------------------------------------
def _gather_convention(rank, world_size, B):
    """Loss = sum_i a_i . X_i computed with class-shard-like split: rank r owns the term of rows with i % W == r."""
    torch.manual_seed(0)
    full = torch.randn(world_size * B, 3, dtype=D64)
    a = torch.randn(world_size * B, 3, dtype=D64)
    x = full[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    X = gather_embeddings(x)
    mine = (torch.arange(world_size * B) % world_size == rank).to(D64)
    loss = shard_sum(((a * X).sum(1) * mine).sum())  # global value, this rank's summand in the graph
    loss.backward()
    labels = gather_labels(torch.arange(B) + 100 * rank)
    m = global_max(torch.tensor([float(rank), -float(rank)]))
    mean = rank_mean(torch.tensor([float(rank)]))
    return X.detach(), x.grad, loss.detach(), a, labels, m, mean, full


@pytest.mark.multirank
@pytest.mark.parametrize("W", [2, 3])
def test_gather_backward_sums_over_ranks_and_multiplies_by_W(W):
    B = 2
    out = run_ranks(_gather_convention, W, B)
    full, a = out[0][7], out[0][3]
    ref_loss = (a * full).sum()  # d ref_loss / d x_i = a_i
    for rank, (X, grad, loss, _, labels, m, mean, _) in enumerate(out):
        assert torch.equal(X, full)
        assert torch.allclose(loss, ref_loss)
        assert torch.allclose(grad, W * a[rank * B:(rank + 1) * B])  # THE x W, after summing the shard parts
        assert torch.equal(labels, torch.cat([torch.arange(B) + 100 * r for r in range(W)]))
        assert m.tolist() == [W - 1.0, 0.0]
        assert mean.tolist() == [(W - 1) / 2]


def _mismatched_batch(rank, world_size):
    x = torch.zeros(3 + rank, 2)
    try:
        gather_embeddings(x)
    except DistributedInputError as e:
        return str(e)
    return None


@pytest.mark.multirank
def test_gather_with_different_batch_sizes_fails_clearly_on_every_rank():
    messages = run_ranks(_mismatched_batch, 2)
    for msg in messages:
        assert msg is not None and "rank 0: [3, 2], rank 1: [4, 2]" in msg


def _split_softmax(rank, world_size, C, N):
    torch.manual_seed(1)
    z = torch.randn(N, C, dtype=D64) * 5
    t = torch.randint(0, C, (N,))
    p = ClassPartition(C, world_size, rank)
    z_local = z[:, p.start:p.end].clone().requires_grad_(True)
    t_local = p.to_local(t)
    loss = dist_cross_entropy(z_local, t_local)
    loss.backward()
    lse = dist_logsumexp(z_local.detach())
    nontarget = dist_logsumexp_nontarget(z_local.detach(), t_local)
    correct = dist_top1_correct(z_local.detach(), t_local)
    return loss.detach(), z_local.grad, lse, nontarget, correct, z, t


@pytest.mark.multirank
@pytest.mark.parametrize("W,C", [(2, 7), (3, 2)])  # uneven; and C < W: a rank with no class at all
def test_distributed_cross_entropy_equals_full_softmax(W, C):
    out = run_ranks(_split_softmax, W, C, 6)
    z, t = out[0][5].clone().requires_grad_(True), out[0][6]
    ref = F.cross_entropy(z, t)
    ref.backward()
    masked = z.detach().clone()
    masked[torch.arange(6), t] = float("-inf")
    for rank, (loss, grad, lse, nontarget, correct, _, _) in enumerate(out):
        p = ClassPartition(C, W, rank)
        assert torch.allclose(loss, ref.detach(), rtol=1e-12)
        assert grad.shape == (6, p.num_local)
        assert torch.allclose(grad, z.grad[:, p.start:p.end], rtol=1e-10, atol=1e-14)
        assert torch.allclose(lse, torch.logsumexp(z.detach(), 1))
        assert torch.allclose(nontarget, torch.logsumexp(masked, 1))
        assert torch.equal(correct, z.detach().argmax(1) == t)


def _raises(rank, world_size):
    if rank == 1:
        raise KeyError("rank one failed on purpose")
    return rank


@pytest.mark.multirank
def test_harness_names_the_failing_rank():
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 raised.*rank one failed on purpose"):
        run_ranks(_raises, 2)

"""Head memory per rank at 1M classes: our row-sparse partial FC against a dense-gradient one, side by side.

    ./run.sh python -m bench.bench_head_memory [--classes 1000000] [--ranks 2] [--out bench/results/FILE]

Both variants run the same steps on real gloo ranks (forked processes): gather the batch, sample positives plus
random negatives (sample_rate), CosFace logits, distributed softmax cross-entropy, backward, SGD (momentum 0.9,
weight decay 5e-4). They differ in where the centres live:
- sparse (heads.PartialFC + heads.optim.HeadOptimizer): centres and momentum are buffers; the sampled rows are a
  small leaf tensor, so there is no [num_local, D] gradient;
- dense (arcface_torch's Partial FC v2 pattern): the centres are one Parameter indexed inside autograd, so autograd
  materialises a dense [num_local, D] gradient and torch SGD keeps a dense momentum; weight decay moves every row.
Reported per rank: peak resident memory above the process's baseline (after imports, before the head exists), the
analytic size of one shard (num_local x D x 4 bytes), the ratio peak / shard, and the mean step time.
"""
from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import psutil
import torch


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _run_variant(rank: int, world: int, kind: str, C: int, D: int, B: int, rate: float, steps: int) -> dict:
    from heads.comm import gather_embeddings, gather_labels
    from heads.dist_softmax import dist_cross_entropy
    from heads.margins import CombinedMargin, cosine, margin_logits
    from heads.optim import HeadOptimizer
    from heads.partial_fc import PartialFC, init_centres
    from heads.partition import ClassPartition

    torch.manual_seed(rank)
    part = ClassPartition(C, world, rank)
    base = _rss_mb()
    margin = CombinedMargin(1.0, 0.0, 0.4)
    if kind == "sparse":
        head = PartialFC(part, D, margin=margin, scale=64.0, sample_rate=rate, seed=0)
        opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        weight = torch.nn.Parameter(init_centres(part.start, part.num_local, D, 0.01, 0))
        opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps):
        x = torch.randn(B, D, requires_grad=True)
        y = torch.randint(0, C, (B,))
        t0 = time.perf_counter()
        if kind == "sparse":
            loss, _ = head(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            X, Y = gather_embeddings(x), gather_labels(y)
            local = part.to_local(Y)
            positives = torch.unique(local[local >= 0])
            score = torch.rand(part.num_local, generator=gen)
            score[positives] = 2.0
            index = torch.topk(score, max(int(rate * part.num_local), positives.numel())).indices.sort().values
            target = torch.where(local >= 0, torch.searchsorted(index, local.clamp_min(0)), -1)
            logits = margin_logits(cosine(X, weight[index]), target, margin, 64.0)
            loss = dist_cross_entropy(logits, target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t0)
    shard_mb = part.num_local * D * 4 / 2 ** 20
    return {"kind": kind, "rank": rank, "num_local": part.num_local, "shard_mb": shard_mb,
            "peak_above_base_mb": _peak_mb() - base, "step_s": sum(times) / max(len(times), 1)}


def main(argv=None) -> str:
    from prettytable import PrettyTable

    from tests.distributed import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128, help="per rank")
    ap.add_argument("--sample-rate", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    rows = {}
    for kind in ("sparse", "dense"):
        res = run_ranks(_run_variant, a.ranks, kind, a.classes, a.dim, a.batch, a.sample_rate, a.steps, timeout=1800)
        rows[kind] = max(res, key=lambda r: r["peak_above_base_mb"])
    t = PrettyTable(["head", "classes per rank", "one shard (MB)", "peak above baseline (MB)", "peak / shard",
                     "step (s)"])
    for kind, r in rows.items():
        label = "row-sparse (ours)" if kind == "sparse" else "dense gradient (PFC v2 pattern)"
        t.add_row([label, r["num_local"], f"{r['shard_mb']:.0f}", f"{r['peak_above_base_mb']:.0f}",
                   f"{r['peak_above_base_mb'] / r['shard_mb']:.2f}", f"{r['step_s']:.3f}"])
    ratio = rows["dense"]["peak_above_base_mb"] / rows["sparse"]["peak_above_base_mb"]
    machine = (f"{platform.machine()} CPU container, {psutil.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM, torch {torch.__version__}")
    text = (f"Head memory per rank: {a.classes:,} classes, D={a.dim}, {a.ranks} gloo ranks, batch {a.batch}/rank, "
            f"sample_rate {a.sample_rate}, SGD momentum 0.9\nmachine: {machine}\n{t.get_string()}\n"
            f"dense / row-sparse peak memory: {ratio:.2f}x\n")
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    return text


if __name__ == "__main__":
    main()

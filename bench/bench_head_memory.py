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

    ./run.sh python -m bench.bench_head_memory --per-family [--classes 100000 --sample-rate 1.0 --batch 256]

``--per-family``: the transient working set of one head step per loss family instead: the peak resident memory during
a steady-state step (forward, backward, head optimizer step, zero_grad; statistics off, as on a non-log step) above
the resident memory right before it. Linux's peak-RSS counter is reset before each measured step
(/proc/self/clear_refs), and glibc's mmap threshold is fixed so that freed buffers leave the resident set. What it
measures is what the step allocates: the [N, K] blocks of the scores, the [K, D] rows and their gradients; not the
head's state (weights, momentum, memory rows), reported apart.
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


FAMILIES = {"cosface": {"loss": "cosface"}, "arcface": {"loss": "arcface"}, "uce": {"loss": "uce"},
            "gb_cosface": {"loss": "gb_cosface"}, "unitsface": {"loss": "unitsface"},
            "cosface_s2s_bce": {"loss": "cosface_s2s_bce"}, "cosface_s2s_softmax": {"loss": "cosface_s2s_softmax"},
            "epl": {"loss": "epl"}}


def _run_family(rank: int, world: int, cfg: dict, C: int, D: int, B: int, steps: int) -> dict:
    import gc

    import heads
    from bench.head_cases import fill_memory
    from bench.measure import PeakMemory
    from bench.ranks import fix_malloc
    from heads import build_head
    from heads.optim import HeadOptimizer
    from heads.partition import ClassPartition
    fix_malloc()
    head = build_head(cfg, C, D, ClassPartition(C, world, rank), seed=0)
    fill_memory(head, torch.Generator().manual_seed(rank))  # a full memory, the term on
    if hasattr(heads, "set_collect_stats"):
        heads.set_collect_stats(head, False)
    opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    state_mb = sum(t.numel() * t.element_size() for t in list(head.buffers()) + list(head.parameters())) / 2 ** 20
    g = torch.Generator().manual_seed(100 + rank)
    peaks, times = [], []
    for step in range(2 + steps):
        x = torch.randn(B, D, generator=g).requires_grad_(True)
        y = torch.randint(0, C, (B,), generator=g)
        gc.collect()
        with PeakMemory(torch.device("cpu")) as peak:  # the peak resident set above the one at rest
            t0 = time.perf_counter()
            loss, _ = head(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            dt = time.perf_counter() - t0
        del loss, x
        if step >= 2:  # after the warm-up steps (first-call checks, lazily created state)
            peaks.append(peak.mb)
            times.append(dt)
    return {"state_mb": state_mb, "step_peak_mb": max(peaks), "step_s": sorted(times)[len(times) // 2]}


def per_family(a) -> str:
    from prettytable import PrettyTable

    from bench.ranks import run_ranks

    N = a.ranks * a.batch
    k = a.classes // a.ranks if a.sample_rate >= 1 else int(a.sample_rate * (a.classes // a.ranks))
    t = PrettyTable(["family", "head state (MB/rank)", "step peak above rest (MB/rank)", "in [N, K] blocks",
                     "step (s)"])
    block_mb = N * k * 4 / 2 ** 20
    for name in a.families:
        cfg = {**FAMILIES[name], "sample_rate": a.sample_rate}
        res = run_ranks(_run_family, a.ranks, cfg, a.classes, a.dim, a.batch, a.steps, timeout=3600)
        r = max(res, key=lambda r: r["step_peak_mb"])
        t.add_row([name, f"{r['state_mb']:.0f}", f"{r['step_peak_mb']:.0f}", f"{r['step_peak_mb'] / block_mb:.1f}",
                   f"{r['step_s']:.2f}"])
        print(f"{name}: step peak {r['step_peak_mb']:.0f} MB", flush=True)
    machine = (f"{platform.machine()} CPU container, {psutil.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM, torch {torch.__version__}")
    return (f"Head step working set per loss family: {a.classes:,} classes, D={a.dim}, {a.ranks} gloo ranks, batch "
            f"{a.batch}/rank (N={N}), sample_rate {a.sample_rate} (K={k} sampled classes per rank: one [N, K] "
            f"float32 block = {block_mb:.0f} MB), statistics off; per rank the largest step peak of "
            f"{a.steps} steps after 2 warm-up steps\nmachine: {machine}\n{t.get_string()}\n")


def main(argv=None) -> str:
    from prettytable import PrettyTable

    from bench.ranks import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128, help="per rank")
    ap.add_argument("--sample-rate", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--per-family", action="store_true",
                    help="the working set of one head step per loss family (see the module docstring)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    a = ap.parse_args(argv)
    if a.per_family:
        text = per_family(a)
        print(text)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(text)
        return text

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

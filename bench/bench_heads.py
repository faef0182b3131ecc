"""Benchmark: one head step per loss family on W ranks, side by side with plain CosFace in the same run.

A head step = forward (gather, sampling, cosines, loss) + backward + the head optimizer step + zero_grad, on the
class-sharded head of one rank, with random embeddings [B, D] per rank (no backbone). Memory terms are measured with
a full memory (every row written) and switched on (epoch past their start).

Timing is paired: each family runs in the same processes as a CosFace head, the two stepped alternately on the same
batches, and the ratio is median(family) / median(CosFace), so slow drifts of machine load cancel (a shared CPU is
noisy). For the memory terms a third timing in the same alternation gives the floor of scoring every sampled memory
row exactly: what such a term cannot avoid — reading its K rows and two matmuls ([N, D] x [D, K] for the cosines,
[N, K] x [K, D] for dL/dx; the memory takes no gradient) — timed bare on the same shapes; "floor" = (CosFace + that)
/ CosFace.
Memory is measured separately, the family alone in fresh processes: the head state (buffers + parameters)
and the peak resident memory (ru_maxrss: state + the step's working set + the Python/torch runtime).

    python -m bench.bench_heads          # 100k classes at r = 1 and 0.1, 1M at r = 0.1; 2 CPU gloo ranks
    python -m bench.bench_heads --settings 100000:1.0 --families cosface unitsface --steps 3
    python -m bench.bench_heads --device cuda --world-size 1 --batch 1024   # one GPU: the head step of 8 x 128

Each (classes, rate, family) runs in fresh processes (so ru_maxrss is that family's own peak): forked on the CPU,
SPAWNED with ``--device cuda`` (a fork of a process that touched CUDA cannot use it: the parent makes no torch.cuda
call at all; a spawned probe rank reports the GPU's name, or that there is none). Every step runs as a non-log step
of the trainer: statistics off (heads.set_collect_stats), in ``--matmul-precision`` (default fp32). The "step peak"
column is the transient working set of one steady-state step above the memory held before it (peak allocated GPU
memory, or on the CPU the peak resident set after resetting Linux's counter, /proc/self/clear_refs). Results are
printed as a table and, with --out, written to a text file (bench/results/heads_*.txt) with the machine named.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.head_cases import fill_memory
from bench.measure import PeakMemory, cpu_name, synchronize
from bench.ranks import RankError, fix_malloc, run_ranks
from heads import EmbeddedLoss, build_head, set_collect_stats
from heads.optim import HeadOptimizer
from heads.partition import ClassPartition
from heads.precision import MATMUL_PRECISIONS
from runtime.process import barrier

FAMILIES = {
    "cosface": {"loss": "cosface"},
    "arcface": {"loss": "arcface"},
    "uce": {"loss": "uce"},
    "gb_cosface": {"loss": "gb_cosface", "scale": 32.0},
    "unitsface": {"loss": "unitsface"},                       # CosFace + USS
    "cosface_s2s_softmax": {"loss": "cosface_s2s_softmax"},
    "cosface_s2s_bce": {"loss": "cosface_s2s_bce"},
    "epl": {"loss": "epl"},                                   # CosFace + prototypes
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _state_mb(head: torch.nn.Module) -> float:
    tensors = list(head.buffers()) + list(head.parameters())
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def _head(cfg: dict, num_classes: int, dim: int, part: ClassPartition, rank: int, device: torch.device):
    head = build_head(cfg, num_classes, dim, part, seed=0)
    fill_memory(head, torch.Generator().manual_seed(rank))
    head = head.to(device)
    set_collect_stats(head, False)  # a non-log step of the trainer
    return head, HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _probe(rank: int, world_size: int, device: str) -> dict:
    """Run in a spawned rank: what the device is (the parent of a CUDA benchmark must not touch CUDA)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is visible to torch")
        return {"name": torch.cuda.get_device_name(0)}
    return {"name": "cpu"}


def _step_peak(head, opt, x: torch.Tensor, labels: torch.Tensor) -> float:
    """MB the step allocates above what was held before it (GPU: allocated memory; CPU: resident set)."""
    with PeakMemory(x.device) as peak:
        _step(head, opt, x, labels)
    return peak.mb


def _step(head, opt, x: torch.Tensor, labels: torch.Tensor) -> float:
    """One timed head step; the ranks start it together (a barrier), so no rank's time holds another's lag."""
    synchronize(x.device)
    barrier()
    t0 = time.perf_counter()
    loss, _ = head(x.requires_grad_(True), labels)
    loss.backward()
    opt.step()
    opt.zero_grad()
    synchronize(x.device)
    return time.perf_counter() - t0


def _floor_step(n: int, dim: int, memory: torch.nn.Module, sampled: torch.Tensor | None) -> float:
    """What a memory term cannot avoid per step: read the K sampled rows, cosines [n, K], dL/dx [n, D]."""
    device = memory.valid.device
    u = torch.nn.functional.normalize(torch.randn(n, dim, device=device), dim=1)
    synchronize(device)
    t0 = time.perf_counter()
    rows = memory.rows(sampled)[0]
    cos = u @ rows.T
    cos @ rows
    synchronize(device)
    return time.perf_counter() - t0


def _rank_paired(rank: int, world_size: int, cfg: dict, num_classes: int, dim: int, batch: int, steps: int,
                 warmup: int, device: str) -> dict:
    """CosFace and ``cfg`` stepped alternately on the same batches: the ratio cancels slow drifts in machine load."""
    part = ClassPartition(num_classes, world_size, rank)
    cosface = {**FAMILIES["cosface"], "sample_rate": cfg["sample_rate"]}  # the same sample rate
    dev = torch.device(device)
    pair = {"cosface": _head(cosface, num_classes, dim, part, rank, dev),
            "family": _head(cfg, num_classes, dim, part, rank, dev)}
    family = pair["family"][0]
    memory = family.s2s.memory if isinstance(family, EmbeddedLoss) else None
    g = torch.Generator().manual_seed(100 + rank)
    times: dict[str, list[float]] = {"cosface": [], "family": [], "floor": []}
    for step in range(warmup + steps):
        x = torch.randn(batch, dim, generator=g).to(dev)
        labels = torch.randint(0, num_classes, (batch,), generator=g).to(dev)
        for name, (head, opt) in pair.items():
            dt = _step(head, opt, x.clone(), labels)
            if step >= warmup:
                times[name].append(dt)
        if memory is not None:
            dt = _floor_step(batch * world_size, dim, memory, pair["cosface"][0].last_sampled)
            if step >= warmup:
                times["floor"].append(dt)
    return {name: statistics.median(t) if t else None for name, t in times.items()}


def _rank_memory(rank: int, world_size: int, cfg: dict, num_classes: int, dim: int, batch: int, device: str) -> dict:
    """The family alone in fresh processes: its head state, the peak memory of its steps (resident memory of the
    process on CPU, allocated device memory on a GPU) and the working set of one steady-state step."""
    part = ClassPartition(num_classes, world_size, rank)
    dev = torch.device(device)
    if dev.type == "cpu":
        fix_malloc()
    head, opt = _head(cfg, num_classes, dim, part, rank, dev)
    g = torch.Generator().manual_seed(100 + rank)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    batches = [(torch.randn(batch, dim, generator=g).to(dev), torch.randint(0, num_classes, (batch,), generator=g)
                .to(dev)) for _ in range(3)]
    for x, labels in batches[:2]:
        _step(head, opt, x, labels)
    peak = (torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    step_peak = _step_peak(head, opt, *batches[2])
    return {"state_mb": _state_mb(head), "peak_mb": peak, "step_peak_mb": step_peak}


def run(settings: list[tuple[int, float]], families: list[str], world_size: int, dim: int, batch: int,
        steps: int, warmup: int, device: str = "cpu", precision: str = "fp32") -> list[dict]:
    spawn = device == "cuda"  # CUDA ranks are spawned: a forked child cannot use CUDA
    ranks = {"start_method": "spawn" if spawn else "fork", "backend": "nccl" if spawn else "gloo", "timeout": 3600}
    rows = []
    for num_classes, rate in settings:
        for family in families:
            cfg = {**FAMILIES[family], "sample_rate": rate, "matmul_precision": precision}
            ratio = step_s = floor = None
            if family != "cosface":
                timed = run_ranks(_rank_paired, world_size, cfg, num_classes, dim, batch, steps, warmup, device,
                                  **ranks)
                base = max(r["cosface"] for r in timed)  # the slowest rank sets the pace
                step_s = max(r["family"] for r in timed)
                ratio = step_s / base
                if timed[0]["floor"] is not None:
                    floor = max(r["cosface"] + r["floor"] for r in timed) / base
            memory = run_ranks(_rank_memory, world_size, cfg, num_classes, dim, batch, device, **ranks)
            row = {"classes": num_classes, "rate": rate, "family": family, "step_s": step_s, "ratio": ratio,
                   "floor": floor,
                   "cosface_s": None if family == "cosface" else base,
                   "state_mb": max(r["state_mb"] for r in memory), "peak_mb": max(r["peak_mb"] for r in memory),
                   "step_peak_mb": max(r["step_peak_mb"] for r in memory)}
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = (f"{'classes':>9} {'rate':>5} {'family':<20} {'step ms/rank':>12} {'CosFace ms':>10} {'x CosFace':>9} "
          f"{'floor':>5} {'state MB/rank':>13} {'peak MB/rank':>12} {'step peak MB':>12}")


def format_row(r: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{1000 * v:.1f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
    floor = "-" if r.get("floor") is None else f"{r['floor']:.2f}"
    return (f"{r['classes']:>9} {r['rate']:>5} {r['family']:<20} {ms(r['step_s']):>12} {ms(r['cosface_s']):>10} "
            f"{ratio:>9} {floor:>5} {r['state_mb']:>13.0f} {r['peak_mb']:>12.0f} {r['step_peak_mb']:>12.0f}")


def machine() -> str:
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {mem:.0f} GiB RAM, torch {torch.__version__}, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["100000:1.0", "100000:0.1", "1000000:0.1"],
                   help="CLASSES:SAMPLE_RATE pairs")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one spawned process on the first GPU (--world-size 1), timed with synchronisation")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="fp32",
                   help="the head's [N, D] x [D, K] products (heads/precision.py)")
    p.add_argument("--out", type=Path, default=None, help="write the table here (bench/results/heads_*.txt)")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.device == "cuda" and a.world_size != 1:
        p.error("--device cuda measures one GPU: pass --world-size 1 (and the global batch as --batch)")
    settings = []
    for item in a.settings:
        try:
            classes, rate = item.split(":")
            settings.append((int(classes), float(rate)))
        except ValueError:
            p.error(f"--settings: expected CLASSES:SAMPLE_RATE (e.g. 100000:0.1), got {item!r}")
    if a.device == "cuda":  # asked of a spawned rank: this process never touches CUDA
        try:
            gpu = run_ranks(_probe, 1, "cuda", start_method="spawn", timeout=600)[0]["name"]
        except RankError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            p.error(lines[-1] if lines else str(e))
    if "cosface" not in a.families:
        a.families = ["cosface"] + a.families  # the reference column
    else:
        a.families = ["cosface"] + [f for f in a.families if f != "cosface"]
    where = (f"1 spawned process on {gpu} (peak columns: allocated GPU memory)"
             if a.device == "cuda" else f"{a.world_size} gloo ranks x 1 thread (peak columns: resident memory)")
    title = (f"head step per loss family: {where}, B={a.batch}/rank "
             f"(N={a.world_size * a.batch}), D={a.dim}, float32, matmul precision {a.matmul_precision}, statistics "
             f"off, median of {a.steps} steps after {a.warmup} warm-up, each family stepped alternately with CosFace "
             f"in the same processes")
    print(title)
    print("machine:", machine())
    print(HEADER, flush=True)
    rows = run(settings, a.families, a.world_size, a.dim, a.batch, a.steps, a.warmup, a.device, a.matmul_precision)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join([title, f"machine: {machine()}", f"command: python -m bench.bench_heads "
                                    f"{' '.join(argv)}".rstrip(), HEADER]
                                   + [format_row(r) for r in rows]) + "\n")
    return rows


if __name__ == "__main__":
    main()

"""Benchmark: cosine scores of IJB-C-sized template pairs, and the ROC / TAR@FAR on them.

IJB-C 1:1 has 23,124 templates and 15,658,489 pairs (19,557 genuine). Here: random unit 512-d template features,
15.6M random pairs drawn uniformly from the 23k templates (the hard case for blocking: every block of the template
plane holds pairs), random genuine labels. Timed, each as the best of --repeats runs:

- ours: eval.ijb.score_pairs — pairs sorted by (template block, row) with one integer sort, each block scored by a
  sampled dense-dense product (only the listed cells) or, when dense, one GEMM;
- eval.roc: roc_curve (sorting 15.6M scores) + TAR@FAR at 1e-6 … 1e-1 under both rules;
- baselines on a slice of the pairs, extrapolated linearly to all of them (marked "extrapolated"): insightface's
  scoring (batches of 100k pairs: gather both feature rows, multiply, sum) and the full template×template GEMM
  (every one of the 535M cells, then a lookup; timed on 2048 rows).

    python -m bench.bench_ijb_scoring --threads 1 2 --out bench/results/ijb_scoring_2core-cpu.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from eval.ijb import score_pairs
from eval.roc import DEFAULT_FARS, roc_curve, tar_at_far
from eval.tables import format_table

IJBC_TEMPLATES, IJBC_PAIRS, IJBC_GENUINE = 23_124, 15_658_489, 19_557


def best_of(repeats: int, fn) -> tuple[float, object, list[float]]:
    """(best time, last result, every time): the machine is shared, so the spread is reported too."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out, times


def insightface_style(feats: np.ndarray, p1: np.ndarray, p2: np.ndarray, batch: int = 100_000) -> np.ndarray:
    out = np.empty(len(p1), dtype=np.float32)
    for s in range(0, len(p1), batch):
        out[s : s + batch] = np.sum(feats[p1[s : s + batch]] * feats[p2[s : s + batch]], -1)
    return out


def measure(args: argparse.Namespace, threads: int) -> list[str]:
    """One table: our scoring, the ROC and the two baselines with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(args.templates, args.dim, generator=gen), dim=1)
    p1 = rng.integers(0, args.templates, args.pairs)
    p2 = rng.integers(0, args.templates, args.pairs)
    labels = np.zeros(args.pairs, dtype=bool)
    labels[rng.choice(args.pairs, min(IJBC_GENUINE, args.pairs), replace=False)] = True

    t_score, scores, all_score = best_of(args.repeats, lambda: score_pairs(feats, p1, p2))
    check = rng.choice(args.pairs, 100_000, replace=False)
    max_err = float(np.abs(scores[check] - (feats[p1[check]] * feats[p2[check]]).sum(1).numpy()).max())

    def roc_and_tars():
        curve = roc_curve(scores, labels)
        return tar_at_far(curve, DEFAULT_FARS), tar_at_far(curve, DEFAULT_FARS, "insightface")

    t_roc, _, all_roc = best_of(args.repeats, roc_and_tars)

    n_base = min(args.baseline_pairs, args.pairs)
    f_np = feats.numpy()
    t_if, _, _ = best_of(1, lambda: insightface_style(f_np, p1[:n_base], p2[:n_base]))
    t_if_all = t_if * args.pairs / n_base
    rows_timed = min(2048, args.templates)
    sel = p1 < rows_timed
    t_gemm, _, _ = best_of(1, lambda: (feats[:rows_timed] @ feats.T)[p1[sel], p2[sel]])
    t_gemm_all = t_gemm * args.templates / rows_timed

    header = ["method", "pairs", "seconds", "M pairs/s", "time / ours"]
    rows = [
        ["ours: score_pairs (blocked sampled GEMM)", f"{args.pairs:,}", f"{t_score:.2f}",
         f"{args.pairs / t_score / 1e6:.2f}", "1.00"],
        ["insightface-style gather + sum (extrapolated)", f"{n_base:,} timed", f"{t_if_all:.2f}",
         f"{args.pairs / t_if_all / 1e6:.2f}", f"{t_if_all / t_score:.2f}"],
        ["full template x template GEMM (extrapolated)", f"{rows_timed} rows timed", f"{t_gemm_all:.2f}",
         f"{args.pairs / t_gemm_all / 1e6:.2f}", f"{t_gemm_all / t_score:.2f}"],
        ["ROC (one sort) + TAR@6 FARs, both rules", f"{args.pairs:,}", f"{t_roc:.2f}", "", ""],
        ["total: scores + ROC + TAR", f"{args.pairs:,}", f"{t_score + t_roc:.2f}", "", ""],
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        f"## {threads} torch thread(s)",
        "",
        f"- best of {args.repeats} runs; every run, seconds: score_pairs {', '.join(f'{t:.2f}' for t in all_score)};"
        f" ROC + TAR {', '.join(f'{t:.2f}' for t in all_roc)}; 1-minute load average after: {load:.1f}",
        f"- max |score - direct dot product| over 100k sampled pairs: {max_err:.1e}",
        "",
        "```",
        format_table(header, rows, f"IJB-C-sized 1:1 scoring, {threads} thread(s)"),
        "```",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", type=int, default=IJBC_TEMPLATES)
    parser.add_argument("--pairs", type=int, default=IJBC_PAIRS)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-pairs", type=int, default=1_000_000, help="slice timed for the baselines")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch thread counts to measure (default: torch's choice)")
    parser.add_argument("--machine", default="2-core CPU container")
    parser.add_argument("--out", default=None, help="write the report here too (bench/results/ijb_scoring_*.txt)")
    args = parser.parse_args()

    lines = [
        "# IJB-C-sized pair scoring",
        "",
        f"- Machine: {args.machine} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, numpy {np.__version__}); the cores are shared with other jobs, hence the spread",
        f"- {args.templates:,} random unit {args.dim}-d templates, {args.pairs:,} uniform random pairs "
        f"({IJBC_GENUINE:,} genuine), as IJB-C's 1:1 protocol",
        "",
    ]
    for threads in args.threads:
        lines += measure(args, threads)
    lines.append("Command: `python -m bench.bench_ijb_scoring --threads 1 2 "
                 "--out bench/results/ijb_scoring_2core-cpu.txt`")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()

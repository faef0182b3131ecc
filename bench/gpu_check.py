"""One command for the day a GPU is lent: everything this project could only test on CPU, measured, in one table.

    python -m bench.gpu_check                   # on a CUDA machine (sized for <= 8 minutes on one H200; not yet run
                                                # on a GPU: the estimate is ~5, torch.compile's first step the most)
    python -m bench.gpu_check --dry-run         # every part at tiny sizes on the CPU, under a minute (CI runs it)

Needs only torch (and this repository); the trainer part also needs the project's requirements (deepspeed, PyYAML,
...) and is skipped with the reason printed when they do not import. Without CUDA the command runs the dry run.

Parts (rows of the table, in this order):

1. exactness   every loss family on a small case (C=64, D=32, N=24, sample_rate 1, a full memory, two training steps
               with the head optimizer): loss, dL/dx of each step and the whole head state after them, on the
               device in float64 and in float32 with each head.matmul_precision (fp32, tf32, bf16), against the same
               head in float64 on the CPU. Largest relative error (|a - b| / max|b| per tensor). Checked: float64
               <= 1e-9, fp32 <= 1e-3; tf32 and bf16 are reported (what chooses the GPU default,
               heads/precision.py).
2. syncs       host syncs of one head training step (forward, backward, optimizer; statistics off, r = 0.1 and 1)
               per loss family, counted by torch.cuda.set_sync_debug_mode("warn") (on the CPU by bench/sync_count.py);
               checked: 0 (the log-step count, statistics on, is reported).
3. r100        R100 training images/s (bf16 autocast trunk, fp32 tail, SGD; a synthetic batch resident on the
               device; batch 128): as shipped, + channels_last, + torch.compile (its compile time apart); peak
               allocated memory.
4. head        one head step (forward, backward, optimizer) at 1M and 2M classes, r = 0.1 and 1, N = 1024, D = 512
               on one device: this project's row-sparse CosFace head in each matmul precision, and the dense-gradient
               partial FC (arcface_torch v2's pattern: centres as one Parameter indexed inside autograd, torch SGD)
               in the same run: median step time and peak allocated memory (OOM reported as such).
5. trainer     ``python -m trainer configs/demo.yaml train.max_steps=40`` through DeepSpeed on this machine (1 rank):
               return code, steps and seconds, held-out verification.

The table is printed and written to ``--out`` (default bench/results/gpu_check_<device>.txt) with the machine named.
Exit status 1 when a checked row fails.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from bench.head_cases import FAMILIES, fill_memory
from bench.measure import PeakMemory, cpu_name, synchronize
from runtime.process import free_port, is_distributed

REPO = Path(__file__).resolve().parent.parent

TOLERANCE = {"float64": 1e-9, "fp32": 1e-3}


@dataclass
class Sizes:
    exact_classes: int = 64
    exact_dim: int = 32
    exact_batch: int = 24
    sync_classes: int = 20000
    sync_batch: int = 256
    sync_dim: int = 128
    r100: str = "r100"
    r100_batch: int = 128
    r100_steps: int = 20
    r100_warmup: int = 5
    compile_backend: str = "inductor"
    head_classes: list[int] = field(default_factory=lambda: [1_000_000, 2_000_000])
    head_rates: list[float] = field(default_factory=lambda: [0.1, 1.0])
    head_batch: int = 1024
    head_dim: int = 512
    head_steps: int = 3
    trainer_steps: int = 40
    trainer_overrides: list[str] = field(default_factory=list)


def dry_run_sizes() -> Sizes:
    return Sizes(sync_classes=2000, sync_batch=32, sync_dim=32, r100="iresnet_tiny", r100_batch=4, r100_steps=2,
                 r100_warmup=1, compile_backend="eager", head_classes=[2000, 4000], head_batch=64, head_dim=64,
                 head_steps=2, trainer_steps=2,
                 trainer_overrides=["data.synthetic.num_ids=24", "data.synthetic.imgs_per_id=4",
                                    "data.synthetic.val_ids=12", "data.synthetic.val_pairs=24",
                                    "data.synthetic.workers=1", "data.num_workers=0", "train.batch_size=8"])


@dataclass
class Row:
    part: str
    case: str
    result: str
    check: str = ""  # "ok", "FAIL", or "" (reported, not checked)


# --- helpers ----------------------------------------------------------------------------------------------------------
def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def size(mb: float) -> str:
    mb = max(mb, 0.0)
    return f"{mb:.0f} MB" if mb < 1024 else f"{mb / 1024:.2f} GB"


def ms_gb(seconds: float, mb: float) -> str:
    return f"{1000 * seconds:.1f} ms, peak {size(mb)}"


# --- 1. exactness -----------------------------------------------------------------------------------------------------
def _exact_run(cfg: dict, device: torch.device, dtype: torch.dtype, precision: str, z: Sizes) -> list[torch.Tensor]:
    from heads import build_head, set_collect_stats
    from heads.optim import HeadOptimizer
    from heads.partition import ClassPartition

    C, D, N = z.exact_classes, z.exact_dim, z.exact_batch
    head = build_head({**cfg, "sample_rate": 1.0, "matmul_precision": precision}, C, D, ClassPartition(C, 1, 0),
                      seed=0).to(dtype)
    g = torch.Generator().manual_seed(5)
    fill_memory(head, g, dtype=torch.float64)  # the same rows on every device
    head = head.to(device)
    set_collect_stats(head, False)
    opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    out = []
    for _ in range(2):
        x = torch.randn(N, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True)
        y = torch.randint(0, C, (N,), generator=g).to(device)
        loss, _ = head(x, y)
        loss.backward()
        out += [loss.detach(), x.grad]
        opt.step()
        opt.zero_grad()
    out += [v for v in head.state_dict().values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return [t.detach().cpu() for t in out]


def part_exactness(device: torch.device, z: Sizes) -> list[Row]:
    variants = [("float64", torch.float64, "fp32")] if device.type == "cuda" else []
    variants += [(p, torch.float32, p) for p in ("fp32", "tf32", "bf16")]
    where = "cuda" if device.type == "cuda" else "cpu"
    rows = []
    for name, cfg in FAMILIES.items():
        ref = _exact_run(cfg, torch.device("cpu"), torch.float64, "fp32", z)
        cells, failed = [], False
        for label, dtype, precision in variants:
            got = _exact_run(cfg, device, dtype, precision, z)
            err = max(rel_error(a, b) for a, b in zip(got, ref))
            tol = TOLERANCE.get(label)
            failed |= tol is not None and not err <= tol
            cells.append(f"{label} {err:.1e}")
        rows.append(Row("exactness", f"{name}: {where} vs float64 cpu", ", ".join(cells), "FAIL" if failed else "ok"))
    return rows


# --- 2. host syncs ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def count_device_syncs(device: torch.device):
    """Yields a list that ends up holding one entry per host sync made inside the block."""
    seen: list[str] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode(0)
        seen += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    else:
        from bench.sync_count import count_syncs  # the CPU stand-in
        with count_syncs() as counter:
            yield seen
        seen += [f"{op} at {site}" for op, site in counter.events]


def part_syncs(device: torch.device, z: Sizes) -> list[Row]:
    from heads import build_head, set_collect_stats
    from heads.optim import HeadOptimizer
    from heads.partition import ClassPartition

    rows = []
    C, D, N = z.sync_classes, z.sync_dim, z.sync_batch
    how = "torch.cuda.set_sync_debug_mode" if device.type == "cuda" else "bench/sync_count.py (CPU stand-in)"
    for rate in (0.1, 1.0):
        for name, cfg in FAMILIES.items():
            head = build_head({**cfg, "sample_rate": rate}, C, D, ClassPartition(C, 1, 0), seed=0)
            fill_memory(head, torch.Generator().manual_seed(1), dtype=torch.float64)
            head = head.to(device)
            opt = HeadOptimizer(head, lr=0.1)
            g = torch.Generator().manual_seed(2)
            counts = []
            for step, stats in enumerate((False, False, True)):  # warm-up (first-call checks), counted, log step
                set_collect_stats(head, stats)
                x = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
                y = torch.randint(0, C, (N,), generator=g).to(device)
                synchronize(device)
                with count_device_syncs(device) as seen:
                    loss, logs = head(x, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                counts.append(seen)
            steady, log_step = counts[1], counts[2]
            detail = f"{len(steady)} per step (log step: {len(log_step)})"
            if steady:
                detail += f"; first: {steady[0][:90]}"
            rows.append(Row("syncs", f"{name} r={rate} ({how})", detail, "ok" if not steady else "FAIL"))
    return rows


# --- 3. R100 throughput -----------------------------------------------------------------------------------------------
def _r100_step(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    loss = model(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def part_r100(device: torch.device, z: Sizes) -> list[Row]:
    from backbones import get_model

    rows = []
    variants = [("as shipped", False, False), ("+ channels_last", True, False), ("+ torch.compile", True, True)]
    for label, channels_last, compiled in variants:
        torch.manual_seed(0)
        autocast = "bf16" if device.type == "cuda" else None  # the CPU dry run: float32 (bf16 CPU autocast is slow)
        model = get_model(z.r100, num_features=512, autocast_dtype=autocast).to(device).train()
        x = torch.randn(z.r100_batch, 3, 112, 112, device=device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step_model = torch.compile(model, backend=z.compile_backend) if compiled else model
        step = functools.partial(_r100_step, step_model, x, opt)
        try:
            t0 = time.perf_counter()
            step()
            synchronize(device)
            first = time.perf_counter() - t0
            for _ in range(z.r100_warmup):
                step()
            with PeakMemory(device) as peak:
                t0 = time.perf_counter()
                for _ in range(z.r100_steps):
                    step()
                synchronize(device)
                elapsed = time.perf_counter() - t0
            result = f"{z.r100_steps * z.r100_batch / elapsed:.1f} img/s, peak {size(peak.mb)} above the weights"
            if compiled:
                result += f", first step (compile, backend {z.compile_backend}) {first:.0f} s"
            rows.append(Row("r100", f"{z.r100} batch {z.r100_batch} {'bf16' if autocast else 'fp32'}: {label}",
                            result))
        except Exception as e:  # noqa: BLE001 - one variant failing (e.g. no compiler for inductor) is a result
            rows.append(Row("r100", f"{z.r100} {label}", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}",
                            "error"))
        del model, step_model, opt, x, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- 4. head step at scale --------------------------------------------------------------------------------------------
def _dense_step(weight, opt, x, y, rate, gen, margin, scale):
    """The dense-gradient partial FC (bench/bench_head_memory.py's pattern), one process; ``x`` is copied, so the
    same batch serves every step."""
    from heads.dist_softmax import dist_cross_entropy
    from heads.margins import cosine, margin_logits

    x = x.clone().requires_grad_(True)
    C = weight.shape[0]
    if rate < 1:
        positives = torch.unique(y)
        score = torch.rand(C, generator=gen, device=weight.device)
        score[positives] = 2.0
        index = torch.topk(score, max(int(rate * C), positives.numel())).indices.sort().values
        target = torch.searchsorted(index, y)
        w = weight[index]
    else:
        target, w = y, weight
    loss = dist_cross_entropy(margin_logits(cosine(x, w), target, margin, scale), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _head_step(head, opt, x, y) -> None:
    """One step of this project's head on a copy of ``x`` (the same batch serves every step)."""
    loss, _ = head(x.clone().requires_grad_(True), y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def _timed(device: torch.device, step, steps: int) -> tuple[float, float]:
    step()  # warm-up
    times = []
    with PeakMemory(device) as peak:
        for _ in range(steps):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak.mb


def part_head(device: torch.device, z: Sizes) -> list[Row]:
    from heads import build_head, set_collect_stats, set_matmul_precision
    from heads.margins import CombinedMargin
    from heads.optim import HeadOptimizer
    from heads.partition import ClassPartition

    rows = []
    N, D = z.head_batch, z.head_dim
    for C in z.head_classes:
        for rate in z.head_rates:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(N, D, generator=g).to(device)
            y = torch.randint(0, C, (N,), generator=g).to(device)
            case = f"{C:,} classes r={rate} N={N}"
            try:
                head = build_head({"loss": "cosface", "sample_rate": rate}, C, D, ClassPartition(C, 1, 0), seed=0)
                head = head.to(device)
                set_collect_stats(head, False)
                opt = HeadOptimizer(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
                state_mb = sum(t.numel() * t.element_size() for t in head.buffers()) / 2 ** 20
                for precision in ("fp32", "tf32", "bf16"):
                    set_matmul_precision(head, precision)
                    seconds, mb = _timed(device, functools.partial(_head_step, head, opt, x, y), z.head_steps)
                    rows.append(Row("head", f"{case}: row-sparse CosFace, {precision}",
                                    f"{ms_gb(seconds, mb)} above its state ({size(state_mb)}: centres + momentum)"))
                del head, opt
            except torch.cuda.OutOfMemoryError:
                rows.append(Row("head", f"{case}: row-sparse CosFace", "OOM", "FAIL"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                weight = torch.nn.Parameter(torch.randn(C, D, device=device) * 0.01)
                dense_opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
                gen = torch.Generator(device=device).manual_seed(0)
                margin = CombinedMargin(1.0, 0.0, 0.4)
                step = functools.partial(_dense_step, weight, dense_opt, x, y, rate, gen, margin, 64.0)
                seconds, mb = _timed(device, step, z.head_steps)
                rows.append(Row("head", f"{case}: dense-gradient PFC (v2 pattern), fp32",
                                f"{ms_gb(seconds, mb)} above its weights (+ dense grad and momentum after step 1)"))
                del weight, dense_opt, step
            except torch.cuda.OutOfMemoryError:
                rows.append(Row("head", f"{case}: dense-gradient PFC", "OOM"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# --- 5. the trainer through DeepSpeed ---------------------------------------------------------------------------------
def part_trainer(device: torch.device, z: Sizes) -> list[Row]:
    missing = [m for m in ("deepspeed", "yaml", "prettytable", "numpy", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        return [Row("trainer", "demo through DeepSpeed", f"skipped: {', '.join(missing)} not importable (install "
                    f"requirements.txt, e.g. by running ./run.sh once)")]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        cmd = [sys.executable, "-m", "trainer", "configs/demo.yaml", f"train.max_steps={z.trainer_steps}",
               f"output={tmp}/run", f"data.root={tmp}/data", f"data.val_root={tmp}/data", *z.trainer_overrides]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                                  "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
    case = f"python -m trainer configs/demo.yaml train.max_steps={z.trainer_steps} (1 rank, {device.type})"
    lines = run.stdout.splitlines()
    trained = next((line for line in lines if line.startswith("trained ")), "")
    if run.returncode != 0 or not trained:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        return [Row("trainer", case, f"rc {run.returncode} after {wall:.0f} s: {' | '.join(tail)[:300]}", "FAIL")]
    summary = next((i for i, line in enumerate(lines) if "held-out verification" in line), len(lines))
    accuracy = [line.strip("| ").replace("|", " ").split() for line in lines[summary:] if line.startswith("| ")
                and "±" in line]
    held_out = "; ".join(f"{cells[0]} {cells[1]} -> {cells[-4]}" for cells in accuracy if len(cells) >= 5)
    return [Row("trainer", case, f"rc 0, {trained}; held-out acc % (before -> after, ± in the log): {held_out}",
                "ok")]


# --- the table --------------------------------------------------------------------------------------------------------
PARTS = {"exactness": part_exactness, "syncs": part_syncs, "r100": part_r100, "head": part_head,
         "trainer": part_trainer}


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    return f"{gpu}{cpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, {platform.system()} {platform.release()}"


def format_table(rows: list[Row]) -> str:
    headers = ("part", "case", "result", "check")
    cells = [headers] + [(r.part, r.case, r.result, r.check) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths)) + " |" for cell in cells[1:]]
    return "\n".join(out + [line])


def start_process_group(device: torch.device) -> None:
    """A 1-rank process group, so that the heads run their distributed code paths (collectives, shape checks)."""
    if is_distributed():
        return
    port = free_port()
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU (under a minute)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="run only these parts")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the table (default bench/results/gpu_check_<device>.txt)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sizes = Sizes() if cuda else dry_run_sizes()
    if cuda:
        torch.cuda.set_device(device)
    note = "" if cuda else (" (dry run: tiny sizes on the CPU" + ("" if a.dry_run else ", no CUDA device visible") +
                            ")")
    t_start = time.perf_counter()
    start_process_group(device)
    rows: list[Row] = []
    try:
        for name in a.parts:
            t0 = time.perf_counter()
            try:
                new = PARTS[name](device, sizes)
            except Exception as e:  # noqa: BLE001 - a part that breaks is a row of the table, the others still run
                new = [Row(name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                           "FAIL")]
            rows += new
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
            for r in new:
                print(f"  {r.part:9s} {r.case}: {r.result} {r.check}", flush=True)
    finally:
        dist.destroy_process_group()
    title = (f"facetrain GPU check on {device.type}{note}: {time.perf_counter() - t_start:.0f} s\n"
             f"machine: {machine(device)}\ncommand: python -m bench.gpu_check {' '.join(argv or sys.argv[1:])}")
    text = title + "\n" + format_table(rows) + "\n"
    print(text)
    out = a.out or REPO / "bench" / "results" / f"gpu_check_{'cuda' if cuda else 'cpu_dry_run'}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 1 if any(r.check == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

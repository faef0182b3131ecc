"""Soak: a long 2-rank CPU run through ./run.sh, watched from outside. Does memory creep, do steps slow down, does
anything turn non-finite, do periodic checkpoints and their rotation hold up?

    ./run.sh python -m bench.soak [--steps 1000] [--out bench/results/soak_cpu.txt]

Synthetic identities (40 x 16 images), the tiny IResNet, UniTSFace's embedded loss (CosFace + USS with the class
memory), batch 16 per rank, a step checkpoint every 30 steps (2 kept; an epoch ends every 20 steps). Every second the
resident memory (RSS) of both ranks is sampled; the step log gives the steps/s of each 10-step window. Printed: per
100 steps the step time and the RSS of each rank; the least-squares RSS slope per 100 steps after the first 200
(warm-up: allocator pools, the DataLoader worker, the memory filling); the step-time trend (last 200 steps over steps
200-400); the non-finite count (skipped steps in the log, and every tensor of the final checkpoint checked).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
STEP = re.compile(r"step (\d+)/(\d+)\s+loss (\S+)\s+lr \S+\s+([\d.]+) samples/s")


def run_soak(steps: int, work: Path) -> dict:
    from data.synthetic import make_dataset
    data = work / "data"
    make_dataset(data, num_ids=40, imgs_per_id=16, val_ids=4, val_pairs=10, seed=1, progress=False)
    out = work / "run"
    env = {**os.environ, "NPROC": "2", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "MASTER_PORT"):
        env.pop(k, None)
    args = [str(REPO / "run.sh"), "configs/base.yaml", "model.name=iresnet_tiny", "model.num_features=64",
            f"data.root={data}", f"output={out}", "data.num_workers=1", "train.batch_size=16", "train.log_every=10",
            "train.epochs=1000", f"train.max_steps={steps}", "train.eval_every_epoch=false", "head.loss=unitsface",
            "head.s2s_start_epoch=1", "train.checkpoint_every_steps=30", "train.keep_step_checkpoints=2",
            "train.keep_checkpoints=2", "optim.lr=0.05", "schedule.warmup_epochs=1", "seed=5"]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[int, list[float]]] = []  # (step at sample time, [rss MB per rank])
    log = out / "train.log"
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        time.sleep(1.0)
        try:
            ranks = [p for p in launcher.children() if "trainer" in " ".join(p.cmdline())]
            rss = [p.memory_info().rss / 2 ** 20 for p in ranks]
        except psutil.Error:
            continue
        found = STEP.findall(log.read_text()) if log.is_file() else []
        if found and len(rss) == 2:
            samples.append((int(found[-1][0]), rss))
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"the soak run failed (exit {proc.returncode}):\n{stdout[-3000:]}")
    text = log.read_text()
    windows = [(int(s), float(sps)) for s, _, loss, sps in STEP.findall(text)]
    losses = [float(loss) for _, _, loss, _ in STEP.findall(text)]
    skipped = text.count("step skipped on every rank")
    tag = (out / "checkpoints" / "latest").read_text().strip()
    from trainer.checkpoint import non_finite_tensors, safe_load
    bad = []
    folder = out / "checkpoints" / tag
    for f in [folder / "backbone.pth", folder / "mp_rank_00_model_states.pt", *sorted((folder / "head").glob("*.pt"))]:
        bad += [f"{f.name}:{n}" for n in non_finite_tensors(safe_load(f))]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    return {"samples": samples, "windows": windows, "losses": losses, "skipped": skipped, "bad": bad, "kept": kept,
            "seconds": time.monotonic() - t0, "global_batch": 32}


def report(res: dict, steps: int) -> str:
    samples, windows = res["samples"], res["windows"]
    gb = res["global_batch"]
    lines = [f"soak: {steps} steps, 2 CPU ranks x 16 (tiny IResNet, unitsface), {platform.machine()} "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
             f"whole run {res['seconds']:.0f}s; checkpoints kept at the end: {', '.join(res['kept'])}", "",
             "steps        step ms   RSS rank 0 MB   RSS rank 1 MB"]
    for lo in range(0, steps, 100):
        w = [gb / sps * 1000 for s, sps in windows if lo < s <= lo + 100 and sps > 0]
        r = [rss for s, rss in samples if lo < s <= lo + 100]
        if not w or not r:
            continue
        r0, r1 = np.mean([x[0] for x in r]), np.mean([x[1] for x in r])
        lines.append(f"{lo + 1:>4}-{lo + 100:<6} {np.median(w):>8.1f}   {r0:>13.1f}   {r1:>13.1f}")
    late = [(s, rss) for s, rss in samples if s > 200]
    slopes = []
    if len(late) >= 3:
        x = np.array([s for s, _ in late], dtype=float)
        for k in range(2):
            y = np.array([rss[k] for _, rss in late])
            slopes.append(np.polyfit(x, y, 1)[0] * 100)
    early = [gb / sps for s, sps in windows if 200 < s <= 400 and sps > 0]
    last = [gb / sps for s, sps in windows if s > steps - 200 and sps > 0]
    trend = np.median(last) / np.median(early) if early and last else float("nan")
    lines += ["",
              "RSS slope after step 200, MB per 100 steps: " + ", ".join(f"rank {k} {v:+.2f}" for k, v in
                                                                        enumerate(slopes)),
              f"step time, last 200 steps / steps 201-400: {trend:.3f}",
              f"loss: first window {res['losses'][0]:.3f}, last window {res['losses'][-1]:.3f}",
              f"non-finite: {res['skipped']} skipped steps; {len(res['bad'])} non-finite tensors in the final "
              f"checkpoint" + (f" ({', '.join(res['bad'][:5])})" if res["bad"] else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="facetrain-soak-") as tmp:
        text = report(run_soak(ns.steps, Path(tmp)), ns.steps)
    print(text)
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(f"$ python -m bench.soak --steps {ns.steps}\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

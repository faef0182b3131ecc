"""What happens when ...: each fault a cluster job meets, done for real to a 2-rank CPU run of ./run.sh, with its
exit code, the time from the fault to the job's end, and the work lost (steps trained but in no checkpoint).

    ./run.sh python -m bench.faults [--out bench/results/faults_cpu.txt]

The run: synthetic identities (12 x 6 images), the tiny IResNet, batch 8 per rank (4 steps per epoch), a log line and a
periodic checkpoint every 3 steps, train.hang_timeout_s=4 (default 600) so that a hang is seen in seconds. Each fault
is applied once step 5 is logged. "work lost" = the last step logged minus the step of the checkpoint `latest` names
(the steps a `train.resume=auto` has to redo).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from runtime.layout import META_FILE, newest_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.name=iresnet_tiny", "model.num_features=32", "model.kwargs={depths: [1, 1, 1, 1]}",
        "train.batch_size=8", "train.log_every=1", "data.num_workers=1", "head.scale=16", "head.margin=0.2",
        "schedule.warmup_epochs=0.5", "train.eval_every_epoch=false", "seed=11", "train.checkpoint_every_steps=3",
        "train.hang_timeout_s=4"]


def start(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "NPROC": "2", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen([str(REPO / "run.sh"), "configs/base.yaml", *TINY, f"data.root={data}", f"output={out}",
                             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def last_step(out: Path) -> int:
    import re
    found = re.findall(r"step (\d+)/\d+ ", (out / "train.log").read_text()) if (out / "train.log").is_file() else []
    return int(found[-1]) if found else 0


def wait_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while last_step(out) < step:
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the run ended or stalled before step {step}:\n{proc.stdout.read()[-2000:]}")
        time.sleep(0.05)


def saved_step(out: Path) -> int | None:
    folder = newest_checkpoint(out)
    if folder is None:
        return None
    return json.loads((folder / META_FILE).read_text())["global_step"]


def ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children() if "trainer" in " ".join(p.cmdline())]


def fault(kind: str, proc: subprocess.Popen) -> None:
    rs = ranks(proc)
    if kind == "SIGTERM to every process (scancel, preemption)":
        os.killpg(proc.pid, signal.SIGTERM)
    elif kind == "SIGUSR1 to every process (--signal=USR1@180)":
        os.killpg(proc.pid, signal.SIGUSR1)
    elif kind == "SIGTERM to the launcher alone":
        os.kill(proc.pid, signal.SIGTERM)
    elif kind == "SIGUSR1 to one rank alone":
        rs[1].send_signal(signal.SIGUSR1)
    elif kind == "SIGTERM to the loader workers alone":
        for w in [w for r in rs for w in r.children()]:
            w.send_signal(signal.SIGTERM)
    elif kind == "SIGKILL of one rank":
        rs[1].kill()
    elif kind == "SIGSTOP of one rank (hung)":
        rs[1].send_signal(signal.SIGSTOP)
    elif kind == "SIGKILL of the launcher":
        os.kill(proc.pid, signal.SIGKILL)
    else:
        raise ValueError(kind)


SIGNAL_CASES = ["SIGTERM to every process (scancel, preemption)", "SIGUSR1 to every process (--signal=USR1@180)",
                "SIGTERM to the launcher alone", "SIGUSR1 to one rank alone", "SIGTERM to the loader workers alone",
                "SIGKILL of one rank", "SIGSTOP of one rank (hung)", "SIGKILL of the launcher"]


def run_case(kind: str, data: Path, work: Path) -> dict:
    out = work / f"case{SIGNAL_CASES.index(kind)}"
    proc = start(data, out, "train.epochs=500")
    wait_step(out, 5, proc)
    before = ranks(proc)
    t0 = time.monotonic()
    fault(kind, proc)
    try:
        proc.communicate(timeout=120)
    finally:
        for r in before:  # a stopped or orphaned rank must not outlive the measurement
            try:
                if r.is_running():
                    r.kill()
            except psutil.Error:
                pass
    gone, alive = psutil.wait_procs(before, timeout=10)
    elapsed = time.monotonic() - t0
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    saved = saved_step(out)
    done = last_step(out)
    return {"case": kind, "exit": code, "seconds": elapsed, "logged": done, "saved": saved,
            "lost": None if saved is None else max(done - saved, 0), "orphans": len(alive),
            "lock_left": (out / "run.lock").exists()}


def run_nonfinite(data: Path, work: Path) -> dict:
    out = work / "nonfinite"
    first = start(data, out, "train.epochs=2")
    first.communicate(timeout=180)
    t0 = time.monotonic()
    proc = start(data, out, "train.epochs=4", "train.resume=auto", "optim.lr=1.0e36", "train.max_nonfinite_steps=3")
    proc.communicate(timeout=180)
    skipped = (out / "train.log").read_text().count("step skipped on every rank")
    return {"case": f"weights overflow (lr 1e36): {skipped} non-finite steps skipped, then the abort",
            "exit": proc.returncode,
            "seconds": time.monotonic() - t0, "logged": last_step(out), "saved": saved_step(out),
            "lost": None, "orphans": 0, "lock_left": (out / "run.lock").exists(), "skipped": skipped}


def table(rows: list[dict]) -> str:
    from prettytable import PrettyTable
    t = PrettyTable(["what happens", "exit code", "s to job end", "last step", "latest ckpt step", "work lost",
                     "ranks left", "lock left"])
    for r in rows:
        t.add_row([r["case"], r["exit"], f"{r['seconds']:.1f}", r["logged"], r["saved"],
                   "-" if r["lost"] is None else f"{r['lost']} steps", r["orphans"], "yes" if r["lock_left"] else
                   "no"])
    t.align["what happens"] = "l"
    return t.get_string()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    ns = parser.parse_args(argv)
    from data.synthetic import make_dataset
    rows = []
    with tempfile.TemporaryDirectory(prefix="facetrain-faults-") as tmp:
        work = Path(tmp)
        make_dataset(work / "data", num_ids=12, imgs_per_id=6, val_ids=4, val_pairs=10, seed=3, progress=False)
        for kind in SIGNAL_CASES:
            rows.append(run_case(kind, work / "data", work))
            print(f"{kind}: exit {rows[-1]['exit']} after {rows[-1]['seconds']:.1f}s", flush=True)
        rows.append(run_nonfinite(work / "data", work))
    text = (f"faults: 2 CPU ranks through ./run.sh, periodic checkpoint every 3 steps, hang_timeout_s=4; "
            f"{platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n" + table(rows))
    print(text)
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text("$ python -m bench.faults\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a multi-day cluster job meets, with real processes and real signals on the synthetic data:

- SIGTERM / SIGUSR1 to the launcher, the ranks, the loader workers or the whole process group: every rank saves the
  same step's checkpoint, the job exits 0, and resume=auto continues from it;
- a rank stopped with SIGSTOP: the job ends within train.hang_timeout_s, naming the rank and its last step;
- non-finite steps: skipped, counted, K in a row end the run naming the records; `latest` stays finite and resumes;
- a crafted head shard that would run code on load; a second run on the same output folder; unclear failures.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.test_train_e2e import REPO, TINY, run

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data.synthetic import make_dataset
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, num_ids=12, imgs_per_id=6, val_ids=8, val_pairs=20, seed=3, progress=False)
    return root


def start(data_dir: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.Popen:
    """./run.sh in a session of its own (so that a test can signal its whole process group)."""
    env = {**os.environ, "NPROC": str(nproc), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "MASTER_PORT"):
        env.pop(k, None)
    args = [str(REPO / "run.sh"), "configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}",
            "train.log_every=1", *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    log = out / "train.log"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and f" step {step}/" in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout}s")


def ranks_of(launcher_pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher_pid).children() if "trainer" in " ".join(p.cmdline())]


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout}s:\n{out[-3000:]}")
    return proc.returncode, out


def latest_meta(out: Path) -> dict:
    tag = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / tag / "meta.json").read_text())


@pytest.mark.parametrize("target,sig", [("group", "SIGTERM"), ("group", "SIGUSR1"), ("launcher", "SIGTERM"),
                                        ("launcher", "SIGUSR1"), ("ranks", "SIGTERM"), ("one rank", "SIGUSR1"),
                                        ("workers", "SIGTERM")])
def test_a_stop_signal_to_any_target_saves_one_step_and_exits_0(data_dir, tmp_path, target, sig):
    out = tmp_path / "run"
    proc = start(data_dir, out, "train.epochs=200", "data.num_workers=1")
    wait_for_step(out, 3, proc)
    signum = getattr(signal, sig)
    ranks = ranks_of(proc.pid)
    assert len(ranks) == 2
    t0 = time.monotonic()
    if target == "group":
        os.killpg(proc.pid, signum)  # what scancel / SLURM preemption does: every process of the job
    elif target == "launcher":
        os.kill(proc.pid, signum)
    elif target == "ranks":
        for r in ranks:
            r.send_signal(signum)
    elif target == "one rank":
        ranks[1].send_signal(signum)
    else:  # only the loader workers: they pass it on to their rank
        workers = [w for r in ranks for w in r.children()]
        assert workers, "data.num_workers=1 should give each rank a worker"
        for w in workers:
            w.send_signal(signum)
    code, stdout = finish(proc)
    elapsed = time.monotonic() - t0
    assert code == 0, stdout[-3000:]
    assert "stopped by" in stdout and "train.resume=auto" in stdout
    meta = latest_meta(out)
    assert meta["global_step"] >= 3 and meta["tag"].startswith(("step_", "epoch_"))
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert not (out / "run.lock").exists()
    assert all(not r.is_running() or r.status() == psutil.STATUS_ZOMBIE for r in ranks)
    assert elapsed < 60
    if (target, sig) == ("group", "SIGTERM"):  # and the job continues from exactly there
        p = run(["configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}", "train.resume=auto",
                 f"train.epochs={meta['epoch'] + 1}"])
        log = (out / "train.log").read_text().split("resumed from")[-1]
        assert f"at epoch {meta['epoch']}, step {meta['global_step']}" in log
        assert latest_meta(out)["global_step"] == (meta["epoch"] + 1) * 4, p.stdout[-2000:]


def test_no_rank_outlives_a_killed_launcher(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(data_dir, out, "train.epochs=200")
    wait_for_step(out, 2, proc)
    ranks = ranks_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks still running after the launcher was killed: {[p.pid for p in alive]}"


def test_a_stalled_rank_ends_the_job_within_the_bound_naming_it(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(data_dir, out, "train.epochs=200", "train.hang_timeout_s=4", "train.checkpoint_every_steps=2")
    wait_for_step(out, 4, proc)
    ranks = ranks_of(proc.pid)
    before = latest_meta(out)["global_step"]
    t0 = time.monotonic()
    ranks[1].send_signal(signal.SIGSTOP)
    try:
        code, stdout = finish(proc, timeout=60)
    finally:
        for r in ranks:
            if r.is_running():
                r.kill()
    elapsed = time.monotonic() - t0
    assert code == 3, stdout[-3000:]
    assert elapsed < 4 + 2 + 8  # the bound, a heartbeat round, slack (the launcher ends a hung job at once)
    assert "rank(s) 1 stopped answering" in stdout and "last reached step" in stdout
    meta = latest_meta(out)
    assert meta["global_step"] >= before  # a checkpoint from before the hang stays latest
    checkpoint = out / "checkpoints" / meta["tag"]
    assert (checkpoint / "head" / "rank_001_of_002.pt").is_file()


def test_non_finite_steps_are_skipped_then_abort_and_latest_still_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}", "train.log_every=1"]
    run([*common, "train.epochs=1"])
    assert latest_meta(out)["tag"] == "epoch_0001"
    # A learning rate that overflows the weights: every step from the second on is non-finite.
    p = run([*common, "train.epochs=3", "train.resume=auto", "optim.lr=1.0e36", "train.max_nonfinite_steps=3",
             "train.checkpoint_every_steps=1"], check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert "step skipped on every rank" in text and "(1 in a row, 1 in total)" in text
    assert "3 non-finite steps in a row" in text and "record keys of this rank's last batch: [" in text
    meta = latest_meta(out)
    folder = out / "checkpoints" / meta["tag"]
    for f in [folder / "backbone.pth", *sorted((folder / "head").glob("*.pt"))]:
        state = torch.load(f, map_location="cpu", weights_only=True)
        tensors = state.values() if f.name == "backbone.pth" else state["head"].values()
        assert all(torch.isfinite(v).all() for v in tensors if isinstance(v, torch.Tensor) and v.is_floating_point())
    p = run([*common, "train.epochs=2", "train.resume=auto"])
    assert latest_meta(out)["tag"] == "epoch_0002"


def test_a_crafted_head_shard_cannot_run_code(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}"]
    run([*common, "train.epochs=1"])
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shard = out / "checkpoints" / "epoch_0001" / "head" / "rank_000_of_002.pt"
    state = torch.load(shard, weights_only=True)
    state["extra"] = Payload()
    torch.save(state, shard)
    p = run([*common, "train.epochs=2", "train.resume=auto"], check=False)
    assert p.returncode != 0
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "rank_000_of_002.pt: cannot be read as a checkpoint without running code" in p.stdout + p.stderr
    assert "posix.system" in p.stdout + p.stderr


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(data_dir, tmp_path):
    out = tmp_path / "run"
    first = start(data_dir, out, "train.epochs=200")
    try:
        wait_for_step(out, 2, first)
        holder = json.loads((out / "run.lock").read_text())
        p = run(["configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}", "train.epochs=1"],
                check=False)
        assert p.returncode != 0
        text = p.stdout + p.stderr
        assert "another run holds this output folder" in text and f"pid {holder['pid']}" in text
        assert "train.force_unlock=true" in text
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        code, _ = finish(first)
    assert code == 0 and not (out / "run.lock").exists()
    # A lock left by a process that is gone (SIGKILL) is recognised and taken over.
    (out / "run.lock").write_text(json.dumps({"host": holder["host"], "pid": 2 ** 22 + 12345,
                                              "started": "yesterday"}))
    p = run(["configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}", "train.epochs=1"])
    assert "took over the lock" in (out / "train.log").read_text()


def test_checkpoint_for_another_class_count_and_missing_engine_file_are_clear(data_dir, tmp_path):
    from data.synthetic import make_dataset
    out = tmp_path / "run"
    common = ["configs/base.yaml", *TINY, f"output={out}"]
    run([*common, f"data.root={data_dir}", "train.epochs=1"])
    other = tmp_path / "other"
    make_dataset(other, num_ids=10, imgs_per_id=8, val_ids=4, val_pairs=10, seed=5, progress=False)
    p = run([*common, f"data.root={other}", "train.epochs=2", "train.resume=auto"], check=False)
    assert p.returncode != 0
    assert "written for 12 classes, the data has 10" in p.stdout + p.stderr
    (out / "checkpoints" / "epoch_0001" / "mp_rank_00_model_states.pt").unlink()
    p = run([*common, f"data.root={data_dir}", "train.epochs=2", "train.resume=auto"], check=False)
    assert p.returncode != 0
    assert "DeepSpeed file mp_rank_00_model_states.pt is missing" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_under_the_deepspeed_launcher_a_signalled_launcher_still_leaves_a_checkpoint(data_dir, tmp_path, sig):
    """`deepspeed --no_python ./run.sh`: DeepSpeed's node launcher terminates the ranks on SIGTERM (they save first)
    and dies of SIGUSR1 (the orphaned ranks get SIGTERM from the kernel and save). Its exit code is DeepSpeed's."""
    from tests.distributed import free_port
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(k, None)
    out = tmp_path / "ds"
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port",
                             str(free_port()), "--no_python", "./run.sh", "configs/base.yaml", *TINY,
                             f"data.root={data_dir}", f"output={out}", "train.epochs=200", "train.log_every=1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_step(out, 3, proc)
    # `deepspeed` (the runner) starts one deepspeed.launcher.launch per node, which starts the ranks.
    node_launcher, = [p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in
                      " ".join(p.cmdline())]
    ranks = node_launcher.children()
    assert len(ranks) == 2
    node_launcher.send_signal(getattr(signal, sig))
    finish(proc, timeout=90)
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive
    meta = latest_meta(out)
    assert meta["global_step"] >= 3 and meta["tag"].startswith(("step_", "epoch_"))
    assert "saving a checkpoint at step" in (out / "train.log").read_text()

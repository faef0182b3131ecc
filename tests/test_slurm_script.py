"""scripts/slurm.sbatch as SLURM runs it, with stand-ins for the two SLURM commands it calls: `srun` (runs the one
task with a step's variables) and `scontrol` (records its arguments). Preemption = SIGTERM to every process of the job,
the batch shell included: the task saves, the script waits for it, requeues the job, and exits 0."""
import os
import signal
import stat
import subprocess
import time

import pytest

from tests.distributed import free_port
from tests.test_resilience import finish, latest_meta, wait_for_step
from tests.test_train_e2e import REPO, TINY

pytestmark = pytest.mark.slow

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: one task of a job step, in this process
while [ "${1#--}" != "$1" ]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_STEP_NUM_TASKS=1 SLURM_JOB_NODELIST=localhost
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$SCONTROL_LOG"
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data.synthetic import make_dataset
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, num_ids=12, imgs_per_id=6, val_ids=8, val_pairs=20, seed=3, progress=False)
    return root


def sbatch(tmp_path, data_dir, out, *extra) -> tuple[subprocess.Popen, object]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)
    log = tmp_path / "scontrol.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO), "SCONTROL_LOG": str(log), "MASTER_PORT": str(free_port()),
           "FACETRAIN_STATUS_FILE": str(tmp_path / "status"), "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(k, None)
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "slurm.sbatch"), "configs/base.yaml", *TINY,
                             f"data.root={data_dir}", f"output={out}", "train.log_every=1", *extra], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, log


def test_preempted_job_saves_waits_and_requeues_itself(data_dir, tmp_path):
    out = tmp_path / "run"
    proc, log = sbatch(tmp_path, data_dir, out, "train.epochs=200")
    wait_for_step(out, 3, proc)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # SLURM's preemption: every process of the job, the batch shell too
    code, stdout = finish(proc)
    assert code == 0, stdout[-3000:]
    assert "training stopped" in stdout
    assert log.read_text().split() == ["requeue", "4242"]
    assert latest_meta(out)["global_step"] >= 3


def test_a_finished_job_is_not_requeued(data_dir, tmp_path):
    out = tmp_path / "run"
    proc, log = sbatch(tmp_path, data_dir, out, "train.epochs=1")
    code, stdout = finish(proc)
    assert code == 0, stdout[-3000:]
    assert "training finished" in stdout
    assert not log.exists()

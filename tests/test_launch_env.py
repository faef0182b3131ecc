"""One DistEnv from every launcher's variables."""
import pytest

from trainer.distributed import LaunchError, detect, first_host


def test_deepspeed_launcher():
    d = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                "MASTER_PORT": "29600"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port, d.launcher) == \
        (3, 8, 1, 2, "10.0.0.1", 29600, "deepspeed")


def test_torchrun():
    d = detect({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
                "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (d.launcher, d.local_world_size, d.master_port) == ("torchrun", 4, 1234)


def test_slurm_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
    d = detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.launcher) == \
        (5, 16, 1, 8, "gpu07", "slurm")
    assert d.master_port == 15000 + 4242 % 20000
    assert detect({**env, "MASTER_PORT": "2000"}).master_port == 2000


def test_single_process():
    d = detect({})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single") and d.master_port > 0


@pytest.mark.parametrize("nodes,first", [("n1", "n1"), ("a1,a2", "a1"), ("node[003-010]", "node003"),
                                         ("x-y[5,7-9]", "x-y5"), ("gpu[1-2],gpu9", "gpu1")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_bad_env():
    with pytest.raises(LaunchError, match="RANK='x'|RANK"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="outside world size"):
        detect({"RANK": "2", "WORLD_SIZE": "2"})


def test_cpu_runs_build_no_deepspeed_op():
    """On CPU DeepSpeed's comm layer must not JIT-compile its shared-memory op (~60 s on every fresh machine)."""
    import torch

    from trainer.distributed import prepare_deepspeed
    prepare_deepspeed(torch.device("cpu"))
    from deepspeed.comm.torch import build_shm_op
    assert build_shm_op() is None

"""One DistEnv from every launcher's variables."""
import pytest

from runtime.process import LaunchError, detect, first_host


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
           "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
           "SLURM_STEP_NUM_TASKS": "16"}
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


# --- which GPU a rank uses, and what DeepSpeed is told ---------------------------------------------------------------
@pytest.mark.parametrize("local_rank,count,index", [(0, 8, 0), (3, 8, 3), (3, 1, 0), (5, 4, 1), (0, 1, 0)])
def test_device_index_is_the_local_rank_among_the_visible_gpus(local_rank, count, index):
    from runtime.process import device_index
    assert device_index(local_rank, count) == index


def test_device_index_errors_name_what_was_expected():
    from runtime.process import device_index
    with pytest.raises(LaunchError, match="no GPU visible"):
        device_index(0, 0)
    with pytest.raises(LaunchError, match="local rank must be >= 0"):
        device_index(-1, 2)


def _srun_task_3_of_4():
    """srun --ntasks-per-node=4 --gpus-per-task=1: local id 3, and this task sees ONE GPU (its own, as cuda:0)."""
    return detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "7",
                   "SLURM_JOB_NODELIST": "gpu01", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_STEP_NUM_TASKS": "4"})


def test_pick_device_under_srun_with_one_visible_gpu_per_task(monkeypatch):
    import torch

    from runtime.process import pick_device
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert pick_device(_srun_task_3_of_4()) == torch.device("cuda", 0)
    assert current == [0]


def test_more_ranks_than_visible_gpus_is_refused_before_nccl(monkeypatch):
    """8 ranks on a node that shows them 4 GPUs each would put two NCCL ranks on one GPU ("duplicate GPU")."""
    import torch

    from runtime.process import LaunchError, pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    env = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "LOCAL_SIZE": "8"})
    with pytest.raises(LaunchError, match="8 ranks on this node but 4 GPUs visible.*NPROC=4"):
        pick_device(env)


@pytest.mark.parametrize("device,exported", [("cuda:0", "0"), ("cpu", "3")])
def test_init_exports_the_device_it_uses_as_local_rank(monkeypatch, device, exported):
    """DeepSpeed opens cuda:LOCAL_RANK: under srun with one GPU per task it must read 0, not the local id 3 ("invalid
    device ordinal" on every rank but local 0). The launcher's local rank stays in FACETRAIN_LOCAL_RANK."""
    import os

    import deepspeed
    import torch

    from trainer import distributed
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "FACETRAIN_LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "unset")  # restored after the test
    calls = []
    monkeypatch.setattr(distributed, "prepare_deepspeed", lambda dev: None)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append((dict(os.environ), kw)))
    env = _srun_task_3_of_4()
    distributed.init(env, torch.device(device))
    (seen, kwargs), = calls
    assert seen["LOCAL_RANK"] == exported and seen["FACETRAIN_LOCAL_RANK"] == "3"
    assert (seen["RANK"], seen["WORLD_SIZE"]) == ("3", "4")
    assert kwargs["dist_backend"] == ("nccl" if device.startswith("cuda") else "gloo")


def test_the_variables_a_launcher_exports_read_back_as_the_same_rank():
    """runtime.process writes (DistEnv.environ: ./run.sh's launcher, DeepSpeed's start) and reads (detect) one set
    of variables."""
    from trainer.launch import rank_env
    d = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                "MASTER_PORT": "29600"})
    assert detect(d.environ()) == d
    env = rank_env({"SLURM_PROCID": "7", "SLURM_STEP_NUM_TASKS": "8", "PATH": "/bin"}, rank=1, nproc=2, port=29700)
    mine = detect(env)
    assert (mine.rank, mine.world_size, mine.local_rank, mine.local_world_size, mine.master_port, mine.launcher) == \
        (1, 2, 1, 2, 29700, "facetrain")
    assert "SLURM_PROCID" not in env and env["PATH"] == "/bin"


def test_a_broken_launcher_environment_is_one_line_naming_the_variable(monkeypatch, capsys):
    from trainer.main import main
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["output=unused", "data.synthetic=null"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rank ?: error: environment variable RANK='zero': expected an integer"], err

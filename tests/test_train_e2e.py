"""End to end through the real entry points: ./run.sh -> launcher -> 2 gloo ranks -> checkpoints (periodic and
epoch ends) -> resume (exact, mid-epoch) -> resume on 1 rank (resharded head) -> eval CLI on the checkpoint; the
DeepSpeed launcher and srun paths. CPU gloo runs by design: CUDA_VISIBLE_DEVICES is emptied (on a GPU machine two
ranks would otherwise share one GPU under NCCL, and CUDA kernels are not bit-reproducible)."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

TINY = ["model.name=iresnet_tiny", "model.num_features=32", "model.kwargs={depths: [1, 1, 1, 1]}",
        "train.batch_size=8", "train.log_every=2", "data.num_workers=0", "head.scale=16", "head.margin=0.2",
        "schedule.warmup_epochs=0.5", "train.eval_every_epoch=false", "seed=11"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data.synthetic import make_dataset
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, num_ids=12, imgs_per_id=6, val_ids=8, val_pairs=20, seed=3, progress=False)
    return root


def run(args, nproc=2, check=True):
    env = {**os.environ, "NPROC": str(nproc), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "MASTER_PORT"):
        env.pop(k, None)
    for attempt in range(3):
        p = subprocess.run([str(REPO / "run.sh"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=400)
        # run.sh picks a free port and the launcher binds it a moment later: retry only that race.
        if p.returncode == 0 or "address already in use" not in (p.stdout + p.stderr).lower():
            break
    if check and p.returncode != 0:
        raise AssertionError(f"./run.sh {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def srun_task_env() -> dict:
    """The variables srun gives the one task of a one-task job step (no launcher variables)."""
    from tests.distributed import free_port
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "SLURM_LOCALID": "0",
           "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "localhost",
           "MASTER_PORT": str(free_port())}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def backbone_of(ckpt: Path) -> dict:
    return torch.load(ckpt / "backbone.pth", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.multirank
def test_train_resume_reshard_eval(data_dir, tmp_path):
    common = ["configs/base.yaml", *TINY, f"data.root={data_dir}", f"data.val_root={data_dir}", "head.loss=unitsface",
              "head.s2s_start_epoch=1"]
    # 72 images / (2 ranks x 8) = 4 steps per epoch.
    straight = tmp_path / "straight"
    p = run([*common, f"output={straight}", "train.epochs=2", "train.eval_before=true",
             "train.checkpoint_every_steps=3"])
    assert "rank 0/2 via facetrain on cpu" in p.stdout
    assert "held-out verification" in p.stdout and "before training acc %" in p.stdout
    log = (straight / "train.log").read_text()
    assert "step 8/8" in log and "samples/s" in log and "ETA" in log
    assert " INFO    epoch 1 step 8/8 " in log  # every line carries its level
    # What a run shows while it runs (rank 0): the resolved config at start, TensorBoard events holding the logged
    # scalars and each evaluation (read back with TensorBoard's reader), metrics.csv, and curves.png at the end.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.monitor_tags import TARGETS, assert_scalar_tags
    from trainer.config import load_config
    assert load_config(straight / "config.yaml")["train"]["checkpoint_every_steps"] == 3
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert_scalar_tags(tags, ("accuracy", "fold_0", "best_single_accuracy", "best_single_threshold",
                              "accuracy_at_t_uss", "t_uss_minus_t*"))
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("train/t_uss")] == [6, 8]  # USS from epoch 1
    for target in TARGETS:
        assert [e.step for e in events.Scalars(f"eval/{target}/best_single_threshold")] == [0, 8]
        # The learned threshold is reported once the loss has logged it (USS from epoch 1), not its unset b = 0.
        assert [e.step for e in events.Scalars(f"eval/{target}/accuracy_at_t_uss")] == [8]
    assert (straight / "metrics.csv").read_text().startswith("step,epoch,name,value,time")
    assert (straight / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"curves:     {straight / 'curves.png'}" in p.stdout
    ckpts = straight / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "epoch_0002"
    for name in ("backbone.pth", "config.yaml", "meta.json", "head/rank_000_of_002.pt", "head/rank_001_of_002.pt"):
        assert (ckpts / "epoch_0002" / name).is_file(), name
    assert not list(ckpts.glob(".tmp-*"))

    # A periodic step checkpoint (every 3 steps, mid-epoch) continues bit-identically to the straight run: backbone,
    # head centres and momentum, the class memory, and the backbone optimizer's momentum.
    resumed = tmp_path / "resumed"
    meta = json.loads((ckpts / "step_0000003" / "meta.json").read_text())
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (0, 3, 3)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_0001", "epoch_0002", "latest", "step_0000003",
                                                       "step_0000006"]
    run([*common, f"output={resumed}", "train.epochs=2", f"train.resume={ckpts / 'step_0000003'}"])
    assert "at epoch 0, step 3" in (resumed / "train.log").read_text()
    a, b = backbone_of(ckpts / "epoch_0002"), backbone_of(resumed / "checkpoints" / "epoch_0002")
    for k in a:
        # Parameters are bit-identical. BatchNorm running statistics are averaged over ranks at every checkpoint
        # (linear, so equal in exact arithmetic); the extra average at step 3 changes only their rounding.
        exact = not (k.endswith("running_mean") or k.endswith("running_var"))
        torch.testing.assert_close(b[k], a[k], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7, msg=k)
    for r in range(2):
        ha, hb = (torch.load(c / "epoch_0002" / "head" / f"rank_00{r}_of_002.pt", weights_only=True)
                  for c in (ckpts, resumed / "checkpoints"))
        assert ha["head"].keys() == hb["head"].keys() and "s2s.memory.features" in ha["head"]
        for k, v in ha["head"].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(hb["head"][k], v), f"rank {r}: head {k}"
    oa, ob = (torch.load(c / "epoch_0002" / "mp_rank_00_model_states.pt", weights_only=True)["optimizer"]["state"]
              for c in (ckpts, resumed / "checkpoints"))
    assert oa.keys() == ob.keys() and len(oa) > 0
    for k in oa:
        assert torch.equal(ob[k]["momentum_buffer"], oa[k]["momentum_buffer"]), f"backbone momentum {k}"

    # The same checkpoint continues on ONE rank: the head's class shards are re-cut; 72 / 8 = 9 steps per epoch now.
    run([*common, f"output={straight}", "train.epochs=3", "train.resume=auto"], nproc=1)
    log = (straight / "train.log").read_text()
    assert "head resharded from 2 to 1 ranks" in log and "at epoch 2, step 18" in log and "step 27/27" in log
    assert any(" WARNING " in line for line in log.splitlines() if "head resharded from 2 to 1 ranks" in line)
    one = torch.load(ckpts / "epoch_0003" / "head" / "rank_000_of_001.pt", weights_only=True)["head"]
    assert one["s2c.weight"].shape[0] == 12 and one["s2s.memory.features"].shape[0] == 12

    # Eval CLI on our checkpoint folder.
    p = run(["eval", "verification", "--weights", str(ckpts / "epoch_0003"), "--bins", str(data_dir), "--no-progress",
             "--json", str(tmp_path / "eval.json")])
    assert "synth_lfw" in p.stdout
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert {r["target"] for r in results} == {"synth_lfw", "synth_cfp"}


@pytest.mark.slow
def test_bad_override_is_a_clear_error(data_dir):
    p = run(["configs/base.yaml", f"data.root={data_dir}", "train.batch_sise=8"], nproc=1, check=False)
    assert p.returncode != 0
    assert "unknown config key `train.batch_sise`; did you mean `train.batch_size`?" in p.stderr + p.stdout


@pytest.mark.slow
@pytest.mark.multirank
def test_deepspeed_no_python_launch(data_dir, tmp_path):
    """`deepspeed --no_python ./run.sh ...`: the launcher starts run.sh per rank with --local_rank=N and RANK set."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(k, None)
    port = str(__import__("tests.distributed", fromlist=["free_port"]).free_port())
    out = tmp_path / "ds"
    p = subprocess.run([str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port", port,
                        "--no_python", "./run.sh", "configs/base.yaml", *TINY, f"data.root={data_dir}",
                        f"output={out}", "train.epochs=1", "train.max_steps=2"],
                       cwd=REPO, env={**env, "PATH": f"{REPO / '.venv' / 'bin'}:{env['PATH']}"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "rank 0/2 via deepspeed" in log and "step 2/2" in log


@pytest.mark.slow
def test_srun_task_runs_the_trainer_directly(data_dir, tmp_path):
    """Under srun every task runs ./run.sh; it must notice it is a rank (SLURM step variables) and not relaunch."""
    env = srun_task_env()
    out = tmp_path / "srun"
    p = subprocess.run([str(REPO / "run.sh"), "configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}",
                        "train.epochs=1", "train.max_steps=2"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 0/1 via slurm on cpu" in p.stdout
    assert "launch.py" not in p.stdout + p.stderr  # the deepspeed launcher was not involved


@pytest.mark.slow
def test_preemption_signal_saves_and_resumes(data_dir, tmp_path):
    """SIGUSR1 (SLURM's --signal) mid-run: a step checkpoint, a clean exit 0, and resume=auto finishes the run."""
    import signal
    import time

    env = srun_task_env()
    out = tmp_path / "preempt"
    args = [str(REPO / "run.sh"), "configs/base.yaml", *TINY, f"data.root={data_dir}", f"output={out}",
            "train.epochs=30", "train.log_every=1"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and " step 2/" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    assert "stopped by SIGUSR1" in stdout
    latest = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    assert 2 <= meta["global_step"] < 30 * 9
    assert meta["step_in_epoch"] > 0 or latest.startswith("epoch_")
    finish = meta["epoch"] + 1  # run to the end of the interrupted epoch
    p = subprocess.run(args[:-2] + [f"train.epochs={finish}", "train.resume=auto", "train.log_every=1"], cwd=REPO,
                       env={**env, "MASTER_PORT": str(int(env["MASTER_PORT"]) + 1)}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    resumed_log = log.read_text().split("resumed from")[-1]
    assert f"at epoch {meta['epoch']}, step {meta['global_step']}" in resumed_log
    assert f"step {meta['global_step'] + 1}/{finish * 9}" in resumed_log  # 72 images / 8 = 9 steps per epoch
    assert (out / "checkpoints" / "latest").read_text().strip() == f"epoch_{finish:04d}"


FAMILY_STATE = {  # head.loss -> (extra overrides, a state the step log must show)
    "unitsface": ([], "t_uss"),
    "uce": ([], "t_uce"),
    "gb_cosface": ([], "p_v"),
    "epl": (["head.s2s_start_epoch=1"], "loss_s2s"),
    "cosface_s2s_bce": ([], "t_s2s_mean"),
    "arcface": ([], "accuracy"),
}


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("loss", sorted(FAMILY_STATE))
def test_every_loss_family_trains_through_the_trainer(data_dir, tmp_path, loss):
    extra, state = FAMILY_STATE[loss]
    out = tmp_path / loss
    p = run(["configs/base.yaml", *[a for a in TINY if not a.startswith("head.")], f"data.root={data_dir}",
             f"data.val_root={data_dir}", f"output={out}", f"loss={loss}", "train.epochs=2", "train.log_every=1",
             *extra])
    log = (out / "train.log").read_text()
    step_lines = [line for line in log.splitlines() if " step " in line and "loss " in line]
    assert len(step_lines) == 8
    losses = [float(line.split("loss ")[1].split()[0]) for line in step_lines]
    assert all(map(math.isfinite, losses)), losses
    assert state in step_lines[-1], step_lines[-1]
    assert "best single cosine threshold" in p.stdout
    # the head's state (memories, biases, p_v) is in the checkpoint and loads back into the same head
    import heads
    from heads.partition import ClassPartition
    from trainer.config import load_config
    from trainer.train import head_config
    cfg = load_config(out / "checkpoints" / "epoch_0002" / "config.yaml")
    for r in range(2):
        head = heads.build_head(head_config(cfg), num_classes=12, embedding_size=32,
                                partition=ClassPartition(12, 2, r), seed=cfg["seed"])
        saved = torch.load(out / "checkpoints" / "epoch_0002" / "head" / f"rank_00{r}_of_002.pt", weights_only=True)
        head.load_state_dict(saved["head"])

"""The one embedding pipeline (eval.features.embed) and the launcher handling eval uses (runtime.process): device choice
under srun / torchrun, tensor and file inputs, normalisation, output arrays, several ranks, and an srun-style
two-task run of the verification command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.features import FaceImages, FeatureError, embed, extract_features, rank_slice
from runtime.process import LaunchError, choose_device, first_host
from runtime.process import detect as detect_launch
from runtime.process import device_index as cuda_device_index
from runtime.process import start as start_rank
from tests.distributed import free_port, run_ranks
from tests.fixtures_eval import identity_field, save_image, small_model

REPO = Path(__file__).resolve().parents[1]

SRUN_TASK_3 = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_STEP_NUM_TASKS": "4",
               "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu1"}

# ------------------------------------------------------------------------------------------------ the launcher


def test_srun_task_with_one_visible_gpu_uses_cuda_0():
    # srun --gpus-per-task=1: task with local id 3 sees exactly one GPU, which is cuda:0 for it
    launch = detect_launch(SRUN_TASK_3)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.launcher) == (3, 4, 3, "gpu07", 15000 + 4242, "slurm")
    assert cuda_device_index(launch.local_rank, device_count=1) == 0
    assert choose_device(None, launch.local_rank, device_count=1) == torch.device("cuda", 0)
    assert choose_device("cuda", launch.local_rank, device_count=1) == torch.device("cuda", 0)
    # every GPU of the node visible to every task (one task per GPU): the local rank itself
    assert choose_device(None, launch.local_rank, device_count=8) == torch.device("cuda", 3)
    # two tasks per GPU share them round-robin
    assert [cuda_device_index(r, 2) for r in range(4)] == [0, 1, 0, 1]


def test_device_choice_without_cuda_and_explicit_devices():
    assert choose_device(None, 3, device_count=0) == torch.device("cpu")
    assert choose_device("cpu", 3, device_count=2) == torch.device("cpu")
    assert choose_device("cuda:1", 3, device_count=2) == torch.device("cuda", 1)  # an explicit index is kept
    with pytest.raises(LaunchError, match="no CUDA device is visible"):
        choose_device("cuda", 0, device_count=0)
    with pytest.raises(LaunchError, match="no CUDA device is visible"):
        cuda_device_index(0, 0)


def test_launchers_are_recognised():
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400",
                "TORCHELASTIC_RUN_ID": "x"}
    launch = detect_launch(torchrun)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.launcher) == (5, 8, 1, "n1", 29400, "torchrun")
    deepspeed = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert detect_launch(deepspeed).launcher == "deepspeed"
    # the batch script itself (no srun step) and a plain process are one process
    batch = {k: v for k, v in SRUN_TASK_3.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert detect_launch(batch).launcher == "single" and detect_launch({}).world_size == 1
    assert detect_launch({**SRUN_TASK_3, "MASTER_PORT": "2345", "MASTER_ADDR": "head"}).master_port == 2345
    assert [first_host(s) for s in ("gpu[03-05,9],cpu1", "a1,a2", "node17", "x[7]")] == ["gpu03", "a1", "node17",
                                                                                         "x7"]


def test_launcher_errors_name_the_variable():
    with pytest.raises(LaunchError, match=r"SLURM_PROCID='x': expected an integer"):
        detect_launch({**SRUN_TASK_3, "SLURM_PROCID": "x"})
    with pytest.raises(LaunchError, match="rank 4 is outside world size 4"):
        detect_launch({**SRUN_TASK_3, "SLURM_PROCID": "4"})
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is missing"):
        detect_launch({k: v for k, v in SRUN_TASK_3.items() if k != "SLURM_JOB_NODELIST"})


def test_init_exports_nothing(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**SRUN_TASK_3, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    rank, world, device = start_rank("cpu")
    assert (rank, world, device) == (0, 1, torch.device("cpu"))
    assert dict(os.environ) == before  # no LOCAL_RANK (or anything) that could disagree with the device in use


# ------------------------------------------------------------------------------------------------ the pipeline


def _png_faces(tmp_path, n=7):
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"face{i}.png")
        save_image(identity_field(9, i), paths[-1])
    return paths


def test_tensor_and_files_give_the_same_features(tmp_path):
    paths = _png_faces(tmp_path)
    images = FaceImages(paths)
    tensor = torch.stack([images[i] for i in range(len(images))])
    model = small_model(0)
    from_files = embed(model, images, batch_size=3, num_workers=0, progress=False)
    from_tensor = embed(model, tensor, batch_size=4, progress=False)
    assert from_files.shape == (7, 512) and from_files.dtype == np.float32
    np.testing.assert_allclose(from_files, from_tensor, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(extract_features(model, tensor, batch_size=4, progress=False), from_tensor)


def test_flip_normalise_and_the_formula(tmp_path):
    model = small_model(1)
    model.train()
    images = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    raw = embed(model, images, batch_size=2, flip=False, progress=False)
    summed = embed(model, images, batch_size=2, progress=False)
    unit = embed(model, images, batch_size=2, normalize=True, progress=False)
    assert model.training  # the previous mode comes back
    model.eval()
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        f, f_flip = model(x), model(x.flip(3))
    np.testing.assert_allclose(raw, f.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(summed, (f + f_flip).numpy(), rtol=1e-5, atol=1e-5)
    ref = (f + f_flip).double()
    np.testing.assert_allclose(unit, (ref / ref.norm(dim=1, keepdim=True)).numpy(), rtol=0, atol=1e-6)
    # into a preallocated memmap
    out = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(5, 512))
    assert embed(model, images, batch_size=2, out=out, progress=False) is out
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), summed)


def test_pipeline_errors(tmp_path):
    model = small_model(0)
    with pytest.raises(FeatureError, match="uint8"):
        embed(model, torch.zeros(2, 3, 112, 112))
    with pytest.raises(FeatureError, match="no images"):
        embed(model, torch.zeros(0, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(FeatureError, match="batch_size"):
        embed(model, torch.zeros(1, 3, 112, 112, dtype=torch.uint8), batch_size=0)
    with pytest.raises(FeatureError, match=r"out has shape \(3, 512\), expected \(1, 512\)"):
        embed(model, torch.zeros(1, 3, 112, 112, dtype=torch.uint8), out=np.zeros((3, 512), np.float32))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(FeatureError, match=r"bad.jpg: cannot read image \(not a decodable image file, 12 bytes\)"):
        FaceImages([bad])[0]
    with pytest.raises(FeatureError, match=r"missing.jpg: cannot read image \(No such file"):
        FaceImages([tmp_path / "missing.jpg"])[0]
    small = tmp_path / "small.png"
    save_image(np.zeros((50, 60, 3), np.uint8), small)
    with pytest.raises(FeatureError, match=r"small.png: image is 60x50, expected an aligned 112x112"):
        FaceImages([small])[0]
    with pytest.raises(FeatureError, match="landmarks must be"):
        FaceImages([small], np.zeros((2, 5, 2)))


def _embed_on_ranks(rank, world, paths):
    torch.manual_seed(0)
    model = small_model(0)
    tensor_images = torch.stack([FaceImages(paths)[i] for i in range(len(paths))])
    return (embed(model, FaceImages(paths), batch_size=2, progress=False),
            embed(model, tensor_images, batch_size=3, normalize=True, progress=False),
            embed(model, tensor_images[:1], batch_size=3, progress=False),  # rank 1 has nothing to embed
            embed(model, tensor_images, batch_size=3, progress=False, sharded=False))


@pytest.mark.multirank
def test_two_ranks_equal_one_process(tmp_path):
    paths = _png_faces(tmp_path, 7)  # 4 + 3 over 2 ranks; batch 2 leaves a short last batch on each
    model = small_model(0)
    single = embed(model, FaceImages(paths), batch_size=3, progress=False)
    unit = embed(model, FaceImages(paths), batch_size=3, normalize=True, progress=False)
    results = run_ranks(_embed_on_ranks, 2, paths)
    assert [r[:3] for r in results[1:]] == [(None, None, None)]
    np.testing.assert_allclose(results[0][0], single, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(results[0][1], unit, rtol=0, atol=1e-5)
    np.testing.assert_allclose(results[0][2], single[:1], rtol=1e-5, atol=1e-3)
    for rank in range(2):  # sharded=False: every rank embeds everything itself
        np.testing.assert_allclose(results[rank][3], single, rtol=1e-5, atol=1e-3)
    assert [rank_slice(7, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 7)]
    assert [rank_slice(2, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 2)]


# ------------------------------------------------------------------------------------------------ srun end to end


@pytest.mark.multirank
def test_eval_command_as_two_srun_tasks(tmp_path):
    """`srun -n 2 ./run.sh eval verification ...`: two tasks that know only their SLURM variables form one group;
    task 0 prints and writes the result, equal to a one-process run. Eval imports nothing from trainer/."""
    from data.verification_bin import write_bin
    from tests.fixtures_eval import make_small_weights

    rng = np.random.default_rng(0)
    images = []
    for k in range(22):
        face = identity_field(3, k // 2 if k % 4 < 2 else 50 + k)
        images.append(np.clip(face + rng.normal(0, 3, face.shape), 0, 255).astype(np.uint8))
    import cv2

    write_bin(tmp_path / "pairs.bin", [cv2.imencode(".png", im)[1].tobytes() for im in images],
              [k % 2 == 0 for k in range(11)])
    _, model_args = make_small_weights(tmp_path / "model" / "backbone.pth")
    argv = [sys.executable, "-m", "eval", "verification", *model_args, "--bins", str(tmp_path / "pairs.bin"),
            "--no-progress", "--num-workers", "0", "--batch-size", "4"]
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
            and not k.startswith("SLURM")}
    base.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    port = str(free_port())
    tasks = []
    for task in range(2):
        env = {**base, "SLURM_PROCID": str(task), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(task),
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "localhost",
               "MASTER_PORT": port}
        tasks.append(subprocess.Popen(argv + ["--out", str(tmp_path / "two")], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [t.communicate(timeout=240) for t in tasks]
    for t, (out, err) in zip(tasks, outputs):
        assert t.returncode == 0, err
    assert "pairs" in outputs[0][0] and outputs[1][0] == ""
    one = subprocess.run(argv + ["--out", str(tmp_path / "one")], cwd=REPO, env=base, text=True,
                         capture_output=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two_res = json.loads((tmp_path / "two" / "eval_verification.json").read_text())["results"][0]
    one_res = json.loads((tmp_path / "one" / "eval_verification.json").read_text())["results"][0]
    assert two_res["pairs"] == one_res["pairs"] == 11
    for key in ("accuracy_mean", "accuracy_std", "uniform_accuracy"):
        assert two_res[key] == pytest.approx(one_res[key], abs=1e-9), key

    probe = subprocess.run([sys.executable, "-c", "import sys, eval.__main__, eval.ijb, eval.megaface, "
                            "eval.verification, eval.onnx_export, eval.tables, eval.uniform_threshold; "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer'))"],
                           cwd=REPO, env=base, text=True, capture_output=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"

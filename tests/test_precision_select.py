"""model.precision: what `auto` picks per GPU generation, and fp16 through the whole trainer (on CPU the trunk stays
fp32; the dynamic loss scale, its checkpoint and its resume run as on a GPU)."""
import pytest
import torch

from trainer.config import ConfigError
from trainer.engine import precision_for, resolve_precision


@pytest.mark.parametrize("capability,expected", [(None, "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                 ((8, 0), "bf16"), ((9, 0), "bf16"), ((10, 0), "bf16")])
def test_auto_is_bf16_with_bf16_tensor_cores_fp16_before_them_fp32_without_gpu(capability, expected):
    assert precision_for(capability) == expected  # V100 7.0, T4 7.5, A100 8.0, H100/H200 9.0


def test_explicit_choices_are_kept_and_unknown_ones_named():
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "bf16", "fp16")] == ["fp32", "fp32", "bf16", "fp16"]
    with pytest.raises(ConfigError, match=r"model.precision: expected one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", cpu)


@pytest.mark.slow
@pytest.mark.multirank
def test_fp16_trains_checkpoints_its_loss_scale_and_resumes(tmp_path):
    from data.synthetic import make_dataset
    from tests.test_train_e2e import TINY, run
    data = tmp_path / "data"
    make_dataset(data, num_ids=12, imgs_per_id=6, val_ids=4, val_pairs=10, seed=3, progress=False)
    out = tmp_path / "run"
    common = ["configs/base.yaml", *TINY, f"data.root={data}", f"output={out}", "model.precision=fp16",
              "model.loss_scale=256.0"]
    run([*common, "train.epochs=1"])
    assert "precision fp16, dynamic loss scale from 256" in (out / "train.log").read_text()
    head = torch.load(out / "checkpoints" / "epoch_0001" / "head" / "rank_000_of_002.pt", weights_only=True)
    assert float(head["trainer_state"]["loss_scale"]) == 256.0  # 4 good steps < the growth interval
    run([*common, "train.epochs=2", "train.resume=auto"])
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch_0002"


def test_backbone_switches_keep_checkpoint_names(tmp_path):
    """model.compile compiles in place (parameter names, so checkpoints, unchanged); channels_last and
    cudnn.benchmark act on CUDA only."""
    from trainer.config import load_config
    from trainer.engine import build_backbone
    cfg = load_config(None, ["data.root=x", "model.name=iresnet_tiny", "model.compile=true",
                             "model.channels_last=true"])
    plain = load_config(None, ["data.root=x", "model.name=iresnet_tiny"])
    compiled = build_backbone(cfg, torch.device("cpu"), "fp32")
    reference = build_backbone(plain, torch.device("cpu"), "fp32")
    assert list(compiled.state_dict()) == list(reference.state_dict())
    assert compiled.conv1.weight.is_contiguous()  # channels_last is a CUDA-only switch

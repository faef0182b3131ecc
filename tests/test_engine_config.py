"""ds_config.json is checked before DeepSpeed sees it: what would silently break the sharded head is refused."""
import json

import pytest

from trainer.config import ConfigError, load_config
from trainer.engine import load_ds_config


def cfg_with(tmp_path, ds: dict, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return load_config(None, ["data.root=x", f"deepspeed.config={path}", "train.batch_size=32", *overrides])


def test_default_file_is_completed_from_the_yaml(tmp_path):
    ds = load_ds_config(load_config(None, ["data.root=x", "train.batch_size=32", "deepspeed.zero_stage=1",
                                           "deepspeed.gradient_clipping=3"]), world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_accumulation_steps"]) == \
        (32, 128, 1)
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_allow_untested_optimizer"] is True
    assert ds["gradient_clipping"] == 3.0


@pytest.mark.parametrize("ds,message", [
    ({"fp16": {"enabled": True}}, "`fp16.enabled` must be false.*loss-scaled gradients"),
    ({"bf16": {"enabled": True}}, "`bf16.enabled` must be false.*model.precision"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 is not supported"),
    ({"optimizer": {"type": "Adam"}}, "remove the `optimizer` section"),
    ({"zero_optimization": {"stage": 3}}, "stage=3"),
])
def test_refusals_name_the_file_and_key(tmp_path, ds, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_ds_config(cfg_with(tmp_path, ds), world_size=2)
    assert "ds.json" in str(e.value)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        load_ds_config(load_config(None, ["data.root=x", f"deepspeed.config={path}"]), world_size=1)


@pytest.mark.parametrize("ds,message", [
    ({"train_micro_batch_size_per_gpu": 16},
     r"`train_micro_batch_size_per_gpu` is 16, but the YAML says train.batch_size=32 per rank\..*remove "
     r"`train_micro_batch_size_per_gpu` from ds.json \(or make it 32\)"),
    ({"train_batch_size": 32},
     r"`train_batch_size` is 32, but the YAML says train.batch_size=32 per rank x 4 ranks = 128\..*remove "
     r"`train_batch_size` from ds.json \(or make it 128\)"),
    ({"train_micro_batch_size_per_gpu": 32, "train_batch_size": 64}, r"`train_batch_size` is 64.* = 128"),
    ({"train_micro_batch_size_per_gpu": "32"}, r"`train_micro_batch_size_per_gpu` is '32'"),
    ({"gradient_accumulation_steps": 2}, r"gradient_accumulation_steps=2 is not supported"),
])
def test_batch_sizes_that_disagree_with_the_yaml_are_refused(tmp_path, ds, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_ds_config(cfg_with(tmp_path, ds), world_size=4)
    assert str(tmp_path / "ds.json") in str(e.value)


@pytest.mark.parametrize("ds", [
    {"train_micro_batch_size_per_gpu": 32, "train_batch_size": 128, "gradient_accumulation_steps": 1},
    {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto"},
    {"train_batch_size": 128},
])
def test_batch_sizes_equal_to_the_yaml_are_accepted(tmp_path, ds):
    out = load_ds_config(cfg_with(tmp_path, ds), world_size=4)
    assert (out["train_micro_batch_size_per_gpu"], out["train_batch_size"], out["gradient_accumulation_steps"]) == \
        (32, 128, 1)

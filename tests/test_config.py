"""Config: extends-chains, key=value overrides, validation errors that name the key."""
import pytest

from trainer.config import ConfigError, load_config, parse_override


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_extends_and_overrides(tmp_path):
    write(tmp_path, "parent.yaml", f"extends: {load_config.__globals__['BASE_CONFIG']}\n"
                                   "data: {root: /data/ms1m}\nhead: {loss: arcface}\n")
    child = write(tmp_path, "child.yaml", "extends: parent.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(child, ["head.margin=0.3", "optim.lr=1", "head.margin=[1.0, 0.2, 0.1]", "train.max_steps=7"])
    assert cfg["head"]["loss"] == "arcface"          # from the parent
    assert cfg["train"]["epochs"] == 3               # from the child
    assert cfg["head"]["margin"] == [1.0, 0.2, 0.1]  # the last override wins
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["train"]["max_steps"] == 7
    assert cfg["train"]["batch_size"] == 128         # base default untouched


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key `head.sample_rte`.*`head.sample_rate`"):
        load_config(None, ["data.root=x", "head.sample_rte=0.1"])
    bad = write(tmp_path, "bad.yaml", "data: {root: x}\ntrian: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key `trian`.*`train`"):
        load_config(bad)


def test_type_and_value_errors():
    with pytest.raises(ConfigError, match=r"`train.batch_size`: expected int, got 'big'"):
        load_config(None, ["data.root=x", "train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"`head.sample_rate`: must be within \[0, 1\]"):
        load_config(None, ["data.root=x", "head.sample_rate=1.5"])
    with pytest.raises(ConfigError, match=r"`model.precision`: must be auto, fp32 or bf16"):
        load_config(None, ["data.root=x", "model.precision=fp16"])
    with pytest.raises(ConfigError, match=r"`data.root`: is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.epochs")


def test_open_mappings_merge_and_cycle(tmp_path):
    cfg = load_config(None, ["data.root=x", "data.synthetic={num_ids: 10, seed: 1}", "data.synthetic.seed=5"])
    assert cfg["data"]["synthetic"] == {"num_ids": 10, "seed": 5}
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(b)


def test_shipped_configs_load():
    from trainer.config import REPO_ROOT
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        try:
            cfg = load_config(path)
        except ConfigError as e:  # recipes leave the data folder to the command line
            assert "`data.root`: is required" in str(e), (path, e)
            cfg = load_config(path, ["data.root=somewhere"])
        assert cfg["train"]["epochs"] > 0, path

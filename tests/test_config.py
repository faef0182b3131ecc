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
    with pytest.raises(ConfigError, match=r"`model.precision`: must be auto, fp32, bf16 or fp16"):
        load_config(None, ["data.root=x", "model.precision=fp8"])
    with pytest.raises(ConfigError, match=r"`model.loss_scale`: must be > 0"):
        load_config(None, ["data.root=x", "model.loss_scale=0.0"])
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


def test_exponent_floats_yaml_reads_as_strings_are_floats(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as the string '1e-3': taken as the float, from a file and on the command line."""
    cfg = load_config(None, ["data.root=x", "optim.lr=1e-3", "optim.weight_decay=5e-4", "head.scale=6.4e1",
                             "head.margin=[1, 5e-1, 0]", "deepspeed.gradient_clipping=1E1"])
    assert cfg["optim"]["lr"] == 1e-3 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["optim"]["weight_decay"] == 5e-4 and cfg["head"]["scale"] == 64.0
    assert cfg["head"]["margin"] == [1, 0.5, 0] and cfg["deepspeed"]["gradient_clipping"] == 10.0
    recipe = write(tmp_path, "recipe.yaml", "data: {root: x}\noptim:\n  lr: 1e-3\n  weight_decay: 1e-5\n"
                                            "schedule: {warmup_epochs: 2e0}\n")
    cfg = load_config(recipe)
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["schedule"]["warmup_epochs"]) == (1e-3, 1e-5, 2.0)
    assert all(isinstance(v, float) for v in (cfg["optim"]["lr"], cfg["schedule"]["warmup_epochs"]))
    from trainer.config import dump_config
    assert "lr: 0.001" in dump_config(cfg)  # written back as a number


def test_strings_that_are_not_numbers_stay_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"`optim.lr`: expected float, got 'fast' \(str\)"):
        load_config(None, ["data.root=x", "optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"`optim.momentum`: expected float, got '0.9x' \(str\)"):
        load_config(write(tmp_path, "bad.yaml", "data: {root: x}\noptim: {momentum: 0.9x}\n"))
    with pytest.raises(ConfigError, match=r"`train.epochs`: expected int, got '1e1' \(str\)"):  # not where an int is
        load_config(None, ["data.root=x", "train.epochs=1e1"])
    with pytest.raises(ConfigError, match=r"`optim.lr`: must be > 0"):
        load_config(None, ["data.root=x", "optim.lr=-1e-3"])
    assert load_config(None, ["data.root=1e-3", "model.name=1e-3"])["model"]["name"] == "1e-3"  # str keys stay str


def test_max_bad_images():
    assert load_config(None, ["data.root=x"])["data"]["max_bad_images"] == 100
    assert load_config(None, ["data.root=x", "data.max_bad_images=0"])["data"]["max_bad_images"] == 0
    with pytest.raises(ConfigError, match=r"`data.max_bad_images`: must be >= 0 \(0 = stop at the first damaged"):
        load_config(None, ["data.root=x", "data.max_bad_images=-1"])
    with pytest.raises(ConfigError, match=r"`data.max_bad_images`: expected int, got 'many'"):
        load_config(None, ["data.root=x", "data.max_bad_images=many"])

"""Backbones: arcface_torch layout (names + shapes, strict load), sizes, MACs, precision, loader errors, training."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones import (
    BackboneError,
    BackboneWeightsError,
    count_macs,
    get_model,
    list_models,
    load_backbone_weights,
)
from backbones.iresnet import trunk_autocast_enabled

DEPTHS = {
    "r18": [2, 2, 2, 2],
    "r34": [3, 4, 6, 3],
    "r50": [3, 4, 14, 3],
    "r100": [3, 13, 30, 3],
    "r200": [6, 26, 60, 6],
}


# --------------------------------------------------------------------------- the published layout, written from rules


def bn_entries(prefix: str, c: int) -> dict[str, list[int]]:
    return {
        f"{prefix}.weight": [c],
        f"{prefix}.bias": [c],
        f"{prefix}.running_mean": [c],
        f"{prefix}.running_var": [c],
        f"{prefix}.num_batches_tracked": [],
    }


def arcface_layout(depths: list[int], num_features: int = 512) -> dict[str, list[int]]:
    """arcface_torch IResNet state_dict key -> shape, from the stage/block rules (independent of our model code)."""
    out: dict[str, list[int]] = {"conv1.weight": [64, 3, 3, 3], **bn_entries("bn1", 64), "prelu.weight": [64]}
    cin = 64
    for stage, (depth, width) in enumerate(zip(depths, [64, 128, 256, 512]), start=1):
        for b in range(depth):
            p = f"layer{stage}.{b}"
            out.update(bn_entries(f"{p}.bn1", cin))
            out[f"{p}.conv1.weight"] = [width, cin, 3, 3]
            out.update(bn_entries(f"{p}.bn2", width))
            out[f"{p}.prelu.weight"] = [width]
            out[f"{p}.conv2.weight"] = [width, width, 3, 3]
            out.update(bn_entries(f"{p}.bn3", width))
            if b == 0:  # stride 2 at every stage's first block -> projection shortcut
                out[f"{p}.downsample.0.weight"] = [width, cin, 1, 1]
                out.update(bn_entries(f"{p}.downsample.1", width))
            cin = width
    out.update(bn_entries("bn2", 512))
    out["fc.weight"] = [num_features, 512 * 7 * 7]
    out["fc.bias"] = [num_features]
    out.update(bn_entries("features", num_features))
    return out


def random_state(layout: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
        for k, shape in layout.items()
    }


def n_params(layout: dict[str, list[int]]) -> int:
    """Parameters only (buffers: running stats and counters excluded)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    total = 0
    for k, shape in layout.items():
        if not k.endswith(buffers):
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


@pytest.fixture(scope="module")
def big_models() -> dict[str, nn.Module]:
    """r100 and r200 are built once for the whole module."""
    return {"r100": get_model("r100"), "r200": get_model("r200")}


def model_for(name: str, big_models: dict[str, nn.Module]) -> nn.Module:
    return big_models[name] if name in big_models else get_model(name)


# --------------------------------------------------------------------------------------------------- layout / load


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100", "r200"])
def test_state_dict_names_and_shapes_match_arcface_torch(name, big_models):
    model = model_for(name, big_models)
    expected = arcface_layout(DEPTHS[name])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert got == expected


def test_arcface_state_dict_file_loads_strictly_into_r18(tmp_path):
    state = random_state(arcface_layout(DEPTHS["r18"]), seed=1)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = load_backbone_weights(get_model("r18"), path)
    loaded = model.state_dict()
    for k in ("conv1.weight", "layer2.0.downsample.0.weight", "fc.weight", "features.running_var"):
        assert torch.equal(loaded[k], state[k]), k


def test_module_prefixed_state_dict_loads(tmp_path):
    state = random_state(arcface_layout(DEPTHS["r18"]), seed=2)
    path = tmp_path / "ddp_backbone.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = load_backbone_weights(get_model("r18"), path)
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


@pytest.mark.parametrize("name", ["r50", "r100"])
def test_independent_state_dict_loads_strictly(name, big_models):
    model = model_for(name, big_models)
    state = random_state(arcface_layout(DEPTHS[name]), seed=3)
    result = model.load_state_dict(state, strict=True)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert torch.equal(model.state_dict()["layer3.5.prelu.weight"], state["layer3.5.prelu.weight"])
    # restore the arcface init for the other tests that share r100 (features.weight is 1 there)
    with torch.no_grad():
        model.features.weight.fill_(1.0)


# --------------------------------------------------------------------------------------------------- sizes / MACs

# exact counts of the layout above; arcface_torch's model table quotes r50 43.6M and r100 65.2M parameters
PARAMS = {"r18": 24_025_600, "r34": 34_139_328, "r50": 43_590_848, "r100": 65_156_160, "r200": 118_833_920}


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100", "r200"])
def test_parameter_counts(name, big_models):
    model = model_for(name, big_models)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == n_params(arcface_layout(DEPTHS[name])) == PARAMS[name]
    assert trainable == total - 512  # features.weight is frozen


def test_published_parameter_counts():
    assert abs(PARAMS["r50"] / 1e6 - 43.6) < 0.05
    assert abs(PARAMS["r100"] / 1e6 - 65.2) < 0.05


# published forward MACs at 1x3x112x112 (arcface_torch's model table); tolerance 1 %
PUBLISHED_GMACS = {"r18": 2.6, "r50": 6.3, "r100": 12.1, "r200": 23.5}


@pytest.mark.parametrize("name", ["r18", "r50", "r100", "r200"])
def test_macs_match_published(name, big_models):
    macs = count_macs(model_for(name, big_models))
    assert abs(macs / 1e9 - PUBLISHED_GMACS[name]) / PUBLISHED_GMACS[name] < 0.01, macs


def test_count_macs_exact_on_small_net():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),  # out 8x4x4: 128 * 27 = 3456
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # out 8x4x4: 128 * 2 * 9 = 2304
        nn.Flatten(),
        nn.Linear(128, 10),  # 1280
    )
    net.train()
    assert count_macs(net, (1, 3, 8, 8)) == 3456 + 2304 + 1280
    assert count_macs(net, (2, 3, 8, 8)) == 2 * (3456 + 2304 + 1280)
    assert net.training  # mode restored
    assert not net[0]._forward_hooks  # hooks removed


# --------------------------------------------------------------------------------------------- forward / precision


def test_r18_output_shape_and_dtype():
    model = get_model("r18").eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 512) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_features_weight_fixed_at_one_and_not_trained():
    model = get_model("iresnet_tiny", num_features=64)
    assert torch.equal(model.features.weight, torch.ones(64))
    assert not model.features.weight.requires_grad
    assert model.features.bias.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=5e-4)
    model(torch.randn(4, 3, 112, 112)).pow(2).sum().backward()
    opt.step()
    assert model.features.weight.grad is None
    assert torch.equal(model.features.weight, torch.ones(64))


def test_autocast_decision():
    assert trunk_autocast_enabled("cuda", "bf16")
    assert not trunk_autocast_enabled("cpu", "bf16")
    assert not trunk_autocast_enabled("cuda", None)
    assert not trunk_autocast_enabled("cuda", "fp32")


def test_cpu_always_fp32_even_with_bf16_and_outer_autocast():
    torch.manual_seed(0)
    ref = get_model("iresnet_tiny").eval()
    bf = get_model("iresnet_tiny", autocast_dtype="bf16").eval()
    bf.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        y_ref = ref(x)
        y_bf = bf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_outer = bf(x)
            y_outer_ref = ref(x)
        # sanity: an outer CPU autocast does change a bare conv's dtype, so the check above is meaningful
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ref.conv1(x).dtype == torch.bfloat16
    for y in (y_bf, y_outer, y_outer_ref):
        assert y.dtype == torch.float32
        assert torch.equal(y, y_ref)


def test_bad_input_shape_is_named():
    model = get_model("iresnet_tiny").eval()
    with pytest.raises(ValueError, match=r"\[N, 3, 112, 112\].*\[2, 3, 96, 96\]"):
        model(torch.randn(2, 3, 96, 96))


# ------------------------------------------------------------------------------------------------------- factory


def test_list_models():
    assert list_models() == ["r18", "r34", "r50", "r100", "r200", "iresnet_tiny"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(BackboneError, match=r"unknown backbone 'r101'.*r18, r34, r50, r100, r200, iresnet_tiny"):
        get_model("r101")


def test_unknown_kwarg_is_named():
    with pytest.raises(BackboneError, match=r"'r50' got unknown argument\(s\) \['widths'\].*num_features"):
        get_model("r50", widths=[8, 8, 8, 8])


def test_trunk_autocast_follows_the_choice_on_cuda_and_stays_fp32_elsewhere():
    from backbones.iresnet import trunk_autocast, trunk_autocast_enabled
    assert trunk_autocast_enabled("cuda", "fp16") and trunk_autocast_enabled("cuda", "bf16")
    assert not any(trunk_autocast_enabled("cpu", d) for d in (None, "fp32", "bf16", "fp16"))
    assert trunk_autocast("cuda", "fp16").fast_dtype == torch.float16
    assert trunk_autocast("cuda", "bf16").fast_dtype == torch.bfloat16
    model = get_model("iresnet_tiny", autocast_dtype="fp16").eval()  # on CPU: the fp32 model, bit for bit
    ref = get_model("iresnet_tiny").eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 112, 112)
    assert torch.equal(model(x), ref(x))
    with pytest.raises(ValueError, match="autocast_dtype must be one of"):
        get_model("iresnet_tiny", autocast_dtype="fp8")


def test_kwargs_reach_the_model():
    m = get_model("r18", num_features=128, dropout=0.2)
    assert m.fc.out_features == 128 and m.features.num_features == 128 and m.dropout.p == 0.2


def test_tiny_family_is_configurable():
    m = get_model(
        "iresnet_tiny", depths=[1, 2, 1], widths=[8, 16, 24], stem_width=4, stem_stride=1, num_features=32
    ).eval()
    # 112 -> stem stride 1 -> 112 -> 56 -> 28 -> 14 (three stages)
    assert m.fc.in_features == 24 * 14 * 14
    assert len(m.layer2) == 2 and not hasattr(m, "layer4")
    assert m.layer1[0].downsample is not None and m.layer2[1].downsample is None
    assert list(m.layer1[0].conv1.weight.shape) == [8, 4, 3, 3]
    with torch.no_grad():
        assert m(torch.randn(2, 3, 112, 112)).shape == (2, 32)


def test_tiny_default_structure():
    m = get_model("iresnet_tiny")
    # r18 depths, quarter widths, stem stride 2: 112 -> 56 -> 28 -> 14 -> 7 -> 4
    assert [len(getattr(m, f"layer{k}")) for k in range(1, 5)] == [2, 2, 2, 2]
    assert m.conv1.stride == (2, 2) and m.fc.in_features == 128 * 4 * 4
    assert m.fc.out_features == 512


# ------------------------------------------------------------------------------------------------ loader errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(BackboneWeightsError, match=r"nope\.pth: no such weights file"):
        load_backbone_weights(get_model("iresnet_tiny"), path)


@pytest.mark.parametrize("content", [b"", b"xx", b"this is not a torch file", "truncated"])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    if content == "truncated":
        torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, path)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(BackboneWeightsError, match=r"garbage\.pth: cannot be read as a torch state_dict") as err:
        load_backbone_weights(get_model("iresnet_tiny"), path)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)  # one clean line


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f, protocol=2)
    with pytest.raises(BackboneWeightsError, match=r"evil\.pth: cannot be read .*not a plain tensor pickle.*print"):
        load_backbone_weights(get_model("iresnet_tiny"), path)
    assert "code ran" not in capsys.readouterr().out


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(BackboneWeightsError, match=r"list\.pth: expected a state_dict .*got list"):
        load_backbone_weights(get_model("iresnet_tiny"), path)


def test_training_checkpoint_is_named(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    pattern = r"(?s)ckpt\.pth: expected a plain state_dict.*entries \(2\): epoch, state_dict"
    with pytest.raises(BackboneWeightsError, match=pattern):
        load_backbone_weights(get_model("iresnet_tiny"), path)


def test_wrong_depth_lists_missing_keys(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(random_state(arcface_layout(DEPTHS["r18"])), path)
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_weights(get_model("r34"), path)
    msg = str(err.value)
    assert "r18.pth" in msg and "missing keys" in msg and "layer1.2.bn1.weight" in msg
    assert "unexpected keys" not in msg and "shape mismatches" not in msg
    assert "... and" in msg  # long lists are shortened


def test_wrong_width_lists_unexpected_and_shape_mismatches(tmp_path):
    state = random_state(arcface_layout(DEPTHS["r18"], num_features=256))
    state["head.extra"] = torch.zeros(2)
    path = tmp_path / "r18_256.pth"
    torch.save(state, path)
    model = get_model("r18")
    before = model.fc.weight.detach().clone()
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_weights(model, path)
    msg = str(err.value)
    assert "r18_256.pth" in msg
    assert "unexpected keys (1): head.extra" in msg
    assert "fc.weight [256, 25088] (model [512, 25088])" in msg
    assert "missing keys" not in msg
    assert torch.equal(model.fc.weight, before)  # nothing was half-loaded


# ------------------------------------------------------------------------------------------------------- training


def test_tiny_model_trains_on_a_fixed_batch():
    torch.manual_seed(0)
    model = get_model("iresnet_tiny", num_features=64).train()
    classifier = nn.Linear(64, 4)
    x = torch.randn(16, 3, 112, 112)
    y = torch.arange(16) % 4
    params = [p for p in model.parameters() if p.requires_grad] + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(classifier(model(x)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0], losses

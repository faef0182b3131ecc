"""ONNX export: onnxruntime equals torch, dynamic batch, and the MFR-style self-check passes a good export and
fails each kind of bad model for the right reason."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import backbones
from eval import onnx_export as ox
from tests.fixtures_eval import SMALL_NET, make_small_weights, small_model


def verdicts(report: ox.CheckReport) -> dict[str, bool]:
    return {name: passed for name, passed, _ in report.checks}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    model = small_model(0)
    ox.export_onnx(model, path)
    return model, path


def test_export_equals_torch_with_a_dynamic_batch(exported):
    model, path = exported
    diff = ox.compare_with_torch(model, path, batch_sizes=(1, 5))
    assert diff["max_abs_normalised"] <= 1e-4 and diff["max_rel"] <= 1e-4
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 112, 112]
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out_dims] == ["batch", 512]
    assert model.training is False and next(model.parameters()).dtype == torch.float32  # the model is untouched


def test_mfr_self_check_passes_a_good_export(exported):
    _, path = exported
    report = ox.mfr_self_check(path)
    assert report.ok, report.table("self-check")
    assert set(verdicts(report)) >= {"input 112x112", "dynamic batch", "feature dim", "no NaN/inf", "normalisation",
                                     "batch = single", "weights >= 32 bit", "latency (1 image)"}
    assert report.info["feature_dim"] == 512 and report.info["latency_ms"] > 0
    slow = ox.mfr_self_check(path, max_ms=1e-6)
    assert verdicts(slow)["latency (1 image)"] is False and not slow.ok


def _edited(path, tmp_path, name, edit):
    proto = onnx.load(str(path))
    edit(proto)
    out = tmp_path / f"{name}.onnx"
    onnx.save(proto, str(out))
    return out


def test_mfr_self_check_fails_bad_graphs(exported, tmp_path):
    _, path = exported

    def fixed_batch(p):
        p.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2

    def half_weight(p):
        p.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float16), "unused_half"))

    def normalising_names(p):
        p.graph.node[0].name, p.graph.node[1].name = "Sub_0", "Mul_1"

    cases = {"dynamic batch": fixed_batch, "weights >= 32 bit": half_weight, "normalisation": normalising_names}
    for check, edit in cases.items():
        report = ox.mfr_self_check(_edited(path, tmp_path, check.replace(" ", "_"), edit))
        failed = [name for name, passed in verdicts(report).items() if not passed]
        assert failed == [check], report.table(check)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    assert verdicts(ox.mfr_self_check(garbage)) == {"file": True, "model size": True, "loads": False}
    missing = ox.mfr_self_check(tmp_path / "absent.onnx")
    assert verdicts(missing) == {"file": False}


def test_mfr_self_check_fails_bad_models(tmp_path):
    wide = backbones.get_model("iresnet_tiny", **SMALL_NET, num_features=1024).eval()
    report = ox.mfr_self_check(ox.export_onnx(wide, tmp_path / "wide.onnx"))
    assert [n for n, p in verdicts(report).items() if not p] == ["feature dim"]

    broken = small_model(1)
    with torch.no_grad():
        broken.fc.bias[3] = float("nan")
    report = ox.mfr_self_check(ox.export_onnx(broken, tmp_path / "nan.onnx"))
    assert verdicts(report)["no NaN/inf"] is False

    small_input = backbones.get_model("iresnet_tiny", **SMALL_NET, input_size=96).eval()
    report = ox.mfr_self_check(ox.export_onnx(small_input, tmp_path / "96.onnx", image_size=96))
    assert [n for n, p in verdicts(report).items() if not p] == ["input 112x112"]


def test_cli_export_and_check_only(tmp_path, capsys):
    weights, model_args = make_small_weights(tmp_path / "run" / "backbone.pth")
    assert ox.main(model_args + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs torch" in printed and "all checks passed" in printed
    report = json.loads((tmp_path / "run" / "eval_onnx.json").read_text())
    onnx_path = tmp_path / "run" / "backbone.onnx"
    assert report["ok"] is True and report["onnx"] == str(onnx_path) and onnx_path.is_file()
    assert report["comparison"]["max_abs_normalised"] <= 1e-4
    assert ox.main(["--check-only", str(onnx_path)]) == 0
    assert ox.main(["--check-only", str(tmp_path / "nothing.onnx")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_face_like_image_is_deterministic():
    a, b = ox.face_like_image(), ox.face_like_image()
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8 and (a == b).all() and len(np.unique(a)) >= 3

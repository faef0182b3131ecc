"""eval.cli, the plumbing the eval commands share: the parser, the label, the model loaded once, and feature files
written once (memmap or plain save, never left half-written) and reused afterwards without loading the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eval.cli as cli
from eval.features import FeatureError, embed
from tests.fixtures_eval import make_small_weights, small_model


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 112, 112), dtype=np.uint8))


@pytest.fixture()
def run(tmp_path, monkeypatch):
    """An EvalRun on a small bare backbone.pth, counting how often the model is loaded."""
    _, model_args = make_small_weights(tmp_path / "model" / "backbone.pth")
    parser = cli.eval_parser("python -m eval.test", "test", data_help="data folder")
    args = parser.parse_args(model_args + ["--data", "x", "--num-workers", "0", "--no-progress", "--device", "cpu"])
    loads = []
    load = cli.model_from_arguments

    def counting(*a):
        loads.append(1)
        return load(*a)

    monkeypatch.setattr(cli, "model_from_arguments", counting)
    r = cli.EvalRun.start(args)
    r.loads = loads
    return r


def test_parser_and_label(tmp_path):
    with_data = cli.eval_parser("p", "d", data_help="what --data names")
    with pytest.raises(SystemExit):
        with_data.parse_args(["--weights", "w"])  # --data is required
    (tmp_path / "run" / "epoch_3").mkdir(parents=True)
    args = cli.eval_parser("p", "d", batch_size=64).parse_args(["--weights", str(tmp_path / "run" / "epoch_3")])
    assert args.batch_size == 64 and not hasattr(args, "data")
    assert cli.run_label(args) == "epoch_3"  # a checkpoint folder: its name
    args.label = "ours"
    assert cli.run_label(args) == "ours"


def test_features_are_written_once_then_reused_without_the_model(run, tmp_path, capsys):
    assert (run.rank, run.world, run.label) == (0, 1, "model/backbone")
    images = _images(5)
    path = tmp_path / "feats" / "x_features.npy"
    feats, reused = run.cached_features(path, images, flip=True, normalize=True, desc="X")
    assert not reused and path.is_file() and not list(path.parent.glob("*.partial*"))
    assert isinstance(feats, np.memmap) and feats.shape == (5, run.model()[0].num_features)
    expected = embed(small_model(), images, batch_size=7, flip=True, normalize=True, progress=False)
    np.testing.assert_allclose(feats, expected, rtol=0, atol=1e-6)
    assert "embedded X features of 5 images" in capsys.readouterr().out

    again, reused = run.cached_features(path, images, flip=False, normalize=False, desc="X")  # options ignored
    assert reused and "reusing X features" in capsys.readouterr().out
    np.testing.assert_array_equal(again, feats)
    assert len(run.loads) == 1  # loaded for the extraction only, once

    with pytest.raises(FeatureError, match="5 rows, but the list has 4 images"):
        run.cached_features(path, _images(4), flip=True, normalize=True, desc="X")


def test_a_model_without_num_features_is_saved_whole(run, tmp_path):
    model, cfg = run.model()
    run._model = (torch.nn.Sequential(model), cfg)  # no num_features: no memmap, the array is saved at the end
    images = _images(3, seed=1)
    path = tmp_path / "plain"  # no .npy suffix: written exactly there all the same
    feats, reused = run.cached_features(path, images, flip=False, normalize=False, desc="plain")
    assert not reused and path.is_file() and not list(tmp_path.glob("plain*.npy"))
    np.testing.assert_array_equal(np.load(path), feats)
    np.testing.assert_allclose(feats, embed(model, images, flip=False, progress=False), rtol=0, atol=1e-6)

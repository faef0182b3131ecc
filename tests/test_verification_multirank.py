"""The verification CLI on 2 gloo ranks (each embeds half of the images) equals the single-process result."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.distributed import run_ranks


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def setup(tmp_path):
    import backbones
    from data.verification_bin import write_bin
    rng = np.random.default_rng(0)
    pairs = 21  # odd: the ranks' slices differ in size
    write_bin(tmp_path / "tiny.bin", [_jpeg(rng) for _ in range(2 * pairs)], [bool(k % 2) for k in range(pairs)])
    torch.manual_seed(0)
    model = backbones.get_model("iresnet_tiny", num_features=16, depths=(1, 1, 1, 1))
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    return tmp_path


def _cli(rank, world, root):
    from eval.verification import main
    return main(["--weights", str(root / "backbone.pth"), "--network", "iresnet_tiny", "--model-arg",
                 "num_features=16", "--model-arg", "depths=[1, 1, 1, 1]", "--bins", str(root / "tiny.bin"),
                 "--no-progress", "--json", str(root / f"out_{world}.json")])


@pytest.mark.multirank
def test_two_ranks_equal_one(setup):
    (one,) = run_ranks(_cli, 1, setup)
    two = run_ranks(_cli, 2, setup)
    assert two[1] == []  # rank 1 embeds its half and reports nothing
    a, b = one[0], two[0][0]
    for key in ("accuracy_mean", "accuracy_std", "best_threshold", "uniform_accuracy", "uniform_threshold"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert json.loads((setup / "out_2.json").read_text())["results"][0]["pairs"] == 21

"""eval.ijb around the scoring: the meta read for feature extraction only (no pair list), and the CPU fallback when
scoring on the device fails (a long extraction is never lost at the last step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import ijb
from tests.fixtures_eval import make_ijb_dataset


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    make_ijb_dataset(root, "IJBC", num_subjects=4)
    meta = ijb.read_ijb_meta(root, "IJBC")
    feats = np.random.default_rng(0).normal(size=(len(meta.image_names), 16)).astype(np.float32)
    return root, meta, feats


def test_meta_without_pairs_is_the_same_but_for_the_pairs(ijbc):
    root, meta, _ = ijbc
    light = ijb.read_ijb_meta(root, "IJBC", with_pairs=False)
    assert light.image_names == meta.image_names and len(meta.pair_t1) > 0
    for name in ("templates", "medias", "landmarks", "faceness"):
        np.testing.assert_array_equal(getattr(light, name), getattr(meta, name))
    assert (light.pair_t1.dtype, light.pair_t2.dtype, light.pair_label.dtype) == (np.int64, np.int64, bool)
    assert len(light.pair_t1) == len(light.pair_t2) == len(light.pair_label) == 0


def test_scoring_falls_back_to_the_cpu_when_the_device_fails(ijbc, monkeypatch):
    _, meta, feats = ijbc
    expected, _ = ijb.evaluate_ijb(meta, feats)
    score = ijb.verification_1to1
    devices = []

    def failing_off_the_cpu(template_ids, template_feats, *args):
        devices.append(template_feats.device.type)
        if template_feats.device.type != "cpu":
            raise RuntimeError("no such kernel")
        return score(template_ids, template_feats, *args)

    monkeypatch.setattr(ijb, "verification_1to1", failing_off_the_cpu)
    with pytest.warns(UserWarning, match=r"scoring on meta failed \(no such kernel\); scoring on the CPU instead"):
        result, _ = ijb.evaluate_ijb(meta, feats, device=torch.device("meta"))
    assert devices == ["meta", "cpu"]
    assert result["verification"] == expected["verification"]
    assert result["identification"] == expected["identification"]  # 1:N scored on the CPU features too

    def failing(*args):
        devices.append("cpu")
        raise RuntimeError("broken")

    monkeypatch.setattr(ijb, "verification_1to1", failing)
    devices.clear()
    with pytest.raises(RuntimeError, match="broken"):  # on the CPU there is nothing to fall back to
        ijb.evaluate_ijb(meta, feats)
    assert devices == ["cpu"]

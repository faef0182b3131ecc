"""Verification bins (safe unpickling, structure, decoding), the 10-fold protocol, the uniform-threshold accuracy,
flip-summed embeddings, checkpoint loading, and the `python -m eval.verification` command end to end."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data.verification_bin import VerificationBinError, load_bin_images, read_bin, write_bin
from eval.checkpoint_io import CheckpointError, load_model_for_eval
from eval.verification import (
    THRESHOLDS,
    evaluate_pairs,
    extract_embeddings,
    fold_slices,
    format_table,
    uniform_threshold_accuracy,
    verify_bins,
)
from eval.verification import main as verification_main

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "iresnet_tiny", "depths": [1, 1, 1, 1], "widths": [8, 8, 16, 16], "stem_width": 8,
        "num_features": 16}


def jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def random_images(n: int, size=(112, 112), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth images survive JPEG nearly unchanged: per-image colour + a gradient
    ramp = np.linspace(0, 60, size[1], dtype=np.float32)[None, :, None]
    return [np.clip(rng.uniform(40, 180, 3).astype(np.float32) + ramp, 0, 255).astype(np.uint8).repeat(size[0], 0)
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------ unpickler
class _Payload:
    """Unpickling this object (unrestricted) opens — i.e. creates — the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    live, marker = tmp_path / "live_marker", tmp_path / "marker"
    pickle.loads(pickle.dumps(([_Payload(live)], [True])))  # the payload is real: plain pickle runs it
    assert live.exists()

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Payload(marker), b"x"], [True]), protocol=2))
    with pytest.raises(VerificationBinError) as e:
        read_bin(path)
    assert str(path) in str(e.value) and "refused to load global" in str(e.value)
    assert "open" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload, refused", [
    (lambda: pickle.dumps(([b"a", b"b"], np.array([True])), protocol=4), "numpy"),  # an ndarray needs globals
    (lambda: pickle.dumps(([b"a", b"b"], [np.bool_(True)]), protocol=4), "numpy"),
    (lambda: pickle.dumps(([b"a", b"b"], [True]), protocol=2), "_codecs.encode"),  # py3 bytes at protocol 2
])
def test_any_global_is_refused(tmp_path, payload, refused):
    path = tmp_path / "g.bin"
    path.write_bytes(payload())
    with pytest.raises(VerificationBinError, match=refused) as e:
        read_bin(path)
    assert str(path) in str(e.value)


def test_python2_pickle_reads_as_bytes(tmp_path):
    # What a Python 2 pickle.dump((['abc', 'def'], [True]), f, 2) holds: SHORT_BINSTRINGs, no global.
    path = tmp_path / "py2.bin"
    path.write_bytes(b"\x80\x02](U\x03abcU\x03defe]\x88a\x86.")
    assert read_bin(path) == ([b"abc", b"def"], [True])


# ------------------------------------------------------------------------------------------------ format
def test_round_trip_and_decode(tmp_path):
    rgbs = random_images(6)
    issame = [True, False, True]
    path = tmp_path / "rt.bin"
    write_bin(path, [jpeg(x) for x in rgbs], issame)
    images, flags = read_bin(path)
    assert flags == issame and images == [jpeg(x) for x in rgbs]
    with open(path, "rb") as f:  # readable the way insightface loads bins
        assert pickle.load(f, encoding="bytes") == (images, flags)

    tensor, same = load_bin_images(path)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (6, 3, 112, 112)
    assert same.dtype == bool and same.tolist() == issame
    for i, x in enumerate(rgbs):
        assert np.abs(tensor[i].permute(1, 2, 0).numpy().astype(int) - x.astype(int)).max() <= 6


@pytest.mark.parametrize("obj, message", [
    ([b"a"], "pickled pair"),
    ((b"a", [True]), "images must be a list"),
    (([b"a", b"b"], (1,)), r"issame\[0\] must be a bool"),
    (([b"a", "b"], [True]), "image 1 must be encoded bytes"),
    (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
    (([b"a", b"b"], [True, False]), "2 images for 2 pairs"),
])
def test_structure_errors(tmp_path, obj, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(VerificationBinError, match=message) as e:
        read_bin(path)
    assert str(path) in str(e.value)


def test_write_bin_validates_before_writing(tmp_path):
    path = tmp_path / "w.bin"
    with pytest.raises(VerificationBinError, match="3 images for 1 pairs"):
        write_bin(path, [b"a", b"b", b"c"], [True])
    with pytest.raises(VerificationBinError, match="image 0 must be encoded bytes, got str"):
        write_bin(path, ["a", b"b"], [True])
    assert not path.exists()
    write_bin(path, [b"a", b"b"], [np.bool_(False)])  # numpy bools are stored as plain bools
    assert read_bin(path) == ([b"a", b"b"], [False])


def test_unreadable_files(tmp_path):
    with pytest.raises(VerificationBinError, match="no such verification bin"):
        read_bin(tmp_path / "missing.bin")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(VerificationBinError, match="not a readable pickle"):
        read_bin(garbage)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(pickle.dumps(([b"a", b"b"], [True]), protocol=4)[:-5])
    with pytest.raises(VerificationBinError, match=f"{truncated}: not a readable pickle"):
        read_bin(truncated)


def test_decode_errors_name_file_and_index(tmp_path):
    good = jpeg(random_images(1)[0])
    path = tmp_path / "undecodable.bin"
    write_bin(path, [good, b"\xff\xd8 not really a jpeg"], [False])
    with pytest.raises(VerificationBinError, match=r"undecodable.bin: image 1: cannot decode"):
        load_bin_images(path)
    path = tmp_path / "small.bin"
    write_bin(path, [good, jpeg(random_images(1, size=(96, 112))[0])], [True])
    with pytest.raises(VerificationBinError, match=r"small.bin: image 1: image is 96x112 \(HxW\), expected 112x112"):
        load_bin_images(path)


# ------------------------------------------------------------------------------------------------ protocol
def test_fold_slices_match_kfold_without_shuffle():
    assert fold_slices(10, 3) == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert [s.stop - s.start for s in fold_slices(6000, 10)] == [600] * 10
    with pytest.raises(ValueError, match="nfolds"):
        fold_slices(5, 10)


def pair_embeddings(issame_true: np.ndarray, dim: int = 8) -> np.ndarray:
    """Unit embeddings: same pairs identical (d² = 0), different pairs orthogonal (d² = 2)."""
    emb = np.zeros((2 * issame_true.size, dim))
    for k, same in enumerate(issame_true):
        emb[2 * k, 0] = 1.0
        emb[2 * k + 1, 0 if same else 1] = 1.0
    return emb


def test_perfectly_separable_is_100_percent():
    truth = np.array([True, False] * 50)
    r = evaluate_pairs(pair_embeddings(truth), truth)
    assert r["accuracy_mean"] == 1.0 and r["accuracy_std"] == 0.0 and r["pairs"] == 100
    assert r["best_threshold"] == pytest.approx(0.01)  # first threshold of the perfect range (0, 2]
    assert r["uniform_accuracy"] == 1.0 and 0.0 < r["uniform_threshold"] <= 2.0


def test_planted_label_flip_gives_exact_accuracy():
    truth = np.array([True, False] * 50)
    labels = truth.copy()
    labels[33] = True  # a different pair (d² = 2) labelled same, in fold 3 (pairs 30..39)
    r = evaluate_pairs(pair_embeddings(truth), labels)
    folds = [1.0] * 10
    folds[3] = 0.9
    assert r["fold_accuracies"] == pytest.approx(folds)
    assert r["accuracy_mean"] == pytest.approx(0.99) and r["accuracy_std"] == pytest.approx(np.std(folds))
    assert r["best_threshold"] == pytest.approx(0.01)
    assert r["uniform_accuracy"] == pytest.approx(0.99)
    assert r["uniform_cosine_threshold"] == pytest.approx(1 - r["uniform_threshold"] / 2)


def reference_protocol(dist: np.ndarray, same: np.ndarray, nfolds: int = 10) -> tuple[list[float], list[float]]:
    """insightface's calculate_roc accuracy part, written plainly: [T, n] predictions per fold."""
    n = dist.size
    folds = np.array_split(np.arange(n), nfolds)
    accs, thrs = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        pred = dist[train][None, :] < THRESHOLDS[:, None]
        train_acc = (pred == same[train][None, :]).mean(axis=1)
        best = int(np.argmax(train_acc))
        accs.append(float(((dist[test] < THRESHOLDS[best]) == same[test]).mean()))
        thrs.append(float(THRESHOLDS[best]))
    return accs, thrs


def test_ten_fold_matches_plain_reference_on_random_embeddings():
    rng = np.random.default_rng(5)
    same = rng.random(617) < 0.5
    emb = rng.normal(size=(2 * same.size, 4))
    emb[1::2][same] = emb[0::2][same] + rng.normal(scale=0.8, size=(same.sum(), 4))  # same pairs closer
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    r = evaluate_pairs(emb, same)
    dist = ((emb[0::2] - emb[1::2]) ** 2).sum(1)
    accs, thrs = reference_protocol(dist, same)
    assert r["fold_accuracies"] == pytest.approx(accs)
    assert r["best_threshold"] == pytest.approx(np.mean(thrs))
    assert 0.6 < r["accuracy_mean"] < 1.0


@pytest.mark.parametrize("seed", range(5))
def test_uniform_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    dist = np.round(rng.uniform(0, 4, n), 1)  # rounding plants many ties
    same = rng.random(n) < rng.uniform(0.1, 0.9)
    dist[same] -= rng.uniform(0, 1.5)  # same pairs closer (tied values stay tied)
    candidates = np.concatenate([np.unique(dist), [dist.max() + 1]])
    brute = max(float(((dist < t) == same).mean()) for t in candidates)
    acc, thr = uniform_threshold_accuracy(dist, same)
    assert acc == pytest.approx(brute, abs=1e-12)
    assert float(((dist < thr) == same).mean()) == pytest.approx(acc, abs=1e-12)  # the threshold realises it


def test_evaluate_pairs_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[2N, D\]"):
        evaluate_pairs(np.zeros((5, 3)), [True, False, True])


# ------------------------------------------------------------------------------------------------ embeddings
class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3 * 8 * 8, 5, generator=g))
        self.bn = torch.nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.flatten(1) @ self.w)


def test_extract_embeddings_flip_sum_normalise_and_mode():
    model = _Linear()
    model.train()
    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    emb = extract_embeddings(model, images, batch_size=3, progress=False)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        ref = model(x) + model(x.flip(3))
        ref = ref / ref.norm(dim=1, keepdim=True)
    assert emb.shape == (7, 5) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5)
    assert not np.allclose(emb, torch.nn.functional.normalize(model(x).detach(), dim=1).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        extract_embeddings(model, images.float())


# ------------------------------------------------------------------------------------------------ checkpoints + CLI
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny IResNet saved both ways (bare backbone.pth, checkpoint dir) and a small bin of rendered faces."""
    import backbones
    from data.synthetic import LFW_LIKE, encode_jpeg, identity_params, render_identity_images

    root = tmp_path_factory.mktemp("verif")
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY.items() if k != "name"}
    model = backbones.get_model("iresnet_tiny", **kwargs)
    torch.save(model.state_dict(), root / "backbone.pth")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "backbone.pth")
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": {**TINY, "precision": "bf16"}, "seed": 1}))

    images, issame = [], []
    for k in range(20):
        a, b = 100 + k % 6, 100 + (k % 6 if k % 2 == 0 else (k + 1) % 6)
        rng = np.random.default_rng(k)
        images += [encode_jpeg(render_identity_images(identity_params(0, i), 1, rng, LFW_LIKE)[0]) for i in (a, b)]
        issame.append(a == b)
    bins = root / "bins"
    bins.mkdir()
    write_bin(bins / "tiny.bin", images, issame)
    return root, ckpt, bins, model


def test_load_model_for_eval_both_layouts(tiny_setup):
    root, ckpt, _, model = tiny_setup
    m1, cfg1 = load_model_for_eval(root / "backbone.pth", "iresnet_tiny", **{k: v for k, v in TINY.items()
                                                                            if k != "name"})
    m2, cfg2 = load_model_for_eval(ckpt)
    assert cfg2 == TINY and "precision" not in cfg2 and cfg1 == cfg2
    assert not m1.training and not m2.training
    for m in (m1, m2):
        for (k, v), ref in zip(m.state_dict().items(), model.state_dict().values()):
            assert torch.equal(v, ref), k


def test_load_model_for_eval_takes_a_run_folder_s_newest_checkpoint(tiny_setup, tmp_path):
    """A run folder (what the trainer's `output` names) loads through runtime/layout.py's checkpoints/latest."""
    import shutil

    from runtime.layout import CONFIG_FILE, LATEST, checkpoints_dir, step_tag
    _, ckpt, _, model = tiny_setup
    run = tmp_path / "run"
    shutil.copytree(ckpt, checkpoints_dir(run) / step_tag(12))
    (run / CONFIG_FILE).write_text((ckpt / CONFIG_FILE).read_text())  # the run's resolved config sits there too
    with pytest.raises(CheckpointError, match="checkpoint directory has no backbone.pth"):
        load_model_for_eval(run)  # no checkpoints/latest yet: not a checkpoint
    (checkpoints_dir(run) / LATEST).write_text(step_tag(12) + "\n")
    loaded, cfg = load_model_for_eval(run)
    assert cfg == TINY
    from eval.tables import output_dir_for
    assert output_dir_for(run) == checkpoints_dir(run) / step_tag(12)  # results land beside that checkpoint
    for (k, v), ref in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, ref), k


def test_load_model_for_eval_errors(tiny_setup, tmp_path):
    root, ckpt, _, _ = tiny_setup
    with pytest.raises(CheckpointError, match="needs the network name"):
        load_model_for_eval(root / "backbone.pth")
    with pytest.raises(CheckpointError, match="disagrees with model.name"):
        load_model_for_eval(ckpt, "r50")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model_for_eval(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model_for_eval(root / "backbone.pth", "iresnet_tiny", num_features=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "backbone.pth").write_bytes((root / "backbone.pth").read_bytes())
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_model_for_eval(bad)
    (bad / "config.yaml").write_text("model: [1, 2]\n")
    with pytest.raises(CheckpointError, match="top-level 'model:' mapping"):
        load_model_for_eval(bad)
    (bad / "config.yaml").write_text("model: {name: iresnet_tiny, kwargs: {no_such_arg: 3}}\n")
    with pytest.raises(CheckpointError, match="cannot build network 'iresnet_tiny'"):
        load_model_for_eval(bad)
    (bad / "config.yaml").write_text("model: {name: r1000}\n")
    with pytest.raises(CheckpointError, match="model.name 'r1000' is not a known network"):
        load_model_for_eval(bad)


def test_trainer_runtime_keys_of_the_model_config_are_not_constructor_arguments(tiny_setup, tmp_path):
    # the trainer's model: mapping also holds precision, loss_scale, compile, ...: eval passes only what the
    # network's constructor takes (and model.kwargs whole)
    root, _, _, model = tiny_setup
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "backbone.pth").write_bytes((root / "backbone.pth").read_bytes())
    kwargs = {k: v for k, v in TINY.items() if k not in ("name", "num_features", "depths")}
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": {
        "name": "iresnet_tiny", "num_features": 16, "dropout": 0.0, "precision": "auto", "loss_scale": 65536.0,
        "cudnn_benchmark": True, "channels_last": False, "compile": False, "depths": [1, 1, 1, 1],
        "kwargs": kwargs}}))
    loaded, cfg = load_model_for_eval(ckpt)
    assert cfg == {**TINY, "dropout": 0.0}
    for (k, v), ref in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, ref), k


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.verification", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_end_to_end(tiny_setup, tmp_path):
    root, ckpt, bins, model = tiny_setup
    out = tmp_path / "res.json"
    p = run_cli("--weights", str(ckpt), "--bins", str(bins), "--batch-size", "7", "--json", str(out),
                "--no-progress", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "tiny" in p.stdout and "accuracy % (mean ± std)" in p.stdout and "uniform-threshold" in p.stdout
    saved = json.loads(out.read_text())
    assert saved["model"] == TINY and len(saved["results"]) == 1
    res = saved["results"][0]
    assert res["target"] == "tiny" and res["pairs"] == 20 and len(res["fold_accuracies"]) == 10

    # the same numbers in-process (embedding maths is deterministic on CPU)
    model.eval()
    inproc = verify_bins(model, [bins / "tiny.bin"], batch_size=7, progress=False)[0]
    assert res["accuracy_mean"] == pytest.approx(inproc["accuracy_mean"])
    assert res["uniform_accuracy"] == pytest.approx(inproc["uniform_accuracy"])
    table = format_table([inproc], title="t")
    assert "tiny" in table and f"{100 * inproc['accuracy_mean']:.2f}" in table

    # a broken bin or a missing path: one clear error, not a traceback
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"garbage")
    for bins_arg, message in ((broken, f"error: {broken}: not a readable pickle"),
                              (tmp_path / "nope", "no such file or directory")):
        with pytest.raises(SystemExit, match=message):
            verification_main(["--weights", str(ckpt), "--bins", str(bins_arg), "--no-progress", "--device", "cpu"])

    # a bare backbone.pth needs --network; the error is one clear line, no traceback
    p = run_cli("--weights", str(root / "backbone.pth"), "--bins", str(bins / "tiny.bin"))
    assert p.returncode != 0 and "needs the network name" in p.stderr and "Traceback" not in p.stderr


def test_cli_names_the_bins_it_skipped_and_why(tiny_setup, tmp_path, capsys):
    root, ckpt, bins, _ = tiny_setup
    folder = tmp_path / "bins"
    folder.mkdir()
    good = (bins / "tiny.bin").read_bytes()
    (folder / "lfw.bin").write_bytes(good)
    (folder / "agedb_30.bin").write_bytes(good)
    (folder / "damaged.bin").write_bytes(good[: len(good) // 2])
    write_bin(folder / "wrong_size.bin", [jpeg(x) for x in random_images(2, size=(96, 112))], [True])
    out = tmp_path / "out"
    results = verification_main(["--weights", str(ckpt), "--bins", str(folder), "--no-progress", "--device", "cpu",
                                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert [r["target"] for r in results] == ["agedb_30", "lfw"]
    assert "skipped 2 bin(s):" in printed
    assert f"{folder / 'damaged.bin'}: not a readable pickle" in printed
    assert f"{folder / 'wrong_size.bin'}: image 0: image is 96x112 (HxW), expected 112x112" in printed
    saved = json.loads((out / "eval_verification.json").read_text())
    assert [s["path"] for s in saved["skipped"]] == [str(folder / "damaged.bin"), str(folder / "wrong_size.bin")]
    assert saved["kind"] == "verification" and [r["target"] for r in saved["results"]] == ["agedb_30", "lfw"]
    assert (out / "eval_verification.csv").read_text().splitlines()[0].startswith("target,pairs,accuracy")

    # --targets: the other bins of the folder are skipped, with that reason; a target that is nowhere is an error
    verification_main(["--weights", str(ckpt), "--bins", str(folder), "--targets", "lfw", "--no-progress",
                       "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"{folder / 'agedb_30.bin'}: not among --targets lfw" in printed and "skipped 3 bin(s):" in printed
    with pytest.raises(SystemExit, match=r"--targets cfp_fp: no such .bin among --bins"):
        verification_main(["--weights", str(ckpt), "--bins", str(folder), "--targets", "lfw", "cfp_fp",
                           "--device", "cpu"])
    # nothing usable at all: one error naming every skipped bin
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "damaged.bin").write_bytes(good[:100])
    with pytest.raises(SystemExit, match=r"no usable verification bin \(.*damaged.bin: not a readable pickle"):
        verification_main(["--weights", str(ckpt), "--bins", str(only_bad), "--no-progress", "--device", "cpu",
                           "--out", str(out)])

"""The data tools on real folders and rec files: pack (folder tree -> rec), shuffle (rec -> rec), inspect (report and
verify), their CLIs, and the path a new user takes: pack -> shuffle -> inspect -> DALI loader."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.loader import build_loader
from data.rec_index import looks_grouped, prepare_rec, scan_images
from data.recordio import InsightFaceRec, RecordIOError, write_insightface_rec
from data.tools import inspect as inspect_tool
from data.tools import pack as pack_tool
from data.tools import shuffle as shuffle_tool
from data.tools.pack import PackError, pack
from data.tools.shuffle import shuffle_rec

H, W = 24, 20
REPO = Path(__file__).resolve().parents[1]


def picture(label: int, variant: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([40 * label + 3 * x, 4 * y + 40 * variant, 2 * (x + y)], -1).clip(0, 255).astype(np.uint8)


def save(img: np.ndarray, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


@pytest.fixture()
def tree(tmp_path) -> Path:
    """4 identities (folder names not in label order on purpose), JPEG and PNG files, an empty folder, a stray file."""
    src = tmp_path / "faces"
    for label, name in enumerate(["alice", "bob", "carol", "dave"]):
        for v in range(3):
            fmt = "JPEG" if v < 2 else "PNG"
            save(picture(label, v), src / name / f"{v}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)
    (src / "empty").mkdir()
    (src / "bob" / "notes.txt").write_text("not an image")
    return src


def records(root: Path) -> list[tuple[int, bytes]]:
    rec = InsightFaceRec(root)
    return [rec.read(i) for i in range(len(rec))]


# ---------------------------------------------------------------------------------------------------- pack
def test_pack_writes_the_insightface_layout(tree, tmp_path):
    result = pack(tree, tmp_path / "out", size=(H, W))
    assert (result["images"], result["classes"], result["skipped"]) == (12, 4, [])
    rec = InsightFaceRec(tmp_path / "out")
    assert rec.header is not None and rec.property == (4, H, W)
    assert len(rec.reader) == 1 + 12 + 4  # header, images grouped by identity, identity-range records
    got = records(tmp_path / "out")
    assert [label for label, _ in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # sorted folder names
    # a JPEG of the right size is kept byte for byte; a PNG becomes a JPEG of the same picture
    assert got[3][1] == (tree / "bob" / "0.jpg").read_bytes()
    assert got[5][1][:3] == b"\xff\xd8\xff"
    decoded = np.asarray(Image.open(io.BytesIO(got[5][1])).convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - picture(1, 2)).mean() < 3
    assert (tmp_path / "out" / "identities.tsv").read_text().splitlines() == [
        "label\tfolder\timages", "0\talice\t3", "1\tbob\t3", "2\tcarol\t3", "3\tdave\t3"]
    assert scan_images(rec).ok


def test_pack_in_worker_processes_writes_the_same_bytes(tree, tmp_path):
    pack(tree, tmp_path / "serial", size=(H, W), workers=0)
    pack(tree, tmp_path / "parallel", size=(H, W), workers=2)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()


def test_pack_shuffled_without_second_pass(tree, tmp_path):
    pack(tree, tmp_path / "a", size=(H, W), shuffle=True, seed=1)
    pack(tree, tmp_path / "b", size=(H, W), shuffle=True, seed=1, with_header=False)
    a, b = InsightFaceRec(tmp_path / "a"), InsightFaceRec(tmp_path / "b")
    assert a.header is not None and a.header.label.tolist() == [13.0, 13.0] and len(a.reader) == 13
    assert b.header is None and len(b.reader) == 12
    assert records(tmp_path / "a") == records(tmp_path / "b")
    labels = [label for label, _ in records(tmp_path / "a")]
    assert sorted(labels) == sorted([c for c in range(4) for _ in range(3)]) and labels != sorted(labels)


def test_pack_bad_images_are_named(tree, tmp_path):
    save(picture(0, 0, size=(H + 4, W)), tree / "carol" / "big.png", "PNG")
    with pytest.raises(PackError, match=r"carol/big\.png: image is 28x20 \(HxW\), expected 24x20.*--resize"):
        pack(tree, tmp_path / "out", size=(H, W))
    assert not (tmp_path / "out" / "train.rec").exists()  # nothing half-written
    assert pack(tree, tmp_path / "resized", size=(H, W), resize=True)["images"] == 13
    (tree / "carol" / "big.png").unlink()
    (tree / "dave" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(50))
    with pytest.raises(PackError, match=r"dave/broken\.jpg: cannot be decoded as an image"):
        pack(tree, tmp_path / "out2", size=(H, W), workers=2)
    result = pack(tree, tmp_path / "out3", size=(H, W), skip_bad=True)
    assert result["images"] == 12 and len(result["skipped"]) == 1 and "broken.jpg" in result["skipped"][0]
    with pytest.raises(PackError, match="no identity folders with images"):
        pack(tmp_path / "out3", tmp_path / "out4")


# ---------------------------------------------------------------------------------------------------- shuffle
@pytest.fixture()
def grouped(tree, tmp_path) -> Path:
    pack(tree, tmp_path / "grouped", size=(H, W))
    return tmp_path / "grouped"


def test_shuffle_keeps_every_record_and_changes_the_order(grouped, tmp_path):
    result = shuffle_rec(grouped, tmp_path / "s", seed=0)
    assert result["images"] == 12 and result["header"] is False
    before, after = records(grouped), records(tmp_path / "s")
    assert sorted(after) == sorted(before) and after != before
    rec = InsightFaceRec(tmp_path / "s")
    assert rec.header is None and rec.image_keys.tolist() == list(range(12))  # no header: keys 0..N-1
    assert (tmp_path / "s" / "property").read_text() == f"4,{H},{W}"
    shuffle_rec(grouped, tmp_path / "same_seed", seed=0)
    shuffle_rec(grouped, tmp_path / "other_seed", seed=1)
    assert (tmp_path / "same_seed" / "train.rec").read_bytes() == (tmp_path / "s" / "train.rec").read_bytes()
    assert records(tmp_path / "other_seed") != after


def test_shuffle_with_header_and_from_a_rec_without_one(grouped, tmp_path):
    """insightface's shuffle_rec.py asserts a header; a header-less rec shuffles here, with or without header out."""
    shuffle_rec(grouped, tmp_path / "noheader", seed=0)
    shuffle_rec(tmp_path / "noheader", tmp_path / "header", seed=1, with_header=True)
    rec = InsightFaceRec(tmp_path / "header")
    assert rec.header is not None and rec.header.label.tolist() == [13.0, 13.0]
    assert rec.image_keys.tolist() == list(range(1, 13)) and len(rec.reader) == 13  # no identity-range records
    assert sorted(records(tmp_path / "header")) == sorted(records(grouped))


def test_shuffle_refuses_its_source_an_existing_output_and_a_damaged_rec(grouped, tmp_path):
    with pytest.raises(RecordIOError, match="must differ from the source"):
        shuffle_rec(grouped, grouped)
    shuffle_rec(grouped, tmp_path / "s")
    with pytest.raises(RecordIOError, match="exists; pass --force"):
        shuffle_rec(grouped, tmp_path / "s")
    shuffle_rec(grouped, tmp_path / "s", seed=3, force=True)
    shutil.copytree(grouped, tmp_path / "bad")
    offset = InsightFaceRec(tmp_path / "bad").reader.offset(5)
    data = bytearray((tmp_path / "bad" / "train.rec").read_bytes())
    data[offset:offset + 4] = b"RIFF"
    (tmp_path / "bad" / "train.rec").write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=r"bad/train\.rec: key 5 at offset \d+: wrong magic"):
        shuffle_rec(tmp_path / "bad", tmp_path / "s2")
    assert not (tmp_path / "s2" / "train.rec").exists()


# ---------------------------------------------------------------------------------------------------- inspect
def test_inspect_reports_a_sound_rec(grouped, capsys):
    report = inspect_tool.inspect_rec(grouped, decode=True)
    assert report["ok"] and report["header"] and report["images"] == 12 and report["other_records"] == 4
    assert report["labels"] == {"min": 0, "max": 3, "distinct": 4,
                                "images_per_identity": {"min": 3, "median": 3.0, "max": 3}}
    assert report["order"].startswith("grouped by identity") and report["undecodable_records"] == 0
    assert report["classes_without_images"] == 0
    assert inspect_tool.main([str(grouped), "--workers", "0"]) == 0
    assert "OK" in capsys.readouterr().out
    assert inspect_tool.main([str(grouped), "--json", "--decode", "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 12


def test_inspect_finds_damaged_and_undecodable_records(grouped, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(grouped, bad)
    rec = InsightFaceRec(bad)
    data = bytearray((bad / "train.rec").read_bytes())
    o2, o4, o9 = (rec.reader.offset(k) for k in (2, 4, 9))
    data[o2 + 32: o2 + 36] = b"\0\0\0\0"  # key 2: not an image
    data[o4 + 8 + 24 + 150: o4 + 8 + 24 + 400] = bytes(250)  # key 4: a JPEG with its data destroyed
    data[o9 + 12: o9 + 16] = np.float32(7).tobytes()  # key 9: label 7, property says 4 classes
    (bad / "train.rec").write_bytes(bytes(data))
    (bad / "property").write_text(f"4,{H},{W - 2}")  # and every image is 2 pixels wider than property says
    report = inspect_tool.inspect_rec(bad, decode=True, workers=2, max_problems=50)
    assert not report["ok"] and report["damaged_records"] == 2
    problems = {p["key"]: p["problem"] for p in report["problems"] if "offset" in p}
    assert problems[2].startswith("not an image record") and "label 7 is out of range" in problems[9]
    decoded = [p for p in report["problems"] if "offset" not in p]
    assert report["undecodable_records"] == len(decoded) == 10  # the 10 sound records: all the wrong size ...
    assert "undecodable image" in next(p["problem"] for p in decoded if p["key"] == 4)  # ... or undecodable
    assert {p["key"] for p in decoded} == set(range(1, 13)) - {2, 9}
    assert inspect_tool.main([str(bad), "--workers", "0"]) == 1
    assert "key 2 at offset" in capsys.readouterr().out


def test_inspect_exit_status_2_when_the_files_cannot_be_opened(grouped, tmp_path, capsys):
    shutil.copytree(grouped, tmp_path / "bad")
    size = (tmp_path / "bad" / "train.rec").stat().st_size
    (tmp_path / "bad" / "train.idx").write_text(f"0\t0\n1\t{size + 8}\n")
    assert inspect_tool.main([str(tmp_path / "bad")]) == 2
    assert "key 1 has offset" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- CLIs, a user's path
@pytest.mark.parametrize("tool", ["pack", "shuffle", "inspect"])
def test_cli_help(tool):
    out = subprocess.run([sys.executable, "-m", f"data.tools.{tool}", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and f"python -m data.tools.{tool}" in out.stdout


def test_pack_shuffle_inspect_then_train_with_dali(tree, tmp_path, capsys):
    """The README path: pack the folder tree, shuffle the rec, verify it, read it with the DALI loader."""
    assert pack_tool.main([str(tree), str(tmp_path / "set"), "--size", f"{H}x{W}", "--workers", "2"]) == 0
    assert shuffle_tool.main([str(tmp_path / "set"), str(tmp_path / "shuffled"), "--seed", "7"]) == 0
    assert inspect_tool.main([str(tmp_path / "shuffled"), "--decode", "--workers", "0"]) == 0
    assert "12 images" in capsys.readouterr().out
    prep = prepare_rec(tmp_path / "shuffled", cache_dir=tmp_path / "cache")
    assert not looks_grouped(prep.labels) and looks_grouped(prepare_rec(tmp_path / "set", tmp_path / "cache").labels)
    data = build_loader("dali", tmp_path / "shuffled", 3, 0, 2, 0, torch.device("cpu"), num_workers=1,
                        cache_dir=tmp_path / "cache", shuffle=False, flip=False)
    labels = torch.cat([y for _, y in data]).tolist()
    assert labels == prep.labels[:6].tolist()  # rank 0, epoch 0: the first half of the file, in order


def test_tools_on_a_rec_written_by_the_library(tmp_path):
    """A header-less rec whose labels reach property's num_classes - 1 exactly: inspect and shuffle agree."""
    jpegs = []
    for c in range(3):
        buf = io.BytesIO()
        Image.fromarray(picture(c, 0)).save(buf, format="JPEG")
        jpegs.append((c, buf.getvalue()))
    write_insightface_rec(tmp_path / "r", jpegs, 3, (H, W), with_header=False)
    assert inspect_tool.inspect_rec(tmp_path / "r")["labels"]["max"] == 2
    assert shuffle_rec(tmp_path / "r", tmp_path / "s")["classes"] == 3


def test_inspect_counts_the_classes_of_property_without_an_image(grouped, tmp_path, capsys):
    shutil.copytree(grouped, tmp_path / "more")
    (tmp_path / "more" / "property").write_text(f"10,{H},{W}")  # the 12 images use labels 0..3
    report = inspect_tool.inspect_rec(tmp_path / "more")
    assert report["ok"] and report["classes_without_images"] == 6
    assert inspect_tool.main([str(tmp_path / "more"), "--workers", "0"]) == 0
    assert "classes     6 of property's 10 have no image: the head allocates centres for them that never see a " \
           "positive" in capsys.readouterr().out

"""RecordIO / InsightFace rec: golden files written by real mxnet 1.9.1 (scripts/make_golden_recordio.py), round
trips, and clear errors on really damaged files."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.recordio import (
    MAGIC,
    InsightFaceRec,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    encode_record,
    pack,
    unpack,
    write_insightface_rec,
)

GOLDEN = Path(__file__).parent / "data" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
MAGIC_BYTES = struct.pack("<I", MAGIC)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def jpeg(label: int, size: tuple[int, int] = (112, 112)) -> bytes:
    h, w = size
    img = Image.new("RGB", (w, h), (20 * label % 256, 100, 200 - 10 * label % 200))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def edge_payloads() -> list[tuple[int, bytes]]:
    """(key, payload) of the golden edge file, payloads read by our reader and checked against mxnet's sha256."""
    reader = RecordIOReader(GOLDEN / "edge.rec", GOLDEN / "edge.idx")
    out = []
    for e in MANIFEST["edge"]["records"]:
        payload = reader.read_idx(e["key"])
        assert sha(payload) == e["payload_sha256"], e["name"]
        out.append((e["key"], payload))
    return out


# ---------------------------------------------------------------------------------------------------- golden: bytes
def test_golden_edge_file_exercises_every_cflag():
    """Walk edge.rec part by part (independently of the reader): mxnet split records into first/middle/last parts."""
    data = (GOLDEN / "edge.rec").read_bytes()
    flags, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + ((lrec & (2**29 - 1)) + 3) // 4 * 4
    assert pos == len(data)
    assert set(flags) == {0, 1, 2, 3}


def test_reader_reads_mxnet_records_byte_exact():
    reader = RecordIOReader(GOLDEN / "edge.rec", GOLDEN / "edge.idx")
    records = MANIFEST["edge"]["records"]
    assert reader.keys.tolist() == [e["key"] for e in records]  # file order, keys not sorted
    assert len(reader) == len(records)
    for e in records:
        assert reader.offset(e["key"]) == e["offset"]
        payload = reader.read_idx(e["key"])
        assert len(payload) == e["payload_len"], e["name"]
        assert sha(payload) == e["payload_sha256"], e["name"]
        if "payload_hex" in e:
            assert payload.hex() == e["payload_hex"], e["name"]


def test_writer_reproduces_mxnet_rec_and_idx_byte_for_byte(tmp_path):
    items = edge_payloads()
    with RecordIOWriter(tmp_path / "e.rec", tmp_path / "e.idx") as w:
        for key, payload in items:
            w.write_idx(key, payload)
    assert (tmp_path / "e.rec").read_bytes() == (GOLDEN / "edge.rec").read_bytes()
    assert (tmp_path / "e.idx").read_bytes() == (GOLDEN / "edge.idx").read_bytes()
    # and record by record, so a failure names the case
    golden = (GOLDEN / "edge.rec").read_bytes()
    bounds = [e["offset"] for e in MANIFEST["edge"]["records"]] + [len(golden)]
    for (e, (_, payload)), start, end in zip(zip(MANIFEST["edge"]["records"], items), bounds, bounds[1:]):
        assert encode_record(payload) == golden[start:end], e["name"]


def test_writer_without_index_writes_same_records(tmp_path):
    items = edge_payloads()
    with RecordIOWriter(tmp_path / "plain.rec") as w:
        offsets = [w.write(p) for _, p in items]
        with pytest.raises(RecordIOError, match="needs an idx_path"):
            w.write_idx(0, b"x")
    assert (tmp_path / "plain.rec").read_bytes() == (GOLDEN / "edge.rec").read_bytes()
    assert offsets == [e["offset"] for e in MANIFEST["edge"]["records"]]


# ---------------------------------------------------------------------------------------------------- golden: pack
@pytest.mark.parametrize("case", MANIFEST["pack_cases"], ids=lambda c: c["packed_hex"][:16])
def test_pack_and_unpack_match_mxnet(case):
    h = case["header"]
    packed = pack(IRHeader(h["flag"], h["label"], h["id"], h["id2"]), bytes.fromhex(case["payload_hex"]))
    assert packed.hex() == case["packed_hex"]
    header, rest = unpack(packed)
    want = case["unpacked"]
    assert (header.flag, header.id, header.id2) == (want["flag"], want["id"], want["id2"])
    if want["flag"] > 0:
        assert isinstance(header.label, np.ndarray) and header.label.dtype == np.float32
        assert header.label.tolist() == want["label"]
    else:
        assert float(header.label) == want["label"]
    assert rest.hex() == case["unpacked_rest_hex"]


def test_unpack_split_packed_records_from_mxnet():
    """IRHeader packs whose id / label bytes are the magic word were split by mxnet; we rejoin and unpack them."""
    reader = RecordIOReader(GOLDEN / "edge.rec", GOLDEN / "edge.idx")
    packed = [e for e in MANIFEST["edge"]["records"] if "header" in e]
    assert {e["name"] for e in packed} == {"pack_id_is_magic", "pack_vector_label", "pack_label_magic_bits"}
    for e in packed:
        header, image = unpack(reader.read_idx(e["key"]))
        assert header.flag == e["header"]["flag"] and header.id == e["header"]["id"]
        assert header.id2 == e["header"]["id2"]
        label = header.label.tolist() if header.flag else float(header.label)
        assert label == e["header"]["label"]
        assert sha(image) == e["image_sha256"]
    assert pack(IRHeader(0, 7, MAGIC, 3), b"x")[8:12] == MAGIC_BYTES  # the split really is inside the header


# --------------------------------------------------------------------------------------------- golden: InsightFace
def test_insightface_golden_read():
    m = MANIFEST["insightface"]
    rec = InsightFaceRec(GOLDEN / "insightface")
    assert len(rec) == m["num_images"] == 8
    assert rec.image_keys.dtype == np.int64 and rec.image_keys.tolist() == list(range(1, 9))
    assert rec.num_classes == m["num_classes"] and rec.image_size == (112, 112)
    assert rec.header is not None and rec.header.label.tolist() == [9.0, 12.0]
    by_key = {e["key"]: e for e in m["records"]}
    for i in range(len(rec)):
        label, image = rec.read(i)
        assert type(label) is int and label == m["labels"][i]
        assert sha(image) == by_key[i + 1]["image_sha256"]
        assert rec.read_label(i) == label
        with Image.open(io.BytesIO(image)) as im:
            assert im.size == (112, 112)
    with pytest.raises(IndexError):
        rec.read(8)


def test_write_insightface_rec_reproduces_golden_bytes(tmp_path):
    src = InsightFaceRec(GOLDEN / "insightface")
    summary = write_insightface_rec(tmp_path, (src.read(i) for i in range(len(src))), num_classes=3)
    assert (summary.num_images, summary.num_classes, summary.num_identities) == (8, 3, 3)
    for name in ("train.rec", "train.idx"):
        assert (tmp_path / name).read_bytes() == (GOLDEN / "insightface" / name).read_bytes(), name
    assert (tmp_path / "property").read_text().strip() == (GOLDEN / "insightface" / "property").read_text().strip()
    assert not list(tmp_path.glob("*.partial"))


def test_noheader_golden_read_and_rewrite(tmp_path):
    m = MANIFEST["noheader"]
    rec = InsightFaceRec(GOLDEN / "noheader")
    assert rec.header is None and rec.property is None
    assert rec.image_keys.tolist() == [0, 1, 2, 3, 4]
    assert [rec.read(i)[0] for i in range(len(rec))] == m["labels"]
    assert rec.num_classes == 3  # max label + 1, no property file
    assert rec.image_size == (64, 48)  # (h, w) of the first image
    summary = write_insightface_rec(tmp_path, (rec.read(i) for i in range(len(rec))), 3, (64, 48), with_header=False)
    assert summary.num_images == 5 and summary.num_identities == 3
    for name in ("train.rec", "train.idx"):
        assert (tmp_path / name).read_bytes() == (GOLDEN / "noheader" / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------- round trips
def test_random_payloads_with_magic_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    payloads = []
    for n in range(60):
        words = rng.integers(0, 2**32, size=n % 17, dtype=np.uint64).astype("<u4")
        words[rng.random(words.size) < 0.4] = MAGIC
        payloads.append(words.tobytes() + bytes(rng.integers(0, 256, n % 4, dtype=np.uint8)))
    with RecordIOWriter(tmp_path / "r.rec", tmp_path / "r.idx") as w:
        for key, p in enumerate(payloads):
            w.write_idx(1000 - key, p)
    reader = RecordIOReader(tmp_path / "r.rec", tmp_path / "r.idx")
    for key, p in enumerate(payloads):
        assert reader.read_idx(1000 - key) == p
    assert (tmp_path / "r.rec").stat().st_size % 4 == 0


def naive_encode(payload: bytes) -> bytes:
    """dmlc's rule written plainly: cut at every aligned word equal to the magic."""
    n, out, start = len(payload), b"", 0
    for i in range(0, n - n % 4, 4):
        if payload[i:i + 4] == MAGIC_BYTES:
            out += struct.pack("<II", MAGIC, ((1 if start == 0 else 2) << 29) | (i - start)) + payload[start:i]
            start = i + 4
    out += struct.pack("<II", MAGIC, ((3 if start else 0) << 29) | (n - start)) + payload[start:]
    return out + b"\0" * (-n % 4)


def test_encode_record_matches_plain_rule_on_random_payloads():
    rng = np.random.default_rng(2)
    for _ in range(300):
        payload = bytearray(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes())
        for pos in rng.integers(0, max(len(payload) - 3, 1), int(rng.integers(0, 6))):  # aligned or not
            payload[pos:pos + 4] = MAGIC_BYTES
        assert encode_record(bytes(payload)) == naive_encode(bytes(payload)), bytes(payload).hex()


def test_write_insightface_with_header_layout(tmp_path):
    labels = [4, 4, 0, 2, 2, 2]
    summary = write_insightface_rec(tmp_path, ((lab, jpeg(lab)) for lab in labels), num_classes=5)
    assert (summary.num_images, summary.num_classes, summary.num_identities) == (6, 5, 3)
    rec = InsightFaceRec(tmp_path)
    assert rec.num_classes == 5 and rec.image_size == (112, 112) and len(rec) == 6
    assert [rec.read(i)[0] for i in range(6)] == labels
    reader = rec.reader
    assert reader.keys.tolist() == list(range(10))  # header, 6 images, 3 identity ranges
    ranges = [unpack(reader.read_idx(k))[0].label.tolist() for k in (7, 8, 9)]
    assert ranges == [[1.0, 3.0], [3.0, 4.0], [4.0, 7.0]]
    assert rec.header.label.tolist() == [7.0, 10.0]


def test_reader_is_picklable_and_reopens_after_fork():
    reader = RecordIOReader(GOLDEN / "edge.rec", GOLDEN / "edge.idx")
    first = reader.read_idx(17)  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_idx(17) == first and clone._file is not reader._file
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_read_all_in_child, args=(reader, q))
    child.start()
    expected = {e["key"]: e["payload_sha256"] for e in MANIFEST["edge"]["records"]}
    for _ in range(200):  # read in the parent while the child reads too: positions must not interfere
        for key, digest in expected.items():
            assert sha(reader.read_idx(key)) == digest
    result = q.get(timeout=60)
    child.join(timeout=60)
    assert result == "ok", result


def _read_all_in_child(reader: RecordIOReader, q) -> None:
    try:
        inherited = reader._file
        assert reader._handle() is not inherited, "handle not reopened after fork"
        for _ in range(200):
            for e in MANIFEST["edge"]["records"]:
                assert sha(reader.read_idx(e["key"])) == e["payload_sha256"], e["name"]
        q.put("ok")
    except Exception as exc:  # report to the parent instead of dying silently
        q.put(repr(exc))


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def rec_dir(tmp_path) -> Path:
    """A fresh copy of the golden InsightFace rec to damage."""
    d = tmp_path / "rec"
    shutil.copytree(GOLDEN / "insightface", d)
    return d


def test_truncated_rec(rec_dir, tmp_path):
    # InsightFace layout: records after the cut (identity ranges) are caught when the index is opened
    rec_path = rec_dir / "train.rec"
    offset8 = next(e["offset"] for e in MANIFEST["insightface"]["records"] if e["key"] == 8)
    rec_path.write_bytes(rec_path.read_bytes()[:offset8 + 100])  # cut inside image key 8
    with pytest.raises(RecordIOError, match=r"train\.idx: key 9 has offset \d+, past the end of .*train\.rec"):
        InsightFaceRec(rec_dir)
    # no header: the last image is the last record, so the cut is found when it is read
    d = tmp_path / "noheader"
    shutil.copytree(GOLDEN / "noheader", d)
    offset4 = next(e["offset"] for e in MANIFEST["noheader"]["records"] if e["key"] == 4)
    data = (d / "train.rec").read_bytes()
    (d / "train.rec").write_bytes(data[:offset4 + 100])
    rec = InsightFaceRec(d)
    rec.read(3)  # earlier records still fine
    with pytest.raises(RecordIOError, match=rf"train\.rec: key 4 at offset {offset4}: truncated record, part at"):
        rec.read(4)
    (d / "train.rec").write_bytes(data[:offset4 + 4])  # cut inside the part header
    with pytest.raises(RecordIOError, match=rf"key 4 at offset {offset4}: truncated record, part header"):
        InsightFaceRec(d).read(4)


def test_wrong_magic(rec_dir):
    rec_path = rec_dir / "train.rec"
    offset3 = next(e["offset"] for e in MANIFEST["insightface"]["records"] if e["key"] == 3)
    data = bytearray(rec_path.read_bytes())
    data[offset3] ^= 0xFF
    rec_path.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"train\.rec: key 3 at offset {offset3}: wrong magic 0xCED723F5"):
        InsightFaceRec(rec_dir).read(2)


def test_idx_offset_past_end_of_file(rec_dir):
    idx = rec_dir / "train.idx"
    size = (rec_dir / "train.rec").stat().st_size
    lines = idx.read_text().splitlines()
    assert lines[5].startswith("5\t")
    lines[5] = f"5\t{size + 4}"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=rf"train\.idx: key 5 has offset {size + 4}, past the end of .*train\.rec "
                                            rf"\({size} bytes\)"):
        InsightFaceRec(rec_dir)


def test_malformed_idx_lines(tmp_path):
    (tmp_path / "a.rec").write_bytes(encode_record(b"abcd"))
    for text, line, shown in [("0\t0\n1 x\n", 2, "1 x"), ("0\t0\t4\n", 1, r"0\\t0\\t4"), ("0\t-8\n", 1, r"0\\t-8")]:
        (tmp_path / "a.idx").write_text(text)
        with pytest.raises(RecordIOError, match=rf"a\.idx: line {line} is '{shown}', expected 'key<TAB>offset'"):
            RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    (tmp_path / "a.idx").write_text("0\t0\n\n3\t0\n0\t0\n")
    with pytest.raises(RecordIOError, match=r"a\.idx: key 0 appears twice \(lines 1 and 4\)"):
        RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    (tmp_path / "a.idx").write_text("0\t0\n")
    reader = RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    with pytest.raises(RecordIOError, match=r"a\.idx: unknown key 7"):
        reader.read_idx(7)
    with pytest.raises(RecordIOError, match=r"missing\.idx: index file not found"):
        RecordIOReader(tmp_path / "a.rec", tmp_path / "missing.idx")


def test_label_out_of_range_for_property(rec_dir):
    (rec_dir / "property").write_text("2,112,112")
    rec = InsightFaceRec(rec_dir)
    assert rec.read(4)[0] == 1
    with pytest.raises(RecordIOError, match=r"train\.rec: key 6 at offset \d+: label 2 is out of range, property "
                                            r"says num_classes=2"):
        rec.read(5)


def test_bad_labels_in_file(tmp_path):
    image = jpeg(0)
    for label, message in [(1.5, "label 1.5 is not an integer"), (-1.0, "label -1 is negative"),
                           (float("nan"), "label nan is not an integer")]:
        with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
            w.write_idx(0, pack(IRHeader(0, 0.0, 0, 0), image))
            w.write_idx(1, pack(IRHeader(0, label, 1, 0), image))
        rec = InsightFaceRec(tmp_path)  # no header: record 0 has flag 0
        assert rec.read(0)[0] == 0
        with pytest.raises(RecordIOError, match=rf"train\.rec: key 1 at offset \d+: {message}"):
            rec.read(1)


def test_header_record_read_as_image(rec_dir):
    """A damaged idx sends image key 1 to offset 0, where the header record lives."""
    idx = rec_dir / "train.idx"
    lines = idx.read_text().splitlines()
    assert lines[1].startswith("1\t")
    lines[1] = "1\t0"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"key 1 at offset 0: not an image record \(flag=2, label=\[9\.0, 12\.0\], "
                                            r"payload of 0 bytes"):
        InsightFaceRec(rec_dir).read(0)


def test_identity_range_record_read_as_image(tmp_path):
    """A header claiming one image too many makes the first identity-range record an 'image'."""
    labels = [0, 0, 1]
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [5.0, 7.0], 0, 0), b""))  # wrong: 3 images, so it should say 4
        for key, lab in enumerate(labels, start=1):
            w.write_idx(key, pack(IRHeader(0, float(lab), key, 0), jpeg(lab)))
        w.write_idx(4, pack(IRHeader(2, [1.0, 3.0], 4, 0), b""))
        w.write_idx(5, pack(IRHeader(2, [3.0, 4.0], 5, 0), b""))
    rec = InsightFaceRec(tmp_path)
    assert len(rec) == 4
    with pytest.raises(RecordIOError, match=r"key 4 at offset \d+: not an image record \(flag=2, label=\[1\.0, 3\.0\]"):
        rec.read(3)


def test_header_claims_missing_keys(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [4.0, 5.0], 0, 0), b""))
        w.write_idx(1, pack(IRHeader(0, 0.0, 1, 0), jpeg(0)))
        w.write_idx(7, pack(IRHeader(0, 0.0, 7, 0), jpeg(0)))
        w.write_idx(8, pack(IRHeader(0, 0.0, 8, 0), jpeg(0)))
    with pytest.raises(RecordIOError, match=r"header record 0 says images are keys 1\.\.3, but 2 of them are missing "
                                            r"from .*train\.idx \(first: 2\)"):
        InsightFaceRec(tmp_path)
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [1e9, 1e9 + 1], 0, 0), b""))  # absurd count: no 8 GB key array
    with pytest.raises(RecordIOError, match=r"images are keys 1\.\.999999999, but .*train\.idx has only 1 records"):
        InsightFaceRec(tmp_path)


def test_bad_property_and_missing_files(rec_dir, tmp_path):
    (rec_dir / "property").write_text("3,112")
    with pytest.raises(RecordIOError, match=r"property: content is '3,112', expected 'num_classes,height,width'"):
        InsightFaceRec(rec_dir)
    with pytest.raises(RecordIOError, match=r"train\.rec: record file not found"):
        InsightFaceRec(tmp_path / "nowhere")


def test_write_insightface_rec_rejects_bad_samples(tmp_path):
    def write(samples, **kw):
        return write_insightface_rec(tmp_path / "out", samples, num_classes=3, **kw)

    with pytest.raises(RecordIOError, match=r"sample 3 \(label 0\): label 0 appears again after other labels"):
        write([(0, jpeg(0)), (0, jpeg(0)), (1, jpeg(1)), (0, jpeg(0))])
    assert not (tmp_path / "out" / "train.rec").exists() and not list((tmp_path / "out").iterdir())
    with pytest.raises(RecordIOError, match=r"sample 1 \(label 3\): label must be in 0\.\.2"):
        write([(0, jpeg(0)), (3, jpeg(0))])
    with pytest.raises(RecordIOError, match=r"sample 0 \(label 1\): payload is not an encoded image"):
        write([(1, b"not a picture")])
    with pytest.raises(RecordIOError, match=r"sample 0 \(label 1\.0\): label must be an integer"):
        write([(1.0, jpeg(1))])
    with pytest.raises(RecordIOError, match=r"no samples to write"):
        write([])
    assert not list((tmp_path / "out").iterdir())
    # without header any order is fine
    assert write([(0, jpeg(0)), (1, jpeg(1)), (0, jpeg(0))], with_header=False).num_images == 3


def test_reader_rejects_bad_part_sequence(tmp_path):
    """A record whose first part claims to be a middle part (cflag 2) is corrupt."""
    data = bytearray(encode_record(b"abcd" + MAGIC_BYTES + b"efgh"))
    struct.pack_into("<I", data, 4, (2 << 29) | 4)
    (tmp_path / "c.rec").write_bytes(bytes(data))
    (tmp_path / "c.idx").write_text("0\t0\n")
    with pytest.raises(RecordIOError, match=r"c\.rec: key 0 at offset 0: part at byte 0 has cflag 2, expected one of"):
        RecordIOReader(tmp_path / "c.rec", tmp_path / "c.idx").read_idx(0)

"""Write the RecordIO golden files under tests/data/golden/ with the real mxnet.recordio (run once, by hand).

mxnet is not a dependency of this project (it imports only with numpy <= 1.23.5). Run this script in a throwaway
venv outside the repository::

    python3.11 -m venv /tmp/mxvenv
    /tmp/mxvenv/bin/pip install numpy==1.23.5 mxnet==1.9.1 opencv-python-headless==4.11.0.86
    /tmp/mxvenv/bin/python scripts/make_golden_recordio.py          # from the repository root

It writes three record sets and ``manifest.json`` describing every key (offset, IRHeader fields, sha256 of the
payload handed to mxnet, sha256 of the image bytes, small payloads in hex):

- ``insightface/``: InsightFace layout as face2rec-style tools write it. Record 0 = IRHeader(2, [N+1, N+1+ids], 0, 0);
  8 JPEG images of 3 identities at keys 1..8 (IRHeader(0, label, key, 0), ``mx.recordio.pack_img``); one
  identity-range record per identity (IRHeader(2, [first, last+1], key, 0), empty image); ``property``.
- ``noheader/``: 5 JPEG images at keys 0..4, labels out of order, flag 0 everywhere, no ``property``; 64x48 images.
- ``edge.rec`` / ``edge.idx``: raw payloads chosen to hit every branch of dmlc's record splitting (magic word at
  aligned positions: first / middle / last parts, empty parts, consecutive magics, magic at an unaligned position,
  lengths 0..3 mod 4), written under non-sorted keys, plus IRHeader packs with vector labels and id = magic.

The manifest also lists ``pack_cases``: mxnet.recordio.pack outputs for scalar / vector / empty labels.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np

MAGIC = struct.pack("<I", 0xCED7230A)
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def face(identity: int, variant: int, height: int, width: int) -> np.ndarray:
    """A small deterministic BGR picture: identity sets the colours and shape, variant shifts it."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    img[..., 0] = 60 + 120 * x / width + 40 * identity
    img[..., 1] = 40 + 150 * y / height
    img[..., 2] = 200 - 60 * identity
    cy, cx = height / 2 + 4 * variant, width / 2 - 3 * variant
    r = min(height, width) / (3 + identity)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = (30 + 70 * identity, 220 - 50 * variant, 90)
    return np.clip(img, 0, 255).astype(np.uint8)


def header_json(h) -> dict:
    label = h.label.tolist() if isinstance(h.label, np.ndarray) else float(h.label)
    return {"flag": int(h.flag), "label": label, "id": int(h.id), "id2": int(h.id2)}


def write_indexed(rec_dir: Path, name: str, items: list[tuple[int, bytes]]) -> list[dict]:
    """Write (key, payload) with MXIndexedRecordIO, read everything back with mxnet, return per-key entries."""
    rec, idx = rec_dir / f"{name}.rec", rec_dir / f"{name}.idx"
    w = mx.recordio.MXIndexedRecordIO(str(idx), str(rec), "w")
    for key, payload in items:
        w.write_idx(key, payload)
    w.close()
    r = mx.recordio.MXIndexedRecordIO(str(idx), str(rec), "r")
    entries = []
    for key, payload in items:
        back = r.read_idx(key)
        assert back == payload, f"mxnet read-back differs for key {key}"
        entries.append({"key": key, "offset": r.idx[key], "payload_len": len(payload), "payload_sha256": sha(payload)})
        if len(payload) <= 256:
            entries[-1]["payload_hex"] = payload.hex()
    r.close()
    return entries


def add_unpacked(entries: list[dict]) -> None:
    """Add mxnet.recordio.unpack's view (header fields, image sha256) to entries that hold IRHeader payloads."""
    for e in entries:
        payload = e.pop("_payload")
        h, img = mx.recordio.unpack(payload)
        e["header"] = header_json(h)
        e["image_len"] = len(img)
        e["image_sha256"] = sha(img)


def insightface_set(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    n = len(labels)
    ids = sorted(set(labels))
    items, ranges = [], []
    items.append((0, mx.recordio.pack(mx.recordio.IRHeader(2, [n + 1, n + 1 + len(ids)], 0, 0), b"")))
    for key, label in enumerate(labels, start=1):
        img = face(label, key, 112, 112)
        items.append((key, mx.recordio.pack_img(mx.recordio.IRHeader(0, label, key, 0), img, quality=90,
                                                img_fmt=".jpg")))
    for label in ids:
        keys = [k for k, lab in enumerate(labels, start=1) if lab == label]
        ranges.append((keys[0], keys[-1] + 1))
    for i, (start, end) in enumerate(ranges):
        key = n + 1 + i
        items.append((key, mx.recordio.pack(mx.recordio.IRHeader(2, [start, end], key, 0), b"")))
    entries = write_indexed(root, "train", items)
    for e, (_, payload) in zip(entries, items):
        e["_payload"] = payload
    add_unpacked(entries)
    (root / "property").write_text(f"{len(ids)},112,112")
    return {"num_images": n, "num_classes": len(ids), "image_size": [112, 112], "labels": labels,
            "identity_ranges": ranges, "records": entries}


def noheader_set(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    labels = [2, 0, 1, 0, 2]
    items = [(key, mx.recordio.pack_img(mx.recordio.IRHeader(0, label, key, 0), face(label, key, 64, 48),
                                        quality=90, img_fmt=".jpg")) for key, label in enumerate(labels)]
    entries = write_indexed(root, "train", items)
    for e, (_, payload) in zip(entries, items):
        e["_payload"] = payload
    add_unpacked(entries)
    return {"num_images": len(labels), "num_classes": 3, "image_size": [64, 48], "labels": labels,
            "records": entries}


def edge_set(root: Path) -> dict:
    rng = np.random.default_rng(0)
    noise = bytes(rng.integers(0, 256, 301, dtype=np.uint8))
    jpeg = cv2.imencode(".jpg", face(1, 0, 16, 16), [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    raw = [
        ("empty", b""),
        ("len1", b"a"),
        ("len2", b"ab"),
        ("len3", b"abc"),
        ("len4", b"abcd"),
        ("magic_only", MAGIC),
        ("magic_first", MAGIC + b"xyz"),
        ("magic_last", b"1234" + MAGIC),
        ("magic_x3", MAGIC * 3),
        ("magic_unaligned", b"ab" + MAGIC + b"cd"),
        ("magic_tail_unaligned", b"abcde" + MAGIC[:3]),
        ("first_middle_last", b"abcd" + MAGIC + b"efgh" + MAGIC + b"ij"),
        ("noise_with_magics", noise[:40] + MAGIC + noise[40:101] + b"\0\0\0" + MAGIC + noise[101:]),
    ]
    packed = [
        ("pack_id_is_magic", mx.recordio.pack(mx.recordio.IRHeader(0, 7, 0xCED7230A, 3), jpeg)),
        ("pack_vector_label", mx.recordio.pack(mx.recordio.IRHeader(0, [1.5, -2.0, 3.25], 11, 12), jpeg)),
        ("pack_label_magic_bits", mx.recordio.pack(
            mx.recordio.IRHeader(0, [np.frombuffer(MAGIC, np.float32)[0], 4.0], 1, 2), b"tail")),
    ]
    keys = [17, 3, 42, 0, 8, 5, 99, 12, 1, 64, 7, 23, 31, 2, 50, 9]
    items = [(k, p) for k, (_, p) in zip(keys, raw + packed)]
    entries = write_indexed(root, "edge", items)
    for e, (name, payload) in zip(entries, raw + packed):
        e["name"] = name
        if name.startswith("pack_"):
            e["_payload"] = payload
    add_unpacked([e for e in entries if "_payload" in e])
    return {"records": entries}


def pack_cases() -> list[dict]:
    cases = [
        (mx.recordio.IRHeader(0, 3.0, 7, 0), b"xy"),
        (mx.recordio.IRHeader(5, 3, 7, 1), b"image"),  # scalar label forces flag 0
        (mx.recordio.IRHeader(0, np.float32(0.5), 2**40, 2**63), b""),
        (mx.recordio.IRHeader(0, [1.0, 2.5], 1, 2), b"abc"),
        (mx.recordio.IRHeader(9, np.array([4.0], np.float32), 0, 0), b"z"),  # flag = len(label)
        (mx.recordio.IRHeader(0, [], 0, 0), b"q"),  # empty label vector -> flag 0, label 0
    ]
    out = []
    for h, payload in cases:
        label = h.label.tolist() if isinstance(h.label, np.ndarray) else h.label
        label = [float(v) for v in label] if isinstance(label, list) else float(label)
        packed = mx.recordio.pack(h, payload)
        uh, rest = mx.recordio.unpack(packed)
        out.append({"header": {"flag": int(h.flag), "label": label, "id": int(h.id), "id2": int(h.id2),
                               "label_is_vector": not isinstance(h.label, (int, float, np.floating))},
                    "payload_hex": payload.hex(), "packed_hex": packed.hex(),
                    "unpacked": header_json(uh), "unpacked_rest_hex": rest.hex()})
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {
        "generator": "scripts/make_golden_recordio.py",
        "versions": {"mxnet": mx.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
                     "python": sys.version.split()[0]},
        "insightface": insightface_set(OUT / "insightface"),
        "noheader": noheader_set(OUT / "noheader"),
        "edge": edge_set(OUT),
        "pack_cases": pack_cases(),
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()

"""RecordIO files as written by mxnet / dmlc-core, and InsightFace's train.rec layout on top of them.

Byte format (dmlc-core ``recordio.cc``), all integers little-endian uint32::

    record  = part+                    a payload is stored as one or more parts
    part    = MAGIC  lrec  data  pad   lrec = (cflag << 29) | len(data);  pad = zero bytes up to a 4-byte boundary
    MAGIC   = 0xCED7230A

A payload that contains MAGIC at a 4-byte aligned position p is cut there: the four magic bytes are dropped and
re-inserted by the reader between parts. cflag says which part this is: 0 whole record, 1 first, 2 middle, 3 last.
Cut points are aligned, so only the last part can need padding.

Payload (mxnet ``recordio.pack``): struct ``IfQQ`` = (flag, label, id, id2), 24 bytes; when ``flag > 0`` the header
label is 0 and ``flag`` float32 labels follow; then the encoded image.

Index (``.idx``): one text line ``key\\toffset\\n`` per record, offset = byte position of the record's first part.

InsightFace layout (``train.rec`` + ``train.idx`` + optional ``property`` = "num_classes,height,width"): record 0 is a
header when its flag > 0, with label = [num_images + 1, num_images + 1 + num_identities]; images are keys
1 .. num_images; then one identity-range record per identity (label = [first_key, last_key + 1], empty payload).
"""
from __future__ import annotations

import io
import numbers
import operator
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, NamedTuple, Sequence

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_BITS = 29
_MAX_LEN = (1 << _LEN_BITS) - 1
_PART_HEAD = struct.Struct("<II")  # magic, lrec
_IR_STRUCT = struct.Struct("<IfQQ")  # flag, label, id, id2: mxnet's native 'IfQQ' on little-endian hosts, 24 bytes
_FLOAT32_EXACT = 1 << 24  # every integer below this is exact in float32

# cflag values
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3


class RecordIOError(ValueError):
    """A RecordIO / InsightFace file is malformed or does not hold what was expected."""


# --------------------------------------------------------------------------------------------------------------------
# Low level: one record <-> bytes
# --------------------------------------------------------------------------------------------------------------------
def _pad4(n: int) -> int:
    return (n + 3) & ~3


def encode_record(payload: bytes) -> bytes:
    """Return the exact bytes dmlc's RecordIOWriter writes for ``payload`` (parts, headers, padding)."""
    payload = bytes(payload)
    n = len(payload)
    if n > _MAX_LEN:
        raise RecordIOError(f"record payload of {n} bytes exceeds the RecordIO limit of {_MAX_LEN} bytes")
    out = bytearray()
    start = 0  # first byte of the part being built
    i = payload.find(_MAGIC_BYTES)
    while i >= 0:  # every occurrence; only those at aligned positions cut the payload
        if i % 4:
            i = payload.find(_MAGIC_BYTES, i + 1)
            continue
        cflag = FIRST if start == 0 else MIDDLE
        out += _PART_HEAD.pack(MAGIC, (cflag << _LEN_BITS) | (i - start))
        out += payload[start:i]
        start = i + 4
        i = payload.find(_MAGIC_BYTES, start)
    cflag = LAST if start != 0 else WHOLE
    out += _PART_HEAD.pack(MAGIC, (cflag << _LEN_BITS) | (n - start))
    out += payload[start:]
    out += b"\0" * (_pad4(n) - n)
    return bytes(out)


# --------------------------------------------------------------------------------------------------------------------
# Payload header (mxnet.recordio.IRHeader / pack / unpack)
# --------------------------------------------------------------------------------------------------------------------
class IRHeader(NamedTuple):
    """mxnet's image-record header. ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader | Sequence, payload: bytes) -> bytes:
    """Serialise ``header`` + ``payload`` exactly like ``mxnet.recordio.pack``.

    A scalar label forces flag = 0; a sequence label sets flag = len(label), stores 0 in the header's label field and
    prepends the labels as float32.
    """
    flag, label, id_, id2 = header
    if isinstance(label, numbers.Number):  # mxnet's test; numpy scalars count as numbers
        flag, extra = 0, b""
    else:
        labels = np.asarray(label, dtype=np.float32).ravel()
        flag, label, extra = labels.size, 0.0, labels.astype("<f4").tobytes()
    return _IR_STRUCT.pack(flag, label, id_, id2) + extra + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Inverse of :func:`pack`, like ``mxnet.recordio.unpack``: (header, rest of the payload)."""
    if len(record) < _IR_STRUCT.size:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_IR_STRUCT.size}-byte IRHeader")
    flag, label, id_, id2 = _IR_STRUCT.unpack_from(record)
    rest = record[_IR_STRUCT.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"IRHeader flag={flag} announces {flag} float32 labels but only {len(rest)} bytes "
                                "follow")
        label = np.frombuffer(rest, dtype="<f4", count=flag).astype(np.float32)
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), rest


# --------------------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------------------
class RecordIOWriter:
    """Write a .rec (and optionally a .idx) byte-identical to mxnet's MXRecordIO / MXIndexedRecordIO."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = None if idx_path is None else os.fspath(idx_path)
        self._rec: BinaryIO | None = open(self.rec_path, "wb")
        self._idx = None if self.idx_path is None else open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._pos = 0

    def tell(self) -> int:
        """Byte offset where the next record starts."""
        return self._pos

    def write(self, payload: bytes) -> int:
        """Append one record; return its offset."""
        if self._rec is None:
            raise RecordIOError(f"{self.rec_path}: writer is closed")
        data = encode_record(payload)
        offset = self._pos
        self._rec.write(data)
        self._pos += len(data)
        return offset

    def write_idx(self, key: int, payload: bytes) -> int:
        """Append one record and its ``key\\toffset`` line; return its offset."""
        if self._idx is None:
            raise RecordIOError(f"{self.rec_path}: write_idx needs an idx_path")
        key = _as_int(key, f"{self.rec_path}: record key")
        offset = self.write(payload)
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        for f in (self._rec, self._idx):
            if f is not None:
                f.close()
        self._rec = self._idx = None

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise RecordIOError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise RecordIOError(f"{what} must be an integer, got {value!r}") from None


# --------------------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------------------
class RecordIOReader:
    """Random access to an indexed .rec file.

    Keys and offsets live in int64 arrays (16 bytes per record, no per-key Python objects, so forked DataLoader
    workers share them without copy-on-write churn). The file handle is opened lazily and re-opened in every new
    process (checked by pid); pickling drops it.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path)
        if not os.path.isfile(self.rec_path):
            raise RecordIOError(f"{self.rec_path}: record file not found")
        self.file_size = os.path.getsize(self.rec_path)
        keys, offsets = _parse_idx(self.idx_path)
        bad = np.flatnonzero(offsets >= self.file_size)
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(f"{self.idx_path}: key {int(keys[i])} has offset {int(offsets[i])}, past the end of "
                                f"{self.rec_path} ({self.file_size} bytes)")
        self.keys = keys  # file order, like mxnet's MXIndexedRecordIO.keys
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        self._sorted_offsets = offsets[order]
        self._file: BinaryIO | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self.keys.size)

    def __contains__(self, key: int) -> bool:
        i = int(np.searchsorted(self._sorted_keys, key))
        return i < self._sorted_keys.size and int(self._sorted_keys[i]) == key

    def missing_keys(self, keys: np.ndarray) -> np.ndarray:
        """The entries of ``keys`` that are not in the index."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), max(self._sorted_keys.size - 1, 0))
        found = self._sorted_keys[pos] == keys if self._sorted_keys.size else np.zeros(keys.shape, bool)
        return keys[~found]

    def offset(self, key: int) -> int:
        """Byte offset of record ``key``."""
        i = int(np.searchsorted(self._sorted_keys, key))
        if i >= self._sorted_keys.size or int(self._sorted_keys[i]) != key:
            raise RecordIOError(f"{self.idx_path}: unknown key {key}")
        return int(self._sorted_offsets[i])

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Byte offsets of ``keys`` (int64 array), vectorised; every key must be in the index."""
        keys = np.asarray(keys, dtype=np.int64)
        missing = self.missing_keys(keys)
        if missing.size:
            raise RecordIOError(f"{self.idx_path}: unknown key {int(missing[0])}")
        return self._sorted_offsets[np.searchsorted(self._sorted_keys, keys)]

    def read_idx(self, key: int) -> bytes:
        """The payload of record ``key`` (parts re-joined with the magic word, padding removed)."""
        return self.read_at(self.offset(key), key)

    def read_at(self, offset: int, key: int | None = None) -> bytes:
        """The payload of the record starting at byte ``offset``."""
        f = self._handle()
        where = (f"{self.rec_path}: key {key} at offset {offset}" if key is not None
                 else f"{self.rec_path}: offset {offset}")
        parts = []
        pos = offset
        while True:
            if pos + _PART_HEAD.size > self.file_size:
                raise RecordIOError(f"{where}: truncated record, part header at byte {pos} runs past the end of the "
                                    f"file ({self.file_size} bytes)")
            f.seek(pos)
            magic, lrec = _PART_HEAD.unpack(f.read(_PART_HEAD.size))
            if magic != MAGIC:
                raise RecordIOError(f"{where}: wrong magic 0x{magic:08X} at byte {pos}, expected 0x{MAGIC:08X}")
            cflag, length = lrec >> _LEN_BITS, lrec & _MAX_LEN
            expected = (WHOLE, FIRST) if not parts else (MIDDLE, LAST)
            if cflag not in expected:
                raise RecordIOError(f"{where}: part at byte {pos} has cflag {cflag}, expected one of {expected}")
            end = pos + _PART_HEAD.size + _pad4(length)
            if end > self.file_size:
                raise RecordIOError(f"{where}: truncated record, part at byte {pos} needs {length} bytes up to byte "
                                    f"{end}, file has {self.file_size}")
            parts.append(f.read(length))
            pos = end
            if cflag in (WHOLE, LAST):
                return _MAGIC_BYTES.join(parts)

    def _handle(self) -> BinaryIO:
        if self._file is None or self._pid != os.getpid():
            # After a fork the inherited handle shares its file position with the parent: open our own.
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._pid = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = None
        return state


def _parse_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key\\toffset`` lines into (keys, offsets) int64 arrays in file order; blank lines are skipped."""
    if not os.path.isfile(idx_path):
        raise RecordIOError(f"{idx_path}: index file not found")
    keys, offsets, lines = array("q"), array("q"), array("q")
    with open(idx_path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            fields = raw.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
                if offset < 0:
                    raise ValueError
            except ValueError:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                raise RecordIOError(f"{idx_path}: line {line_no} is {text!r}, expected 'key<TAB>offset' with "
                                    f"integer key and non-negative integer offset") from None
            keys.append(key)
            offsets.append(offset)
            lines.append(line_no)
    keys_np = np.frombuffer(keys, dtype=np.int64).copy()
    order = np.argsort(keys_np, kind="stable")
    dup = np.flatnonzero(np.diff(keys_np[order]) == 0)
    if dup.size:
        a, b = order[dup[0]], order[dup[0] + 1]
        raise RecordIOError(f"{idx_path}: key {int(keys_np[a])} appears twice (lines {lines[a]} and {lines[b]})")
    return keys_np, np.frombuffer(offsets, dtype=np.int64).copy()


# --------------------------------------------------------------------------------------------------------------------
# InsightFace layer
# --------------------------------------------------------------------------------------------------------------------
_IMAGE_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
    b"GIF8": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def image_format(data: bytes) -> str | None:
    """Name of the encoded-image format ``data`` starts with, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _IMAGE_SIGNATURES.items():
        if data.startswith(signature):
            return name
    return None


def _read_property(path: Path) -> tuple[int, int, int]:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"{path}: content is {text!r}, expected 'num_classes,height,width' "
                            f"(three positive integers)") from None
    return values  # type: ignore[return-value]


def _class_label(value: float, where: str, num_classes: int | None) -> int:
    """A float32 label from the file as an int class index, with range checks."""
    v = float(value)
    if not np.isfinite(v) or v != np.floor(v):
        raise RecordIOError(f"{where}: label {v!r} is not an integer")
    if v < 0:
        raise RecordIOError(f"{where}: label {int(v)} is negative")
    if num_classes is not None and v >= num_classes:
        raise RecordIOError(f"{where}: label {int(v)} is out of range, property says num_classes={num_classes}")
    return int(v)


def _unpack_at(payload: bytes, where: str) -> tuple[IRHeader, bytes]:
    try:
        return unpack(payload)
    except RecordIOError as e:
        raise RecordIOError(f"{where}: {e}") from None


class InsightFaceRec:
    """An InsightFace training set: ``root/train.rec``, ``root/train.idx`` and optionally ``root/property``.

    ``image_keys`` holds the record keys of the images (header and identity-range records excluded);
    :meth:`read` returns (int64-valued label, encoded image bytes) by position in ``image_keys``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.reader = RecordIOReader(self.root / "train.rec", self.root / "train.idx")
        prop = self.root / "property"
        self.property: tuple[int, int, int] | None = _read_property(prop) if prop.is_file() else None
        self.header: IRHeader | None = None
        self.image_keys = self._find_image_keys()
        self._num_classes = self.property[0] if self.property else None
        self._image_size = tuple(self.property[1:]) if self.property else None

    def _find_image_keys(self) -> np.ndarray:
        if 0 not in self.reader:
            return self.reader.keys.copy()
        where = f"{self.reader.rec_path}: header record 0"
        header, _ = _unpack_at(self.reader.read_idx(0), where)
        if header.flag == 0:
            return self.reader.keys.copy()
        self.header = header
        end = _class_label(header.label[0], where, None)  # label[0] = num_images + 1
        if end < 1:
            raise RecordIOError(f"{where}: label[0] = {end}, expected num_images + 1 >= 1")
        if end - 1 > len(self.reader):
            raise RecordIOError(f"{where} says images are keys 1..{end - 1}, but {self.reader.idx_path} has only "
                                f"{len(self.reader)} records")
        keys = np.arange(1, end, dtype=np.int64)
        missing = self.reader.missing_keys(keys)
        if missing.size:
            raise RecordIOError(f"{where} says images are keys 1..{end - 1}, but {missing.size} of them are missing "
                                f"from {self.reader.idx_path} (first: {int(missing[0])})")
        return keys

    def __len__(self) -> int:
        return int(self.image_keys.size)

    @property
    def num_classes(self) -> int:
        """From ``property``; otherwise max label + 1 (computed once, reads every image record)."""
        if self._num_classes is None:
            self._num_classes = 1 + max((self.read_label(i) for i in range(len(self))), default=-1)
        return self._num_classes

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) from ``property``; otherwise the size of the first image."""
        if self._image_size is None:
            from PIL import Image  # only needed for a set without property

            _, data = self.read(0)
            with Image.open(io.BytesIO(data)) as im:
                self._image_size = (im.height, im.width)
        return self._image_size  # type: ignore[return-value]

    def _record(self, i: int) -> tuple[IRHeader, bytes, str]:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"{self.root}: image index {i} out of range for {n} images")
        key = int(self.image_keys[i])
        offset = self.reader.offset(key)
        where = f"{self.reader.rec_path}: key {key} at offset {offset}"
        header, data = _unpack_at(self.reader.read_at(offset, key), where)
        return header, data, where

    def _label(self, header: IRHeader, where: str) -> int:
        value = header.label if header.flag == 0 else header.label[0]  # InsightFace: first label of a vector
        return _class_label(value, where, self.property[0] if self.property else None)

    def read_label(self, i: int) -> int:
        """Label of image ``i`` (by position in ``image_keys``)."""
        header, _, where = self._record(i)
        return self._label(header, where)

    def read(self, i: int) -> tuple[int, bytes]:
        """(label, encoded image) of image ``i`` (by position in ``image_keys``)."""
        header, data, where = self._record(i)
        if image_format(data) is None:
            label = header.label if header.flag == 0 else header.label.tolist()
            raise RecordIOError(f"{where}: not an image record (flag={header.flag}, label={label}, payload of "
                                f"{len(data)} bytes starting {data[:8].hex() or 'empty'}); a header or identity-range "
                                f"record where an image was expected?")
        return self._label(header, where), data


# --------------------------------------------------------------------------------------------------------------------
# InsightFace writer
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecSummary:
    num_images: int
    num_classes: int
    num_identities: int


def write_insightface_rec(out_dir: str | os.PathLike, samples: Iterable[tuple[int, bytes]], num_classes: int,
                          image_size: tuple[int, int] = (112, 112), with_header: bool = True,
                          identity_ranges: bool = True) -> RecSummary:
    """Write ``out_dir/{train.rec, train.idx, property}`` from streamed (label, encoded image) samples.

    With header (InsightFace layout) and ``identity_ranges`` samples must come grouped by label; the header record 0
    is reserved first and filled in once the number of images is known, so the bytes equal what mxnet-based tools
    write. With header but without ``identity_ranges`` (a shuffled set) samples come in any order and the header is
    [num_images + 1, num_images + 1]: no identity-range records follow the images.
    Without header, images are keys 0..N-1 in any label order. Files appear only when complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = _as_int(num_classes, "num_classes")
    if not 0 < num_classes <= _FLOAT32_EXACT:
        raise RecordIOError(f"num_classes={num_classes} must be in 1..{_FLOAT32_EXACT} (labels are float32)")
    height, width = (_as_int(v, "image_size") for v in image_size)
    rec_path, idx_path = out / "train.rec", out / "train.idx"
    tmp_rec, tmp_idx = out / "train.rec.partial", out / "train.idx.partial"
    first_key = 1 if with_header else 0
    ranges: list[tuple[int, int, int]] = []  # (label, first_key, end_key) per identity, with header only
    seen = np.zeros(num_classes, dtype=bool)  # labels met so far
    key = first_key
    try:
        with RecordIOWriter(tmp_rec, tmp_idx) as writer:
            if with_header:
                writer.write_idx(0, _header_payload(0, 0))  # placeholder of the final size, rewritten below
            for n, (label, data) in enumerate(samples):
                where = f"sample {n} (label {label!r})"
                label = _as_int(label, f"{where}: label")
                if not 0 <= label < num_classes:
                    raise RecordIOError(f"{where}: label must be in 0..{num_classes - 1}")
                if image_format(bytes(data[:12])) is None:
                    raise RecordIOError(f"{where}: payload is not an encoded image (JPEG/PNG/BMP/GIF/TIFF/WEBP)")
                if with_header and identity_ranges:
                    if ranges and ranges[-1][0] == label:
                        ranges[-1] = (label, ranges[-1][1], key + 1)
                    elif seen[label]:
                        raise RecordIOError(f"{where}: label {label} appears again after other labels; with_header "
                                            f"needs samples grouped by label (each identity contiguous)")
                    else:
                        ranges.append((label, key, key + 1))
                seen[label] = True
                writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), data))
                key += 1
            num_images = key - first_key
            if num_images == 0:
                raise RecordIOError(f"{out}: no samples to write")
            if with_header:
                if num_images + 1 + len(ranges) > _FLOAT32_EXACT:
                    raise RecordIOError(f"{out}: {num_images} images do not fit a float32 header exactly; "
                                        f"use with_header=False")
                for _, start, end in ranges:
                    writer.write_idx(key, pack(IRHeader(2, [float(start), float(end)], key, 0), b""))
                    key += 1
        if with_header:
            header = encode_record(_header_payload(num_images + 1, num_images + 1 + len(ranges)))
            assert len(header) == len(encode_record(_header_payload(0, 0)))  # 32-byte payloads, never split
            with open(tmp_rec, "r+b") as f:
                f.write(header)
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for p in (tmp_rec, tmp_idx):
            p.unlink(missing_ok=True)
    (out / "property").write_text(f"{num_classes},{height},{width}", encoding="ascii")
    return RecSummary(num_images=num_images, num_classes=num_classes, num_identities=int(seen.sum()))


def _header_payload(images_end: int, ids_end: int) -> bytes:
    """Record 0 of the InsightFace layout: label = [num_images + 1, num_images + 1 + num_identities]."""
    return pack(IRHeader(2, [float(images_end), float(ids_end)], 0, 0), b"")

"""Write a rec's images into a new rec in a seeded random order.

    python -m data.tools.shuffle SRC OUT [--seed 0] [--header] [--force]

DALI's ``fn.readers.mxnet`` reads a file in stored order and shuffles only within a buffer of ``initial_fill``
records, so on a set stored identity by identity (MS1MV3, Glint360K as published) its batches hold few
identities. Shuffling the file once fixes that. SRC may have the InsightFace header or not (insightface's
``shuffle_rec.py`` asserts a header). OUT gets, by default, no header (images are keys 0..N-1, like insightface's
script writes); with ``--header`` an InsightFace header record [N+1, N+1] (images 1..N, no identity-range records,
which a shuffled file cannot have), readable by arcface_torch's torch dataset too. Labels are kept (the class,
i.e. the first label of a label vector); ``property`` is copied. SRC is checked first (truncation, magic words,
non-image records, labels vs property) and left untouched.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data.rec_index import same_label_neighbours, scan_images
from data.recordio import InsightFaceRec, RecordIOError, write_insightface_rec
from data.tools.cli import REC_FOLDER, progress_bar, tool_parser


def shuffle_rec(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0, with_header: bool = False,
                force: bool = False, progress: bool = False) -> dict:
    """Shuffle ``src`` into ``out`` (see the module docstring); returns a summary dict."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise RecordIOError(f"{out}: the output folder must differ from the source folder")
    if (out / "train.rec").exists() and not force:
        raise RecordIOError(f"{out / 'train.rec'} exists; pass --force to replace it")
    rec = InsightFaceRec(src)
    scan = scan_images(rec, progress=progress)
    scan.check()
    if len(rec) == 0:
        raise RecordIOError(f"{rec.reader.rec_path}: holds no image records")
    num_classes = rec.property[0] if rec.property else int(scan.labels.max()) + 1
    order = np.random.default_rng(seed).permutation(len(rec))

    def samples() -> Iterator[tuple[int, bytes]]:
        for i in progress_bar(order, "shuffling", enabled=progress):
            yield rec.read(int(i))

    summary = write_insightface_rec(out, samples(), num_classes, rec.image_size, with_header=with_header,
                                    identity_ranges=False)
    before = same_label_neighbours(scan.labels)
    return {"images": summary.num_images, "classes": num_classes, "out": str(out), "header": with_header,
            "same_label_neighbours_before": before}


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser("shuffle", __doc__, "Example: python -m data.tools.shuffle /data/ms1m-retinaface-t1 "
                                             "/data/ms1m-shuffled && python -m data.tools.inspect /data/ms1m-shuffled",
                         src=REC_FOLDER, out="output folder (a new train.rec, train.idx, property)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--header", action="store_true", help="write an InsightFace header record (images 1..N)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT/train.rec")
    args = parser.parse_args(argv)
    try:
        result = shuffle_rec(args.src, args.out, args.seed, args.header, args.force, progress=True)
    except RecordIOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{result['out']}: {result['images']} images of {result['classes']} classes in random order "
          f"({'with' if args.header else 'without'} header); {result['same_label_neighbours_before']:.0%} of "
          f"neighbouring records shared a label before")
    return 0


if __name__ == "__main__":
    sys.exit(main())

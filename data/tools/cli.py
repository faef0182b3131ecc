"""What the data tools share on the command line: the parser of ``python -m data.tools.NAME`` (its description the
first paragraph of the tool's docstring), the positional arguments naming a rec folder, and the progress bar."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, TypeVar

T = TypeVar("T")

REC_FOLDER = "folder with train.rec, train.idx (and property)"


def tool_parser(name: str, doc: str | None, epilog: str, src: str | None = None,
                out: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``python -m data.tools.NAME``; with ``src`` / ``out``, the positional folders ``src`` and
    ``out`` (a Path each) with those help texts."""
    parser = argparse.ArgumentParser(prog=f"python -m data.tools.{name}", description=(doc or "").split("\n\n")[0],
                                     epilog=epilog)
    if src is not None:
        parser.add_argument("src", type=Path, help=src)
    if out is not None:
        parser.add_argument("out", type=Path, help=out)
    return parser


def progress_bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """``items`` behind a tqdm bar counting images when ``enabled``; unchanged otherwise."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="img", unit_scale=True)

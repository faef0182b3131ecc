"""InsightFace verification ``.bin`` files (lfw, cfp_fp, agedb_30, calfw, cplfw, ...), read safely.

A bin is a pickle of ``(images, issame)``: ``images`` is a list of 2N encoded images (JPEG/PNG bytes, pair k is
``images[2k], images[2k+1]``) and ``issame`` a list of N bools. The public files were written by Python 2, so they
are loaded with ``encoding='bytes'`` (Python 2 ``str`` becomes ``bytes``).

Unpickling can execute arbitrary code (any global callable can be invoked through REDUCE). The structure above needs
no global at all — lists, tuples, bytes and bools are pickle primitives — so :class:`_NoGlobalsUnpickler` refuses
every global: a crafted file raises :class:`VerificationBinError` naming the file and the refused global, and nothing
runs.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported lazily: writing bins (e.g. in data-generation workers) does not need it
    import torch

__all__ = ["VerificationBinError", "write_bin", "read_bin", "load_bin_images", "decode_image"]


class VerificationBinError(ValueError):
    """A verification .bin file is unsafe, malformed, or holds an image that cannot be used."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An Unpickler that resolves no global: classes and functions can never be reached, so nothing can be called."""

    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):  # noqa: D102 - the refusal is the whole point
        raise VerificationBinError(
            f"{self._path}: refused to load global '{module}.{name}' — a verification bin holds only lists of "
            "bytes and bools and needs no global; this file is not a plain InsightFace bin (a Python 3 pickle of "
            "protocol < 3 also needs one, _codecs.encode, for every bytes object: if you trust the file, re-save it "
            "with data.verification_bin.write_bin)"
        )


def _validate(obj: object, path: str) -> tuple[list[bytes], list[bool]]:
    """Check ``obj`` is ``(list of 2N bytes, list of N bools)``; return the two lists."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise VerificationBinError(
            f"{path}: expected a pickled pair (images, issame), got {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        )
    images, issame = obj
    if not isinstance(images, (list, tuple)):
        raise VerificationBinError(f"{path}: images must be a list of encoded images, got {type(images).__name__}")
    if not isinstance(issame, (list, tuple)):
        raise VerificationBinError(f"{path}: issame must be a list of bools, got {type(issame).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, (bytes, bytearray)):
            raise VerificationBinError(f"{path}: image {i} must be encoded bytes, got {type(img).__name__}")
    for k, flag in enumerate(issame):
        if not isinstance(flag, bool):
            raise VerificationBinError(f"{path}: issame[{k}] must be a bool, got {type(flag).__name__} {flag!r}")
    if len(images) != 2 * len(issame):
        raise VerificationBinError(
            f"{path}: {len(images)} images for {len(issame)} pairs; expected exactly 2 images per pair "
            f"({2 * len(issame)})"
        )
    return [bytes(img) for img in images], list(issame)


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Read a verification bin without executing anything; return (2N encoded images, N issame flags)."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            obj = _NoGlobalsUnpickler(f, p).load()
    except VerificationBinError:
        raise
    except FileNotFoundError:
        raise VerificationBinError(f"{p}: no such verification bin") from None
    except Exception as e:  # a corrupt pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
        raise VerificationBinError(f"{p}: not a readable pickle ({type(e).__name__}: {e})") from None
    return _validate(obj, p)


def write_bin(path: str | os.PathLike, images: list[bytes], issame: list[bool]) -> None:
    """Write ``(images, issame)`` as a verification bin readable by InsightFace and by :func:`read_bin`.

    Protocol 4 stores bytes as BINBYTES (no global), unlike protocol 2 under Python 3.
    """
    p = str(path)
    imgs, flags = _validate((list(images), [bool(x) if isinstance(x, np.bool_) else x for x in issame]), p)
    tmp = Path(p + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((imgs, flags), f, protocol=4)
    os.replace(tmp, p)


def decode_image(data: bytes, image_size: tuple[int, int], where: str) -> np.ndarray:
    """Decode encoded bytes to uint8 RGB [H, W, 3]; ``where`` names the file and index for errors."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise VerificationBinError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    h, w = image_size
    if rgb.shape[:2] != (h, w):
        raise VerificationBinError(
            f"{where}: image is {rgb.shape[0]}x{rgb.shape[1]} (HxW), expected {h}x{w}; align/crop faces first"
        )
    return rgb


def load_bin_images(
    path: str | os.PathLike, image_size: tuple[int, int] = (112, 112)
) -> tuple["torch.Tensor", np.ndarray]:
    """Read and decode a bin: uint8 RGB tensor [2N, 3, H, W] and bool array [N]. ``image_size`` is (H, W)."""
    import torch

    p = str(path)
    images, issame = read_bin(p)
    h, w = image_size
    out = np.empty((len(images), 3, h, w), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = decode_image(data, image_size, f"{p}: image {i}").transpose(2, 0, 1)
    return torch.from_numpy(out), np.asarray(issame, dtype=bool)

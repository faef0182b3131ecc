"""5-point face alignment onto the ArcFace 112x112 template — the IJB-B/C protocol of insightface and arcface_torch.

The field's recipe (insightface's IJB scripts, arcface_torch's ``eval_ijbc.py``), followed step by step so that a
crop here is the crop there, pixel for pixel:

1. the 5 landmarks (left eye, right eye, nose tip, left and right mouth corners, image pixels) as float32;
2. a similarity transform (rotation, uniform scale, translation; no reflection) fitted by least squares from them to
   :data:`ARCFACE_TEMPLATE` — Umeyama's closed form (PAMI 1991) as scikit-image's ``SimilarityTransform`` computes
   it. It is skimage's own estimator, called on float32 points like the field calls it: skimage then works in
   float32, and a float64 fit of the same points differs by up to ~1e-4 in the matrix, enough to move pixels;
3. ``cv2.warpAffine(image, M, (112, 112), borderValue=0)``: OpenCV's bilinear warp (fixed-point sample positions
   and weights), black outside the image.

Images are decoded by OpenCV too (eval.features), as the field's scripts read them with ``cv2.imread``.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ARCFACE_TEMPLATE", "AlignmentError", "estimate_similarity", "warp_affine", "align_face"]

# insightface's 112x112 ArcFace template (eyes, nose tip, mouth corners; x, y), built the way its IJB scripts build
# it — the 96x112 template shifted right by 8 pixels in float32 — which is not bit-equal to float32(38.2946, ...).
ARCFACE_TEMPLATE = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float32,
)
ARCFACE_TEMPLATE[:, 0] += np.float32(8.0)
ARCFACE_TEMPLATE.setflags(write=False)


class AlignmentError(ValueError):
    """Landmarks or an image that cannot be aligned."""


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity M (float64) minimising Σ‖M·[src_i; 1] − dst_i‖², reflections excluded.

    Computed by scikit-image's ``SimilarityTransform`` (Umeyama's closed form) in the precision of the inputs: the
    field passes float32 landmarks and a float32 template, and so does :func:`align_face`.
    """
    from skimage.transform import SimilarityTransform

    src, dst = np.asarray(src), np.asarray(dst)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise AlignmentError(f"need two [n, 2] point sets of equal shape (n >= 2), got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise AlignmentError(f"landmarks must be finite, got {src.tolist()}")
    if np.ptp(src, axis=0).max() <= 1e-6:
        raise AlignmentError(f"landmarks are all at one point ({src[0].tolist()}): no transform can be fitted")
    fit = SimilarityTransform.from_estimate(src, dst)
    if not fit:
        raise AlignmentError(f"no similarity transform fits landmarks {src.tolist()}: {fit}")
    m = np.asarray(fit.params[:2], dtype=np.float64)
    if not np.isfinite(m).all():
        raise AlignmentError(f"no similarity transform fits landmarks {src.tolist()}")
    return m


def warp_affine(image: np.ndarray, m: np.ndarray, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """``cv2.warpAffine(image, m, size, borderValue=0)`` (bilinear): uint8 [H, W, C] → uint8 [h, w, C].

    ``size`` is (width, height) like OpenCV's dsize.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise AlignmentError(f"image must be uint8 [H, W, C], got {image.dtype} {image.shape}")
    return cv2.warpAffine(np.ascontiguousarray(image), np.asarray(m, dtype=np.float64), tuple(size),
                          borderValue=0.0)


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Align a face: fit landmarks [5, 2] to the template (scaled by image_size/112) and warp → uint8 [s, s, C].

    Channels are warped independently, so RGB in gives RGB out (the field warps BGR, then converts: the same).
    """
    landmarks = np.asarray(landmarks)
    if landmarks.shape != (5, 2):
        raise AlignmentError(f"need 5 landmarks (x, y), got shape {landmarks.shape}")
    template = ARCFACE_TEMPLATE if image_size == 112 else ARCFACE_TEMPLATE * np.float32(image_size / 112.0)
    m = estimate_similarity(landmarks.astype(np.float32), template)
    return warp_affine(image, m, (image_size, image_size))

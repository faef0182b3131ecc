"""5-point face alignment onto the ArcFace 112x112 template (the IJB-B/C protocol of insightface).

A similarity transform (rotation, uniform scale, translation; no reflection) is fitted by least squares (Umeyama,
1991) from the detected landmarks (left eye, right eye, nose tip, left and right mouth corners, in image pixels) to
:data:`ARCFACE_TEMPLATE`, and the image is warped with it by bilinear sampling, black outside the image.

The warp reproduces OpenCV's ``warpAffine`` (the tool insightface used) in numpy: pixel (i, j) has its centre at
x = j, y = i; output pixel x samples the input at M⁻¹·x, sample positions quantised to 1/32 pixel, bilinear
weights, rounded to the nearest integer (PIL's ``transform`` truncates instead, a −0.5 grey-level bias, and puts
pixel centres at +0.5, which is why it is not used).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ARCFACE_TEMPLATE", "AlignmentError", "estimate_similarity", "warp_affine", "align_face"]

# insightface's arcface_dst: eye centres, nose tip, mouth corners of a 112x112 aligned face (x, y).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
_SUBPIXELS = 32  # OpenCV INTER_TAB_SIZE: bilinear sample positions are quantised to 1/32 pixel


class AlignmentError(ValueError):
    """Landmarks or an image that cannot be aligned."""


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity M minimising Σ‖M·[src_i; 1] − dst_i‖² (Umeyama's closed form, reflections excluded).

    With centred points a_i = src_i − mean(src), b_i = dst_i − mean(dst):
        Σ = (1/n) Σ b_i a_iᵀ = U S Vᵀ,  d = diag(1, sign(det U · det V)),
        R = U d Vᵀ,  scale c = trace(S d) / ((1/n) Σ ‖a_i‖²),  t = mean(dst) − c R mean(src).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise AlignmentError(f"need two [n, 2] point sets of equal shape (n >= 2), got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise AlignmentError(f"landmarks must be finite, got {src.tolist()}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    var_s = (a**2).sum() / len(a)
    if var_s <= 1e-12:
        raise AlignmentError(f"landmarks are all at one point ({mu_s.tolist()}): no transform can be fitted")
    cov = b.T @ a / len(a)
    u, s, vt = np.linalg.svd(cov)
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def warp_affine(image: np.ndarray, m: np.ndarray, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """``cv2.warpAffine(image, m, size, borderValue=0)`` (bilinear): uint8 [H, W, C] → uint8 [h, w, C].

    ``size`` is (width, height) like OpenCV's dsize. Output pixel (x, y) samples the input at
    (u, v) = A·(x, y) + t with [A | t] = m⁻¹, quantised to 1/32 pixel as OpenCV does; with u0 = ⌊u⌋,
    a = u − u0 (same for v, b) the value is
        round((1−a)(1−b)·I[v0, u0] + a(1−b)·I[v0, u0+1] + (1−a)b·I[v0+1, u0] + ab·I[v0+1, u0+1]),
    where pixels outside the image read as 0.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise AlignmentError(f"image must be uint8 [H, W, C], got {image.dtype} {image.shape}")
    full = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    width, height = size
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    u = np.round((inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) * _SUBPIXELS) / _SUBPIXELS
    v = np.round((inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) * _SUBPIXELS) / _SUBPIXELS
    u0, v0 = np.floor(u), np.floor(v)
    a, b = (u - u0).astype(np.float32)[..., None], (v - v0).astype(np.float32)[..., None]

    # A one-pixel black frame makes "outside reads 0" a clip: any neighbour left of / above the image lands on the
    # frame at index 0, any right of / below it on the frame at index H+1 (W+1).
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0))).astype(np.float32)
    h_pad, w_pad = padded.shape[:2]
    c0 = np.clip(u0.astype(np.int64) + 1, 0, w_pad - 1)
    c1 = np.clip(u0.astype(np.int64) + 2, 0, w_pad - 1)
    r0 = np.clip(v0.astype(np.int64) + 1, 0, h_pad - 1)
    r1 = np.clip(v0.astype(np.int64) + 2, 0, h_pad - 1)
    top = (1 - a) * padded[r0, c0] + a * padded[r0, c1]
    bottom = (1 - a) * padded[r1, c0] + a * padded[r1, c1]
    out = (1 - b) * top + b * bottom
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Align a face: fit landmarks [5, 2] to the template (scaled by image_size/112) and warp → uint8 [s, s, 3]."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise AlignmentError(f"need 5 landmarks (x, y), got shape {landmarks.shape}")
    template = ARCFACE_TEMPLATE * (image_size / 112.0)
    return warp_affine(image, estimate_similarity(landmarks, template), (image_size, image_size))

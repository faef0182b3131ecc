"""Learnable synthetic identities: cartoon faces whose identity lives in geometry, and whose pixels are dominated
by nuisance — so an untrained network cannot verify them, but a trained one can, and learns it on identities it
never saw.

Identity (fixed per identity, drawn from ``default_rng([seed, 0, identity])``): face oval and jaw, skin tone and a
smooth skin pattern, hair colour / volume / hairline / fringe wave, ears, eye spacing / height / size / tilt / iris
colour, brow shape, nose length / width / nostrils, mouth width / height / smile / lip colour, optional moustache,
moles. Every part is a soft ellipse in a canonical face frame u, v ∈ [-1, 1] (u right, v down).

Nuisance (fresh per image, from a :class:`Nuisance` profile): pose — in-plane rotation, scale, shift and a yaw that
projects the features off a head-shaped ellipsoid (x = x₀·cos φ + z₀·sin φ, far-side features foreshortened);
expression (blink, gaze, mouth opening, smile); occasional glasses; background clutter (smooth colour field plus
random shapes); directional lighting, gain, colour cast, gamma; sensor noise; occasional blur.

Rendering is vectorised over the images of one identity (arrays [n, 3, H, W], each part drawn only inside its
bounding window); each image is JPEG-encoded with PIL (quality 90). :func:`render_identity_images` is the list of its
steps, in the order they draw from the image generator: pose / expression, background, the face parts back to front
(hair and ears, face and fringe, moles, eyes and brows, nose, mouth, glasses: no draws), lighting, blur, noise.
:func:`make_dataset` writes a training RecordIO set plus ``synth_lfw.bin`` (moderate nuisance) and ``synth_cfp.bin``
(frontal vs strong-yaw pairs) on held-out identities. Same seed → identical bytes.

CLI: ``python -m data.synthetic --out DIR --num-ids N --imgs-per-id K --val-ids M --val-pairs P --seed S``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.verification_bin import write_bin

__all__ = [
    "IMAGE_SIZE",
    "GENERATOR_VERSION",
    "Nuisance",
    "TRAIN",
    "LFW_LIKE",
    "CFP_FRONTAL",
    "CFP_PROFILE",
    "identity_params",
    "render_identity_images",
    "encode_jpeg",
    "make_verification_pairs",
    "make_dataset",
    "main",
]

IMAGE_SIZE = 112
GENERATOR_VERSION = 1  # bump when the rendered pixels change for a given seed

# RNG streams: default_rng([seed, stream, index]) keeps every identity / image set independent of the others, so
# identity k looks the same whatever num_ids is.
_STREAM_IDENTITY, _STREAM_TRAIN_IMAGES, _STREAM_VAL_IMAGES, _STREAM_PAIRS = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------------------------
# nuisance profiles
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Nuisance:
    """Per-image variation. Angles in radians, lengths in canonical units (image half-width = 1)."""

    rot_std: float = 0.08  # in-plane rotation
    scale_std: float = 0.08  # log-scale
    shift_std: float = 0.05
    yaw_max: float = 0.45  # |yaw| ~ U(yaw_min, yaw_max), random sign
    yaw_min: float = 0.0
    pitch_std: float = 0.05  # vertical shift of inner features (nodding)
    expression: float = 0.7  # blink / gaze / mouth opening / smile strength
    glasses_prob: float = 0.05
    clutter: float = 0.6  # background: 5·clutter shapes, colour-wave amplitude ∝ clutter
    light: float = 0.4  # directional lighting gradient amplitude
    gain_std: float = 0.15  # log brightness
    cast_std: float = 0.08  # per-channel colour cast (log)
    gamma_std: float = 0.15  # log gamma
    noise_max: float = 6.0  # sensor noise sigma ~ U(0, noise_max), in 0..255 units
    blur_prob: float = 0.1

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Draw the per-image pose / expression variables, each an array [n]."""
        yaw = rng.uniform(self.yaw_min, self.yaw_max, n) * rng.choice([-1.0, 1.0], n)
        return {
            "rot": rng.normal(0, self.rot_std, n),
            "scale": np.exp(rng.normal(0, self.scale_std, n)),
            "tx": rng.normal(0, self.shift_std, n),
            "ty": rng.normal(0, self.shift_std, n),
            "yaw": yaw,
            "pitch": rng.normal(0, self.pitch_std, n),
            "blink": np.clip(1 - self.expression * rng.exponential(0.15, n), 0.1, 1.0),
            "gaze_u": rng.normal(0, 0.25 * self.expression, n),
            "gaze_v": rng.normal(0, 0.15 * self.expression, n),
            "mouth_open": np.clip(rng.normal(-0.3, 0.5, n), 0, 1) * self.expression,
            "smile": rng.normal(0, 0.06 * self.expression, n),
            "glasses": rng.random(n) < self.glasses_prob,
        }


TRAIN = Nuisance()
LFW_LIKE = Nuisance(yaw_max=0.35)
CFP_FRONTAL = Nuisance(yaw_max=0.12, rot_std=0.06)
CFP_PROFILE = Nuisance(yaw_min=0.6, yaw_max=0.9, rot_std=0.15, pitch_std=0.07)


# ---------------------------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------------------------
_HAIR_PALETTE = np.array([[0.05, 0.04, 0.04], [0.20, 0.12, 0.06], [0.40, 0.25, 0.12], [0.85, 0.70, 0.40],
                          [0.65, 0.25, 0.08], [0.60, 0.60, 0.62], [0.92, 0.92, 0.90], [0.30, 0.30, 0.55]])


def identity_params(seed: int, identity: int) -> dict[str, Any]:
    """The fixed appearance of one identity (plain floats / small arrays), deterministic in (seed, identity)."""
    r = np.random.default_rng([seed, _STREAM_IDENTITY, identity])
    u = r.uniform
    skin_base = np.array([0.93, 0.74, 0.60]) * u(0.45, 1.05) + r.normal(0, 0.04, 3)
    hair = np.clip(_HAIR_PALETTE[r.integers(len(_HAIR_PALETTE))] + r.normal(0, 0.06, 3), 0.02, 0.95)
    return {
        # head: face oval (radii, centre height, jaw narrowing), skin tone + a smooth skin pattern (fu, fv, phase, rgb)
        "face_rx": u(0.46, 0.62), "face_ry": u(0.58, 0.76), "face_cy": u(0.0, 0.12), "jaw": u(0.62, 1.0),
        "skin": np.clip(skin_base, 0.1, 1.0).astype(np.float32),
        "skin_pattern": [(*map(float, r.normal(0, 3.0, 2)), u(0, 2 * math.pi),
                          (u(0.03, 0.09) * r.normal(0, 1, 3)).astype(np.float32)) for _ in range(3)],
        # hair: colour, volume, hairline height and the wave of the fringe; ears
        "hair": hair.astype(np.float32), "hair_volume": u(1.0, 1.25), "hairline": u(-0.62, -0.30),
        "fringe_amp": u(0.0, 0.12), "fringe_freq": u(3.0, 9.0), "fringe_phase": u(0, 2 * math.pi),
        "ear_size": u(0.08, 0.15), "ear_cy": u(-0.12, 0.08),
        # eyes (height, half-spacing, radii, tilt, iris colour and size) and brows
        "eye_y": u(-0.24, -0.08), "eye_dx": u(0.18, 0.32), "eye_rx": u(0.07, 0.12), "eye_ry": u(0.035, 0.065),
        "eye_tilt": u(-0.35, 0.35), "iris": r.uniform(0.05, 0.7, 3).astype(np.float32), "iris_r": u(0.45, 0.8),
        "brow_gap": u(0.07, 0.16), "brow_len": u(0.09, 0.17), "brow_thick": u(0.018, 0.045),
        "brow_tilt": u(-0.45, 0.35),
        # nose and mouth
        "nose_len": u(0.12, 0.30), "nose_w": u(0.04, 0.10), "nostril_dx": u(0.035, 0.08), "nose_dark": u(0.1, 0.3),
        "mouth_y": u(0.22, 0.44), "mouth_rx": u(0.10, 0.24), "mouth_ry": u(0.02, 0.06), "smile": u(-0.6, 1.2),
        "lips": np.clip(np.array([0.75, 0.30, 0.30]) * u(0.5, 1.1) + r.normal(0, 0.05, 3), 0, 1).astype(np.float32),
        # marks: an optional moustache, 0-3 moles (u, v, radius)
        "moustache": bool(r.random() < 0.25), "moustache_ry": u(0.015, 0.04),
        "moles": [(u(-0.4, 0.4), u(-0.2, 0.5), u(0.015, 0.03)) for _ in range(int(r.integers(0, 4)))],
    }


# ---------------------------------------------------------------------------------------------------------------
# rendering helpers (coordinates and masks are [n, H, W], per-image scalars [n, 1, 1], images [n, 3, H, W])
# ---------------------------------------------------------------------------------------------------------------
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates x, y ∈ (-1, 1) as [1, H, W] float32 (y grows downwards)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / (size / 2) - 1.0).astype(np.float32)
    return c[None, None, :].repeat(size, axis=1), c[None, :, None].repeat(size, axis=2)


def _col(a: np.ndarray | float) -> np.ndarray:
    """Per-image values [n] → [n, 1, 1] float32."""
    return np.asarray(a, dtype=np.float32).reshape(-1, 1, 1)


def _ellipse(u, v, cx, cy, rx, ry, angle=0.0, edge=0.02) -> np.ndarray:
    """Soft coverage in [0, 1] of an ellipse (centre cx, cy; radii rx, ry; rotated by angle), ramp ≈ edge wide.

    f = r² − 1 with r² = (du/rx)² + (dv/ry)²; the signed distance to the rim is ≈ −f / |∇f| (first order, exact on
    the rim), so thin ellipses keep a thin ramp along their long axis too.
    """
    du, dv = u - cx, v - cy
    if np.any(angle != 0.0):
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))  # float32: a float64 scalar would promote
        du, dv = c * du + s * dv, -s * du + c * dv
    gu, gv = du / (rx * rx), dv / (ry * ry)  # ∇f / 2
    inside = 1.0 - (du * gu + dv * gv)  # −f
    dist = inside / np.maximum(2.0 * np.sqrt(gu * gu + gv * gv), 1e-6)
    return np.clip(dist / edge + 0.5, 0.0, 1.0, dtype=np.float32)


def _project(x0: float, face_rx: float, depth: float, yaw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Yaw a point at x₀ on a head ellipsoid (half-width face_rx, depth ``depth``·face_rx).

    Returns (projected x, horizontal foreshortening factor dx/dx₀ ≥ 0.12) as [n, 1, 1].
    """
    t = np.clip(x0 / face_rx, -0.98, 0.98)
    z0 = depth * face_rx * math.sqrt(1.0 - t * t)
    x = x0 * np.cos(yaw) + z0 * np.sin(yaw)
    dz_dx0 = -depth * t / math.sqrt(1.0 - t * t)
    squash = np.cos(yaw) + dz_dx0 * np.sin(yaw)
    return _col(x), _col(np.clip(squash, 0.12, None))


def _box_blur(img: np.ndarray, k: int) -> np.ndarray:
    """Separable k×k box blur of [3, H, W] (edge-padded), via cumulative sums."""
    p = k // 2
    out = np.pad(img, ((0, 0), (p, p), (p, p)), mode="edge")
    for axis in (1, 2):
        c = np.cumsum(out, axis=axis, dtype=np.float32)
        c = np.concatenate([np.zeros_like(c.take([0], axis=axis)), c], axis=axis)
        n = out.shape[axis] - k + 1
        out = (c.take(np.arange(k, k + n), axis=axis) - c.take(np.arange(n), axis=axis)) / k
    return out


def _background(rng: np.random.Generator, n: int, size: int, clutter: float) -> np.ndarray:
    """Cluttered backgrounds [n, 3, size, size]: base colour + smooth colour waves + random ellipses and bars.

    Drawn at half resolution and upsampled ×2 (pixel repeat): clutter needs no fine detail, and it is 4× cheaper.
    """
    half = (size + 1) // 2
    x, y = _pixel_grid(half)
    img = np.empty((n, 3, half, half), dtype=np.float32)
    img[:] = rng.uniform(0.05, 0.95, (n, 3, 1, 1)).astype(np.float32)
    for _ in range(3):  # smooth colour field
        f = rng.normal(0, 3.0, (n, 2))
        phase = rng.uniform(0, 2 * math.pi, n)
        wave = np.sin(_col(f[:, 0]) * x + _col(f[:, 1]) * y + _col(phase))
        img += (clutter * 0.18 * rng.normal(0, 1, (n, 3, 1, 1))).astype(np.float32) * wave[:, None]
    for _ in range(int(round(5 * clutter))):  # shapes: ellipses and long bars
        colour = rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32)
        cx, cy = _col(rng.uniform(-1.1, 1.1, n)), _col(rng.uniform(-1.1, 1.1, n))
        bar = rng.random(n) < 0.4
        rx = _col(np.where(bar, rng.uniform(0.5, 1.5, n), rng.uniform(0.08, 0.45, n)))
        ry = _col(np.where(bar, rng.uniform(0.03, 0.08, n), rng.uniform(0.08, 0.45, n)))
        alpha = _ellipse(x, y, cx, cy, rx, ry, _col(rng.uniform(0, math.pi, n)), edge=0.04)
        alpha *= _col(rng.uniform(0.5, 1.0, n))
        img += alpha[:, None] * (colour - img)
    return img.repeat(2, axis=2).repeat(2, axis=3)[:, :, :size, :size]


# ---------------------------------------------------------------------------------------------------------------
# the renderer
# ---------------------------------------------------------------------------------------------------------------
class _Canvas:
    """n images [n, 3, H, W] being drawn, with every pixel's canonical face coordinates (u, v).

    A part is painted inside a pixel window around it — the union over the n images of its bounding box — so a
    small part costs a small window instead of the whole image.
    """

    def __init__(self, img: np.ndarray, x: np.ndarray, y: np.ndarray, q: dict[str, np.ndarray]) -> None:
        self.img = img
        self.size = img.shape[-1]
        self.cos, self.sin, self.scale = _col(np.cos(q["rot"])), _col(np.sin(q["rot"])), _col(q["scale"])
        self.tx, self.ty = _col(q["tx"]), _col(q["ty"])
        xs, ys = x - self.tx, y - self.ty  # undo shift, rotation, scale
        self.u = (self.cos * xs + self.sin * ys) / self.scale
        self.v = (-self.sin * xs + self.cos * ys) / self.scale
        self.edge = 0.025 / self.scale  # ~1.4 px anti-aliasing ramp whatever the scale

    def window(self, cx, cy, radius) -> tuple[slice, slice] | None:
        """Pixel rows/cols covering a disc (canonical centre cx, cy; radius) in all images; None if off-image."""
        half = self.size / 2
        xc = self.scale * (self.cos * cx - self.sin * cy) + self.tx  # canonical -> image coordinates
        yc = self.scale * (self.sin * cx + self.cos * cy) + self.ty
        r = self.scale * np.max(radius) + 0.05
        x0, x1 = np.floor(np.min((xc - r + 1) * half)), np.ceil(np.max((xc + r + 1) * half))
        y0, y1 = np.floor(np.min((yc - r + 1) * half)), np.ceil(np.max((yc + r + 1) * half))
        x0, y0 = max(int(x0), 0), max(int(y0), 0)
        x1, y1 = min(int(x1), self.size), min(int(y1), self.size)
        return (slice(y0, y1), slice(x0, x1)) if x0 < x1 and y0 < y1 else None

    def coords(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return self.u[:, win[0], win[1]], self.v[:, win[0], win[1]]

    def paint(self, win: tuple[slice, slice], alpha: np.ndarray, colour) -> None:
        """img ← img + α·(colour − img) inside the window; colour is RGB [3] or channel-first [n, 3, h, w]."""
        colour = np.asarray(colour, dtype=np.float32)
        if colour.ndim == 1:
            colour = colour.reshape(3, 1, 1)
        view = self.img[:, :, win[0], win[1]]
        view += alpha[:, None] * (colour - view)

    def ellipse(self, cx, cy, rx, ry, colour, angle=0.0, sharp: float = 1.0, opacity=1.0, bend=None) -> None:
        """Paint a soft ellipse; ``bend(u)`` optionally offsets v (a curved part such as a smiling mouth)."""
        extra = 0.0 if bend is None else 0.15
        win = self.window(cx, cy, np.maximum(np.max(rx), np.max(ry)) + extra)
        if win is None:
            return
        u, v = self.coords(win)
        if bend is not None:
            v = v - bend(u)
        alpha = _ellipse(u, v, cx, cy, rx, ry, angle, edge=self.edge * sharp)
        self.paint(win, alpha * opacity, colour)


def render_identity_images(
    params: dict[str, Any], n: int, rng: np.random.Generator, nuisance: Nuisance = TRAIN, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Render ``n`` images of one identity (``params`` from :func:`identity_params`) → uint8 [n, size, size, 3].

    The steps, in the order they draw from ``rng``: the per-image pose / expression, the background; then the face
    parts, back to front (no draws); then the lighting, the blur and the sensor noise.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    q = nuisance.sample(rng, n)
    x, y = _pixel_grid(size)
    cv = _Canvas(_background(rng, n, size, nuisance.clutter), x, y, q)
    face = _face_geometry(params, q)
    _draw_hair_and_ears(cv, face)
    _draw_face_and_fringe(cv, face)
    _draw_moles(cv, face)
    _draw_eyes_and_brows(cv, face)
    _draw_nose(cv, face)
    _draw_mouth(cv, face)
    _draw_glasses(cv, face)
    img = cv.img
    _apply_lighting(img, rng, nuisance, x, y)
    img *= 255.0  # the sensor works in 0..255 units
    _blur_some(img, rng, nuisance)
    _add_noise(img, rng, nuisance)
    return np.ascontiguousarray(np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


@dataclass(frozen=True, eq=False)
class _Face:
    """One identity's face under n poses: what every part's drawing needs (per-image values are [n, 1, 1])."""

    p: dict[str, Any]  # the identity (identity_params)
    q: dict[str, np.ndarray]  # the per-image pose / expression (Nuisance.sample), each [n]
    frx: float  # face oval: radii and centre height
    fry: float
    fcy: float
    pitch: np.ndarray  # vertical shift of the inner features
    head_rx: np.ndarray  # silhouette half-width of the yawed head
    head_cx: np.ndarray  # silhouette centre
    eye_cy: np.ndarray  # height of the eyes (brows, nose and glasses hang off it)

    def at(self, x0: float, depth: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Projected centre and foreshortening of a face feature at canonical x0 (see _project)."""
        return _project(x0, self.frx, depth, self.q["yaw"])


def _face_geometry(p: dict[str, Any], q: dict[str, np.ndarray]) -> _Face:
    """The pose-dependent geometry: a yawed ellipsoid keeps an elliptical outline, slightly narrower and shifted."""
    yaw, frx, pitch = q["yaw"], p["face_rx"], _col(q["pitch"])
    return _Face(p=p, q=q, frx=frx, fry=p["face_ry"], fcy=p["face_cy"], pitch=pitch,
                 head_rx=_col(np.sqrt((frx * np.cos(yaw)) ** 2 + (0.9 * frx * np.sin(yaw)) ** 2)),
                 head_cx=_col(0.15 * frx * np.sin(yaw)),
                 eye_cy=p["face_cy"] + p["eye_y"] + pitch)


def _draw_hair_and_ears(cv: _Canvas, f: _Face) -> None:
    """Hair behind the head, then the ears (hidden on the far side as yaw grows)."""
    p, yaw = f.p, f.q["yaw"]
    cv.ellipse(f.head_cx - _col(0.25 * f.frx * np.sin(yaw)), f.fcy - 0.18 * f.fry,
               f.head_rx * p["hair_volume"] * 1.05, f.fry * 0.85 * p["hair_volume"], p["hair"])
    for side in (-1.0, 1.0):
        ex, _ = f.at(side * f.frx * 0.98, depth=0.9)
        visible = _col(np.clip(1.0 - 2.5 * np.maximum(side * yaw, 0.0), 0.0, 1.0))
        cv.ellipse(ex + side * 0.02, f.fcy + p["ear_cy"] + f.pitch, p["ear_size"] * 0.6, p["ear_size"],
                   p["skin"] * 0.85, opacity=visible)


def _draw_face_and_fringe(cv: _Canvas, f: _Face) -> None:
    """The face oval (horizontal radius shrinks below the cheek line: the jaw) with the identity's skin pattern,
    then the fringe: hair over the top of the face with an identity-specific wavy edge."""
    p, fcy, fry = f.p, f.fcy, f.fry
    win = cv.window(f.head_cx, fcy, max(float(np.max(f.head_rx)), fry))
    if win is None:
        return
    u, v = cv.coords(win)
    edge = cv.edge
    below = np.clip((v - fcy) / fry, 0.0, 1.0)
    face = _ellipse(u, v, f.head_cx, fcy, f.head_rx * (1.0 - (1.0 - p["jaw"]) * below ** 2), fry, edge=edge)
    cv.paint(win, face, _skin_colour(p, u, v, f.head_cx))
    wave = p["fringe_amp"] * np.sin(p["fringe_freq"] * u + p["fringe_phase"])
    # (×2 on the face's coverage: the fringe must also hide the face's anti-aliased rim, not just half of it)
    cover = np.minimum(2.0 * face, 1.0)
    cv.paint(win, cover * np.clip((fcy + p["hairline"] * fry + wave - v) / edge * 0.5 + 0.5, 0.0, 1.0), p["hair"])


def _skin_colour(p: dict[str, Any], u: np.ndarray, v: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Skin [n, 3, h, w] at canonical (u, v): the identity's tone plus its smooth pattern (sines about centre cx)."""
    skin = np.empty((len(u), 3) + u.shape[1:], dtype=np.float32)
    skin[:] = p["skin"].reshape(3, 1, 1)
    for fu, fv, phase, amp in p["skin_pattern"]:
        skin += np.sin(fu * (u - cx) + fv * v + phase)[:, None] * amp.reshape(3, 1, 1)
    return np.clip(skin, 0.0, 1.0)


def _draw_moles(cv: _Canvas, f: _Face) -> None:
    """The identity's moles, dark skin-coloured dots that follow the pose."""
    for mu, mv, mr in f.p["moles"]:
        mx, msq = f.at(mu)
        cv.ellipse(mx, f.fcy + mv + f.pitch, mr * msq, mr, f.p["skin"] * 0.35, sharp=0.5)


def _draw_eyes_and_brows(cv: _Canvas, f: _Face) -> None:
    """Each side in turn: the eye, then its brow."""
    p = f.p
    for side in (-1.0, 1.0):
        _draw_eye(cv, f, side)
        bcx, bsq = f.at(side * (p["eye_dx"] + 0.01))
        cv.ellipse(bcx, f.eye_cy - p["eye_ry"] - p["brow_gap"], p["brow_len"] * bsq, p["brow_thick"],
                   p["hair"] * 0.7, angle=side * p["brow_tilt"], sharp=0.7)


def _draw_eye(cv: _Canvas, f: _Face, side: float) -> None:
    """One eye (side −1 left, +1 right): sclera (closing as it blinks), then iris and pupil moved by the gaze."""
    p, q, eye_cy = f.p, f.q, f.eye_cy
    cx, squash = f.at(side * p["eye_dx"])
    rx, ry = p["eye_rx"] * squash, _col(p["eye_ry"] * q["blink"])
    win = cv.window(cx, eye_cy, p["eye_rx"])
    if win is None:
        return
    u, v = cv.coords(win)
    eye = _ellipse(u, v, cx, eye_cy, rx, ry, side * p["eye_tilt"], edge=cv.edge * 0.7)
    cv.paint(win, eye, (0.95, 0.95, 0.92))
    icx, icy = cx + _col(q["gaze_u"]) * rx * 0.5, eye_cy + _col(q["gaze_v"]) * ry * 0.3
    ir = p["eye_ry"] * p["iris_r"] * 1.3
    cv.paint(win, eye * _ellipse(u, v, icx, icy, ir * squash, ir, edge=cv.edge * 0.6), p["iris"])
    cv.paint(win, eye * _ellipse(u, v, icx, icy, 0.45 * ir * squash, 0.45 * ir, edge=cv.edge * 0.6),
             (0.03, 0.03, 0.03))


def _draw_nose(cv: _Canvas, f: _Face) -> None:
    """A shaded ridge that sticks out (depth 1.35) and two nostrils."""
    p = f.p
    ncx, nsq = f.at(0.0, depth=1.35)
    ncy = f.eye_cy + 0.05 + p["nose_len"] / 2
    cv.ellipse(ncx, ncy, p["nose_w"] * np.maximum(nsq, 0.5), p["nose_len"] / 2 + 0.02, p["skin"] * 0.55,
               opacity=p["nose_dark"])
    for side in (-1.0, 1.0):
        nx, nsq2 = f.at(side * p["nostril_dx"], depth=1.25)
        cv.ellipse(nx, ncy + p["nose_len"] / 2, 0.022 * nsq2, 0.014, p["skin"] * 0.3, sharp=0.6, opacity=0.8)


def _draw_mouth(cv: _Canvas, f: _Face) -> None:
    """Lips bent into a smile (parabola in u), an optional opening, an optional moustache."""
    p, q = f.p, f.q
    mcx, msq = f.at(0.0, depth=1.05)
    mcy = f.fcy + p["mouth_y"] + f.pitch
    mrx = p["mouth_rx"] * msq
    smile = p["smile"] + _col(q["smile"]) * 10

    def bend(u: np.ndarray) -> np.ndarray:
        return -smile * 0.05 * ((u - mcx) / mrx) ** 2

    opening = _col(q["mouth_open"]) * 0.03
    cv.ellipse(mcx, mcy, mrx, p["mouth_ry"] + opening, p["lips"], sharp=0.7, bend=bend)
    cv.ellipse(mcx, mcy, mrx * 0.8, opening + 0.004, (0.15, 0.03, 0.03), sharp=0.5, bend=bend,
               opacity=np.minimum(opening / 0.01, 1.0))
    if p["moustache"]:
        cv.ellipse(mcx, mcy - p["mouth_ry"] - p["moustache_ry"] - 0.01, mrx * 1.05, p["moustache_ry"],
                   p["hair"] * 0.8, bend=bend)


def _draw_glasses(cv: _Canvas, f: _Face) -> None:
    """Glasses (an occlusion, on the images whose draw says so): dark rims around both eyes and a bridge."""
    p, q, eye_cy = f.p, f.q, f.eye_cy
    if not q["glasses"].any():
        return
    on = _col(q["glasses"].astype(np.float32))
    bx, _ = f.at(0.0)
    win = cv.window(bx, eye_cy, p["eye_dx"] + 0.2)
    if win is None:
        return
    u, v = cv.coords(win)
    rims = _ellipse(u, v, bx, eye_cy - 0.02, 0.12, 0.012, edge=cv.edge * 0.5)
    for side in (-1.0, 1.0):
        cx, squash = f.at(side * p["eye_dx"])
        outer = _ellipse(u, v, cx, eye_cy, 0.15 * squash, 0.11, edge=cv.edge * 0.5)
        inner = _ellipse(u, v, cx, eye_cy, 0.13 * squash, 0.09, edge=cv.edge * 0.5)
        rims = np.maximum(rims, outer - inner)
    cv.paint(win, rims * on, (0.05, 0.05, 0.06))


def _apply_lighting(img: np.ndarray, rng: np.random.Generator, nuisance: Nuisance, x: np.ndarray,
                    y: np.ndarray) -> None:
    """Photometric nuisance, in place on img (0..1): directional light, gain, colour cast, clip, gamma."""
    n = len(img)
    ang = _col(rng.uniform(0, 2 * math.pi, n))
    amp = _col(rng.uniform(0, nuisance.light, n))
    img *= (1.0 + amp * (np.cos(ang) * x + np.sin(ang) * y))[:, None]
    img *= np.exp(rng.normal(0, nuisance.gain_std, (n, 1, 1, 1)) + rng.normal(0, nuisance.cast_std, (n, 3, 1, 1))
                  ).astype(np.float32)
    np.clip(img, 0.0, 1.0, out=img)
    img **= np.exp(rng.normal(0, nuisance.gamma_std, (n, 1, 1, 1))).astype(np.float32)


def _blur_some(img: np.ndarray, rng: np.random.Generator, nuisance: Nuisance) -> None:
    """In place: box-blur each image with probability ``blur_prob`` (kernel 3 or 5)."""
    n = len(img)
    blur = rng.random(n) < nuisance.blur_prob
    ksize = rng.choice([3, 5], n)
    for i in np.flatnonzero(blur):
        img[i] = _box_blur(img[i], int(ksize[i]))


def _add_noise(img: np.ndarray, rng: np.random.Generator, nuisance: Nuisance) -> None:
    """In place: sensor noise, sigma ~ U(0, noise_max) per image (0..255 units).

    Each image reads a randomly offset window of one Gaussian pool (drawing n·H·W·3 normals is slow).
    """
    n = len(img)
    pool = rng.standard_normal(2 * img[0].size, dtype=np.float32)
    sigma = rng.uniform(0, nuisance.noise_max, n).astype(np.float32)
    for i, off in enumerate(rng.integers(0, img[0].size, n)):
        img[i] += sigma[i] * pool[off : off + img[0].size].reshape(img[0].shape)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode uint8 RGB [H, W, 3] as JPEG bytes (PIL, no chroma-subsampling surprises: PIL's default 4:2:0)."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# verification pairs on held-out identities
# ---------------------------------------------------------------------------------------------------------------
def make_verification_pairs(
    identities: list[int], num_pairs: int, rng: np.random.Generator
) -> list[tuple[int, int, bool]]:
    """``num_pairs`` (id_a, id_b, same) triples alternating same / different (so every contiguous fold is balanced).

    Same pairs cycle through the identities (each used about equally); different pairs draw two distinct ones.
    """
    if len(identities) < 2:
        raise ValueError(f"need at least 2 held-out identities for verification pairs, got {len(identities)}")
    if num_pairs < 2:
        raise ValueError(f"need at least 2 verification pairs, got {num_pairs}")
    order = rng.permutation(len(identities))
    pairs = []
    for k in range(num_pairs):
        if k % 2 == 0:
            a = identities[order[(k // 2) % len(identities)]]
            pairs.append((a, a, True))
        else:
            i, j = rng.choice(len(identities), 2, replace=False)
            pairs.append((identities[i], identities[j], False))
    return pairs


def _render_encoded(job: tuple) -> list[bytes]:
    """Worker: render and JPEG-encode ``n`` images of one identity. job = (seed, identity, n, nuisance, quality,
    rng key) — everything an image depends on, so any process renders the same bytes."""
    seed, identity, n, nuisance, quality, key = job
    rng = np.random.default_rng(key)
    return [encode_jpeg(rgb, quality) for rgb in render_identity_images(identity_params(seed, identity), n, rng,
                                                                        nuisance)]


def _ordered_map(fn, jobs: list[tuple], workers: int) -> Iterator[list[bytes]]:
    """map(fn, jobs) in order, over ``workers`` spawned processes when workers > 1 (results are identical)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=2)


def _pair_jobs(pairs: list[tuple[int, int, bool]], seed: int, tag: int, profiles: tuple[Nuisance, Nuisance],
               quality: int) -> tuple[list[tuple], list[list[int]]]:
    """Render jobs for a bin — per identity and side, one batch — and the bin positions each job's images fill.

    Image 2k of the bin uses ``profiles[0]``'s nuisance, image 2k+1 ``profiles[1]``'s (for CFP-like bins: frontal
    vs profile). Every image is a fresh nuisance draw.
    """
    slots: dict[tuple[int, int], list[int]] = {}  # (identity, side) -> bin positions
    for k, (a, b, _) in enumerate(pairs):
        slots.setdefault((a, 0), []).append(2 * k)
        slots.setdefault((b, 1), []).append(2 * k + 1)
    keys = sorted(slots)
    jobs = [(seed, ident, len(slots[ident, side]), profiles[side], quality,
             [seed, _STREAM_VAL_IMAGES, tag, ident, side]) for ident, side in keys]
    return jobs, [slots[k] for k in keys]


# ---------------------------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------------------------
VAL_BINS: dict[str, tuple[Nuisance, Nuisance]] = {
    "synth_lfw": (LFW_LIKE, LFW_LIKE),  # moderate nuisance on both sides
    "synth_cfp": (CFP_FRONTAL, CFP_PROFILE),  # frontal vs strong yaw, like CFP-FP
}


def make_dataset(
    out_dir: str | Path,
    num_ids: int,
    imgs_per_id: int,
    val_ids: int,
    val_pairs: int,
    seed: int = 0,
    quality: int = 90,
    progress: bool = True,
    workers: int = 1,
    train_nuisance: Nuisance = TRAIN,
) -> dict[str, Any]:
    """Write ``train.rec``/``train.idx``/``property`` (labels 0..num_ids−1) and one bin per :data:`VAL_BINS` entry.

    Training identities are 0..num_ids−1; the bins use identities num_ids..num_ids+val_ids−1 (never trained on).
    ``workers`` > 1 renders in that many processes (same bytes). Also writes ``synthetic.json`` (settings and each
    bin's pair identities). Returns that summary (plus the wall time in ``seconds``).
    """
    _check_dataset_args(num_ids, imgs_per_id, val_ids, val_pairs, seed, quality, workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bar = tqdm(total=num_ids * imgs_per_id + 2 * val_pairs * len(VAL_BINS), desc="synthetic faces", unit="img",
               disable=not progress)
    _write_train(out, num_ids, imgs_per_id, seed, quality, workers, train_nuisance, bar)
    held_out = list(range(num_ids, num_ids + val_ids))
    bins = {name: _write_val_bin(out, name, tag, profiles, held_out, val_pairs, seed, quality, workers, bar)
            for tag, (name, profiles) in enumerate(VAL_BINS.items())}
    bar.close()
    summary = _dataset_summary(num_ids, imgs_per_id, val_ids, val_pairs, seed, quality, train_nuisance, bins)
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1))  # no paths, no timing: same seed, same bytes
    for b in bins.values():
        b["path"] = str(out / b["file"])
    return {**summary, "dir": str(out), "seconds": round(time.perf_counter() - t0, 2)}


def _check_dataset_args(num_ids: int, imgs_per_id: int, val_ids: int, val_pairs: int, seed: int, quality: int,
                        workers: int) -> None:
    """ValueError (naming the argument) unless every count is an integer ≥ its minimum, the seed a non-negative
    integer and the quality in 1..100."""
    for name, value, low in (("num_ids", num_ids, 1), ("imgs_per_id", imgs_per_id, 1), ("val_ids", val_ids, 2),
                             ("val_pairs", val_pairs, 2), ("quality", quality, 1), ("workers", workers, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"make_dataset: {name} must be an integer >= {low}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"make_dataset: seed must be a non-negative integer, got {seed!r}")
    if quality > 100:
        raise ValueError(f"make_dataset: quality must be in 1..100, got {quality}")


def _write_train(out: Path, num_ids: int, imgs_per_id: int, seed: int, quality: int, workers: int,
                 nuisance: Nuisance, bar: tqdm) -> None:
    """Render identities 0..num_ids−1, ``imgs_per_id`` images each (label = identity), into train.rec/.idx/property."""
    from data.recordio import write_insightface_rec

    jobs = [(seed, label, imgs_per_id, nuisance, quality, [seed, _STREAM_TRAIN_IMAGES, label])
            for label in range(num_ids)]

    def samples() -> Iterator[tuple[int, bytes]]:
        for label, images in enumerate(_ordered_map(_render_encoded, jobs, workers)):
            yield from ((label, jpeg) for jpeg in images)
            bar.update(len(images))

    write_insightface_rec(out, samples(), num_ids, image_size=(IMAGE_SIZE, IMAGE_SIZE))


def _write_val_bin(out: Path, name: str, tag: int, profiles: tuple[Nuisance, Nuisance], held_out: list[int],
                   val_pairs: int, seed: int, quality: int, workers: int, bar: tqdm) -> dict[str, Any]:
    """Draw bin number ``tag``'s pairs of held-out identities, render them into ``<name>.bin``; returns the bin's
    entry in the summary."""
    pairs = make_verification_pairs(held_out, val_pairs, np.random.default_rng([seed, _STREAM_PAIRS, tag]))
    jobs, positions = _pair_jobs(pairs, seed, tag, profiles, quality)
    images: list[bytes] = [b""] * (2 * len(pairs))
    for where, encoded in zip(positions, _ordered_map(_render_encoded, jobs, workers)):
        for i, jpeg in zip(where, encoded):
            images[i] = jpeg
        bar.update(len(encoded))
    path = out / f"{name}.bin"
    write_bin(path, images, [same for _, _, same in pairs])
    return {"file": path.name, "pairs": len(pairs), "positives": sum(s for _, _, s in pairs),
            "pair_identities": [[a, b] for a, b, _ in pairs]}


def _dataset_summary(num_ids: int, imgs_per_id: int, val_ids: int, val_pairs: int, seed: int, quality: int,
                     train_nuisance: Nuisance, bins: dict[str, Any]) -> dict[str, Any]:
    """What ``synthetic.json`` holds: the generator version, the settings, the nuisance profiles and the bins."""
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "quality": quality,
        "image_size": IMAGE_SIZE,
        "train": {"files": ["train.rec", "train.idx", "property"], "num_ids": num_ids, "imgs_per_id": imgs_per_id,
                  "images": num_ids * imgs_per_id, "identities": [0, num_ids], "nuisance": asdict(train_nuisance)},
        "val": {"identities": [num_ids, num_ids + val_ids], "pairs_per_bin": val_pairs,
                "profiles": {name: [asdict(p) for p in profiles] for name, profiles in VAL_BINS.items()},
                "bins": bins},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Write a synthetic face-identity training set (train.rec/.idx/property) and held-out "
                    "verification bins (synth_lfw.bin, synth_cfp.bin). Same seed -> identical files.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-ids", type=int, default=400, help="training identities (default 400)")
    parser.add_argument("--imgs-per-id", type=int, default=16, help="training images per identity (default 16)")
    parser.add_argument("--val-ids", type=int, default=200, help="held-out identities for the bins (default 200)")
    parser.add_argument("--val-pairs", type=int, default=1000, help="pairs per bin, half same (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default 1; same bytes)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        summary = make_dataset(args.out, args.num_ids, args.imgs_per_id, args.val_ids, args.val_pairs, args.seed,
                               args.quality, progress=not args.no_progress, workers=args.workers)
    except ValueError as e:
        parser.error(str(e))
    train, val = summary["train"], summary["val"]
    out = Path(summary["dir"])
    print(f"train: {train['images']} images of {train['num_ids']} identities (labels 0..{train['num_ids'] - 1}) -> "
          f"{out / 'train.rec'} (+ train.idx, property)")
    for name, b in val["bins"].items():
        print(f"{name}: {b['pairs']} pairs ({b['positives']} same) of held-out identities "
              f"{val['identities'][0]}..{val['identities'][1] - 1} -> {b['path']}")
    print(f"settings and pair identities -> {out / 'synthetic.json'}; took {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()

"""5-point alignment (eval.align, eval.features.FaceImages) against the field's recipe run with OpenCV and
scikit-image themselves: cv2.imread → skimage SimilarityTransform on float32 points → cv2.warpAffine → RGB."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from eval.align import ARCFACE_TEMPLATE, AlignmentError, align_face, estimate_similarity, warp_affine
from eval.features import FaceImages, FeatureError
from tests.fixtures_eval import identity_field, save_image

# the template as the field's IJB scripts write it: the 96x112 points, x shifted by 8, in float32
FIELD_TEMPLATE = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                           [62.7299, 92.2041]], dtype=np.float32)
FIELD_TEMPLATE[:, 0] += 8.0


def field_crop(path, landmarks):
    """The field's crop of one image, computed with the libraries alone (the oracle)."""
    bgr = cv2.imread(str(path))
    fit = SimilarityTransform.from_estimate(np.asarray(landmarks, dtype=np.float32), FIELD_TEMPLATE)
    crop = cv2.warpAffine(bgr, fit.params[0:2, :], (112, 112), borderValue=0.0)
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]])


def random_faces(tmp_path, count, seed=0):
    """Loose JPEG crops of smooth faces under random similarity transforms, with their (noisy) landmarks."""
    rng = np.random.default_rng(seed)
    paths, marks = [], []
    for k in range(count):
        face = identity_field(seed, k)
        m = similarity(rng.uniform(-40, 40), rng.uniform(0.6, 2.5), rng.uniform(10, 60), rng.uniform(10, 60))
        size = (int(rng.integers(200, 320)), int(rng.integers(200, 320)))
        loose = cv2.warpAffine(face, m, size, borderValue=(90, 40, 10))
        path = tmp_path / f"{k}.jpg"
        save_image(loose, path, quality=int(rng.integers(70, 99)))
        points = ARCFACE_TEMPLATE.astype(np.float64) @ m[:, :2].T + m[:, 2] + rng.normal(0, 1.5, (5, 2))
        paths.append(path)
        marks.append(np.round(points, 3))  # as in the meta files: a few decimals, read as float32
    return paths, np.array(marks, dtype=np.float32)


def test_template_is_the_fields_float32_template():
    assert ARCFACE_TEMPLATE.dtype == np.float32
    np.testing.assert_array_equal(ARCFACE_TEMPLATE, FIELD_TEMPLATE)
    assert not np.array_equal(ARCFACE_TEMPLATE[:, 0], np.float32([38.2946, 73.5318, 56.0252, 41.5493, 70.7299]))


def test_crops_equal_the_fields_opencv_skimage_recipe(tmp_path):
    paths, marks = random_faces(tmp_path, 40)
    images = FaceImages(paths, marks)
    for i, path in enumerate(paths):
        ours = images[i].numpy().transpose(1, 2, 0)
        np.testing.assert_array_equal(ours, field_crop(path, marks[i]), err_msg=str(path))


def test_transform_equals_skimage_and_is_the_least_squares_fit():
    rng = np.random.default_rng(1)
    for _ in range(200):
        src = (ARCFACE_TEMPLATE * rng.uniform(0.4, 3.0) + rng.normal(0, 4, (5, 2)) + rng.uniform(0, 300, 2))
        src = src.astype(np.float32)
        m = estimate_similarity(src, ARCFACE_TEMPLATE)
        np.testing.assert_array_equal(m, SimilarityTransform.from_estimate(src, ARCFACE_TEMPLATE).params[:2])
        # independent float64 least squares: x' = a x − b y + tx, y' = b x + a y + ty
        rows = []
        for x, y in src.astype(np.float64):
            rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        a, b, tx, ty = np.linalg.lstsq(np.array(rows), ARCFACE_TEMPLATE.astype(np.float64).reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(m, [[a, -b, tx], [b, a, ty]], rtol=0, atol=2e-3 * max(1.0, abs(tx), abs(ty)))


def test_align_face_fits_in_float32_like_the_field():
    # float64 landmarks are fitted as float32, the precision the field's call runs in
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (180, 170, 3), dtype=np.uint8)
    marks = ARCFACE_TEMPLATE * 1.37 + np.array([20.123456, 9.876543]) + rng.normal(0, 2, (5, 2))
    m32 = SimilarityTransform.from_estimate(marks.astype(np.float32), FIELD_TEMPLATE).params[:2]
    np.testing.assert_array_equal(align_face(img, marks), cv2.warpAffine(img, m32, (112, 112), borderValue=0.0))


def test_warp_affine_is_opencvs():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (90, 80, 3), dtype=np.uint8)
    m = similarity(-17.0, 0.8, 10.3, 25.7)
    out = warp_affine(img, m, (60, 70))
    assert out.shape == (70, 60, 3)
    np.testing.assert_array_equal(out, cv2.warpAffine(img, m, (60, 70), flags=cv2.INTER_LINEAR,
                                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0))
    assert (out == 0).all(axis=2).any(), "pixels mapped outside the input must be black"


def test_alignment_recovers_the_face_exactly_under_grid_transforms():
    face = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    template = ARCFACE_TEMPLATE.astype(np.float64)
    # integer translation
    canvas = np.zeros((160, 170, 3), np.uint8)
    canvas[31:143, 23:135] = face
    np.testing.assert_array_equal(align_face(canvas, template + [23, 31]), face)
    # 2x upscale by pixel repetition: aligned pixel x reads loose pixel 2x + offset
    canvas = np.zeros((260, 250, 3), np.uint8)
    canvas[5:229, 9:233] = face.repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(align_face(canvas, template * 2 + [9, 5]), face)
    # rotation by 90 degrees: face[y, x] = rot[111 - x, y]
    canvas = np.zeros((130, 130, 3), np.uint8)
    canvas[7:119, 11:123] = np.rot90(face)
    landmarks = np.stack([template[:, 1] + 11, 111 - template[:, 0] + 7], axis=1)
    np.testing.assert_array_equal(align_face(canvas, landmarks), face)


def test_alignment_errors_are_clear(tmp_path):
    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(AlignmentError, match="5 landmarks"):
        align_face(img, np.zeros((4, 2)))
    with pytest.raises(AlignmentError, match="one point"):
        align_face(img, np.ones((5, 2)))
    with pytest.raises(AlignmentError, match="finite"):
        align_face(img, np.full((5, 2), np.nan))
    with pytest.raises(AlignmentError, match="uint8"):
        warp_affine(img.astype(np.float32), similarity(0, 1, 0, 0))
    path = tmp_path / "face.png"
    save_image(identity_field(0, 1), path)
    with pytest.raises(FeatureError, match=r"face.png: cannot align with landmarks .*one point"):
        FaceImages([path], np.ones((1, 5, 2)))[0]

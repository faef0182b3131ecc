"""data/synthetic.py stays readable: no function longer than 50 lines, and the renderer is the list of its steps,
drawing from its generator in the documented order (pose / expression, background, lighting, blur, noise)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from data import synthetic

MAX_LINES = 50


def test_no_function_in_synthetic_is_longer_than_50_lines():
    tree = ast.parse(Path(synthetic.__file__).read_text())
    long = [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines (name, line, length): {long}"


def test_render_draws_its_random_numbers_step_by_step():
    """Rendering through the named steps by hand gives the same pixels and leaves the generator in the same state:
    the face parts draw nothing, the random steps draw in this order."""
    params, n, size, nuisance = synthetic.identity_params(4, 2), 3, 40, synthetic.Nuisance(glasses_prob=0.5,
                                                                                           blur_prob=0.5)
    rng = np.random.default_rng(9)
    images = synthetic.render_identity_images(params, n, rng, nuisance, size=size)

    by_hand = np.random.default_rng(9)
    q = nuisance.sample(by_hand, n)
    x, y = synthetic._pixel_grid(size)
    cv = synthetic._Canvas(synthetic._background(by_hand, n, size, nuisance.clutter), x, y, q)
    face = synthetic._face_geometry(params, q)
    for draw in (synthetic._draw_hair_and_ears, synthetic._draw_face_and_fringe, synthetic._draw_moles,
                 synthetic._draw_eyes_and_brows, synthetic._draw_nose, synthetic._draw_mouth,
                 synthetic._draw_glasses):
        state = by_hand.bit_generator.state
        draw(cv, face)
        assert by_hand.bit_generator.state == state, f"{draw.__name__} drew random numbers"
    synthetic._apply_lighting(cv.img, by_hand, nuisance, x, y)
    cv.img *= 255.0
    synthetic._blur_some(cv.img, by_hand, nuisance)
    synthetic._add_noise(cv.img, by_hand, nuisance)
    expected = np.ascontiguousarray(np.clip(cv.img + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    assert np.array_equal(images, expected)
    assert rng.bit_generator.state == by_hand.bit_generator.state

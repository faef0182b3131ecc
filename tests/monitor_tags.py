"""The TensorBoard tags a UniTSFace run's monitor writes (trainer/monitor.py), as the monitor test (fed by hand) and
the end-to-end test (a real run) check them."""
from __future__ import annotations

TRAIN_SCALARS = ("loss", "lr", "samples_per_s", "skipped_steps", "loss_s2c", "loss_s2s", "t_uss", "b_uss",
                 "memory_filled")
TARGETS = ("synth_lfw", "synth_cfp")


def assert_scalar_tags(tags: set[str], eval_names: tuple[str, ...]) -> None:
    """Every training scalar as train/NAME, and each of ``eval_names`` as eval/TARGET/NAME for both held-out bins."""
    for name in TRAIN_SCALARS:
        assert f"train/{name}" in tags, name
    for target in TARGETS:
        for name in eval_names:
            assert f"eval/{target}/{name}" in tags, (target, name)

"""Learning-rate schedules against values computed by hand."""
import pytest

from trainer.schedule import lr_at


def test_poly_with_warmup():
    kw = dict(base_lr=0.1, total_steps=110, steps_per_epoch=10, type="poly", warmup_epochs=1.0, power=2.0)
    assert lr_at(0, **kw) == pytest.approx(0.01)          # (0+1)/10 of base
    assert lr_at(9, **kw) == pytest.approx(0.1)
    assert lr_at(10, **kw) == pytest.approx(0.1)          # decay starts at 1
    assert lr_at(60, **kw) == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_at(110, **kw) == 0.0


def test_step_decay():
    kw = dict(base_lr=0.1, total_steps=280, steps_per_epoch=10, type="step", milestones=[16, 24], gamma=0.1)
    assert lr_at(159, **kw) == pytest.approx(0.1)
    assert lr_at(160, **kw) == pytest.approx(0.01)
    assert lr_at(240, **kw) == pytest.approx(0.001)

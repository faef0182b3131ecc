"""Undo for the head state a training forward changes, so that a step can be skipped as if it never ran.

A training forward writes state before anyone knows whether the step is usable: the latest-feature memory and
EPL's prototypes take rows of the gathered batch, USS / s2s-BCE set their bias from the data, GB-CosFace moves p_v.
When the step turns out non-finite (the trainer's guard, trainer/guard.py) every one of those writes must be undone
on every rank, identically, or a NaN embedding would sit in the memory for good.

Each module that writes state in its forward derives from :class:`Journaled` and calls ``self.journal(tensor,
index)`` right before the in-place write: the old values (the rows ``index`` of dim 0, or the whole tensor) are
copied. Recording is off until a :class:`HeadTransaction` switches it on, so heads used outside the trainer (tests,
benchmarks) pay nothing and keep nothing. The copies are small: the rows of the classes in one batch, a few
scalars.

    txn = HeadTransaction(head)      # once
    loss, logs = head(x, y)          # records the old values of what it writes
    ... txn.rollback()               # the step is dropped: every write undone, newest first
    ... txn.commit()                 # the step is kept: the copies are released
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class StepJournal:
    """The old values of the tensors written since the last commit, newest last."""

    def __init__(self) -> None:
        self._undo: list[tuple[Tensor, Tensor | None, Tensor]] = []

    def __len__(self) -> int:
        return len(self._undo)

    @torch.no_grad()
    def record(self, tensor: Tensor, index: Tensor | None = None) -> None:
        old = tensor.detach().clone() if index is None else tensor.detach().index_select(0, index)
        self._undo.append((tensor, index, old))

    @torch.no_grad()
    def rollback(self) -> None:
        for tensor, index, old in reversed(self._undo):
            if index is None:
                tensor.copy_(old)
            else:
                tensor.index_copy_(0, index, old)
        self._undo.clear()

    def commit(self) -> None:
        self._undo.clear()


class Journaled:
    """Mixin for a module whose forward writes state: ``self.journal(t, index)`` before each in-place write."""

    _step_journal: StepJournal | None = None

    def journal(self, tensor: Tensor, index: Tensor | None = None) -> None:
        if self._step_journal is not None:
            self._step_journal.record(tensor, index)


class HeadTransaction:
    """Switches recording on for every :class:`Journaled` module of ``head``; rollback / commit per step."""

    def __init__(self, head: nn.Module) -> None:
        self.journal = StepJournal()
        self.modules = [m for m in head.modules() if isinstance(m, Journaled)]
        for m in self.modules:
            m._step_journal = self.journal

    def rollback(self) -> None:
        self.journal.rollback()

    def commit(self) -> None:
        self.journal.commit()

    def close(self) -> None:
        """Stop recording (the journal must be empty: commit or roll back first)."""
        for m in self.modules:
            m._step_journal = None

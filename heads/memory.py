"""The class memory shard: per-class feature state owned by the same rank and class range as the centres.

Two update rules, both applied to the GATHERED batch (every rank sees the same N samples in rank order), each rank
writing only the rows of the classes it owns:

* ``LatestFeatureMemory`` (UniTSFace's USS / s2s terms): row j = the most recent detached embedding of class j,
  written AFTER the loss (a sample is never scored against itself). ``valid`` marks rows ever written: rows never
  written take no part in any loss (the official code reads uninitialised memory there). The rows are stored
  unit-normalised: every loss uses only cosines to them, so this saves a [K, D] normalisation per step (the
  official code keeps the raw feature and normalises at each use; the losses are the same).
* ``PrototypeMemory`` (EPL): unit prototypes, updated BEFORE the loss with the softsign rule
      c = <P_y, x/|x|>,  a = c / (1 + |c|),  P_y <- normalize(a * P_y + (1 - a) * x/|x|)
  so low-similarity (hard) samples move their prototype more. Initialisation: "feature" (a class's first feature
  seen, the cleaner start) or "noise" (the official code: unnormalised N(0, 1) rows, norm ~ sqrt(D)).

Duplicate labels in one batch: the LAST occurrence in the gathered batch wins (one write per class per step, from
the state before the step). The gathered order is rank order, so the rule is the same on any number of ranks.

The writes make no host sync (:func:`write_plan`): every one of the N samples writes one row, of a fixed-size plan —
each owned sample its class's row, with the value from its class's last occurrence (duplicates write the same value),
and a sample of another rank's class the row of this rank's first owned sample, with that row's value; when no
sample is owned, row 0 with its own old value. So the written set and values are those of "one write per class
present", and the journal (heads/journal.py) records the same N rows before the write.

All state is buffers (dim 0 = class): it checkpoints with the head and reshards with ``per_class_buffers``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from heads.journal import Journaled
from heads.margins import normalize
from heads.partition import ClassPartition
from heads.seeds import derive_seed, init_centres

PROTOTYPE_INITS = ("feature", "noise")


class MemoryStateError(ValueError):
    """A memory loaded from a checkpoint holds rows no loss may use; the message names the tensor and rows."""


@torch.no_grad()
def check_loaded_rows(rows: Tensor, valid: Tensor, name: str) -> None:
    """After a load: refuse non-finite WRITTEN rows, and zero the unwritten ones.

    Unwritten rows take no part in a loss, but they still enter the [N, K] products (masked afterwards): a NaN there
    would turn every gradient NaN (0 x NaN = NaN). Zeroing them on load keeps whatever a damaged or foreign
    checkpoint holds in them out of every loss and gradient; ``write`` only ever makes rows valid with finite data.
    """
    bad = valid & ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        where = bad.nonzero().squeeze(1)
        raise MemoryStateError(f"{name}: {where.numel()} written row(s) hold non-finite values (local rows "
                               f"{where[:8].tolist()}{' ...' if where.numel() > 8 else ''}); expected finite unit "
                               f"rows: the checkpoint is damaged or was written by a diverged run")
    rows[~valid] = 0.0


def last_occurrence(local: Tensor) -> tuple[Tensor, Tensor]:
    """(classes, positions): each local class present (sorted) and the position of its last sample in the batch."""
    positions = (local >= 0).nonzero().squeeze(1)
    classes, inverse = torch.unique(local[positions], sorted=True, return_inverse=True)
    last = torch.full_like(classes, -1).scatter_reduce_(0, inverse, positions, reduce="amax")
    return classes, last


def write_plan(local: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dest, src, any_owned) for a sync-free "last occurrence wins" write of the N samples (see the module docstring).

    dest [N]: the row each sample writes; src [N]: the sample whose value goes there (the last occurrence of dest's
    class); any_owned: 0-dim bool, whether this rank owns any sample's class (if not, dest = 0 and the write must
    keep row 0's old value).
    """
    owned = local >= 0
    ordered, order = torch.sort(local, stable=True)
    last = order[torch.searchsorted(ordered, local, right=True) - 1]  # stable: the last equal label is the latest
    first = owned.to(torch.uint8).argmax()                             # the first owned sample (0 if none)
    dest = torch.where(owned, local, local[first].clamp_min(0))
    src = torch.where(owned, last, last[first])
    return dest, src, owned.any()


class LatestFeatureMemory(Journaled, nn.Module):
    """Buffers ``features`` [C_local, D] (the latest embedding of each class) and ``valid`` [C_local] (written)."""

    def __init__(self, partition: ClassPartition, embedding_size: int) -> None:
        super().__init__()
        self.partition = partition
        self.register_buffer("features", torch.zeros(partition.num_local, embedding_size))
        self.register_buffer("valid", torch.zeros(partition.num_local, dtype=torch.bool))

    def per_class_buffers(self) -> list[str]:
        return ["features", "valid"]

    def rows(self, index: Tensor | None) -> tuple[Tensor, Tensor]:
        """(unit rows, valid) of the rows ``index`` (all when None: the buffers themselves, no copy).

        For use within one forward: heads/memory_scores.py keeps no reference to them past it, so ``write`` may
        change the memory right after.
        """
        if index is None:
            return self.features, self.valid
        return self.features.index_select(0, index), self.valid[index]  # index_select: faster than [index]

    @torch.no_grad()
    def write(self, X: Tensor, local: Tensor) -> None:
        """features[y] <- X_i / |X_i| (detached) for the last sample i of each owned class y (no host sync)."""
        if local.numel() == 0:
            return
        dest, src, any_owned = write_plan(local)
        rows = torch.where(any_owned, normalize(X.detach()[src].to(self.features.dtype)), self.features[dest])
        valid = self.valid[dest] | any_owned
        self.journal(self.features, dest)
        self.journal(self.valid, dest)
        self.features.index_copy_(0, dest, rows)
        self.valid.index_copy_(0, dest, valid)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        """Rows saved raw (checkpoints written before the memory kept unit rows) are normalised on load; non-finite
        written rows are refused and unwritten rows zeroed (:func:`check_loaded_rows`)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_loaded_rows(self.features, self.valid, f"{prefix}features")
        with torch.no_grad():
            raw = self.valid & ((self.features.norm(dim=1) - 1.0).abs() > 1e-3)
            if bool(raw.any()):
                self.features[raw] = normalize(self.features[raw])

    @torch.no_grad()
    def filled(self) -> Tensor:
        """Rows written so far on this rank (0-dim tensor: no device sync)."""
        return self.valid.sum()


class PrototypeMemory(Journaled, nn.Module):
    """Buffers ``prototypes`` [C_local, D] and ``valid`` [C_local] (initialised); the softsign update rule."""

    def __init__(self, partition: ClassPartition, embedding_size: int, init: str = "feature", seed: int = 0) -> None:
        super().__init__()
        if init not in PROTOTYPE_INITS:
            raise ValueError(f"PrototypeMemory: init must be one of {PROTOTYPE_INITS}, got {init!r}")
        self.partition = partition
        self.init = init
        if init == "noise":  # drawn per block of classes: the same rows on any number of ranks
            rows = init_centres(partition.start, partition.num_local, embedding_size, 1.0, derive_seed(seed, 0xE91))
            valid = torch.ones(partition.num_local, dtype=torch.bool)
        else:
            rows = torch.zeros(partition.num_local, embedding_size)
            valid = torch.zeros(partition.num_local, dtype=torch.bool)
        self.register_buffer("prototypes", rows)
        self.register_buffer("valid", valid)

    def per_class_buffers(self) -> list[str]:
        return ["prototypes", "valid"]

    def rows(self, index: Tensor | None) -> tuple[Tensor, Tensor]:
        """(unit rows, valid) of the rows ``index`` (all when None: the buffers, no copy, when they are unit rows).

        Updated prototypes are unit rows; "noise" rows are raw N(0, 1) until their class is first seen, so that
        initialisation normalises a copy here.
        """
        rows, valid = (self.prototypes, self.valid) if index is None else (self.prototypes.index_select(0, index),
                                                                              self.valid[index])
        return (normalize(rows) if self.init == "noise" else rows), valid

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        """Non-finite initialised rows are refused, uninitialised rows zeroed (:func:`check_loaded_rows`)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_loaded_rows(self.prototypes, self.valid, f"{prefix}prototypes")

    @torch.no_grad()
    def update(self, X: Tensor, local: Tensor) -> None:
        """Softsign update of P_y from the last sample of each owned class y (first sight: P_y <- x/|x|); no sync."""
        if local.numel() == 0:
            return
        dest, src, any_owned = write_plan(local)
        x = normalize(X.detach()[src].to(self.prototypes.dtype))
        P = self.prototypes[dest]
        seen = self.valid[dest]
        c = (P * x).sum(1, keepdim=True)
        a = c / (1.0 + c.abs())
        moved = normalize(a * P + (1.0 - a) * x)
        new = torch.where(any_owned, torch.where(seen.unsqueeze(1), moved, x), P)
        self.journal(self.prototypes, dest)
        self.journal(self.valid, dest)
        self.prototypes.index_copy_(0, dest, new)
        self.valid.index_copy_(0, dest, seen | any_owned)

    @torch.no_grad()
    def filled(self) -> Tensor:
        """Rows initialised so far on this rank (0-dim tensor)."""
        return self.valid.sum()

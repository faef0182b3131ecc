"""Verification during training: the bins of `data.val_root` scored on the DeepSpeed model, between epochs.

Every rank embeds a contiguous slice of each bin's images (eval.features.embed, the pipeline `python -m eval` uses),
rank 0 gathers them, scores the pairs with eval.verification's 10-fold protocol and logs the table; the decoded bins
are kept between calls. Beside the accuracy: the loss's learned cosine thresholds (t = b/s, p_v) against the best
single threshold (eval.uniform_threshold), for the thresholds the loss has already reported on a log step.
"""
from __future__ import annotations

from pathlib import Path

import torch


def bin_paths(cfg: dict) -> list[Path]:
    """The verification files the config names: data.val_targets under data.val_root, or every *.bin there."""
    d = cfg["data"]
    if d["val_root"] is None:
        return []
    root = Path(d["val_root"])
    if d["val_targets"]:
        paths = [root / f"{name}.bin" for name in d["val_targets"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data.val_targets: verification files not found: {', '.join(missing)}")
        return paths
    return sorted(root.glob("*.bin"))


class Evaluator:
    def __init__(self, cfg: dict, device: torch.device, log, rank: int):
        self.paths = bin_paths(cfg)
        self.device, self.log, self.rank = device, log, rank
        self.history: list[tuple[str, list[dict]]] = []
        self.learned_seen: set[str] = set()  # learned thresholds the loss has logged (USS: from epoch 1 on)
        self._bins: list | None = None

    def __call__(self, model: torch.nn.Module, label: str, learned: dict[str, float]) -> list[dict] | None:
        """Score every bin (collective: call on every rank). ``learned``: the loss's learned thresholds; those not
        yet logged are left out. Returns the per-target results on rank 0 (None elsewhere or without bins)."""
        if not self.paths:
            return None
        from data.verification_bin import load_bin_images
        from eval.uniform_threshold import format_threshold_report, pair_cosines, threshold_report
        from eval.verification import embed_sharded, evaluate_pairs, format_table
        learned = {k: v for k, v in learned.items() if k in self.learned_seen}
        if self._bins is None:
            self._bins = [(p, *load_bin_images(p)) for p in self.paths]
        results = []
        for path, images, issame in self._bins:
            emb = embed_sharded(model, images, batch_size=128, device=self.device, progress=False)
            if emb is not None:  # rank 0
                report = threshold_report(*pair_cosines(emb, issame), learned)
                results.append({"target": Path(path).stem, "path": str(path), **evaluate_pairs(emb, issame),
                                "thresholds": report})
        if self.rank != 0:
            return None
        self.history.append((label, results))
        lines = [format_threshold_report(r["thresholds"], title=r["target"]) for r in results]
        self.log.info("\n" + format_table(results, title=f"verification: {label}") + "\n" + "\n".join(lines))
        return results

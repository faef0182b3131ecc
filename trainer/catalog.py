"""`./run.sh list`: the losses, sample-to-sample terms, backbones and recipes this checkout has, one line each.

Names come from the registries (heads.loss_names(), heads.S2S_TERMS, backbones.list_models()) and the files under
configs/, so a new loss, backbone or recipe shows up here by itself; the one-line descriptions of losses and
backbones live below (a test checks that every registered name has one), a recipe's is its file's first comment.
"""
from __future__ import annotations

from pathlib import Path

from trainer.config import REPO_ROOT

LOSSES = {
    "softmax": "normalised softmax: cross-entropy over s*cos (s=64)",
    "cosface": "CosFace: target logit s*(cos - m), s=64, m=0.4 (arcface_torch)",
    "arcface": "ArcFace: target logit s*cos(theta + m), s=64, m=0.5 (straight_through=true: arcface_torch's)",
    "combined": "combined margin s*(cos(m1*theta + m2) - m3): head.margin=[m1, m2, m3]",
    "uce": "UCE / uniform BCE (UniFace): per-class softplus terms around one learned bias b (t = b/s)",
    "gb_cosface": "GB-CosFace: CosFace against a global boundary p_v (EMA), s=32, m=0.16, alpha=0.15",
    "unitsface": "UniTSFace: CosFace(0.4) + USS (s=64, m=0.1, learned t = b/s) over the class memory from epoch 1",
    "arcface_uss": "ArcFace + USS (UniTSFace ablation)",
    "cosface_s2s_softmax": "CosFace + sample-to-sample softmax over the class memory (UniTSFace ablation)",
    "cosface_s2s_bce": "CosFace + sample-to-sample BCE with one bias per class (UniTSFace ablation)",
    "epl": "EPL: CosFace + empirical prototypes (adaptive margin k=0.7) from epoch 3, averaged",
    "arcface_epl": "EPL's ArcFace_EPL: ArcFace + empirical prototypes",
    "uce_epl": "EPL's UniFace_EPL: UCE + empirical prototypes",
    "uce_diverse": "UCE with one bias per class (UniFace's diverse variant)",
}

S2S_TERMS = {
    "uss": "USS: per-class softplus terms over the latest feature of every class, one learned b (t = b/s)",
    "s2s_softmax": "softmax over the class memory's similarities, positive reduced by m",
    "s2s_bce": "like USS with one bias per class",
    "epl": "empirical prototypes (softsign-weighted running class means), adaptive margin",
}

BACKBONES = {
    "r18": "IResNet-18 (arcface_torch parameter names: its backbone.pth loads strictly)",
    "r34": "IResNet-34 (arcface_torch)",
    "r50": "IResNet-50 (arcface_torch; the papers' R50)",
    "r100": "IResNet-100 (arcface_torch)",
    "r200": "IResNet-200 (arcface_torch; UniTSFace's WebFace42M row)",
    "iresnet_tiny": "r18's depths at a quarter of its widths, stride-2 stem: the CPU demo (model.kwargs resizes it)",
}


def _parameters(name: str) -> str:
    """Parameter count at the factory's defaults, built on the meta device (no memory, no init)."""
    import torch

    import backbones
    with torch.device("meta"):
        model = backbones.get_model(name)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def recipe_line(path: Path) -> str:
    """A recipe's first comment line (its paper row), without the leading '#'."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return "(no header comment)"


def recipes() -> list[Path]:
    return sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if p.name != "base.yaml")


def _rows(rows: list[tuple[str, str]], width: int = 120) -> list[str]:
    """Aligned `  name  text` lines, each cut to ``width`` at the last clause boundary that fits."""
    pad = max((len(n) for n, _ in rows), default=0) + 2
    out = []
    for name, text in rows:
        line = f"  {name:<{pad}}{text}"
        if len(line) > width:
            cut = line[:width - 4]
            at = max(cut.rfind(", "), cut.rfind(": "), cut.rfind(" ("), cut.rfind("; "))
            line = (cut[:at] if at > pad + 2 else cut).rstrip(" ,:;") + " ..."
        out.append(line)
    return out


def format_catalog(with_parameters: bool = True) -> str:
    import backbones
    import heads
    from heads.registry import PRESETS
    lines = ["losses (head.loss=NAME, or loss=NAME on the command line):"]
    lines += _rows([(n, LOSSES.get(n) or (f"= {PRESETS[n]}" if n in PRESETS else "(no description)"))
                    for n in heads.loss_names()])
    lines += ["", "sample-to-sample terms (head.s2s=NAME beside any loss above):"]
    lines += _rows([(n, S2S_TERMS.get(n, "(no description)")) for n in sorted(heads.S2S_TERMS)])
    lines += ["", "backbones (model.name=NAME; parameters at num_features=512):"]
    lines += _rows([(n, (f"{_parameters(n):>7}  " if with_parameters else "") + BACKBONES.get(n, "(no description)"))
                    for n in backbones.list_models()])
    lines += ["", "recipes (./run.sh configs/NAME.yaml [key=value ...]; every key: configs/base.yaml):"]
    lines += _rows([(p.stem, recipe_line(p)) for p in recipes()])
    return "\n".join(lines)

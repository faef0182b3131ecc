"""A plain single-process reference of every loss, written from the formulas (shares no code with heads/).

One process, all classes (or a given subset of columns), float64. ``Reference(cfg, centres).step(X, Y, epoch)``
computes the loss of the global batch, its gradients (w.r.t. X, the centres, b, the per-class biases) with autograd,
applies the state updates in the papers' order (EPL prototypes before the loss, the latest-feature memory after it,
USS / s2s-BCE bias initialisation, GB-CosFace's p_v) and one torch.optim.SGD step on the learnable tensors.

The config is the same dict the heads take (presets expanded here, defaults written out again).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PRESETS = {
    "unitsface": {"loss": "cosface", "s2s": "uss"},
    "arcface_uss": {"loss": "arcface", "s2s": "uss"},
    "cosface_s2s_softmax": {"loss": "cosface", "s2s": "s2s_softmax"},
    "cosface_s2s_bce": {"loss": "cosface", "s2s": "s2s_bce"},
    "epl": {"loss": "cosface", "s2s": "epl"},
    "arcface_epl": {"loss": "arcface", "s2s": "epl"},
    "uce_epl": {"loss": "uce", "s2s": "epl"},
    "uce_diverse": {"loss": "uce", "diverse": True},
}


def expand(cfg: dict) -> dict:
    """The config with its preset expanded and every default written out."""
    cfg = dict(cfg)
    if cfg["loss"] in PRESETS:
        cfg = {**PRESETS[cfg["loss"]], **{k: v for k, v in cfg.items() if k != "loss"}}
    loss = cfg["loss"]
    d = {"scale": 32.0 if loss == "gb_cosface" else 64.0, "margin": {"cosface": 0.4, "arcface": 0.5, "uce": 0.4,
                                                                      "gb_cosface": 0.16}[loss],
         "neg_weight": 1.0, "bias_init": None, "diverse": False, "clamp": True, "alpha": 0.15, "pv_momentum": 0.01,
         "pv_clamp": [0.5, 0.7], "s2s": None, "s2c_weight": 1.0}
    s2s = cfg.get("s2s")
    if s2s is not None:
        d.update({"s2s_scale": 64.0, "s2s_margin": 0.1, "s2s_clamp": True, "s2s_weight": 1.0, "s2s_k": 0.7,
                  "s2s_init": "feature", "s2s_start_epoch": 3 if s2s == "epl" else 1,
                  "s2s_combine": "mean" if s2s == "epl" else "sum"})
    return {**d, **cfg}


def unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-5)


def as_head_state(name: str, value: torch.Tensor) -> torch.Tensor:
    """A reference state entry as the head stores it: the latest-feature memory keeps unit rows (heads/memory.py)."""
    return unit(value) if name == "memory" else value


def sp(z: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """softplus, argument clamped to [-clamp, clamp] when given (the official code's clamp)."""
    return F.softplus(z.clamp(-clamp, clamp) if clamp is not None else z)


class Reference:
    """Full-class state and one training step of the configured loss."""

    def __init__(self, cfg: dict, centres: torch.Tensor, lr: float, momentum: float, weight_decay: float,
                 prototypes: torch.Tensor | None = None):
        self.cfg = c = expand(cfg)
        C, D = centres.shape
        self.C = C
        self.W = centres.clone().requires_grad_(True)
        params = [self.W]
        self.b = self.class_bias = self.s2s_b = self.s2s_class_bias = None
        if c["loss"] == "uce":
            init = c["bias_init"] if c["bias_init"] is not None else math.log(10 * C * 1.0)
            init = float(torch.tensor(init, dtype=torch.float32))  # the head's b is created as a float32 value
            if c["diverse"]:
                self.class_bias = torch.full((C,), init, dtype=centres.dtype, requires_grad=True)
                params.append(self.class_bias)
            else:
                self.b = torch.tensor(init, dtype=centres.dtype, requires_grad=True)
                params.append(self.b)
        if c["s2s"] == "uss":
            self.s2s_b = torch.zeros((), dtype=centres.dtype, requires_grad=True)
            params.append(self.s2s_b)
        if c["s2s"] == "s2s_bce":
            self.s2s_class_bias = torch.zeros(C, dtype=centres.dtype, requires_grad=True)
            params.append(self.s2s_class_bias)
        self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.M = torch.zeros(C, D, dtype=centres.dtype)  # latest features
        self.M_valid = torch.zeros(C, dtype=torch.bool)
        if prototypes is not None:  # "noise" initialisation: given rows, all in use
            self.P, self.P_valid = prototypes.clone(), torch.ones(C, dtype=torch.bool)
        else:
            self.P, self.P_valid = torch.zeros(C, D, dtype=centres.dtype), torch.zeros(C, dtype=torch.bool)
        self.p_v, self.p_v_started = None, False

    # --- the sample-to-class losses over columns S ---------------------------------------------------------------
    def target_cos_margin(self, cos_y: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c["loss"] == "arcface":
            return torch.cos(torch.acos(cos_y) + c["margin"])
        return cos_y - c["margin"]

    def s2c_loss(self, X, y, S):
        """y: the target column of each sample within S."""
        c = self.cfg
        s, n = c["scale"], len(y)
        cos = unit(X) @ unit(self.W[S]).T
        onehot = F.one_hot(y, len(S)).bool()
        cos_y = cos[torch.arange(n), y]
        if c["loss"] in ("cosface", "arcface"):
            logits = s * torch.where(onehot, self.target_cos_margin(cos_y)[:, None], cos)
            return (torch.logsumexp(logits, 1) - logits[torch.arange(n), y]).mean()
        if c["loss"] == "uce":
            z = s * torch.where(onehot, (cos_y - c["margin"])[:, None], cos)
            b = self.class_bias[S][None, :] if c["diverse"] else self.b
            clamp = s if c["clamp"] else None
            terms = torch.where(onehot, sp(-(z - b), clamp), c["neg_weight"] * sp(z - b, clamp))
            return terms.sum(1).mean()
        if c["loss"] == "gb_cosface":
            m, alpha = c["margin"], c["alpha"]
            c_p = cos_y
            c_n = torch.logsumexp((s * cos).masked_fill(onehot, float("-inf")), 1) / s
            v = ((c_p + c_n) / 2).detach()
            if not self.p_v_started:
                self.p_v, self.p_v_started = v.mean(), True
            lo, hi = c["pv_clamp"]
            p_v = self.p_v.clamp(lo, hi)
            v_hat = v + alpha * (p_v - v)
            loss = 0.5 * F.softplus(2 * s * (v_hat - (c_p - m))).mean() + \
                0.5 * F.softplus(2 * s * (c_n - (v_hat - m))).mean()
            self.p_v = (1 - c["pv_momentum"]) * p_v + c["pv_momentum"] * v.mean()
            return loss
        raise AssertionError(c["loss"])

    # --- the sample-to-sample terms over the memory rows of S ------------------------------------------------------
    def s2s_loss(self, X, y, S):
        c = self.cfg
        s, n = c["s2s_scale"], len(y)
        kind = c["s2s"]
        rows, valid = (self.P[S], self.P_valid[S]) if kind == "epl" else (self.M[S], self.M_valid[S])
        cos = unit(X) @ unit(rows).T
        onehot = F.one_hot(y, len(S)).bool()
        cos_y = cos[torch.arange(n), y]
        if kind in ("uss", "s2s_bce"):
            z = s * torch.where(onehot, (cos_y - c["s2s_margin"])[:, None], cos)
            with torch.no_grad():  # data-driven bias: mean over samples of logsumexp over written negatives
                negs = z.masked_fill(onehot | ~valid[None, :], float("-inf"))
                lse = torch.logsumexp(negs, 1)
                data = lse[torch.isfinite(lse)].mean() if torch.isfinite(lse).any() else None
                if kind == "uss" and self.s2s_b <= 0 and data is not None:
                    self.s2s_b.copy_(data)
                if kind == "s2s_bce" and self.s2s_class_bias.mean() <= 0 and data is not None:
                    self.s2s_class_bias += data
            b = self.s2s_b if kind == "uss" else self.s2s_class_bias[S][None, :]
            clamp = s if c["s2s_clamp"] else None
            terms = torch.where(onehot, sp(-(z - b), clamp), sp(z - b, clamp))
            return (terms * valid[None, :]).sum() / n
        if kind == "s2s_softmax":
            target = cos_y - c["s2s_margin"]
        else:  # epl: adaptive margin k * sg(cos_y)
            target = cos_y - c["s2s_k"] * cos_y.detach()
        logits = s * torch.where(onehot, target[:, None], cos)
        logits = logits.masked_fill(~valid[None, :], float("-inf"))
        keep = valid[y]
        if not keep.any():
            return X.sum() * 0.0
        per_sample = torch.logsumexp(logits[keep], 1) - logits[keep][torch.arange(int(keep.sum())), y[keep]]
        return per_sample.mean()

    # --- state updates -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_memory(self, X, Y):
        for i in range(len(Y)):  # in batch order: the last occurrence of a class wins
            self.M[Y[i]] = X[i]
            self.M_valid[Y[i]] = True

    @torch.no_grad()
    def update_prototypes(self, X, Y):
        last = {}
        for i in range(len(Y)):
            last[int(Y[i])] = i
        for cls, i in last.items():
            x = unit(X[i])
            if self.P_valid[cls]:
                cs = torch.dot(self.P[cls], x)
                a = cs / (1 + cs.abs())
                self.P[cls] = unit(a * self.P[cls] + (1 - a) * x)
            else:
                self.P[cls] = x
            self.P_valid[cls] = True

    # --- one step ----------------------------------------------------------------------------------------------------
    def step(self, X: torch.Tensor, Y: torch.Tensor, epoch: int, columns: torch.Tensor | None = None) -> dict:
        """Loss and gradients of one step (then the SGD step). columns: the classes in play (None = all)."""
        c = self.cfg
        S = torch.arange(self.C) if columns is None else columns
        relabel = torch.full((self.C,), -1, dtype=torch.long)
        relabel[S] = torch.arange(len(S))
        y = relabel[Y]
        assert (y >= 0).all(), "every label must be among the columns"
        X = X.clone().requires_grad_(True)
        s2s = c["s2s"]
        if s2s == "epl":
            self.update_prototypes(X.detach(), Y)
        active = s2s is not None and epoch >= c["s2s_start_epoch"]
        losses = {}
        if not active or c["s2c_weight"] != 0:
            losses["s2c"] = self.s2c_loss(X, y, S)
        if active:
            losses["s2s"] = self.s2s_loss(X, y, S)
            wc, ws = c["s2c_weight"], c["s2s_weight"]
            loss = ws * losses["s2s"] + (wc * losses["s2c"] if "s2c" in losses else 0.0)
            if c["s2s_combine"] == "mean":
                loss = loss / (wc + ws)
        else:
            loss = losses["s2c"]
        self.opt.zero_grad()
        loss.backward()
        out = {"loss": loss.detach(), "x": X.grad.clone(), "losses": {k: v.detach() for k, v in losses.items()},
               "centres": None if self.W.grad is None else self.W.grad.clone()}
        for name in ("b", "class_bias", "s2s_b", "s2s_class_bias"):
            t = getattr(self, name)
            if t is not None:
                out[name] = None if t.grad is None else t.grad.clone()
        self.sparse_sgd_step(S)
        if s2s in ("uss", "s2s_bce", "s2s_softmax"):
            self.write_memory(X.detach(), Y)
        return out

    def sparse_sgd_step(self, S: torch.Tensor) -> None:
        """torch.optim.SGD, except that per-class rows outside S (classes not sampled) and their momentum stay."""
        per_class = [t for t in (self.W, self.class_bias, self.s2s_class_bias) if t is not None]
        out = torch.ones(self.C, dtype=torch.bool)
        out[S] = False
        saved = []
        for t in per_class:
            buf = self.opt.state.get(t, {}).get("momentum_buffer")
            saved.append((t, t.detach()[out].clone(), None if buf is None else buf[out].clone()))
        self.opt.step()
        with torch.no_grad():
            for t, rows, buf in saved:
                t[out] = rows
                new_buf = self.opt.state.get(t, {}).get("momentum_buffer")
                if new_buf is not None:
                    new_buf[out] = 0.0 if buf is None else buf

    def state(self) -> dict:
        """Full-class state under canonical names."""
        st = {"centres": self.W.detach().clone(), "memory": self.M.clone(), "memory_valid": self.M_valid.clone(),
              "prototypes": self.P.clone(), "prototypes_valid": self.P_valid.clone(), "p_v": self.p_v}
        mom = self.opt.state.get(self.W, {}).get("momentum_buffer")
        st["centres_momentum"] = mom.clone() if mom is not None else torch.zeros_like(self.W)
        for name in ("b", "class_bias", "s2s_b", "s2s_class_bias"):
            t = getattr(self, name)
            if t is not None:
                st[name] = t.detach().clone()
        return st

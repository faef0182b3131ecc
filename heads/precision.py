"""The precision of the head's big products: [N, D] x [D, K] cosines and their two backward products.

``head.matmul_precision`` (configs/base.yaml; ``heads.set_matmul_precision(head, p)``):

    fp32   float32 operands and arithmetic (torch's default; TF32 stays off unless switched on globally)
    tf32   float32 operands rounded to TF32 (10-bit mantissa) inside the tensor cores, float32 accumulation: CUDA only
           (Ampere and later); elsewhere it is fp32
    bf16   bfloat16 operands (8-bit mantissa), float32 accumulation and a float32 result: on CUDA one cuBLAS call
           (``torch.mm(..., out_dtype=torch.float32)``); on the CPU the same arithmetic emulated (bf16-rounded operands
           multiplied in float32; slower than fp32, for tests)

Only the three products use it; everything else (norms, softmax, softplus, sums, the optimizer) stays in the head's
own dtype. Float64 operands are never rounded: the float64 exactness tests keep their meaning in every mode.

The default is fp32. On a GPU the right default is the fastest mode whose verification accuracy at the demo scale
equals fp32's (tf32 or bf16 make these products 4-8x faster on an H100/H200, and the head is then bound by memory
passes, not by the products); that needs a GPU run of bench/gpu_check.py and of the demo in each mode, which this
project has not had yet. Expected error of one cosine: fp32 ~1e-7, tf32 ~1e-3 x |cos| summed over D (~5e-4 at
D = 512), bf16 ~4e-3 x that (~2e-3); the logits are s = 64 times these.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn

MATMUL_PRECISIONS = ("fp32", "tf32", "bf16")
_OUT_DTYPE_OK: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=float32) works for bf16 there


def check_precision(precision: str, key: str = "matmul_precision") -> str:
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"head.{key}: expected one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}")
    return precision


def set_matmul_precision(head: nn.Module, precision: str) -> None:
    """Set the precision of the head's [N, D] x [D, K] products on ``head`` and every submodule."""
    check_precision(precision)
    for module in head.modules():
        module.matmul_precision = precision


def matmul_precision_of(module: nn.Module) -> str:
    return getattr(module, "matmul_precision", "fp32")


@contextlib.contextmanager
def _tf32_matmuls() -> None:
    """TF32 for CUDA float32 matmuls inside the block (the previous setting restored after)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = old


def _bf16_mm(a: Tensor, b: Tensor) -> Tensor:
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    device = a.device.type
    if _OUT_DTYPE_OK.get(device, device == "cuda"):
        try:
            out = torch.mm(a16, b16, out_dtype=torch.float32)
            _OUT_DTYPE_OK[device] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError) as e:
            _OUT_DTYPE_OK[device] = False
            if device == "cuda":
                warnings.warn(f"matmul_precision bf16: torch.mm(out_dtype=float32) is not available here ({e}); "
                              f"bf16 operands are multiplied in float32 instead (same result, no speed-up)")
    return torch.mm(a16.to(torch.float32), b16.to(torch.float32))


def matmul(a: Tensor, b: Tensor, precision: str = "fp32") -> Tensor:
    """a [M, D] @ b [D, K] in ``precision`` (see the module docstring); float64 operands always in float64."""
    if precision == "fp32" or a.dtype == torch.float64 or b.dtype == torch.float64:
        return torch.mm(a, b)
    if precision == "tf32":
        if a.is_cuda:
            with _tf32_matmuls():
                return torch.mm(a, b)
        return torch.mm(a, b)
    if precision == "bf16":
        out_dtype = torch.promote_types(a.dtype, b.dtype)
        out = _bf16_mm(a, b)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    raise ValueError(f"matmul: precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")

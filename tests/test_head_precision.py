"""head.matmul_precision: bf16 / tf32 products stay within their tolerance of fp32; float64 is never rounded."""
import pytest
import torch

import heads
from heads import EmbeddedLoss, HeadConfigError, build_head
from heads.partition import ClassPartition
from heads.precision import matmul

C, D, N = 300, 64, 24
FAMILIES = ["cosface", "arcface", "uce", "gb_cosface", "unitsface", "cosface_s2s_bce", "cosface_s2s_softmax", "epl"]


def run(loss: str, precision: str, dtype=torch.float32, seed: int = 0):
    """(loss, dL/dx, centre-row gradient) of one training forward + backward; memory full, the s2s term on."""
    cfg = {"loss": loss, "matmul_precision": precision, "scale": 32.0}
    head = build_head(cfg, C, D, ClassPartition(C, 1, 0), seed=1).to(dtype)
    g = torch.Generator().manual_seed(seed)
    if isinstance(head, EmbeddedLoss):
        memory = head.s2s.memory
        rows = memory.features if hasattr(memory, "features") else memory.prototypes
        rows.copy_(torch.nn.functional.normalize(torch.randn(rows.shape, generator=g, dtype=dtype), dim=1))
        memory.valid.fill_(True)
        head.set_epoch(head.start_epoch)
    s2c = head.s2c if isinstance(head, EmbeddedLoss) else head
    x = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, C, (N,), generator=g)
    loss, _ = head(x, y)
    loss.backward()
    _, grad_w = s2c.pop_row_grads()
    return loss.detach(), x.grad, grad_w


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("loss", FAMILIES)
def test_bf16_and_tf32_products_stay_within_their_tolerance_of_fp32(loss):
    ref = run(loss, "fp32")
    for precision, tol in (("tf32", 1e-6), ("bf16", 5e-2)):  # tf32 is fp32 off CUDA; bf16: 8-bit mantissa operands
        got = run(loss, precision)
        for name, a, b in zip(("loss", "dL/dx", "dL/dw"), got, ref):
            assert rel(a, b) <= tol, (loss, precision, name, rel(a, b))
    bf16 = run(loss, "bf16")
    assert not torch.equal(bf16[1], ref[1])  # the bf16 path really rounds the operands


@pytest.mark.parametrize("loss", ["cosface", "uce", "unitsface", "epl"])
def test_float64_is_never_rounded(loss):
    ref = run(loss, "fp32", torch.float64)
    for precision in ("tf32", "bf16"):
        got = run(loss, precision, torch.float64)
        for a, b in zip(got, ref):
            assert torch.equal(a, b), (loss, precision)


def test_matmul_modes_on_plain_tensors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 33, generator=g), torch.randn(33, 5, generator=g)
    exact = a.double() @ b.double()
    assert torch.equal(matmul(a, b, "fp32"), a @ b)
    bf = matmul(a, b, "bf16")
    assert bf.dtype == torch.float32
    emulated = a.bfloat16().double() @ b.bfloat16().double()  # bf16 operands, (near-)exact accumulation
    assert torch.allclose(bf.double(), emulated, rtol=0, atol=1e-4)
    assert 1e-4 < float((bf.double() - exact).abs().max()) < 0.2
    assert torch.equal(matmul(a.double(), b.double(), "bf16"), a.double() @ b.double())
    with pytest.raises(ValueError, match="precision"):
        matmul(a, b, "fp16")


def test_the_config_key_sets_every_submodule_and_bad_values_name_the_key():
    head = build_head({"loss": "unitsface", "matmul_precision": "bf16"}, C, D, ClassPartition(C, 1, 0), seed=0)
    assert {m.matmul_precision for m in head.modules()} == {"bf16"}
    default = build_head({"loss": "cosface"}, C, D, ClassPartition(C, 1, 0), seed=0)
    assert {m.matmul_precision for m in default.modules()} == {"fp32"}
    with pytest.raises(HeadConfigError, match=r"head\.matmul_precision: expected one of fp32, tf32, bf16, got 'fp16'"):
        build_head({"loss": "cosface", "matmul_precision": "fp16"}, C, D, ClassPartition(C, 1, 0), seed=0)
    heads.set_matmul_precision(default, "tf32")
    assert {m.matmul_precision for m in default.modules()} == {"tf32"}
    with pytest.raises(ValueError, match="matmul_precision"):
        heads.set_matmul_precision(default, "int8")


def test_the_base_config_names_the_key():
    from trainer.config import load_config
    cfg = load_config(None, ["data.root=unused", "head.matmul_precision=bf16"])
    assert cfg["head"]["matmul_precision"] == "bf16"
    assert load_config(None, ["data.root=unused"])["head"]["matmul_precision"] == "fp32"

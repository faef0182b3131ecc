"""IResNet: the "improved" pre-activation ResNet used by ArcFace / arcface_torch.

Layout (input 3x112x112, every conv 3x3 unless said otherwise, all convs bias-free):

    stem     conv1 (3 -> 64, stride 1) -> bn1 -> prelu
    stage k  (k = 1..4, widths 64/128/256/512): `depth_k` IBasicBlocks, the first with stride 2
    head     bn2 (BN2d) -> flatten (512*7*7) -> dropout -> fc (-> num_features) -> features (BN1d, weight == 1)

    IBasicBlock(x) = bn3(conv2_stride(prelu(bn2(conv1(bn1(x)))))) + shortcut(x)
    shortcut       = downsample (conv1x1 stride + BN) when stride != 1 or channels change, else identity

Parameter / buffer names and shapes equal arcface_torch's `backbones/iresnet.py`, so its `backbone.pth` loads
strictly. BatchNorm: eps 1e-5, momentum 0.1 (PyTorch's default, which arcface_torch keeps). Initialisation as
arcface_torch: conv weights ~ N(0, 0.1), BN weight 1 / bias 0, `features.weight` fixed at 1 and not trained.

Precision: the trunk (stem .. dropout) runs under bf16 (`autocast_dtype == "bf16"`) or fp16 ("fp16": GPUs without
bf16 tensor cores; the trainer scales the loss) autocast only when the input is on CUDA; on any other device it runs
in fp32. fc and features always run in fp32 (autocast disabled around them), so the embedding is float32 whatever
the trunk did.

The same class builds small variants (narrower stages, fewer blocks, a strided stem) for CPU demos.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.1
CONV_INIT_STD = 0.1

AUTOCAST_CHOICES = (None, "fp32", "bf16", "fp16")
_AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (the projection shortcut)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def batch_norm2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv_out_size(size: int, stride: int) -> int:
    """Spatial size after a conv with kernel 3 / padding 1 (or kernel 1 / padding 0) and the given stride."""
    return (size - 1) // stride + 1


def trunk_autocast_enabled(device_type: str, autocast_dtype: str | None) -> bool:
    """bf16 / fp16 autocast for the trunk only when asked for and the input is on CUDA; fp32 everywhere else."""
    return autocast_dtype in _AUTOCAST_TYPES and device_type == "cuda"


def trunk_autocast(device_type: str, autocast_dtype: str | None) -> torch.autocast:
    """The autocast context the trunk runs under (bf16, fp16 or explicitly disabled).

    Disabling (rather than not entering) autocast makes `autocast_dtype` the single source of truth even inside
    an outer autocast region.
    """
    enabled = trunk_autocast_enabled(device_type, autocast_dtype)
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_TYPES.get(autocast_dtype, torch.bfloat16),
                          enabled=enabled)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = batch_norm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.bn2 = batch_norm2d(out_ch)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, stride)
        self.bn3 = batch_norm2d(out_ch)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), batch_norm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone mapping [N, 3, H, W] images to [N, num_features] float32 embeddings.

    Args:
        layers: blocks per stage, e.g. [3, 4, 14, 3] for r50.
        widths: channels per stage (arcface_torch: 64, 128, 256, 512).
        stem_width: channels of the stem conv (arcface_torch: 64).
        stem_stride: stride of the stem conv (arcface_torch: 1; 2 quarters the cost of small demo models).
        num_features: embedding size.
        dropout: dropout probability before fc.
        autocast_dtype: None / "fp32" (trunk in fp32), "bf16" or "fp16" (trunk under that autocast on CUDA).
        input_size: side of the square input image; fixes the fc input size (112 -> 7x7 for stem_stride 1).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        stem_stride: int = 1,
        num_features: int = 512,
        dropout: float = 0.0,
        autocast_dtype: str | None = None,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        layers, widths = list(layers), list(widths)
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"IResNet: layers {layers} and widths {widths} must be non-empty and of equal length")
        if any(d < 1 for d in layers) or any(w < 1 for w in widths) or stem_width < 1:
            raise ValueError(f"IResNet: depths {layers}, widths {widths} and stem_width {stem_width} must be >= 1")
        if stem_stride < 1 or num_features < 1 or input_size < 1:
            raise ValueError(
                f"IResNet: stem_stride ({stem_stride}), num_features ({num_features}) and input_size "
                f"({input_size}) must be >= 1"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"IResNet: dropout must be in [0, 1), got {dropout}")
        if autocast_dtype not in AUTOCAST_CHOICES:
            raise ValueError(
                f"IResNet: autocast_dtype must be one of {AUTOCAST_CHOICES}, "
                f"got {autocast_dtype!r}"
            )
        self.autocast_dtype = autocast_dtype
        self.num_features = num_features
        self.input_size = input_size

        # stem
        self.conv1 = conv3x3(3, stem_width, stem_stride)
        self.bn1 = batch_norm2d(stem_width)
        self.prelu = nn.PReLU(stem_width)
        size = conv_out_size(input_size, stem_stride)

        # stages layer1..layerK, stride 2 at each stage's first block
        in_ch = stem_width
        for k, (depth, width) in enumerate(zip(layers, widths), start=1):
            blocks = [IBasicBlock(in_ch, width, stride=2)] + [IBasicBlock(width, width) for _ in range(depth - 1)]
            self.add_module(f"layer{k}", nn.Sequential(*blocks))
            in_ch = width
            size = conv_out_size(size, 2)
        self.num_stages = len(layers)

        # head of the network
        self.bn2 = batch_norm2d(in_ch)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * size * size, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)

        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, CONV_INIT_STD)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages, bn2, flatten, dropout: [N, 3, H, W] -> [N, C*h*w] (in the autocast dtype, if any)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for k in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{k}")(x)
        x = torch.flatten(self.bn2(x), 1)
        return self.dropout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(
                f"IResNet expects images [N, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}"
            )
        device_type = x.device.type
        with trunk_autocast(device_type, self.autocast_dtype):
            x = self.trunk(x)
        with torch.autocast(device_type=device_type, enabled=False):
            x = x.to(self.fc.weight.dtype)  # fp32 tail after a bf16 trunk (float64 when the model is, in tests)
            return self.features(self.fc(x))


def iresnet(
    depths: Sequence[int], num_features: int = 512, dropout: float = 0.0, autocast_dtype: str | None = None
) -> IResNet:
    """An arcface_torch IResNet with the given stage depths (widths 64/128/256/512, stem 64 stride 1, 112x112)."""
    return IResNet(depths, num_features=num_features, dropout=dropout, autocast_dtype=autocast_dtype)


def iresnet18(num_features: int = 512, dropout: float = 0.0, autocast_dtype: str | None = None) -> IResNet:
    return iresnet([2, 2, 2, 2], num_features, dropout, autocast_dtype)


def iresnet34(num_features: int = 512, dropout: float = 0.0, autocast_dtype: str | None = None) -> IResNet:
    return iresnet([3, 4, 6, 3], num_features, dropout, autocast_dtype)


def iresnet50(num_features: int = 512, dropout: float = 0.0, autocast_dtype: str | None = None) -> IResNet:
    return iresnet([3, 4, 14, 3], num_features, dropout, autocast_dtype)


def iresnet100(num_features: int = 512, dropout: float = 0.0, autocast_dtype: str | None = None) -> IResNet:
    return iresnet([3, 13, 30, 3], num_features, dropout, autocast_dtype)


def iresnet200(num_features: int = 512, dropout: float = 0.0, autocast_dtype: str | None = None) -> IResNet:
    return iresnet([6, 26, 60, 6], num_features, dropout, autocast_dtype)


def iresnet_tiny(
    depths: Sequence[int] = (2, 2, 2, 2),
    widths: Sequence[int] = (16, 32, 64, 128),
    stem_width: int = 16,
    stem_stride: int = 2,
    num_features: int = 512,
    dropout: float = 0.0,
    autocast_dtype: str | None = None,
    input_size: int = 112,
) -> IResNet:
    """A small IResNet for CPU demos: same blocks and names, configurable depths/widths, a strided stem.

    Default: r18's depths at a quarter of its widths, stem stride 2 (fc input 128*4*4): ~1.75M parameters,
    ~0.044 GMACs; ~136 img/s forward+backward at batch 64, 112x112, one CPU thread (2-core dev machine).
    """
    return IResNet(
        depths,
        widths=widths,
        stem_width=stem_width,
        stem_stride=stem_stride,
        num_features=num_features,
        dropout=dropout,
        autocast_dtype=autocast_dtype,
        input_size=input_size,
    )

"""The segmentation network: a small U-Net of depthwise-separable blocks, built for the CPU.

Sized for live display on two CPU cores: 6-7 ms per 256 x 256 grey frame in onnxruntime
(fp32, 2 threads). A full-resolution head keeps thin structures (needle shafts, fascia bands) that
a head at half resolution would blur away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Sequential:
    pad = (kernel // 2) * dilation
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SeparableBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, residual when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise = conv_bn_relu(c_in, c_in, 3, stride, groups=c_in, dilation=dilation)
        self.pointwise = conv_bn_relu(c_in, c_out, 1)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise(self.depthwise(x))
        return x + y if self.residual else y


class SegNet(nn.Module):
    """Grey ``(N, 1, H, W)`` to class logits ``(N, n_classes, H, W)``; H and W divisible by 16."""

    def __init__(
        self,
        n_classes: int = 5,
        channels: tuple[int, int, int, int] = (16, 32, 64, 128),
        depth: tuple[int, int, int, int] = (1, 2, 3, 3),
    ) -> None:
        super().__init__()
        c0, c1, c2, c3 = channels
        self.stem = nn.Sequential(
            conv_bn_relu(1, c0, 3, 2), *[SeparableBlock(c0, c0) for _ in range(depth[0])]
        )
        self.enc1 = nn.Sequential(
            SeparableBlock(c0, c1, 2), *[SeparableBlock(c1, c1) for _ in range(depth[1])]
        )
        self.enc2 = nn.Sequential(
            SeparableBlock(c1, c2, 2), *[SeparableBlock(c2, c2) for _ in range(depth[2])]
        )
        # Dilations widen the context at 1/16 scale: nerves are recognised by their surroundings.
        self.enc3 = nn.Sequential(
            SeparableBlock(c2, c3, 2),
            *[SeparableBlock(c3, c3, dilation=2 ** (i % 3)) for i in range(depth[3])],
        )
        self.dec2 = SeparableBlock(c3 + c2, c2)
        self.dec1 = SeparableBlock(c2 + c1, c1)
        self.dec0 = SeparableBlock(c1 + c0, c0)
        self.full = conv_bn_relu(1, 8, 3)
        self.head = nn.Sequential(conv_bn_relu(c0 + 8, 16, 3), nn.Conv2d(16, n_classes, 1))

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x)
        s1 = self.enc1(s0)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        y = self.dec2(torch.cat([self._up(s3, s2), s2], 1))
        y = self.dec1(torch.cat([self._up(y, s1), s1], 1))
        y = self.dec0(torch.cat([self._up(y, s0), s0], 1))
        return self.head(torch.cat([self._up(y, x), self.full(x)], 1))

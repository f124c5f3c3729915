"""Tiny models the exporter refuses (tests/test_layers.py, tests/test_cli_errors.py): each factory returns
`(model, example_inputs)` like tests/tiny_models.py. LoRA goes on `stem`; `REFUSED` says what the error names."""

from __future__ import annotations

import torch
from torch import nn


class _Clamp(torch.autograd.Function):
    """A straight-through clamp: torch.onnx traces its forward; the device could not run its own backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class ClampBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Clamp.apply(x)


class SpectrumBlock(nn.Module):
    """torch.fft: aten::fft_rfft has no ONNX opset-17 export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()


class Net(nn.Module):
    def __init__(self, block: nn.Module, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.block = block
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


class Conv1dTransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose1d(8, 8, 2, stride=2)
        self.head = nn.Linear(8, 3)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(torch.relu(self.stem(signal))).mean(dim=2))


def _vec() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(4, 16)}


def custom_function():
    torch.manual_seed(0)
    return Net(ClampBlock()), _vec()


def fft():
    torch.manual_seed(0)
    return Net(SpectrumBlock(), 17), _vec()


def softplus():
    torch.manual_seed(0)
    return Net(nn.Sequential(nn.Softplus(), nn.Linear(32, 32))), _vec()


def instance_norm():
    torch.manual_seed(0)
    return Net(nn.Sequential(nn.Unflatten(1, (4, 8)), nn.InstanceNorm1d(4, affine=True), nn.Flatten())), _vec()


def conv_transpose1d():
    torch.manual_seed(0)
    return Conv1dTransposeNet(), {"signal": torch.randn(4, 4, 12)}


# factory -> (what the one error line must name: module, class, op)
REFUSED = {
    "custom_function": ("block", "ClampBlock", "_Clamp"),  # its own backward cannot run on the device
    "fft": ("block", "SpectrumBlock", "aten::fft_rfft"),
    "softplus": ("block.0", "Softplus", "Softplus"),
    "instance_norm": ("block.1", "InstanceNorm1d", "InstanceNormalization"),
    "conv_transpose1d": ("up", "ConvTranspose1d", "ConvTransposeGrad"),
}

DESCRIPTION = {
    "custom_function": "a custom torch.autograd.Function (its backward cannot run on the device)",
    "fft": "torch.fft (no ONNX export)",
    "softplus": "nn.Softplus (no gradient in ONNX Runtime 1.19)",
    "instance_norm": "nn.InstanceNorm1d/2d (no gradient in ONNX Runtime 1.19)",
    "conv_transpose1d": "nn.ConvTranspose1d (no CPU ConvTransposeGrad kernel)",
}

"""Small torch models with fixed seeds, one per layer family the exporter must handle.

Each factory returns `(model, example_inputs)`, the form `edgepeft export package.module:function` takes.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv1(image)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x)


class TextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.norm = nn.LayerNorm(32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj(self.norm(self.embed(tokens))))
        return self.head(x.mean(dim=1))


def _randomize_stats(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, as a trained model has."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model


def mlp() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return MLP(), {"x": torch.randn(4, 16)}


def convnet() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return _randomize_stats(ConvNet()), {"image": torch.randn(4, 1, 12, 12)}


def textnet() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return TextNet(), {"tokens": torch.randint(0, 100, (4, 10))}


def not_a_factory() -> str:
    return "nope"

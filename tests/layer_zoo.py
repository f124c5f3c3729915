"""One tiny seeded torch model per building block the exporter must compile (issue 11).

Each factory returns `(model, example_inputs)` like tests/tiny_models.py; the inputs are given in the order of
`forward`'s arguments. Every model is a classifier: its output is (batch, classes). Where a block sits in the
middle, a LoRA-adapted "stem" comes before it, so the training step must send gradients back through it.

`ZOO` names, for each entry, its factory, its LoRA `targets` and its trained `head` (`modules_to_save`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 4
CLASSES = 3
WIDTH = 32
VOCAB = 100
SEQ = 6

Example = tuple[nn.Module, dict[str, torch.Tensor]]


class Stacked(nn.Module):
    """stem (Linear) -> block -> head (Linear), on a (batch, 16) input or a (batch, SEQ, 16) one."""

    def __init__(self, block: nn.Module, out: int = WIDTH, pool: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.block = block
        self.head = nn.Linear(out, CLASSES)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.stem(x))
        return self.head(y.mean(dim=1) if self.pool else y)


class ConvStacked(nn.Module):
    """stem (Conv2d 1->8) -> block -> global mean -> head, on a (batch, 1, 8, 8) image."""

    def __init__(self, block: nn.Module, out: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = block
        self.head = nn.Linear(out, CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.relu(self.stem(image))).mean(dim=(2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv(signal)))).mean(dim=2))


class TextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.embed(tokens).mean(dim=1))))


class BagNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, WIDTH, mode="mean")
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.bag(tokens))))


class AttentionNet(nn.Module):
    """stem -> nn.MultiheadAttention (self-attention, batch_first) -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y, _ = self.attn(h, h, h, need_weights=False)
        return self.head(y.mean(dim=1))


class EncoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.layer = nn.TransformerEncoderLayer(WIDTH, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.stem(x)).mean(dim=1))


class DecoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.layer = nn.TransformerDecoderLayer(WIDTH, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.stem(x), memory).mean(dim=1))


class SdpaNet(nn.Module):
    """Hand-written attention through F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.query = nn.Linear(WIDTH, WIDTH)
        self.key = nn.Linear(WIDTH, WIDTH)
        self.value = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        b, s, _ = h.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, 2, WIDTH // 2).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.query(h)), heads(self.key(h)), heads(self.value(h)))
        return self.head(y.transpose(1, 2).reshape(b, s, WIDTH).mean(dim=1))


class RecurrentNet(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], num_layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.rnn = cell(WIDTH, WIDTH // 2 if bidirectional else WIDTH, num_layers, batch_first=True,
                        bidirectional=bidirectional)  # fmt: skip
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.stem(x))
        return self.head(y[:, -1])


class TiedNet(nn.Module):
    """An embedding tied to the output projection (a language-model head): the classes are the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(self.embed(tokens).mean(dim=1))))


class SharedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.relu(self.fc(x)))


class SharedNet(nn.Module):
    """ALBERT-style: one block (Linear + LayerNorm, perturbed weights) applied `uses` times."""

    def __init__(self, uses: int = 2) -> None:
        super().__init__()
        self.uses = uses
        self.stem = nn.Linear(16, WIDTH)
        self.block = SharedBlock()
        self.head = nn.Linear(WIDTH, CLASSES)
        with torch.no_grad():
            self.block.norm.weight.add_(0.1 * torch.randn(WIDTH))
            self.block.norm.bias.add_(0.1 * torch.randn(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for _ in range(self.uses):
            h = self.block(h)
        return self.head(h)


class TwinNormNet(nn.Module):
    """`norms` LayerNorms at their fresh init (weights all ones, biases all zeros): equal values, distinct tensors."""

    def __init__(self, norms: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(16, WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(norms))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norms[0](self.stem(x))
        for norm in self.norms[1:]:
            h = norm(h + torch.relu(self.fc(h)))
        return self.head(h)


def _act(activation: nn.Module) -> nn.Module:
    return nn.Sequential(activation, nn.Linear(WIDTH, WIDTH))


def _bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as a trained model has."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _vec() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(BATCH, 16)}


def _seq() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(BATCH, SEQ, 16)}


def _image() -> dict[str, torch.Tensor]:
    return {"image": torch.randn(BATCH, 1, 8, 8)}


def _tokens() -> dict[str, torch.Tensor]:
    return {"tokens": torch.randint(0, VOCAB, (BATCH, SEQ))}


@dataclass(frozen=True)
class Entry:
    build: Callable[[], Example]
    targets: tuple[str, ...]
    head: tuple[str, ...] = ("head",)
    note: str = ""

    def __call__(self) -> Example:
        torch.manual_seed(0)
        return self.build()


def _conv(block: nn.Module, out: int = 8) -> Callable[[], Example]:
    return lambda: (_bn_stats(ConvStacked(block, out)), _image())


ZOO: dict[str, Entry] = {
    "linear": Entry(lambda: (Stacked(nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, WIDTH))), _vec()), ("stem", "block.1")),
    "conv1d": Entry(lambda: (Conv1dNet(), {"signal": torch.randn(BATCH, 4, 12)}), ("conv", "conv2")),
    "conv2d_grouped": Entry(
        lambda: (ConvStacked(nn.Conv2d(8, 16, 3, padding=1, groups=2), 16), _image()), ("stem", "block")
    ),
    "conv2d_depthwise": Entry(
        lambda: (ConvStacked(nn.Conv2d(8, 8, 3, padding=1, groups=8)), _image()),
        ("stem", "block"),
        note="PEFT needs r divisible by groups: r=8, groups=8",
    ),
    "conv_transpose2d": Entry(
        lambda: (ConvStacked(nn.ConvTranspose2d(8, 4, 2, stride=2), 4), _image()),
        ("stem",),
        note="PEFT has no LoRA for ConvTranspose: frozen, gradients pass through it",
    ),
    "embedding": Entry(lambda: (TextNet(), _tokens()), ("embed", "proj")),
    "embedding_bag": Entry(lambda: (BagNet(), _tokens()), ("proj",), note="PEFT has no LoRA for EmbeddingBag"),
    "layernorm": Entry(lambda: (Stacked(nn.LayerNorm(WIDTH)), _vec()), ("stem",)),
    "groupnorm": Entry(_conv(nn.GroupNorm(2, 8)), ("stem",)),
    "rmsnorm": Entry(lambda: (Stacked(nn.RMSNorm(WIDTH)), _vec()), ("stem",)),
    "batchnorm1d": Entry(lambda: (_bn_stats(Stacked(nn.BatchNorm1d(WIDTH))), _vec()), ("stem",)),
    "batchnorm2d": Entry(_conv(nn.BatchNorm2d(8)), ("stem",)),
    "batchnorm2d_fresh": Entry(
        lambda: (ConvStacked(nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))), _image()),
        ("stem",),
        note="two BatchNorms at their fresh init: equal statistics, each still frozen",
    ),
    "multihead_attention": Entry(
        lambda: (AttentionNet(), _seq()), ("stem", "attn"), note="PEFT's LoRA on nn.MultiheadAttention (in+out proj)"
    ),
    "multihead_attention_frozen": Entry(lambda: (AttentionNet(), _seq()), ("stem",), note="MHA frozen"),
    "transformer_encoder_layer": Entry(lambda: (EncoderNet(), _seq()), ("stem", "linear1", "linear2")),
    "transformer_decoder_layer": Entry(
        lambda: (DecoderNet(), {**_seq(), "memory": torch.randn(BATCH, SEQ, WIDTH)}), ("stem", "linear1", "linear2")
    ),
    "sdpa": Entry(lambda: (SdpaNet(), _seq()), ("query", "value")),
    "gru": Entry(lambda: (RecurrentNet(nn.GRU), _seq()), ("stem",), note="PEFT has no LoRA for GRU"),
    "gru_bidirectional_2layers": Entry(
        lambda: (RecurrentNet(nn.GRU, num_layers=2, bidirectional=True), _seq()), ("stem",)
    ),
    "lstm": Entry(lambda: (RecurrentNet(nn.LSTM), _seq()), ("stem",), note="PEFT has no LoRA for LSTM"),
    "lstm_bidirectional_2layers": Entry(
        lambda: (RecurrentNet(nn.LSTM, num_layers=2, bidirectional=True), _seq()), ("stem",)
    ),
    "gelu_exact": Entry(lambda: (Stacked(_act(nn.GELU())), _vec()), ("stem", "block.1")),
    "gelu_tanh": Entry(lambda: (Stacked(_act(nn.GELU(approximate="tanh"))), _vec()), ("stem", "block.1")),
    "silu": Entry(lambda: (Stacked(_act(nn.SiLU())), _vec()), ("stem", "block.1")),
    "hardswish": Entry(lambda: (Stacked(_act(nn.Hardswish())), _vec()), ("stem", "block.1")),
    "mish": Entry(lambda: (Stacked(_act(nn.Mish())), _vec()), ("stem", "block.1")),
    "maxpool2d": Entry(_conv(nn.MaxPool2d(2)), ("stem",)),
    "avgpool2d": Entry(_conv(nn.AvgPool2d(2)), ("stem",)),
    "avgpool2d_padded": Entry(_conv(nn.AvgPool2d(3, stride=2, padding=1)), ("stem",)),
    "adaptive_avgpool2d": Entry(_conv(nn.AdaptiveAvgPool2d(2)), ("stem",)),
    "dropout": Entry(lambda: (Stacked(nn.Sequential(nn.Dropout(0.5), nn.Linear(WIDTH, WIDTH))), _vec()), ("stem",)),
    "weight_tying": Entry(
        lambda: (TiedNet(), _tokens()), ("proj",), head=(), note="embed.weight is out.weight; classes = vocabulary"
    ),
    "shared_module": Entry(lambda: (SharedNet(), _vec()), ("stem", "fc"), note="ALBERT-style: block used twice"),
    "shared_module_x3": Entry(lambda: (SharedNet(3), _vec()), ("stem", "fc"), note="ALBERT-style: block used 3 times"),
    "identical_values": Entry(lambda: (TwinNormNet(2), _vec()), ("stem", "fc"), note="two fresh LayerNorms"),
    "identical_values_x3": Entry(lambda: (TwinNormNet(3), _vec()), ("stem", "fc"), note="three fresh LayerNorms"),
}


# LoRA target lists the exporter refuses, with what the ExportError must say.
REFUSED_TARGETS: dict[str, tuple[Entry, str]] = {
    "multihead_attention_out_proj": (
        Entry(lambda: (AttentionNet(), _seq()), ("stem", "out_proj")),
        "LoRA on out_proj alone does nothing there",
    ),
}

# What each entry proves, for docs/supported.md: the torch layer (or feature) it is built around.
LAYER = {
    "linear": "nn.Linear",
    "conv1d": "nn.Conv1d",
    "conv2d_grouped": "nn.Conv2d (grouped)",
    "conv2d_depthwise": "nn.Conv2d (depthwise)",
    "conv_transpose2d": "nn.ConvTranspose2d",
    "embedding": "nn.Embedding",
    "embedding_bag": "nn.EmbeddingBag (2-D input, mean/sum/max)",
    "layernorm": "nn.LayerNorm",
    "groupnorm": "nn.GroupNorm",
    "rmsnorm": "nn.RMSNorm",
    "batchnorm1d": "nn.BatchNorm1d (frozen statistics)",
    "batchnorm2d": "nn.BatchNorm2d (frozen statistics)",
    "batchnorm2d_fresh": "nn.BatchNorm2d at its fresh init (equal statistics)",
    "multihead_attention": "nn.MultiheadAttention (PEFT LoRA on it)",
    "multihead_attention_frozen": "nn.MultiheadAttention (frozen)",
    "transformer_encoder_layer": "nn.TransformerEncoderLayer",
    "transformer_decoder_layer": "nn.TransformerDecoderLayer",
    "sdpa": "F.scaled_dot_product_attention",
    "gru": "nn.GRU (unrolled: fixed sequence length)",
    "gru_bidirectional_2layers": "nn.GRU (bidirectional, 2 layers)",
    "lstm": "nn.LSTM (unrolled: fixed sequence length)",
    "lstm_bidirectional_2layers": "nn.LSTM (bidirectional, 2 layers)",
    "gelu_exact": "nn.GELU",
    "gelu_tanh": "nn.GELU(approximate='tanh')",
    "silu": "nn.SiLU",
    "hardswish": "nn.Hardswish",
    "mish": "nn.Mish",
    "maxpool2d": "nn.MaxPool2d",
    "avgpool2d": "nn.AvgPool2d",
    "avgpool2d_padded": "nn.AvgPool2d (stride < kernel, padding)",
    "adaptive_avgpool2d": "nn.AdaptiveAvgPool2d",
    "dropout": "nn.Dropout (off in the backbone)",
    "weight_tying": "weight tying (embedding = output layer)",
    "shared_module": "a module used twice (ALBERT-style)",
    "shared_module_x3": "a module used 3 times (ALBERT-style)",
    "identical_values": "parameters with identical values (2 fresh LayerNorms)",
    "identical_values_x3": "parameters with identical values (3 fresh LayerNorms)",
}


def classes_of(model: nn.Module, example: dict[str, torch.Tensor]) -> int:
    """How many classes the model's output has."""
    with torch.no_grad():
        return int(model.eval()(*example.values()).shape[-1])

"""Forwards of torch layers rewritten, while tracing, into ops ONNX Runtime 1.19 can differentiate on the CPU.

Each rewrite computes what the layer computes (checked against torch in tests/test_layers.py); a layer used
in a way a rewrite does not cover keeps its own forward (and may then fail with a clear ExportError):

- nn.RMSNorm: `aten::rms_norm` has no opset-17 export.
- nn.GELU(approximate="tanh"): `0.5 x (1 + tanh z)` breaks ORT's gradient build; `x sigmoid(2z)` is equal. The
  same for transformers' `GELUTanh` ("gelu_pytorch_tanh": Gemma, GPTBigCode), when transformers is installed.
- nn.EmbeddingBag (2-D input, no offsets): its Loop export fails the ONNX checker; a lookup and a reduction.
- nn.GroupNorm: exported as InstanceNormalization, which has no gradient builder.
- nn.Hardswish, nn.Mish: HardSwish and Softplus have no gradient builder.
- nn.AvgPool2d, nn.AdaptiveAvgPool2d: AveragePoolGrad crashes (SIGFPE); a depthwise Conv or a mean.
- nn.ConvTranspose2d: no CPU ConvTransposeGrad kernel; zero insertion (a MatMul) and a Conv.
- nn.GRU, nn.LSTM: GRUGrad and LSTMGrad crash (SIGSEGV); the cells unrolled over the example's sequence
  length, which the bundle's inputs then fix.

PyTorch's fused eval-mode attention (`aten::_native_multi_head_attention`, `_transformer_encoder_layer_fwd`)
has no ONNX export either: it is switched off while tracing.

`F.scaled_dot_product_attention` with fewer key/value heads than query heads (multi-query attention: Falcon-7B's
layout) relies on broadcasting, and ORT's gradient of that broadcast keeps the query's head count (a Reshape back
to one head then fails in the first training step). While tracing, the key and value heads are repeated to the
query's count by concatenation first (its gradient is a split and a sum, whatever the shapes); the result is the
same.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


def _rms_norm(self: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    dims = tuple(range(-len(self.normalized_shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * self.weight if self.weight is not None else y


def _gelu(self: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    if self.approximate == "tanh":
        return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3)))
    return F.gelu(x)


def _gelu_tanh(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3)))


def _transformers_rewrites() -> dict[type, object]:
    """The rewrites of transformers' own layers, if transformers is installed (it is not needed to export)."""
    try:
        from transformers.activations import GELUTanh
    except ImportError:
        return {}
    return {GELUTanh: _gelu_tanh}


def _embedding_bag(self: nn.EmbeddingBag, input, offsets=None, per_sample_weights=None):  # noqa: A002
    if input.dim() == 2 and offsets is None and per_sample_weights is None and self.max_norm is None:
        e = F.embedding(input, self.weight, self.padding_idx)
        if self.padding_idx is not None and self.mode == "mean":  # torch leaves padding out of the mean
            kept = (input != self.padding_idx).unsqueeze(-1).to(e.dtype)
            return e.sum(1) / kept.sum(1).clamp(min=1)
        return {"mean": lambda: e.mean(1), "sum": lambda: e.sum(1), "max": lambda: e.amax(1)}[self.mode]()
    return _ORIGINAL[nn.EmbeddingBag](self, input, offsets, per_sample_weights)


def _group_norm(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    grouped = x.reshape(shape[0], self.num_groups, -1)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    y = (centred / torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + self.eps)).reshape(shape)
    if self.affine:
        channel = [1, -1] + [1] * (x.dim() - 2)
        y = y * self.weight.reshape(channel) + self.bias.reshape(channel)
    return y


def _relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) - torch.relu(x - 6)  # Clip has no gradient builder


def _hardswish(self: nn.Hardswish, x: torch.Tensor) -> torch.Tensor:
    return x * _relu6(x + 3) / 6


def _mish(self: nn.Mish, x: torch.Tensor) -> torch.Tensor:
    absolute = torch.relu(x) + torch.relu(-x)
    softplus = torch.relu(x) + torch.log(1 + torch.exp(-absolute))  # stable; Softplus has no gradient builder
    return x * torch.tanh(softplus)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _mean_pool(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]):
    """Average pooling as a depthwise Conv with a constant 1/(kh kw) kernel (zero padding counted)."""
    channels = int(x.shape[1])
    weight = torch.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=x.dtype)
    return F.conv2d(x, weight, stride=stride, padding=padding, groups=channels)


def _avg_pool2d(self: nn.AvgPool2d, x: torch.Tensor) -> torch.Tensor:
    kernel, padding = _pair(self.kernel_size), _pair(self.padding)
    stride = _pair(self.stride) if self.stride else kernel
    plain = not self.ceil_mode and self.divisor_override is None and (self.count_include_pad or padding == (0, 0))
    if x.dim() == 4 and plain:
        return _mean_pool(x, kernel, stride, padding)
    return _ORIGINAL[nn.AvgPool2d](self, x)


def _adaptive_avg_pool2d(self: nn.AdaptiveAvgPool2d, x: torch.Tensor) -> torch.Tensor:
    size = _pair(self.output_size)
    height, width = int(x.shape[-2]), int(x.shape[-1])
    out = tuple(s if s is not None else d for s, d in zip(size, (height, width)))
    if x.dim() == 4 and out == (1, 1):
        return x.mean(dim=(2, 3), keepdim=True)
    if x.dim() == 4 and height % out[0] == 0 and width % out[1] == 0:
        kernel = (height // out[0], width // out[1])
        return _mean_pool(x, kernel, kernel, (0, 0))
    return _ORIGINAL[nn.AdaptiveAvgPool2d](self, x)


def _spread(size: int, stride: int, before: int, after: int, dtype: torch.dtype) -> torch.Tensor:
    """A (before + (size-1) stride + 1 + after, size) 0/1 matrix: row before + i * stride holds input i."""
    matrix = torch.zeros(before + (size - 1) * stride + 1 + after, size, dtype=dtype)
    matrix[before + torch.arange(size) * stride, torch.arange(size)] = 1.0
    return matrix


def _conv_transpose2d(self: nn.ConvTranspose2d, x: torch.Tensor, output_size=None) -> torch.Tensor:
    kernel, stride, padding = _pair(self.kernel_size), _pair(self.stride), _pair(self.padding)
    dilation = _pair(self.dilation)
    extra = (
        _pair(self.output_padding)
        if output_size is None
        else self._output_padding(x, output_size, stride, padding, kernel, 2, dilation)
    )
    pads = [dilation[i] * (kernel[i] - 1) - padding[i] for i in range(2)]
    if x.dim() != 4 or self.padding_mode != "zeros" or min(pads) < 0:
        return _ORIGINAL[nn.ConvTranspose2d](self, x, output_size)
    height, width = int(x.shape[2]), int(x.shape[3])
    rows = _spread(height, stride[0], pads[0], pads[0] + extra[0], x.dtype)
    cols = _spread(width, stride[1], pads[1], pads[1] + extra[1], x.dtype)
    spread = torch.matmul(torch.matmul(rows, x), cols.t())  # zeros between and around the inputs
    groups = self.groups
    w = self.weight  # (in, out / groups, kh, kw)
    w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:]).transpose(1, 2).reshape(-1, w.shape[0] // groups, *kernel)
    return F.conv2d(spread, torch.flip(w, dims=(2, 3)), self.bias, dilation=dilation, groups=groups)


def _unrolled_rnn(self: nn.RNNBase, x: torch.Tensor, hx):
    """GRU / LSTM cells in Linear ops, one step per element of the (fixed) sequence."""
    lstm = isinstance(self, nn.LSTM)
    if isinstance(x, nn.utils.rnn.PackedSequence) or getattr(self, "proj_size", 0) or x.dim() != 3:
        return _ORIGINAL[type(self)](self, x, hx)
    seq = x if self.batch_first else x.transpose(0, 1)  # (batch, time, features)
    batch, steps = seq.shape[0], int(seq.shape[1])
    directions = 2 if self.bidirectional else 1
    if hx is None:
        zeros = seq.new_zeros(self.num_layers * directions, batch, self.hidden_size)
        hx = (zeros, zeros) if lstm else zeros
    h0, c0 = hx if lstm else (hx, None)
    finals_h, finals_c = [], []
    layer_input = seq
    for layer in range(self.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = getattr(self, f"weight_ih{suffix}"), getattr(self, f"weight_hh{suffix}")
            b_ih = getattr(self, f"bias_ih{suffix}") if self.bias else None
            b_hh = getattr(self, f"bias_hh{suffix}") if self.bias else None
            projected = F.linear(layer_input, w_ih, b_ih)  # every step's input projection at once
            index = layer * directions + direction
            h = h0[index]
            c = c0[index] if lstm else None
            order = range(steps - 1, -1, -1) if direction else range(steps)
            out = [None] * steps
            for t in order:
                gates_x, gates_h = projected[:, t], F.linear(h, w_hh, b_hh)
                if lstm:
                    i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    xr, xz, xn = gates_x.chunk(3, dim=-1)
                    hr, hz, hn = gates_h.chunk(3, dim=-1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                    h = (1 - z) * n + z * h
                out[t] = h
            outputs.append(torch.stack(out, dim=1))
            finals_h.append(h)
            finals_c.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
    output = layer_input if self.batch_first else layer_input.transpose(0, 1)
    h_n = torch.stack(finals_h)
    return (output, (h_n, torch.stack(finals_c))) if lstm else (output, h_n)


def _gru(self: nn.GRU, input, hx=None):  # noqa: A002
    return _unrolled_rnn(self, input, hx)


def _lstm(self: nn.LSTM, input, hx=None):  # noqa: A002
    return _unrolled_rnn(self, input, hx)


_REWRITES = {
    nn.RMSNorm: _rms_norm,
    nn.GELU: _gelu,
    nn.EmbeddingBag: _embedding_bag,
    nn.GroupNorm: _group_norm,
    nn.Hardswish: _hardswish,
    nn.Mish: _mish,
    nn.AvgPool2d: _avg_pool2d,
    nn.AdaptiveAvgPool2d: _adaptive_avg_pool2d,
    nn.ConvTranspose2d: _conv_transpose2d,
    nn.GRU: _gru,
    nn.LSTM: _lstm,
}
_ORIGINAL = {cls: cls.forward for cls in _REWRITES}


_SDPA = F.scaled_dot_product_attention


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., 1, S, D] -> [..., heads, S, D] by concatenation rather than broadcasting."""
    return torch.cat([x] * heads, dim=-3)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if key.dim() == query.dim() >= 3 and key.shape[-3] == 1 < query.shape[-3]:  # one key/value head for all
        heads = int(query.shape[-3])
        key, value = _repeat_heads(key, heads), _repeat_heads(value, heads)
        kwargs.pop("enable_gqa", None)
    return _SDPA(query, key, value, *args, **kwargs)


def _optimum_patcher():
    """optimum's model patcher, whose SDPA wrapper calls the original it kept at import (None: not installed)."""
    try:
        from optimum.exporters.onnx import model_patcher
    except ImportError:
        return None
    return model_patcher if hasattr(model_patcher, "original_scaled_dot_product_attention") else None


@contextlib.contextmanager
def traceable_forwards() -> Iterator[None]:
    """While tracing: the rewritten forwards above, scaled dot-product attention with its key/value heads repeated
    to the query's, and torch's fused attention fast path off."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    rewrites = {**_REWRITES, **_transformers_rewrites()}
    originals = {cls: cls.forward for cls in rewrites}
    for cls, forward in rewrites.items():
        cls.forward = forward
    F.scaled_dot_product_attention = _sdpa
    optimum = _optimum_patcher()  # optimum's exporter puts its own wrapper of the original in F's place
    if optimum is not None:
        optimum.original_scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA
        if optimum is not None:
            optimum.original_scaled_dot_product_attention = _SDPA
        for cls, forward in originals.items():
            cls.forward = forward
        torch.backends.mha.set_fastpath_enabled(fast_path)

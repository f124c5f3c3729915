"""Prototypes of the fixes proposed in survey-layers.md, monkeypatched onto edgepeft.export.graph (not edited).

Run a survey with them: `python tests/survey_fix_prototypes.py tests/survey_layers.py --out x.md [names...]`.
"""
import math

import onnx
import torch
from torch import nn
from torch.nn import functional as F

import edgepeft.export.graph as G


def _copy(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def undo_dedup(model: onnx.ModelProto, names: set[str]) -> None:
    """A: the legacy exporter turns an initializer equal in value to an earlier one into Identity(earlier):
    give it back its own initializer (ORT's CSE later merges identical Identity nodes into one tensor)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] in names:
            inits[node.output[0]] = _copy(inits[node.input[0]], node.output[0])
            g.initializer.append(inits[node.output[0]])
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def split_shared_norm_params(model: onnx.ModelProto, trainable: set[str]) -> None:
    """B: a frozen initializer feeding several LayerNormalization nodes (a shared module) gets a copy per use:
    ORT's LayerNormalizationGrad always writes `<scale>_grad` and `<bias>_grad`."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        if node.op_type != "LayerNormalization":
            continue
        for k in (1, 2):
            name = node.input[k] if k < len(node.input) else ""
            if name in inits and name not in trainable:
                count = uses[name] = uses.get(name, 0) + 1
                if count > 1:
                    g.initializer.append(_copy(inits[name], f"{name}/use{count - 1}"))
                    node.input[k] = f"{name}/use{count - 1}"


def rms_norm_forward(self, x):
    """D: nn.RMSNorm in ops the legacy exporter knows (aten::rms_norm has no opset-17 symbolic)."""
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    dims = tuple(range(-len(self.normalized_shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * self.weight if self.weight is not None else y


def gelu_forward(self, x):
    """E: tanh-GELU as x * sigmoid(2z) (equal to 0.5 x (1 + tanh z)); ORT's gradient build fails on the tanh form
    ("Graph::RemoveEdge Argument mismatch when removing edge")."""
    if self.approximate == "tanh":
        return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3)))
    return F.gelu(x)


_orig_bag = nn.EmbeddingBag.forward


def bag_forward(self, input, offsets=None, per_sample_weights=None):
    """F: a 2-D EmbeddingBag as Gather + reduce (its export is a Loop the ONNX checker rejects after merging)."""
    if input.dim() == 2 and offsets is None and per_sample_weights is None and self.max_norm is None:
        e = F.embedding(input, self.weight, self.padding_idx)
        return {"mean": e.mean(1), "sum": e.sum(1), "max": e.amax(1)}[self.mode]
    return _orig_bag(self, input, offsets, per_sample_weights)


_orig_export = G._export
_PATCHES = [(nn.RMSNorm, rms_norm_forward), (nn.GELU, gelu_forward), (nn.EmbeddingBag, bag_forward)]


def _export(module, run_export, path, trainable):
    names = set(module.state_dict(keep_vars=True))
    orig_fast = torch.backends.mha.get_fastpath_enabled()
    originals = [(cls, cls.forward) for cls, _ in _PATCHES]
    torch.backends.mha.set_fastpath_enabled(False)  # C: no aten::_native_multi_head_attention in the trace
    for cls, forward in _PATCHES:
        cls.forward = forward
    orig_write_back = G._write_back

    def write_back(model, values):  # the first step after onnx.load: before _freeze_batchnorm reads initializers
        undo_dedup(model, names)
        split_shared_norm_params(model, set(trainable))
        orig_write_back(model, values)

    G._write_back = write_back
    try:
        return _orig_export(module, run_export, path, trainable)
    finally:
        torch.backends.mha.set_fastpath_enabled(orig_fast)
        for cls, forward in originals:
            cls.forward = forward
        G._write_back = orig_write_back

G._export = _export


if __name__ == "__main__":  # python tests/survey_fix_prototypes.py tests/survey_layers.py --out ... [args]
    import runpy
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    script = sys.argv[1]
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")

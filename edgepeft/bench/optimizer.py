"""The AdamW settings a bundle trains with, read from its optimizer model, for PyTorch's AdamW to match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepeft import manifest as mf
from edgepeft.errors import BundleError


def bundle_adamw(bundle: Path) -> dict[str, Any]:
    """`torch.optim.AdamW` keyword arguments (betas, eps, weight_decay) equal to the bundle's AdamWOptimizer node.

    ONNX stores the attributes as float32; they are rounded to 7 significant digits (0.8999999762 -> 0.9).
    """
    import onnx

    model = onnx.load(str(bundle / mf.OPTIMIZER_MODEL))
    nodes = [node for node in model.graph.node if node.op_type == "AdamWOptimizer"]
    if len(nodes) != 1:
        raise BundleError(f"{bundle} does not train with one AdamW optimizer node: PyTorch cannot be matched to it")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}

    def number(name: str) -> float:
        return float(f"{attrs[name]:.7g}")

    if attrs.get("correct_bias", 1) != 1:
        raise BundleError(f"{bundle} trains AdamW without bias correction, which torch.optim.AdamW cannot match")
    return {
        "betas": (number("alpha"), number("beta")),
        "eps": number("epsilon"),
        "weight_decay": number("weight_decay"),
    }

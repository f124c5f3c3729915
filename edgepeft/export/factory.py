"""Resolve `package.module:function` (the CLI's way to name a plain torch model) into a model and inputs."""

from __future__ import annotations

import importlib
import os
import sys

import torch
from torch import nn

from edgepeft.errors import ExportError


def load_factory(spec: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Call the function named by `spec`; it must return `(torch_module, {input_name: example_tensor})`.

    The module is looked up in the current directory first, as `python -m` does, then on `sys.path`.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ExportError(f"{spec!r} is neither a model directory nor `package.module:function`")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"cannot load {spec!r}: {e} (looked in {os.getcwd()} and on PYTHONPATH)") from None
    result = function()
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
        or not isinstance(result[1], dict)
        or not all(isinstance(v, torch.Tensor) for v in result[1].values())
    ):
        raise ExportError(f"{spec} must return (torch.nn.Module, dict of input name -> torch.Tensor)")
    return result

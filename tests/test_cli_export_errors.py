"""`edgepeft export` on a model that cannot compile prints one `Error:` line naming the module, its class and the op,
and writes nothing (tests/unsupported_models.py)."""

from __future__ import annotations

import pytest
import unsupported_models
from click.testing import CliRunner

from edgepeft.cli import main


@pytest.mark.parametrize("name", ["fft", "softplus", "instance_norm", "conv_transpose1d", "custom_function"])
def test_an_unsupported_model_is_one_error_line_naming_module_and_op(tmp_path, name):
    out = tmp_path / "bundle"
    args = ["export", f"unsupported_models:{name}", "--out", str(out), "--target-modules", "stem", "--train-module",
            "head"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:], result.output
    assert "Traceback" not in result.output and "Torch IR graph" not in result.output
    module, cls, op = unsupported_models.REFUSED[name]
    assert f"{module} ({cls})" in errors[0] and op in errors[0], errors[0]
    assert not out.exists()

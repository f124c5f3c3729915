"""A Flower app project for the Deployment Engine (`flwr run DIR`): its own pyproject.toml and one module.

Written to a directory of its own, never the caller's project: `flwr run` rewrites a pyproject.toml that
holds the old `[tool.flwr.federations]` table, so edgepeft's own pyproject.toml never carries one.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.errors import OutputError
from edgepeft.federated.settings import FedSettings

MODULE = '''"""edgepeft's federated adapter app (written by edgepeft.federated.app_project)."""

from edgepeft.federated import client_app, server_app

clientapp = client_app.app
serverapp = server_app.app
'''


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def write_app_project(directory: str | Path, settings: FedSettings, name: str = "edgepeftfed") -> Path:
    """Write the app project to `directory` (new or empty); the run config holds `settings`."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise OutputError(f"the Flower app directory {directory} is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{key} = {_toml(value)}" for key, value in settings.to_run_config().items())
    (directory / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgepeft"

[tool.flwr.app.components]
serverapp = "{name}_app:serverapp"
clientapp = "{name}_app:clientapp"

[tool.flwr.app.config]
{config}
''')
    (directory / f"{name}_app.py").write_text(MODULE)
    return directory

"""The `edgepeft` command line: export on the host; train, eval, predict and adapters on the device; tools.

Each command lives in the module named for it; the device commands import nothing of the exporter or torch.
"""

from edgepeft.cli.adapters_cmd import adapters
from edgepeft.cli.app import main
from edgepeft.cli.eval_cmd import evaluate, predict
from edgepeft.cli.export_cmd import export
from edgepeft.cli.federate_cmd import federate
from edgepeft.cli.generate_cmd import generate
from edgepeft.cli.inspect_cmd import inspect
from edgepeft.cli.tools_cmd import bench, demo
from edgepeft.cli.train_cmd import train
from edgepeft.cli.web_cmd import web

for _command in (export, train, evaluate, predict, generate, inspect, adapters, demo, bench, web, federate):
    main.add_command(_command)

__all__ = ["main"]

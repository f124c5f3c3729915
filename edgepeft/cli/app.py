"""The `edgepeft` command group, and how every command reports an error: one line, in the CLI's own words."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import click

from edgepeft.errors import EdgePeftError

logger = logging.getLogger(__name__)

EXIT_ERROR = 1  # the input or a file is wrong, or the run failed
EXIT_USAGE = 2  # a flag is unknown, missing, or has a value of the wrong kind
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def _flags(command: click.Command, prefix: str = "") -> dict[str, str]:
    return {
        param.name: prefix + max(param.opts, key=len)
        for param in command.params
        if isinstance(param, click.Option) and param.name and param.opts
    }


def flag_words(message: str, command: click.Command, root: click.Group | None = None) -> str:
    """Name a command's flags where a library message names the Python parameter behind them.

    Library errors write parameters as `name` (in backticks) or as `name=True`; here each becomes the
    flag the user typed, e.g. `learning_rate` -> --lr and `overwrite=True` -> --overwrite. A parameter of
    another command (a bundle exported without `profile_memory=True`) is named with its command:
    `edgepeft export --profile-memory`.
    """
    flags: dict[str, str] = {}
    for other in (root.commands.values() if root is not None else ()):
        if other is not command and not isinstance(other, click.Group):
            flags = {**_flags(other, f"edgepeft {other.name} "), **flags}
    flags.update(_flags(command))

    def flag(match: re.Match) -> str:
        return flags.get(match.group(1), match.group(0))

    message = re.sub(r"`([a-z_][a-z0-9_]*)`", flag, message)
    message = re.sub(r"\b[A-Z][A-Za-z]*\(([a-z_][a-z0-9_]*)=True\)", flag, message)  # ExportOptions(x=True)
    message = re.sub(r"\b([a-z_][a-z0-9_]*)=True\b", flag, message)
    return message


class Command(click.Command):
    """A command whose library errors (and file errors) become one line `Error: ...` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (EdgePeftError, OSError) as e:
            message = str(e) if not isinstance(e, OSError) or not e.filename else _os_error(e)
            root = ctx.find_root().command
            group = root if isinstance(root, click.Group) else None
            raise click.ClickException(flag_words(message, self, group)) from None
        except Exception as e:
            # ORT's Python classes, and the RuntimeErrors its C++ core raises through pybind ("[ONNXRuntimeError]")
            if not type(e).__module__.startswith("onnxruntime") and "[ONNXRuntimeError]" not in str(e):
                raise  # a bug of edgepeft's own: its traceback is what a report needs
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if "[ONNXRuntimeError]" in first:  # past the C++ source location and the status code
                first = first.split("[ONNXRuntimeError]", 1)[1].lstrip(" :0123456789")
            raise click.ClickException(f"ONNX Runtime failed: {first[:400]}") from None


def _os_error(error: OSError) -> str:
    return f"{error.filename}: {error.strerror or error}"


class Group(click.Group):
    """The top-level group: every error, a usage error included, is printed as one line on stderr."""

    command_class = Command

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"Error: {e.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
@click.version_option(package_name="edgepeft")
def main(verbose: bool) -> None:
    """edgepeft: compile a model into an on-device training bundle, and train it on local data."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

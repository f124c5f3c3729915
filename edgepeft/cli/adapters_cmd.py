"""`edgepeft adapters`: manage an adapter store, named adapters beside one bundle."""

from __future__ import annotations

import click

from edgepeft.cli.app import Command
from edgepeft.cli.common import human_size, open_session


@click.group()
def adapters() -> None:
    """Manage an adapter store: named adapters beside one bundle."""


def _store(bundle: str, store: str):
    from edgepeft.runtime import open_bundle
    from edgepeft.runtime.store import AdapterStore

    opened = open_bundle(bundle)
    return AdapterStore(store, opened.manifest, protect=(opened.path,))


_bundle_option = click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False),
                              help="The bundle the store's adapters belong to.")  # fmt: skip
_store_argument = click.argument("store", type=click.Path(exists=True, file_okay=False))


@adapters.command(name="list", cls=Command)
@_store_argument
@_bundle_option
def adapters_list(store: str, bundle: str) -> None:
    """List the adapters in STORE with their metadata; * marks the active one."""
    adapter_store = _store(bundle, store)
    active = adapter_store.active
    infos = adapter_store.list()
    if not infos:
        click.echo(f"{store}: no adapters", err=True)
    for info in infos:
        score = "-" if info.score is None else f"{info.score:.4f}"
        click.echo(
            f"{'*' if info.name == active else ' '} {info.name}\tsteps {info.steps}\tscore {score}\t{info.created}"
        )


@adapters.command(name="activate", cls=Command)
@_store_argument
@click.argument("name")
@_bundle_option
def adapters_activate(store: str, name: str, bundle: str) -> None:
    """Make NAME the active adapter of STORE."""
    _store(bundle, store).activate(name)
    click.echo(f"active adapter: {name}")


@adapters.command(name="delete", cls=Command)
@_store_argument
@click.argument("name")
@_bundle_option
def adapters_delete(store: str, name: str, bundle: str) -> None:
    """Delete adapter NAME from STORE."""
    _store(bundle, store).delete(name)
    click.echo(f"deleted adapter: {name}")


@adapters.command(name="export", cls=Command)
@_store_argument
@click.argument("name")
@_bundle_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
def adapters_export(store: str, name: str, bundle: str, out: str) -> None:
    """Write a standalone inference model (int8 base + adapter NAME) for a plain ONNX Runtime session."""
    session = open_session(bundle)
    session.set_trainable(_store(bundle, store).load(name))
    path = session.export_inference(out)
    click.echo(f"inference model {path}: {human_size(path.stat().st_size)}")

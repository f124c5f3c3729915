"""`edgepeft web BUNDLE`: train a bundle in a web page served on 127.0.0.1 (the data never leaves the browser)."""

from __future__ import annotations

import click

from edgepeft.cli.app import Command


@click.command(cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--port", default=8765, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
def web(bundle: str, port: int) -> None:
    """Serve a page that trains BUNDLE in the browser from a local CSV/JSONL file and downloads the adapter."""
    from pathlib import Path

    from edgepeft.webserve import WebApp, make_server

    server = make_server(WebApp(Path(bundle)), port)
    click.echo(f"open http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops; served on 127.0.0.1 only)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

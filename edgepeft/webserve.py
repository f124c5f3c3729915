"""Serve the in-browser trainer (`edgepeft web BUNDLE`): the page, the JS runtime, ONNX Runtime Web and the bundle.

A stdlib HTTP server bound to 127.0.0.1 only. Every response carries the cross-origin isolation headers that
multi-threaded WebAssembly needs (COOP same-origin, COEP require-corp) and a Content-Security-Policy that lets the
page reach nothing but this origin: the user's data file is read with the File API and never leaves the page.
Only known files are served: the page, edgepeft/web/src, three files of onnxruntime-web's dist, the tokenizer
library, and the files the bundle's manifest lists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mimetypes
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edgepeft.errors import EdgePeftError
from edgepeft.runtime.bundle import open_bundle

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
ORT_FILES = ("ort.training.wasm.min.mjs", "ort-training-wasm-simd-threaded.mjs", "ort-training-wasm-simd-threaded.wasm")
TOKENIZERS = ("@huggingface", "tokenizers", "dist", "tokenizers.min.mjs")
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".html": "text/html",
         ".css": "text/css", ".json": "application/json", ".onnx": "application/octet-stream"}  # fmt: skip


def web_root() -> Path:
    """edgepeft/web: the page, the JS runtime and (after `npm ci` there) node_modules."""
    return Path(str(resources.files("edgepeft").joinpath("web")))


def node_modules(root: Path | None = None) -> Path:
    """The npm packages the page needs, installed from the lockfile; a clear error when they are not."""
    modules = (root or web_root()) / "node_modules"
    if not (modules / "onnxruntime-web" / "dist" / ORT_FILES[0]).is_file():
        raise EdgePeftError(f"the web runtime's npm packages are not installed: run `npm ci` in {modules.parent}")
    return modules


@dataclass
class WebApp:
    """What the server serves, and the log of every request it answered."""

    bundle: Path
    root: Path = field(default_factory=web_root)
    requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.manifest = open_bundle(self.bundle).manifest  # a bundle that does not verify is refused here
        self.modules = node_modules(self.root)
        import_map = json.dumps({"imports": {"@huggingface/tokenizers": "/vendor/tokenizers.mjs"}})
        self.import_map = f'<script type="importmap">{import_map}</script>'
        digest = base64.b64encode(hashlib.sha256(import_map.encode()).digest()).decode()
        self.csp = (f"default-src 'self'; script-src 'self' 'wasm-unsafe-eval' 'sha256-{digest}'; "
                    "worker-src 'self' blob:; connect-src 'self'; img-src 'self' blob: data:; "
                    "style-src 'self'; form-action 'none'; base-uri 'none'")  # fmt: skip

    def resolve(self, path: str) -> tuple[bytes | Path, str] | None:
        """The content (or file) and type for a request path; None: not served."""
        if path in ("/", "/index.html"):
            html = (self.root / "page" / "index.html").read_text(encoding="utf-8")
            return html.replace("<!--IMPORTMAP-->", self.import_map).encode(), "text/html; charset=utf-8"
        parts = [p for p in path.split("/") if p]
        if len(parts) != 2 or parts[1] in ("", ".", "..") or "\\" in parts[1]:
            return None
        where, name = parts
        if where == "bundle":
            if name != "manifest.json" and name not in self.manifest.files:
                return None
            file = self.bundle / name
        elif where in ("src", "page"):
            file = self.root / where / name
            if file.suffix not in (".js", ".css", ".html") or not file.is_file():
                return None
        elif where == "ort" and name in ORT_FILES:
            file = self.modules / "onnxruntime-web" / "dist" / name
        elif where == "vendor" and name == "tokenizers.mjs":
            file = self.modules.joinpath(*TOKENIZERS)
        else:
            return None
        kind = TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return file, kind


def make_server(app: WebApp, port: int = 0) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0: any free port) for `app`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
            logger.debug("%s " + format, self.address_string(), *args)

        def _headers(self, code: int, kind: str, length: int) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(length))
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Content-Security-Policy", app.csp)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = unquote(urlsplit(self.path).path)
            app.requests.append(self.path)
            found = app.resolve(path)
            if found is None:
                body = b"not found\n"
                self._headers(404, "text/plain", len(body))
                self.wfile.write(body)
                return
            content, kind = found
            if isinstance(content, Path):
                content = content.read_bytes()
            self._headers(200, kind, len(content))
            self.wfile.write(content)

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_error(405)

        do_POST = do_PUT = do_DELETE = do_HEAD  # the page sends nothing

    server = ThreadingHTTPServer((HOST, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(app: WebApp, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread (for tests and benchmarks); returns it and its URL."""
    server = make_server(app, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{HOST}:{server.server_address[1]}/"

"""The Gradio app of ``dagfusion ui``: one canvas component hosting a litegraph.js editor.

:class:`WorkflowCanvas` is a ``gr.HTML`` subclass. Its value is the graph in dagfusion's own
schema (:mod:`dagfusion.ui.graph`); the browser sets it on every edit, so Python event handlers
see the current graph, and a value set from Python redraws the canvas. Everything else goes
through the component's server functions (``df_*``), which call one
:class:`~dagfusion.ui.handlers.CanvasBackend`: checking as you edit, saving and opening files,
submitting runs and polling their per-node status, progress and previews, cancelling one run.
Polling a run rather than streaming it through a Gradio event keeps the canvas out of
``.change`` feedback loops and lets any tab watch the shared queue.

The page loads only files served by this process: litegraph.js from ``static/vendor`` (copied
there from the npm registry at the version pinned in ``ui/package-lock.json`` by
``ui/build_assets.py``) and the canvas's own ``static/canvas.js`` and ``canvas.css``.

:func:`launch` serves the Blocks mounted in a FastAPI app behind :class:`dagfusion.httpguard.HttpGuard`
(outermost, so Gradio's own routes and CORS handling never see a refused request): on 127.0.0.1
unless ``allow_remote``, with a per-launch token carried by the printed address, Gradio's
analytics off and nothing shared.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no phoning home

import hashlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.base import server

from dagfusion.errors import Problem, UnsafeOperationError, ValidationError
from dagfusion.httpguard import GuardPolicy, HttpGuard, is_loopback, is_wildcard
from dagfusion.ui.graph import empty_graph
from dagfusion.ui.handlers import MAX_PNG_BYTES, CanvasBackend

HOST = "127.0.0.1"
#: Ports tried in turn when none is given (Gradio's usual range).
DEFAULT_PORTS = range(7860, 7960)
#: Largest request body: a dropped PNG travels base64-encoded inside a JSON request.
MAX_REQUEST_BYTES = MAX_PNG_BYTES * 4 // 3 + 1024 * 1024
#: Seconds open connections (Gradio's heartbeat streams) get to finish when the server stops.
SHUTDOWN_GRACE = 3
PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"
VENDOR_DIR = STATIC_DIR / "vendor"
VENDOR_FILES = ("litegraph.core.js", "litegraph.css")
#: The canvas's own scripts, loaded in this order: canvas.js (helpers and the app's core) first,
#: then one file per job, each adding its methods to the app.
OWN_SCRIPTS = (
    "canvas.js",
    "canvas-palette.js",
    "canvas-nodes.js",
    "canvas-widgets.js",
    "canvas-io.js",
    "canvas-runs.js",
    "canvas-undo.js",
    "canvas-minimap.js",
)
OWN_FILES = (*OWN_SCRIPTS, "canvas.css")

TEMPLATE = '<div class="dagfusion-canvas-root" data-testid="dagfusion-canvas"></div>'
JS_ON_LOAD = "window.DagfusionCanvas.mount(element, props, server, watch);"
PAGE_CSS = """
.gradio-container { max-width: 100% !important; padding: 8px !important; }
footer { display: none !important; }
html, body { overflow: hidden !important; height: 100% !important; }
"""


def vendor_problem() -> str | None:
    """Why the pinned third-party assets cannot be served, or ``None`` when they can."""
    missing = [name for name in VENDOR_FILES if not (VENDOR_DIR / name).is_file()]
    if missing:
        return (
            f"the canvas's browser assets are missing from {VENDOR_DIR} ({', '.join(missing)}): "
            "in a source checkout run `make setup` (or `npm ci` in ui/ and `python ui/build_assets.py`)"
        )
    return None


def _url(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # new file, new URL: no stale caches
    return f"/gradio_api/file={path.as_posix()}?v={digest}"


def head_html() -> str:
    """The ``<link>`` and ``<script>`` tags of the canvas, all served by this process."""
    styles = [VENDOR_DIR / "litegraph.css", STATIC_DIR / "canvas.css"]
    scripts = [VENDOR_DIR / "litegraph.core.js", *(STATIC_DIR / name for name in OWN_SCRIPTS)]
    return "".join(f'<link rel="stylesheet" href="{_url(p)}">' for p in styles) + "".join(
        f'<script src="{_url(p)}"></script>' for p in scripts
    )


@contextmanager
def _no_stub_file() -> Iterator[None]:
    """Keep Gradio from writing a ``.pyi`` stub beside this module (into the installed package)
    while the component class below is defined; a no-op if Gradio no longer does so."""
    from gradio import component_meta

    original = getattr(component_meta, "create_or_modify_pyi", None)
    if original is None:
        yield
        return
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        component_meta.create_or_modify_pyi = original


with _no_stub_file():

    class WorkflowCanvas(gr.HTML):
        """The dagfusion canvas: a litegraph.js editor whose value is a dagfusion graph.

        ``notice`` is a message shown in the toolbar when the page opens (for instance the
        problems of the workflow it was opened with).
        """

        def __init__(
            self,
            value: dict[str, Any] | None = None,
            *,
            backend: CanvasBackend | None = None,
            notice: str = "",
            **kwargs: Any,
        ) -> None:
            self._backend = backend
            self.notice = notice
            kwargs.setdefault("html_template", TEMPLATE)
            kwargs.setdefault("js_on_load", JS_ON_LOAD)
            kwargs.setdefault("head", head_html())
            kwargs.setdefault("apply_default_css", False)
            super().__init__(value=value if value is not None else empty_graph(), notice=notice, **kwargs)

        # The graph travels as plain JSON data in both directions.
        def preprocess(self, payload: Any) -> Any:
            return payload

        def postprocess(self, value: Any) -> Any:
            return value

        def api_info(self) -> dict[str, Any]:
            return {"type": "object", "description": "a dagfusion canvas graph (see dagfusion.ui.graph)"}

        def example_payload(self) -> Any:
            return empty_graph()

        def example_value(self) -> Any:
            return empty_graph()

        def _server(self) -> CanvasBackend:
            # Not a `backend` attribute: Gradio would put it into the page's config.
            if self._backend is None:
                raise RuntimeError("this canvas has no backend")
            return self._backend

        # --- server functions (called from canvas.js) -----------------------------------------

        @server
        def df_catalog(self, _data: Any = None) -> dict[str, Any]:
            return self._server().catalog()

        @server
        def df_check(self, graph: Any) -> dict[str, Any]:
            return self._server().check(graph)

        @server
        def df_save(self, graph: Any) -> dict[str, Any]:
            return self._server().save(graph)

        @server
        def df_open(self, payload: Any) -> dict[str, Any]:
            return self._server().open_upload(payload)

        @server
        def df_submit(self, graph: Any) -> dict[str, Any]:
            return self._server().submit(graph)

        @server
        def df_poll(self, data: Any) -> dict[str, Any]:
            data = data if isinstance(data, dict) else {}
            return self._server().poll(data.get("run"), data.get("since", 0))

        @server
        def df_cancel(self, run_id: Any) -> dict[str, Any]:
            return self._server().cancel(run_id)

        @server
        def df_results(self, run_id: Any) -> dict[str, Any]:
            return self._server().results(run_id)

        @server
        def df_paths(self, prefix: Any) -> list[str]:
            return self._server().paths(prefix if isinstance(prefix, str) else "")


def initial_graph(backend: CanvasBackend, path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], str]:
    """The graph and toolbar notice the canvas opens with; raises :class:`ValidationError` when
    the file cannot be opened (the same rules as opening it from the canvas)."""
    if path is None:
        return empty_graph(), ""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError([Problem("unreadable", f"cannot read workflow file: {exc.strerror or exc}")], str(path)) from None
    opened = backend.open_file(path.name, data)
    if not opened["ok"]:
        problems = [Problem(p["code"], p["message"], p["node"], p["input"], p["line"]) for p in opened["problems"]]
        raise ValidationError(problems or [Problem("cannot-open", opened["error"])], str(path))
    count = len(opened["problems"])
    notice = f"{path.name}: {count} problem{'s' if count != 1 else ''} marked on the nodes" if count else ""
    return opened["graph"], notice


def build_app(backend: CanvasBackend, graph: dict[str, Any] | None = None, notice: str = "") -> gr.Blocks:
    """The Gradio Blocks of the canvas (not launched)."""
    problem = vendor_problem()
    if problem:
        raise RuntimeError(problem)
    gr.set_static_paths([str(STATIC_DIR)])
    with gr.Blocks(title="dagfusion", analytics_enabled=False, fill_width=True) as demo:
        WorkflowCanvas(graph, backend=backend, notice=notice, elem_id="dagfusion-canvas")
    return demo


def check_bind(host: str, *, allow_remote: bool) -> None:
    """Refuse (:class:`UnsafeOperationError`) to serve on anything but loopback unless
    ``allow_remote`` (the ``allow_remote`` setting, ``DAGFUSION_ALLOW_REMOTE``)."""
    if not is_loopback(host) and not allow_remote:
        raise UnsafeOperationError(
            f"refusing to serve the canvas on {host or 'every interface'!r}: other machines could reach it. "
            "Bind 127.0.0.1, or set allow_remote (DAGFUSION_ALLOW_REMOTE=1) to serve it on the network "
            "(requests still need the token in the printed address)"
        )


def _bind(host: str, port: int | None) -> socket.socket:
    """A listening-ready socket on ``host``:``port`` (the first free one of
    :data:`DEFAULT_PORTS` when ``port`` is ``None``; ``0``: any free port)."""
    if port is not None and not 0 <= port <= 65535:
        raise OSError(f"port {port} is not between 0 and 65535")
    bare = host[1:-1] if host.startswith("[") else host
    family, _, _, _, address = socket.getaddrinfo(bare or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    last: OSError | None = None
    for candidate in [port] if port is not None else DEFAULT_PORTS:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if os.name != "nt":  # elsewhere it lets another process take the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address[0], candidate, *address[2:]))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    tried = str(port) if port is not None else f"{DEFAULT_PORTS.start}-{DEFAULT_PORTS.stop - 1}"
    raise OSError(f"cannot listen on {host} port {tried}: {last}")


def guarded_app(demo: gr.Blocks, policy: GuardPolicy, host: str = HOST) -> Any:
    """``demo`` mounted at ``/`` in a FastAPI app whose outermost layer is :class:`HttpGuard`
    (so a refused request reaches none of Gradio's routes or middleware, its CORS included)."""
    from fastapi import FastAPI

    shell = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    gr.mount_gradio_app(
        shell,
        demo,
        path="/",
        server_name=host,
        server_port=policy.port,
        footer_links=[],
        run_history=False,
        show_error=True,
        ssr_mode=False,
        enable_monitoring=False,
        mcp_server=False,
        css=PAGE_CSS,
    )
    shell.add_middleware(HttpGuard, policy=policy)  # added last: runs first
    return shell


class CanvasServer:
    """A running canvas server: the address to open (with its token) and how to stop it."""

    def __init__(self, demo: gr.Blocks, app: Any, sock: socket.socket, policy: GuardPolicy, host: str) -> None:
        import uvicorn

        self.demo = demo
        self.app = app
        self.policy = policy
        self.host = host
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            proxy_headers=False,  # no X-Forwarded-* rewriting of the client or scheme
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="dagfusion-ui-server", daemon=True
        )
        self._sock = sock

    @property
    def token(self) -> str:
        return self.policy.token

    @property
    def url(self) -> str:
        """The address to open: it carries the token (``/?token=…``)."""
        return self.policy.url(self.host)

    @property
    def origin(self) -> str:
        """``http://host:port`` without the token (what the page's requests come from)."""
        return self.url.split("/?", 1)[0]

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self, timeout: float = 60.0) -> None:
        """Start serving on a thread; returns once requests are answered."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the canvas server did not start on {self.host}:{self.port}")
            time.sleep(0.01)

    def wait(self) -> None:
        """Serve until the server stops or Ctrl-C (which stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self, timeout: float = SHUTDOWN_GRACE + 5) -> None:
        """Stop serving and free the port (idempotent)."""
        for route in getattr(self.app, "routes", ()):
            stop = getattr(getattr(route, "app", None), "stop_event", None)
            if stop is not None:
                stop.set()  # ends Gradio's heartbeat streams
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
        self.demo.is_running = False


def launch(
    demo: gr.Blocks,
    *,
    host: str = HOST,
    port: int | None = None,
    block: bool = True,
    quiet: bool = False,
    allow_remote: bool = False,
    token: str | None = None,
) -> CanvasServer:
    """Serve ``demo`` behind the host/origin/token guard and print the address to open.

    Binding anything but loopback raises :class:`UnsafeOperationError` unless ``allow_remote``.
    ``port=None`` takes the first free port from 7860, ``0`` any free port. With ``block`` it
    serves until Ctrl-C; otherwise it returns the running :class:`CanvasServer` (``close()`` it).
    Never shared, no server-side rendering, no analytics, no run history or monitoring pages.
    """
    check_bind(host, allow_remote=allow_remote)
    sock = _bind(host, port)
    policy = GuardPolicy.for_bind(host, sock.getsockname()[1], token=token, max_body_bytes=MAX_REQUEST_BYTES)
    try:
        running = CanvasServer(demo, guarded_app(demo, policy, host), sock, policy, host)
        running.start()
    except BaseException:
        sock.close()
        raise
    if not quiet:
        print(f"dagfusion canvas: {running.url}")
        if is_wildcard(host):
            print("  served on every interface (allow_remote): elsewhere, use this machine's address, same port and token")
        print("  the address carries this launch's access token; Ctrl-C stops the server", flush=True)
    if block:
        running.wait()
    return running


def main(
    workflow: str | None,
    *,
    engine: Any,
    port: int | None = None,
    host: str = HOST,
    server: str | None = None,
    token: str | None = None,
    state_dir: str | None = None,
) -> int:
    """``dagfusion ui [WF.yaml|PICTURE.png]``: open the canvas and serve it until Ctrl-C.

    Runs are jobs of one queue (:func:`dagfusion.ui.jobqueue.open_queue`): the job server at
    ``server`` (``--server URL``, token ``token``), else the job service run in this process on
    ``state_dir`` (default: the settings' ``server_dir``), or the server already running there.
    """
    problem = vendor_problem()
    if problem:
        print(f"dagfusion ui: {problem}", file=sys.stderr)
        return 2
    try:
        check_bind(host, allow_remote=engine.settings.allow_remote)
    except UnsafeOperationError as exc:
        print(f"dagfusion ui: {exc}", file=sys.stderr)
        return 2
    from dagfusion.errors import WorkflowError
    from dagfusion.ui.jobqueue import open_queue

    try:
        queue = open_queue(engine, server=server, token=token, state_dir=state_dir)
    except (ConnectionError, ValueError, WorkflowError) as exc:
        print(f"dagfusion ui: {exc}", file=sys.stderr)
        return 2
    print(f"dagfusion ui: runs are jobs of {queue.description}", flush=True)
    backend = CanvasBackend(engine, queue=queue)
    graph, notice = initial_graph(backend, workflow)
    demo = build_app(backend, graph, notice)
    try:
        launch(demo, host=host, port=port, block=True, allow_remote=engine.settings.allow_remote)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"dagfusion ui: {exc}", file=sys.stderr)
        return 2
    finally:
        backend.queue.shutdown()
    return 0


__all__ = [
    "CanvasServer",
    "WorkflowCanvas",
    "build_app",
    "check_bind",
    "guarded_app",
    "head_html",
    "initial_graph",
    "launch",
    "main",
    "vendor_problem",
]

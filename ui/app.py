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
``ui/build_assets.py``) and the canvas's own ``static/canvas.js`` and ``canvas.css``. The server
listens on 127.0.0.1 only, with Gradio's analytics off.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no phoning home

import hashlib
import sys
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.base import server

from dagfusion.errors import Problem, ValidationError
from dagfusion.ui.graph import empty_graph
from dagfusion.ui.handlers import CanvasBackend

HOST = "127.0.0.1"
PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"
VENDOR_DIR = STATIC_DIR / "vendor"
VENDOR_FILES = ("litegraph.core.js", "litegraph.css")
OWN_FILES = ("canvas.js", "canvas.css")

TEMPLATE = '<div class="dagfusion-canvas-root" data-testid="dagfusion-canvas"></div>'
JS_ON_LOAD = "window.DagfusionCanvas.mount(element, props, server, watch);"
PAGE_CSS = """
.gradio-container { max-width: 100% !important; padding: 8px !important; }
footer { display: none !important; }
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
    scripts = [VENDOR_DIR / "litegraph.core.js", STATIC_DIR / "canvas.js"]
    return "".join(f'<link rel="stylesheet" href="{_url(p)}">' for p in styles) + "".join(
        f'<script src="{_url(p)}"></script>' for p in scripts
    )


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


def launch(demo: gr.Blocks, *, port: int | None = None, block: bool = True, quiet: bool = False) -> Any:
    """Serve ``demo`` on 127.0.0.1 only (never shared, no server-side rendering)."""
    return demo.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=quiet,
        footer_links=[],
        css=PAGE_CSS,
    )


def main(workflow: str | None, *, engine: Any, port: int | None = None) -> int:
    """``dagfusion ui [WF.yaml|PICTURE.png]``: open the canvas and serve it until Ctrl-C."""
    problem = vendor_problem()
    if problem:
        print(f"dagfusion ui: {problem}", file=sys.stderr)
        return 2
    backend = CanvasBackend(engine)
    graph, notice = initial_graph(backend, workflow)
    demo = build_app(backend, graph, notice)
    try:
        launch(demo, port=port, block=True)
    except KeyboardInterrupt:
        pass
    finally:
        backend.queue.shutdown()
    return 0


__all__ = ["WorkflowCanvas", "build_app", "head_html", "initial_graph", "launch", "main", "vendor_problem"]

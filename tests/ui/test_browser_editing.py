"""Editing the canvas from the keyboard and the node menu, in headless Chromium: Ctrl+O, arrow-key
nudging, node colours and collapsing (saved in the node's ``ui``, reopened, kept across a reload,
undoable), and files without them saved back byte for byte.

The browser, the server and the page helpers are those of ``test_browser.py``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow  # starts a browser and a server: full suite only


def _load_browser_module() -> Any:
    spec = importlib.util.spec_from_file_location("dagfusion_canvas_browser_tests", Path(__file__).with_name("test_browser.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # skips this module too where the browser tests are skipped
    return module


_b = _load_browser_module()
Canvas = _b.Canvas
READY = _b.READY
_open, _save, _canvas_point, _canonical = _b._open, _b._save, _b._canvas_point, _b._canonical
# The fixtures, shared rather than copied (pytest finds them in this module's namespace).
browser = _b.browser
server = _b.server
canvas = _b.canvas

WORKFLOW = """\
format_version: 1
metadata: {name: editing}
nodes:
  noise:
    type: dagfusion.tensor.Noise
    inputs: {seed: 7}
    ui: {pos: [40, 80]}
  blur:
    type: dagfusion.tensor.Blur
    inputs:
      tensor: {from: noise.tensor}
      sigma: 2.0
    ui: {note: kept, pos: [420, 80]}
"""


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    path = tmp_path / "editing.yaml"
    path.write_text(_canonical(WORKFLOW), encoding="utf-8")
    return path


def _title_box(canvas: Canvas, node_id: str) -> list[float]:
    """Where a node's collapse toggle (the dot at the left of its title bar) is on the page."""
    return canvas.js(
        "(() => { const n = app.nodeById(arg); const t = LiteGraph.NODE_TITLE_HEIGHT;"
        " const p = app.lgc.ds.convertOffsetToCanvas([n.pos[0] + t / 2, n.pos[1] - t / 2]);"
        " const r = app.canvasEl.getBoundingClientRect(); return [r.left + p[0], r.top + p[1]]; })()",
        node_id,
    )


def _menu(canvas: Canvas, node_id: str, *entries: str) -> None:
    """Right-click a node's title and pick ``entries`` (each in the menu the previous one opened)."""
    page = canvas.page
    x, y = _title_box(canvas, node_id)
    page.mouse.click(x + 16, y, button="right")  # on the title bar (inside a collapsed node too)
    for entry in entries:
        menu = page.locator(".litecontextmenu").last
        menu.locator(".litemenu-entry").filter(has_text=re.compile(rf"^\s*{re.escape(entry)}\s*$")).first.click()


def test_ctrl_o_opens_the_file_chooser_but_not_from_a_text_field(canvas: Canvas, workflow: Path) -> None:
    page = canvas.page
    choosers: list[Any] = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    page.focus("[data-testid=df-search]")
    page.keyboard.press("Control+o")
    page.wait_for_timeout(400)
    assert choosers == []  # the key is the text field's
    page.locator("[data-testid=df-canvas]").click(position={"x": 5, "y": 5})
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Control+o")
    assert len(choosers) == 1
    chooser.value.set_files(str(workflow))
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().length === 2")
    assert canvas.node_ids() == ["noise", "blur"]
    page.wait_for_selector("[data-testid=df-message]:has-text('opened editing.yaml')")


def test_arrow_keys_nudge_the_selection_by_the_grid_and_undo(canvas: Canvas, workflow: Path) -> None:
    page = canvas.page
    _open(canvas, workflow, 2)
    canvas.select("blur")
    page.wait_for_timeout(400)
    assert canvas.state("blur")["pos"] == [420, 80]
    page.keyboard.press("ArrowRight")
    assert canvas.state("blur")["pos"] == [430, 80]  # one grid step
    page.wait_for_timeout(400)  # (presses within 200 ms are one undo step)
    page.keyboard.press("Shift+ArrowDown")
    assert canvas.state("blur")["pos"] == [430, 130]  # five steps
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowLeft")
    assert canvas.state("blur")["pos"] == [420, 120]
    assert canvas.state("noise")["pos"] == [40, 80]  # only the selection moves
    page.keyboard.press("Control+z")  # the burst
    assert canvas.state("blur")["pos"] == [430, 80]
    page.keyboard.press("Control+z")
    assert canvas.state("blur")["pos"] == [420, 80]
    page.keyboard.press("Control+Shift+z")
    assert canvas.state("blur")["pos"] == [430, 80]
    # Not while a text field has the focus.
    page.focus("[data-testid=df-search]")
    page.keyboard.press("ArrowLeft")
    page.wait_for_timeout(100)
    assert canvas.state("blur")["pos"] == [430, 80]


def test_colour_and_collapse_are_saved_reopened_kept_on_reload_and_undone(canvas: Canvas, workflow: Path, tmp_path: Path) -> None:
    page = canvas.page
    _open(canvas, workflow, 2)
    red = canvas.js("LGraphCanvas.node_colors.red")
    _menu(canvas, "noise", "Colors", "red")
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeState('noise').color === LGraphCanvas.node_colors.red.color")
    page.wait_for_timeout(400)
    page.mouse.click(*_title_box(canvas, "blur"))  # the title bar's collapse toggle
    canvas.wait_state("blur", "collapsed", True)
    page.wait_for_timeout(400)

    # Each is one undo step.
    page.keyboard.press("Control+z")
    assert not canvas.state("blur")["collapsed"] and canvas.state("noise")["color"] == red["color"]
    page.keyboard.press("Control+z")
    assert canvas.state("noise")["color"] is None and canvas.state("noise")["bgcolor"] is None
    page.keyboard.press("Control+Shift+z")
    page.keyboard.press("Control+Shift+z")
    assert canvas.state("blur")["collapsed"] and canvas.state("noise")["bgcolor"] == red["bgcolor"]

    saved = _save(canvas, tmp_path)
    nodes = yaml.safe_load(saved)["nodes"]
    assert list(nodes["noise"]["ui"].items()) == [("pos", [40, 80]), ("color", red["color"]), ("bgcolor", red["bgcolor"])]
    assert list(nodes["blur"]["ui"].items()) == [("note", "kept"), ("pos", [420, 80]), ("collapsed", True)]

    # Reopened from the file ...
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-testid=df-clear]")
    assert canvas.node_ids() == []
    _open(canvas, tmp_path / "saved.yaml", 2)
    assert canvas.state("noise")["color"] == red["color"] and canvas.state("blur")["collapsed"]
    assert _save(canvas, tmp_path, "again.yaml") == saved
    # ... and after a reload.
    page.wait_for_timeout(400)
    page.reload()
    page.wait_for_selector(READY)
    assert canvas.state("noise")["bgcolor"] == red["bgcolor"] and canvas.state("blur")["collapsed"]
    assert not canvas.state("noise")["collapsed"] and canvas.state("blur")["color"] is None

    # Uncollapsing and "No color" leave no keys behind.
    _menu(canvas, "blur", "Collapse")  # (litegraph's menu entry toggles)
    canvas.wait_state("blur", "collapsed", False)
    _menu(canvas, "noise", "Colors", "No color")
    canvas.wait_state("noise", "color", None)
    assert _save(canvas, tmp_path, "plain.yaml") == workflow.read_text(encoding="utf-8")


def test_a_workflow_without_colours_or_collapse_saves_back_byte_for_byte(canvas: Canvas, workflow: Path, tmp_path: Path) -> None:
    _open(canvas, workflow, 2)
    text = workflow.read_text(encoding="utf-8")
    assert "color" not in text and "collapsed" not in text
    assert _save(canvas, tmp_path) == text

"""The canvas in headless Chromium (Debian's ``chromium``, driven by Playwright).

One app server and one browser for the module; each test opens its own page. The tests drive
the canvas the way a person does — palette clicks, mouse drags between sockets, the inspector's
widgets, the toolbar's buttons, file choosers and drops — and read what it shows (DOM text, and
the per-node state the canvas draws from, through ``window.DagfusionCanvas.app``).

Set ``DAGFUSION_UI_SCREENSHOT=path.png`` to keep the screenshot of the canvas after the quickstart
run (1600×1000).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagfusion.pngmeta import png_info
from dagfusion.registry import Registry

pytestmark = pytest.mark.slow  # starts a browser, a cluster or servers: full suite only

pytest.importorskip("gradio", reason="the canvas needs the ui extra: pip install 'dagfusion[ui]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (the dev extra)")

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "workflows" / "blurred_noise.yaml"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
READY = "[data-testid=dagfusion-canvas][data-ready=true]"


def _chromium() -> str | None:
    explicit = os.environ.get("DAGFUSION_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def server(served: Any) -> str:
    """The address to open: the server's own, carrying this launch's access token."""
    return served.server.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        why = "no chromium executable (install Debian's chromium package, or set DAGFUSION_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(why + ": the browser tests must run in CI")
        pytest.skip(why)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Canvas:
    """A page with the canvas open, and the gestures the tests use."""

    def __init__(self, page: Any, address: str) -> None:
        self.page = page
        self.base = address.split("/?", 1)[0]
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.goto(address)  # sets the token cookie and lands on the address without the token
        assert page.url == self.base + "/"
        page.wait_for_selector(READY, timeout=30_000)

    @property
    def root(self) -> Any:
        return self.page.locator("[data-testid=dagfusion-canvas]")

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(f"(arg) => {{ const app = window.DagfusionCanvas.app; return {expression}; }}", arg)

    def state(self, node_id: str) -> dict[str, Any]:
        return self.js("app.nodeState(arg)", node_id)

    def node_ids(self) -> list[str]:
        return self.js("app.nodeIds()")

    def add(self, search: str, type_id: str) -> str:
        """Add a node from the palette by searching and clicking; returns its id."""
        before = set(self.node_ids())
        self.page.fill("[data-testid=df-search]", search)
        self.page.locator(f"[data-testid=df-palette-item][data-type='{type_id}']:visible").click()
        (new,) = set(self.node_ids()) - before
        return new

    def drag(self, start: list[float], end: list[float]) -> None:
        mouse = self.page.mouse
        mouse.move(*start)
        mouse.down()
        mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=4)
        mouse.move(*end, steps=4)
        mouse.up()

    def connect(self, src: str, output: str, dst: str, input_name: str) -> None:
        start = self.js("app.slotClientPos(arg[0], 'out', arg[1])", [src, output])
        end = self.js("app.slotClientPos(arg[0], 'in', arg[1])", [dst, input_name])
        self.drag(start, end)

    def select(self, node_id: str) -> None:
        self.page.mouse.click(*self.js("app.nodeClientPos(arg)", node_id))
        self.page.wait_for_selector(f"[data-testid=df-inspector][data-node='{node_id}']")

    def field(self, name: str) -> Any:
        return self.page.locator(f"[data-testid=df-field][data-input='{name}']")

    def open_file(self, path: Path) -> None:
        self.page.set_input_files("[data-testid=df-file-input]", str(path))

    def wait_run(self, status: str = "done", timeout: float = 60_000) -> None:
        self.page.wait_for_function(
            "s => document.querySelector('[data-testid=dagfusion-canvas]').dataset.runStatus === s", arg=status, timeout=timeout
        )

    def wait_state(self, node_id: str, key: str, value: Any) -> None:
        self.page.wait_for_function(
            "([id, key, value]) => { const s = window.DagfusionCanvas.app.nodeState(id); return s && s[key] === value; }",
            arg=[node_id, key, value],
        )

    def wait_problems(self, count: int) -> None:
        self.page.wait_for_function(
            "n => document.querySelector('[data-testid=dagfusion-canvas]').dataset.problems === String(n)", arg=count
        )

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith((self.base, "data:", "blob:"))]


@pytest.fixture
def canvas(browser: Any, server: str) -> Iterator[Canvas]:
    context = browser.new_context(viewport={"width": 1500, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    canvas = Canvas(page, server)
    yield canvas
    assert canvas.errors == [], canvas.errors
    context.close()


def test_palette_is_grouped_searchable_and_described(canvas: Canvas, ui_registry: Registry) -> None:
    page = canvas.page
    items = page.locator("[data-testid=df-palette-item]")
    assert items.count() == len(ui_registry)
    groups = page.locator(".df-group summary").all_inner_texts()
    assert {"tensor", "io", "uitest"} <= {g.lower() for g in groups}
    blur = page.locator("[data-testid=df-palette-item][data-type='dagfusion.tensor.Blur']")
    assert "Separable Gaussian blur" in blur.inner_text()  # each entry shows its description
    page.fill("[data-testid=df-search]", "gaussian")
    visible = page.locator("[data-testid=df-palette-item]:visible")
    assert visible.count() >= 1 and all("gaussian" in (t or "") for t in visible.evaluate_all("els => els.map(e => e.dataset.search)"))
    assert page.locator("[data-testid=df-palette-item][data-type='dagfusion.tensor.Noise']").is_hidden()
    assert canvas.foreign_requests() == []  # nothing is fetched from outside this server (no CDN)


def test_build_connect_refuse_edit_run_save_and_reopen(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    noise = canvas.add("noise", "dagfusion.tensor.Noise")
    blur = canvas.add("blur", "dagfusion.tensor.Blur")
    save = canvas.add("png", "dagfusion.io.SaveTensorPNG")
    assert (noise, blur, save) == ("noise", "blur", "save_tensor_png")
    # Spread them out so drags do not land on the wrong node.
    canvas.js("(() => { const p = {noise: [40, 80], blur: [360, 80], save_tensor_png: [680, 80]}; for (const [id, pos] of Object.entries(p)) app.nodeById(id).pos = pos; app.lgc.setDirty(true, true); })()")
    page.wait_for_timeout(100)

    # Validation errors appear on the nodes they concern, before running.
    canvas.wait_problems(2)
    assert canvas.state(blur)["problems"] == ["required input 'tensor' (TENSOR) is not connected or set"]
    assert page.locator(f"[data-testid=df-problem][data-node='{save}']").count() == 1

    # A compatible link is made; an incompatible one is refused with the reason.
    canvas.connect(noise, "tensor", blur, "tensor")
    assert canvas.state(blur)["linked"] == ["tensor"]
    canvas.connect(noise, "tensor", blur, "sigma")
    toast = page.locator("[data-testid=df-toast]")
    assert "sigma expects FLOAT" in toast.inner_text() and "TENSOR" in toast.inner_text()
    assert canvas.state(blur)["linked"] == ["tensor"]
    canvas.connect(blur, "tensor", save, "tensor")
    canvas.wait_problems(0)

    # Parameter widgets come from the input specs: bounds, choices, seeds.
    canvas.select(blur)
    sigma = canvas.field("sigma").locator("input")
    assert sigma.get_attribute("max") == "64" and sigma.get_attribute("min") == "0"
    sigma.fill("100")
    sigma.press("Enter")
    assert "expected a value <= 64" in canvas.field("sigma").inner_text()
    canvas.wait_problems(1)
    sigma.fill("1.5")
    sigma.press("Enter")
    canvas.wait_problems(0)
    assert canvas.state(blur)["inputs"] == {"sigma": 1.5}
    canvas.select(noise)
    assert canvas.field("distribution").locator("option").all_inner_texts() == ["normal", "uniform"]
    canvas.field("distribution").locator("select").select_option(label="uniform")
    canvas.field("seed").locator("[data-testid=df-seed-random]").click()
    seed = canvas.state(noise)["inputs"]["seed"]
    assert isinstance(seed, int) and seed >= 0
    canvas.field("height").locator("input").fill("16")
    canvas.field("height").locator("input").press("Enter")
    page.wait_for_timeout(300)

    # Run: per-node statuses and the preview, on the node and in the previews panel.
    page.click("[data-testid=df-run]")
    canvas.wait_run("done")
    assert {canvas.state(n)["status"] for n in (noise, blur, save)} == {"done"}
    canvas.wait_state(save, "preview", True)  # drawn on the node once the picture has decoded
    assert page.locator(f"[data-testid=df-preview][data-node='{save}'] img").count() == 1
    assert page.locator("[data-testid=df-run-entry][data-status=done]").count() >= 1

    # Save: exactly the CLI's format, which `dagfusion run` accepts.
    with page.expect_download() as download:
        page.click("[data-testid=df-save]")
    saved = tmp_path / "saved.yaml"
    download.value.save_as(saved)
    text = saved.read_text(encoding="utf-8")
    assert text.startswith("format_version: 1\n") and "tensor: {from: noise.tensor}" in text and "pos:" in text
    done = subprocess.run(
        [sys.executable, "-m", "dagfusion.cli", "run", str(saved), "--out", str(tmp_path / "cli-run")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli-run" / "image.png").is_file()

    # Load it back into an empty canvas.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-testid=df-clear]")
    assert canvas.node_ids() == []
    canvas.open_file(saved)
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().length === 3")
    assert canvas.node_ids() == [noise, blur, save]
    assert canvas.state(blur)["inputs"] == {"sigma": 1.5} and canvas.state(save)["linked"] == ["tensor"]
    assert canvas.state(noise)["inputs"]["distribution"] == "uniform"

    # Edits survive a page reload.
    canvas.node_ids()  # (let the canvas store its state)
    page.wait_for_timeout(400)
    page.reload()
    page.wait_for_selector(READY)
    assert canvas.node_ids() == [noise, blur, save] and canvas.state(blur)["inputs"] == {"sigma": 1.5}
    assert "restored" in page.locator("[data-testid=df-message]").inner_text()


def test_quickstart_runs_and_bad_files_keep_the_canvas(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    canvas.open_file(QUICKSTART)
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().length === 7")
    page.click("[data-testid=df-run]")
    canvas.wait_run("done")
    assert canvas.state("save_image")["status"] == "done"
    canvas.wait_state("save_image", "preview", True)
    assert canvas.state("noise")["status"] in ("done", "cached")
    page.wait_for_selector("[data-testid=df-preview][data-node=save_image] img")
    before = canvas.js("JSON.stringify(app.toGraph())")

    newer = tmp_path / "newer.yaml"
    newer.write_text("format_version: 2\nnodes: {a: {type: dagfusion.util.Number}}\n", encoding="utf-8")
    canvas.open_file(newer)
    page.wait_for_function("() => document.querySelector('[data-testid=dagfusion-canvas]').dataset.lastOpenError")
    assert "reads up to 1" in page.locator("[data-testid=df-message]").inner_text()
    assert canvas.js("JSON.stringify(app.toGraph())") == before

    broken = tmp_path / "broken.yaml"
    broken.write_text("format_version: 1\nnodes:\n  a: {type: dagfusion.util.Number, inputs: {value: [unclosed\n", encoding="utf-8")
    canvas.js("delete document.querySelector('[data-testid=dagfusion-canvas]').dataset.lastOpenError")
    canvas.open_file(broken)
    page.wait_for_function("() => document.querySelector('[data-testid=dagfusion-canvas]').dataset.lastOpenError")
    assert "Not opened" in page.locator("[data-testid=df-message]").inner_text()
    assert canvas.js("JSON.stringify(app.toGraph())") == before
    assert canvas.state("save_image")["status"] == "done"  # the run's statuses stay too


def test_dropping_a_dagfusion_png_opens_its_workflow(canvas: Canvas) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG", pnginfo=png_info(QUICKSTART.read_text(encoding="utf-8")))
    data = base64.b64encode(buffer.getvalue()).decode()
    canvas.page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "picture.png", {type: "image/png"}));
            const stage = document.querySelector(".df-stage");
            stage.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            stage.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    canvas.page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().length === 7")
    assert canvas.node_ids()[:2] == ["noise", "blur"]
    assert "opened picture.png" in canvas.page.locator("[data-testid=df-message]").inner_text()


def test_progress_queue_and_cancel_only_this_run(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    workflow = tmp_path / "slow.yaml"
    workflow.write_text(
        "format_version: 1\nmetadata: {name: slow}\nnodes:\n  slow: {type: uitest.Slow, inputs: {steps: 2000, delay: 0.01}}\n",
        encoding="utf-8",
    )
    canvas.open_file(workflow)
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().length === 1")
    page.click("[data-testid=df-run]")
    page.wait_for_function("() => (window.DagfusionCanvas.app.nodeState('slow').progress || {}).step > 0")
    first = canvas.root.get_attribute("data-run-id")
    assert canvas.state("slow")["status"] == "running" and canvas.state("slow")["progress"]["total"] == 2000
    assert "slow" in page.locator("[data-testid=df-message]").inner_text()  # e.g. "run #3: running — slow 12/2000"

    # Submitting while a run is going queues it; the queue shows both.
    page.click("[data-testid=df-run]")
    page.wait_for_function("f => { const r = document.querySelector('[data-testid=dagfusion-canvas]').dataset.runId; return r && r !== f; }", arg=first)
    second = canvas.root.get_attribute("data-run-id")
    page.wait_for_selector(f"[data-testid=df-run-entry][data-run='{second}'][data-status=queued]")
    page.wait_for_selector(f"[data-testid=df-run-entry][data-run='{first}'][data-status=running]")
    canvas.wait_state("slow", "status", "queued")  # the canvas now shows the queued run

    # Cancel cancels the run the canvas shows (the queued one), and only it.
    page.click("[data-testid=df-cancel]")
    page.wait_for_selector(f"[data-testid=df-run-entry][data-run='{second}'][data-status=cancelled]")
    page.wait_for_timeout(300)
    assert page.locator(f"[data-testid=df-run-entry][data-run='{first}']").get_attribute("data-status") == "running"

    # Follow the first run again from the queue and cancel it there.
    page.click(f"[data-testid=df-run-entry][data-run='{first}']")
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeState('slow').status === 'running'")
    page.locator(f"[data-testid=df-run-entry][data-run='{first}'] [data-testid=df-run-cancel]").click()
    canvas.wait_run("cancelled")
    assert canvas.state("slow")["status"] == "cancelled"



# --- round 2: messages, undo, search, placeholders, groups, layout, history, keyboard -----------

MESSAGE = "[data-testid=df-message]"
CANVAS_QUICKSTART = REPO / "workflows" / "quickstart.yaml"


def _message(canvas: Canvas) -> str:
    return canvas.page.locator(MESSAGE).inner_text()


def _open(canvas: Canvas, path: Path, count: int) -> None:
    canvas.open_file(path)
    canvas.page.wait_for_function("n => window.DagfusionCanvas.app.nodeIds().length === n", arg=count)


def _save(canvas: Canvas, tmp_path: Path, name: str = "saved.yaml", keys: str | None = None) -> str:
    page = canvas.page
    with page.expect_download() as download:
        if keys:
            page.keyboard.press(keys)
        else:
            page.click("[data-testid=df-save]")
    target = tmp_path / name
    download.value.save_as(target)
    return target.read_text(encoding="utf-8")


def _canvas_point(canvas: Canvas, fx: float, fy: float) -> list[float]:
    box = canvas.page.locator("[data-testid=df-canvas]").bounding_box()
    return [box["x"] + box["width"] * fx, box["y"] + box["height"] * fy]


def test_a_message_survives_the_poll_and_the_run_line_says_what_is_drawn(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    _open(canvas, QUICKSTART, 7)
    size_before = canvas.state("save_image")["size"]
    page.click("[data-testid=df-run]")
    canvas.wait_run("done")
    canvas.wait_state("save_image", "preview", True)
    assert canvas.state("save_image")["size"] == size_before  # the picture does not grow the node
    page.wait_for_function("s => document.querySelector(s).textContent.includes('done in')", arg=MESSAGE)
    line = _message(canvas)
    assert "done — done" not in line and line.startswith("run #")
    statuses = [canvas.state(n)["status"] for n in canvas.node_ids()]
    ran, cached = statuses.count("done"), statuses.count("cached")
    assert f"{ran} node{'s' if ran != 1 else ''} ran, {cached} cached" in line, (line, statuses)

    # The user's messages stay over several polls (1.5 s each) until their next action.
    _save(canvas, tmp_path)
    assert _message(canvas).startswith("saved ")
    page.wait_for_timeout(3500)
    assert _message(canvas).startswith("saved ")

    canvas.select("blur")
    sigma = canvas.field("sigma").locator("input")
    sigma.fill("500")
    sigma.press("Enter")
    canvas.wait_problems(1)
    page.click("[data-testid=df-run]")
    page.wait_for_function("s => document.querySelector(s).textContent.startsWith('Not run')", arg=MESSAGE)
    page.wait_for_timeout(3500)
    assert _message(canvas).startswith("Not run") and "500" in _message(canvas)

    broken = tmp_path / "broken.yaml"
    broken.write_text("format_version: 1\nnodes: [unclosed\n", encoding="utf-8")
    canvas.open_file(broken)
    page.wait_for_function("s => document.querySelector(s).textContent.startsWith('Not opened')", arg=MESSAGE)
    page.wait_for_timeout(3500)
    assert _message(canvas).startswith("Not opened")

    # Cancelling says so once.
    slow = tmp_path / "slow.yaml"
    slow.write_text("format_version: 1\nnodes:\n  slow: {type: uitest.Slow, inputs: {steps: 2000, delay: 0.01}}\n", encoding="utf-8")
    _open(canvas, slow, 1)
    page.click("[data-testid=df-run]")
    page.wait_for_function("() => (window.DagfusionCanvas.app.nodeState('slow').progress || {}).step > 0")
    page.click("[data-testid=df-cancel]")
    canvas.wait_run("cancelled")
    page.wait_for_function("s => document.querySelector(s).textContent.includes('cancelled')", arg=MESSAGE)
    assert "cancelled — cancelled" not in _message(canvas)


def test_undo_and_redo_every_kind_of_edit(canvas: Canvas) -> None:
    page = canvas.page

    def undo() -> None:
        page.keyboard.press("Control+z")

    def redo() -> None:
        page.keyboard.press("Control+Shift+z")

    noise = canvas.add("noise", "dagfusion.tensor.Noise")
    page.wait_for_timeout(300)
    blur = canvas.add("blur", "dagfusion.tensor.Blur")
    canvas.js("(() => { app.nodeById('noise').pos = [40, 80]; app.nodeById('blur').pos = [420, 80]; app.lgc.setDirty(true, true); app.scheduleSync(); })()")
    page.wait_for_timeout(400)

    # add
    extra = canvas.add("png", "dagfusion.io.SaveTensorPNG")
    assert extra in canvas.node_ids()
    undo()
    assert canvas.node_ids() == [noise, blur]
    redo()
    assert canvas.node_ids() == [noise, blur, extra]
    undo()

    # link
    canvas.connect(noise, "tensor", blur, "tensor")
    assert canvas.state(blur)["linked"] == ["tensor"]
    undo()
    assert canvas.state(blur)["linked"] == []
    redo()
    assert canvas.state(blur)["linked"] == ["tensor"]

    # widget value (from the inspector; the keys work once the field is left)
    canvas.select(blur)
    sigma = canvas.field("sigma").locator("input")
    sigma.fill("2.5")
    sigma.press("Enter")
    assert canvas.state(blur)["inputs"] == {"sigma": 2.5}
    page.locator(MESSAGE).click()
    undo()
    assert canvas.state(blur)["inputs"] == {}
    assert canvas.field("sigma").locator("input").input_value() != "2.5"  # the inspector follows
    redo()
    assert canvas.state(blur)["inputs"] == {"sigma": 2.5}

    # move, with the mouse
    before = canvas.state(noise)["pos"]
    start = canvas.js("app.nodeClientPos(arg)", noise)
    canvas.drag(start, [start[0] + 120, start[1] + 150])
    moved = canvas.state(noise)["pos"]
    assert moved != before
    undo()
    assert canvas.state(noise)["pos"] == before
    redo()
    assert canvas.state(noise)["pos"] == moved

    # delete (the Delete key), and undo brings the node back with its link
    canvas.select(blur)
    page.keyboard.press("Delete")
    assert canvas.node_ids() == [noise]
    undo()
    assert canvas.node_ids() == [noise, blur] and canvas.state(blur)["linked"] == ["tensor"]
    assert canvas.state(blur)["inputs"] == {"sigma": 2.5}
    redo()
    assert canvas.node_ids() == [noise]
    page.click("[data-testid=df-undo]")  # the toolbar's buttons do the same
    assert canvas.node_ids() == [noise, blur]


def test_search_box_ranks_titles_and_descriptions_and_a_dropped_link_searches_what_fits(canvas: Canvas) -> None:
    page = canvas.page
    point = _canvas_point(canvas, 0.3, 0.3)
    page.mouse.dblclick(*point)
    page.wait_for_selector("[data-testid=df-searchbox]")
    page.keyboard.type("blur")
    items = page.locator("[data-testid=df-searchbox-item]")
    assert items.first.get_attribute("data-type") == "dagfusion.tensor.Blur"  # the title ranks first
    page.fill("[data-testid=df-searchbox-input]", "gaussian")  # only in its description
    assert "dagfusion.tensor.Blur" in items.evaluate_all("els => els.map(e => e.dataset.type)")
    page.fill("[data-testid=df-searchbox-input]", "blur")
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().includes('blur')")
    assert page.locator("[data-testid=df-searchbox]").count() == 0

    noise = canvas.add("noise", "dagfusion.tensor.Noise")
    canvas.js("(() => { app.nodeById('noise').pos = [0, 0]; app.nodeById('blur').pos = [0, 400]; app.fitView(); })()")
    page.wait_for_timeout(100)
    start = canvas.js("app.slotClientPos(arg, 'out', 'tensor')", noise)
    canvas.drag(start, _canvas_point(canvas, 0.85, 0.2))
    page.wait_for_selector("[data-testid=df-searchbox][data-filter='nodes taking TENSOR']")
    listed = items.evaluate_all("els => els.map(e => e.dataset.type)")
    fits = canvas.js("app.catalog.nodes.filter(e => e.inputs.some(i => app.accepts(i.type, 'TENSOR'))).map(e => e.type)")
    assert listed and set(listed) <= set(fits) and "dagfusion.tensor.Noise" not in listed
    page.fill("[data-testid=df-searchbox-input]", "save tensor png")
    page.locator("[data-testid=df-searchbox-item][data-type='dagfusion.io.SaveTensorPNG']").click()
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().includes('save_tensor_png')")
    assert canvas.state("save_tensor_png")["linked"] == ["tensor"]


PLACEHOLDER = """\
format_version: 1
nodes:
  noise:
    type: dagfusion.tensor.Noise
    inputs: {seed: 3}
    ui: {pos: [0, 0]}
  magic:
    type: someplugin.Magic
    version: 2.0.0
    inputs: {tensor: {from: noise.tensor}, strength: 0.5}
    ui: {pos: [320, 0]}
  blur:
    type: dagfusion.tensor.Blur
    inputs: {tensor: {from: magic.result}}
    ui: {pos: [640, 0]}
ui:
  groups:
  - title: sources
    bounding: [-20, -80, 300, 260]
"""


def _canonical(text: str) -> str:
    from dagfusion.workflow import parse_workflow

    workflow, problems = parse_workflow(text, "x.yaml")
    assert workflow is not None and problems == []
    return workflow.dump()


def test_unknown_node_types_are_red_placeholders_that_save_back_unchanged(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    text = _canonical(PLACEHOLDER)
    path = tmp_path / "plugin.yaml"
    path.write_text(text, encoding="utf-8")
    _open(canvas, path, 3)
    magic = canvas.state("magic")
    assert magic["placeholder"] and magic["type"] == "someplugin.Magic"
    assert magic["linked"] == ["tensor"] and magic["inputs"] == {"strength": 0.5}
    assert canvas.state("blur")["linked"] == ["tensor"]
    page.wait_for_selector("[data-testid=df-problem][data-node=magic][data-code=unknown-node-type]")
    assert canvas.js("app.graph._groups.length") == 1
    assert _save(canvas, tmp_path) == text


def test_context_menu_adds_nodes_and_groups_which_are_saved(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    point = _canvas_point(canvas, 0.3, 0.3)
    page.mouse.click(*point, button="right")
    page.locator(".litecontextmenu .litemenu-entry", has_text="Add Node").click()
    categories = page.locator(".litecontextmenu").last.locator(".litemenu-entry")
    assert "tensor" in categories.all_inner_texts()
    categories.filter(has_text="tensor").first.click()
    page.locator(".litecontextmenu").last.locator(".litemenu-entry", has_text="Blur").click()
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().includes('blur')")

    page.mouse.click(*_canvas_point(canvas, 0.6, 0.6), button="right")
    page.locator(".litecontextmenu .litemenu-entry", has_text="Add Group").click()
    page.wait_for_function("() => window.DagfusionCanvas.app.toGraph().workflow.ui.groups")
    saved = _save(canvas, tmp_path)
    assert "ui:\n  groups:\n  - title: Group\n    bounding:\n    - " in saved and "color" not in saved

    # Groups come back with the file, and after a reload.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-testid=df-clear]")
    assert canvas.js("app.graph._groups.length") == 0
    _open(canvas, tmp_path / "saved.yaml", 1)
    assert canvas.js("app.graph._groups.map(g => g.title)") == ["Group"]
    page.wait_for_timeout(400)
    page.reload()
    page.wait_for_selector(READY)
    assert canvas.js("app.graph._groups.map(g => g.title)") == ["Group"]


def test_the_quickstart_fits_the_window_and_the_page_does_not_scroll(browser: Any, server: str) -> None:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    canvas = Canvas(page, server)
    _open(canvas, CANVAS_QUICKSTART, 11)
    rect = page.locator("[data-testid=df-canvas]").bounding_box()
    for node_id in canvas.node_ids():
        left, top, right, bottom = canvas.js("app.nodeClientRect(arg)", node_id)
        assert rect["x"] <= left and right <= rect["x"] + rect["width"], node_id
        assert rect["y"] <= top and bottom <= rect["y"] + rect["height"], node_id
    assert canvas.js("app.lgc.ds.scale") < 0.6  # zoomed out further than before
    sizes = page.evaluate("() => [document.documentElement.scrollHeight, window.innerHeight, document.documentElement.scrollWidth, window.innerWidth]")
    assert sizes[0] <= sizes[1] and sizes[2] <= sizes[3], sizes
    # The panes keep their places: with a node selected, problems and runs stay in view.
    canvas.select("sample")
    for pane in ("node", "problems", "runs", "previews"):
        box = page.locator(f"[data-testid=df-pane-{pane}]").bounding_box()
        assert box["height"] > 20 and box["y"] + box["height"] <= 1000, pane
    assert canvas.errors == []
    context.close()


def test_history_is_restored_after_a_reload_with_results(canvas: Canvas) -> None:
    page = canvas.page
    _open(canvas, QUICKSTART, 7)
    page.click("[data-testid=df-run]")
    canvas.wait_run("done")
    run_id = canvas.root.get_attribute("data-run-id")
    page.wait_for_selector("[data-testid=df-result-image]")
    page.reload()
    page.wait_for_selector(READY)
    # The canvas follows the run again, and the history lists it with its results.
    page.wait_for_function("r => document.querySelector('[data-testid=dagfusion-canvas]').dataset.runId === r", arg=run_id)
    canvas.wait_state("save_image", "status", "done")
    entry = page.locator(f"[data-testid=df-run-entry][data-run='{run_id}']")
    assert entry.get_attribute("data-status") == "done"
    entry.click()
    page.wait_for_selector("[data-testid=df-result-image]")
    assert "jobs" in page.locator("[data-testid=df-result-folder]").inner_text()
    page.locator("[data-testid=df-result-image] img").first.click()
    lightbox = page.locator("[data-testid=df-lightbox]")
    assert lightbox.is_visible() and lightbox.locator("img").evaluate("img => img.naturalWidth") > 0
    lightbox.click()
    assert lightbox.is_hidden()


def test_history_survives_a_server_restart(browser: Any, ui_registry: Registry, tmp_path: Path) -> None:
    from dagfusion import Engine, Settings
    from dagfusion.ui.app import PACKAGE_DIR, build_app, launch
    from dagfusion.ui.handlers import CanvasBackend
    from dagfusion.ui.jobqueue import JobQueue

    settings = Settings.load(
        overrides={"output_dir": str(tmp_path / "outputs"), "cache_dir": str(tmp_path / "cache"), "read_dirs": [str(tmp_path)], "device": "cpu"},
        environ={},
    )

    def start() -> tuple[Any, Any]:
        engine = Engine(ui_registry, settings)
        backend = CanvasBackend(engine, queue=JobQueue.local(engine, tmp_path / "state"))
        return backend, launch(build_app(backend), port=0, block=False, quiet=True)

    backend, server = start()
    try:
        graph = backend.open_text(QUICKSTART.read_text(encoding="utf-8"), "blurred_noise.yaml")["graph"]
        run_id = backend.submit(graph)["run"]["id"]
        assert backend.queue.wait_idle(120)
    finally:
        server.close()
        backend.queue.shutdown()
    backend, server = start()
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        Canvas(page, server.url)
        entry = page.locator(f"[data-testid=df-run-entry][data-run='{run_id}']")
        entry.wait_for()
        assert entry.get_attribute("data-status") == "done"
        entry.click()
        page.wait_for_selector("[data-testid=df-result-image][data-name='blurred_noise_00000.png'], [data-testid=df-result-image]")
    finally:
        context.close()
        server.close()
        backend.queue.shutdown()
    assert not (PACKAGE_DIR / "app.pyi").exists()  # serving wrote no stub into the package


def test_keyboard_copy_paste_select_all_bypass_and_save(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    _open(canvas, QUICKSTART, 7)
    page.keyboard.press("Control+a")
    assert canvas.js("Object.keys(app.lgc.selected_nodes).length") == 7
    canvas.page.locator("[data-testid=df-canvas]").click(position={"x": 5, "y": 5})  # deselects
    assert canvas.js("Object.keys(app.lgc.selected_nodes).length") == 0
    page.wait_for_timeout(400)  # (a second click on the same spot would be a double click)
    canvas.select("noise")
    page.keyboard.down("Shift")
    page.mouse.click(*canvas.js("app.nodeClientPos(arg)", "blur"))
    page.keyboard.up("Shift")
    assert canvas.js("Object.keys(app.lgc.selected_nodes).length") == 2
    page.keyboard.press("Control+c")
    page.mouse.move(*_canvas_point(canvas, 0.5, 0.9))
    page.keyboard.press("Control+v")
    page.wait_for_function("() => window.DagfusionCanvas.app.nodeIds().length === 9")
    new = [n for n in canvas.node_ids() if n not in ("noise", "blur", "save_image") and n.startswith(("noise_", "blur_"))]
    assert sorted(new) == ["blur_2", "noise_2"]
    assert canvas.state("blur_2")["linked"] == ["tensor"]  # the link between the copies came along
    assert canvas.js("app.toGraph().links.some(l => l.from[0] === 'noise_2' && l.to[0] === 'blur_2')")
    page.keyboard.press("Delete")
    assert len(canvas.node_ids()) == 7

    canvas.select("blur")
    page.keyboard.press("Control+b")
    assert canvas.state("blur")["bypass"]
    saved = _save(canvas, tmp_path, keys="Control+s")
    assert "  blur:\n    type: dagfusion.tensor.Blur\n    bypass: true\n" in saved
    page.keyboard.press("Control+Enter")
    canvas.wait_run("done")
    assert canvas.state("blur")["status"] == "done" and canvas.state("save_image")["status"] == "done"


def test_the_quickstart_workflow_runs_in_the_browser(browser: Any, server: str, served: Any) -> None:
    import time

    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    canvas = Canvas(page, server)
    _open(canvas, CANVAS_QUICKSTART, 11)
    canvas.wait_problems(0)
    canvas.select("sample")
    steps = canvas.field("steps").locator("input")
    steps.fill("4")  # the workflow's own test_overrides: sample.steps=4
    steps.press("Enter")
    page.wait_for_timeout(400)
    started = time.perf_counter()
    page.click("[data-testid=df-run]")
    canvas.wait_run("done", timeout=300_000)
    print(f"\nquickstart (4 steps) in the browser: {time.perf_counter() - started:.2f}s from Run to done")
    assert canvas.state("save_image")["status"] == "done"
    page.wait_for_selector("[data-testid=df-result-text][data-name='report.txt']")
    assert "ShapeEval on the picture" in page.locator("[data-testid=df-result-text][data-name='report.txt'] pre").inner_text()
    assert page.locator("[data-testid=df-result-image]").count() >= 1
    shot = os.environ.get("DAGFUSION_UI_SCREENSHOT")
    if shot:
        canvas.select("sample")  # the inspector shows its widgets
        page.mouse.move(5, 5)  # nothing hovered
        page.wait_for_timeout(300)
        page.screenshot(path=shot)
    assert canvas.errors == []
    context.close()


def test_a_running_run_is_followed_again_after_a_reload(canvas: Canvas, tmp_path: Path) -> None:
    page = canvas.page
    workflow = tmp_path / "slow.yaml"
    workflow.write_text("format_version: 1\nnodes:\n  slow: {type: uitest.Slow, inputs: {steps: 3000, delay: 0.01}}\n", encoding="utf-8")
    _open(canvas, workflow, 1)
    page.click("[data-testid=df-run]")
    page.wait_for_function("() => (window.DagfusionCanvas.app.nodeState('slow').progress || {}).step > 0")
    run_id = canvas.root.get_attribute("data-run-id")
    page.reload()
    page.wait_for_selector(READY)
    page.wait_for_function("r => document.querySelector('[data-testid=dagfusion-canvas]').dataset.runId === r", arg=run_id)
    canvas.wait_state("slow", "status", "running")
    step = canvas.state("slow")["progress"]["step"]
    page.wait_for_function("s => window.DagfusionCanvas.app.nodeState('slow').progress.step > s", arg=step)
    assert "restored" in _message(canvas)  # the restore message is not replaced by the run's progress
    page.click("[data-testid=df-cancel]")
    canvas.wait_run("cancelled")


MINIMAP = "[data-testid=df-minimap]"
MINIMAP_TOGGLE = "[data-testid=df-minimap-toggle]"


def _minimap(canvas: Canvas) -> dict[str, Any]:
    return canvas.js("app.minimapState()")


def _view_centre(canvas: Canvas) -> list[float]:
    """The graph point at the middle of the canvas."""
    return canvas.js(
        "(() => { const r = app.canvasEl.getBoundingClientRect();"
        " return app.lgc.ds.convertCanvasToOffset([r.width / 2, r.height / 2]); })()"
    )


def test_the_minimap_draws_every_node_and_moves_the_view(browser: Any, server: str) -> None:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    canvas = Canvas(page, server)
    _open(canvas, CANVAS_QUICKSTART, 11)
    page.wait_for_function("() => window.DagfusionCanvas.app.minimapState().nodes.length === 11")
    box = page.locator(MINIMAP).bounding_box()
    stage = page.locator("[data-testid=df-canvas]").bounding_box()
    # A small overlay in the canvas's bottom-right corner.
    assert 190 <= box["width"] <= 210 and 130 <= box["height"] <= 150, box
    assert stage["x"] + stage["width"] - 40 < box["x"] + box["width"] <= stage["x"] + stage["width"]
    assert stage["y"] + stage["height"] - 40 < box["y"] + box["height"] <= stage["y"] + stage["height"]

    state = _minimap(canvas)
    rects = {r["id"]: r for r in state["nodes"]}
    assert sorted(rects) == sorted(canvas.node_ids())
    positions = {n: canvas.state(n)["pos"] for n in rects}
    for a in rects:
        r = rects[a]
        assert 0 <= r["x"] and r["x"] + r["w"] <= 200 and 0 <= r["y"] and r["y"] + r["h"] <= 140, (a, r)
        for b in rects:  # laid out as on the canvas
            if positions[a][0] + 10 < positions[b][0]:
                assert r["x"] < rects[b]["x"], (a, b)
            if positions[a][1] + 10 < positions[b][1]:
                assert r["y"] < rects[b]["y"], (a, b)
    # Each rectangle is painted on the minimap (its middle opaque), the space between them is not.
    alphas = page.evaluate(
        """(points) => { const c = document.querySelector('[data-testid=df-minimap] canvas');
        const k = c.width / c.getBoundingClientRect().width; const ctx = c.getContext('2d');
        return points.map(([x, y]) => ctx.getImageData(Math.floor(x * k), Math.floor(y * k), 1, 1).data[3]); }""",
        [[r["x"] + r["w"] / 2, r["y"] + r["h"] / 2] for r in rects.values()] + [[1, 1]],
    )
    assert all(a > 180 for a in alphas[:-1]), alphas
    assert alphas[-1] < 100, alphas
    # Fitted: the whole graph is in view.
    view = state["view"]
    assert all(view["x"] <= r["x"] and r["x"] + r["w"] <= view["x"] + view["w"] + 1 for r in rects.values())

    # Moving a node on the canvas moves its rectangle.
    before = rects["prompt"]
    start = canvas.js("app.nodeClientPos(arg)", "prompt")
    canvas.drag(start, [start[0] + 120, start[1] + 60])
    page.wait_for_function(
        "x => window.DagfusionCanvas.app.minimapState().nodes.find(r => r.id === 'prompt').x > x + 3", arg=before["x"]
    )

    # A click near the minimap's top-left corner centres the view there: up and to the left.
    positions = {n: canvas.state(n)["pos"] for n in rects}
    selected = canvas.js("Object.keys(app.lgc.selected_nodes)")
    offset = canvas.js("app.lgc.ds.offset.slice()")
    centre = _view_centre(canvas)
    page.mouse.click(box["x"] + 12, box["y"] + 10)
    moved = canvas.js("app.lgc.ds.offset.slice()")
    assert moved[0] > offset[0] + 50 and moved[1] > offset[1] + 50, (offset, moved)
    now = _view_centre(canvas)
    assert now[0] < centre[0] - 50 and now[1] < centre[1] - 50
    page.wait_for_timeout(200)
    view = _minimap(canvas)["view"]
    assert abs(view["x"] + view["w"] / 2 - 11) < 3 and abs(view["y"] + view["h"] / 2 - 9) < 3, view
    # Dragging across it takes the view along, to the bottom-right.
    canvas.drag([box["x"] + 12, box["y"] + 10], [box["x"] + box["width"] - 12, box["y"] + box["height"] - 10])
    last = _view_centre(canvas)
    assert last[0] > centre[0] + 50 and last[1] > centre[1] + 50, (centre, last)
    # The graph itself is untouched: no node moved, the selection is as it was.
    assert {n: canvas.state(n)["pos"] for n in rects} == positions
    assert canvas.js("Object.keys(app.lgc.selected_nodes)") == selected
    assert canvas.errors == []
    context.close()


def test_the_minimap_toggle_and_key_are_remembered_after_a_reload(canvas: Canvas) -> None:
    page = canvas.page
    _open(canvas, QUICKSTART, 7)
    minimap, toggle = page.locator(MINIMAP), page.locator(MINIMAP_TOGGLE)
    assert minimap.is_visible() and toggle.get_attribute("aria-pressed") == "true"
    page.click(MINIMAP_TOGGLE)
    assert minimap.is_hidden() and toggle.get_attribute("aria-pressed") == "false"
    # Hidden, it is not redrawn while the view changes.
    draws = _minimap(canvas)["draws"]
    canvas.js("(app.lgc.ds.offset[0] += 100, app.lgc.setDirty(true, true))")
    page.wait_for_timeout(300)
    assert _minimap(canvas)["draws"] == draws

    page.reload()
    page.wait_for_selector(READY)
    assert minimap.is_hidden() and toggle.get_attribute("aria-pressed") == "false"
    # M shows it again while the canvas has the focus...
    canvas.page.locator("[data-testid=df-canvas]").click(position={"x": 5, "y": 5})
    page.keyboard.press("m")
    assert minimap.is_visible() and canvas.root.get_attribute("data-minimap") == "shown"
    page.wait_for_function("() => window.DagfusionCanvas.app.minimapState().nodes.length === 7")
    # ...but not while a text field has it.
    page.fill("[data-testid=df-search]", "")
    page.focus("[data-testid=df-search]")
    page.keyboard.press("m")
    assert minimap.is_visible() and page.input_value("[data-testid=df-search]") == "m"
    page.fill("[data-testid=df-search]", "")

    page.reload()
    page.wait_for_selector(READY)
    assert minimap.is_visible() and toggle.get_attribute("aria-pressed") == "true"
    canvas.page.locator("[data-testid=df-canvas]").click(position={"x": 5, "y": 5})
    page.keyboard.press("M")
    assert minimap.is_hidden()
    assert page.evaluate("() => window.localStorage.getItem('dagfusion.minimap')") == "hidden"

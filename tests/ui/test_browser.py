"""The canvas in headless Chromium (Debian's ``chromium``, driven by Playwright).

One app server and one browser for the module; each test opens its own page. The tests drive
the canvas the way a person does — palette clicks, mouse drags between sockets, the inspector's
widgets, the toolbar's buttons, file choosers and drops — and read what it shows (DOM text, and
the per-node state the canvas draws from, through ``window.DagfusionCanvas.app``).

Set ``DAGFUSION_UI_SCREENSHOT=path.png`` to keep the screenshot of the canvas after a run.
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
        pytest.skip("no chromium executable (install Debian's chromium package, or set DAGFUSION_CHROMIUM)")
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
    shot = os.environ.get("DAGFUSION_UI_SCREENSHOT")
    if shot:
        canvas.select("noise")  # the inspector shows its widgets
        page.mouse.move(5, 5)  # nothing hovered
        page.wait_for_timeout(300)
        page.screenshot(path=shot)
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

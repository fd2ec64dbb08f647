"""Fixtures of the canvas tests: a registry with two slow test nodes, a canvas backend, and a
running canvas server (one per test module)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dagfusion import FLOAT, INT, TENSOR, Engine, Input, Output, Settings, hookimpl, node
from dagfusion.registry import Registry
from dagfusion.ui.handlers import CanvasBackend

REPO = Path(__file__).resolve().parents[2]


@node(
    "uitest.Slow",
    version="1.0.0",
    category="uitest",
    inputs=[
        Input("steps", INT, 5, min=1, max=10_000, description="How many steps to take."),
        Input("delay", FLOAT, 0.02, min=0.0, max=5.0, description="Seconds per step."),
        Input("x", FLOAT, 0.0, description="Passed through."),
    ],
    outputs=[Output("y", FLOAT)],
    pure=False,
)
def slow(ctx: Any, steps: int, delay: float, x: float) -> float:
    """Sleep ``delay`` seconds per step, reporting progress (and so checking for cancellation)."""
    for i in range(steps):
        time.sleep(delay)
        ctx.progress(i + 1, steps, message="sleeping")
    return x


@node(
    "uitest.Picture",
    version="1.0.0",
    category="uitest",
    inputs=[Input("frames", INT, 1, min=1, max=8), Input("value", FLOAT, 0.5, min=0.0, max=1.0)],
    outputs=[Output("tensor", TENSOR)],
)
def picture(ctx: Any, frames: int, value: float) -> Any:
    """A grey picture shown as a preview (several frames: a short video preview)."""
    import torch

    t = torch.full((3, 16, 24), value)
    ctx.preview([t] * frames if frames > 1 else t, label="grey")
    return t


class UiTestPlugin:
    @hookimpl
    def register_nodes(self, register: Any) -> None:
        register(slow)
        register(picture)


@pytest.fixture(scope="session")
def ui_registry() -> Registry:
    return Registry.from_plugins(load_entrypoints=False, extra_plugins=[("uitest", UiTestPlugin())])


@pytest.fixture
def ui_settings(settings: Settings) -> Settings:
    """The suite's isolated settings (outputs and cache under tmp_path, tmp_path readable)."""
    return settings


@pytest.fixture
def backend(ui_registry: Registry, ui_settings: Settings) -> Iterator[CanvasBackend]:
    backend = CanvasBackend(Engine(ui_registry, ui_settings))
    yield backend
    backend.queue.shutdown()


@pytest.fixture
def quickstart_yaml() -> str:
    return (REPO / "workflows" / "blurred_noise.yaml").read_text(encoding="utf-8")


@dataclass
class Served:
    """A canvas app served on a free loopback port: ``server.url`` carries the token."""

    server: Any  # dagfusion.ui.app.CanvasServer
    backend: CanvasBackend
    demo: Any
    work: Path

    @property
    def origin(self) -> str:
        return self.server.origin


@pytest.fixture(scope="module")
def served(ui_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("gradio", reason="the canvas needs the ui extra: pip install 'dagfusion[ui]'")
    from dagfusion.ui.app import build_app, launch

    work = tmp_path_factory.mktemp("canvas")
    settings = Settings.load(
        overrides={"output_dir": str(work / "outputs"), "cache_dir": str(work / "cache"), "read_dirs": [str(work)], "device": "cpu"},
        environ={},
    )
    backend = CanvasBackend(Engine(ui_registry, settings))
    demo = build_app(backend)
    server = launch(demo, port=0, block=False, quiet=True)
    yield Served(server, backend, demo, work)
    server.close()
    backend.queue.shutdown()

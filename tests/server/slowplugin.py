"""A throw-away dagfusion plugin for server tests: installed into a folder put on ``PYTHONPATH``
(a ``*.dist-info`` with a ``dagfusion`` entry point), so the server and its workers load it.

- ``testslow.Ticker``: ``count`` progress events, ``interval`` seconds apart.
- ``testslow.Stubborn``: sleeps ``seconds`` without ever checking for cancellation.
"""

from __future__ import annotations

import os
from pathlib import Path

MODULE = "dagfusion_testslow"
PLUGIN = '''
from __future__ import annotations

import time
from typing import Any

from dagfusion import FLOAT, INT, Input, Output, hookimpl, node


@node("testslow.Ticker", version="1.0.0", category="testing", pure=False,
      inputs=[Input("count", INT, 10, min=1, max=100000), Input("interval", FLOAT, 0.01, min=0.0, max=10.0)],
      outputs=[Output("ticks", INT, "progress events sent")])
def ticker(ctx: Any, count: int, interval: float) -> int:
    """Report ``count`` progress events."""
    for step in range(1, count + 1):
        if interval:
            time.sleep(interval)
        ctx.progress(step, count)
    return count


@node("testslow.Stubborn", version="1.0.0", category="testing", pure=False,
      inputs=[Input("seconds", FLOAT, 60.0, min=0.0, max=600.0)],
      outputs=[Output("slept", FLOAT, "seconds slept")])
def stubborn(ctx: Any, seconds: float) -> float:
    """Sleep, ignoring cancellation."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return seconds


@hookimpl
def register_nodes(register: Any) -> None:
    register(ticker)
    register(stubborn)
'''

TICKER = """\
format_version: 1
nodes:
  t: {{type: testslow.Ticker, inputs: {{count: {count}, interval: {interval}}}}}
"""
STUBBORN = """\
format_version: 1
nodes:
  s: {type: testslow.Stubborn, inputs: {seconds: 60}}
"""


def install(folder: Path) -> Path:
    """Write the plugin into ``folder`` (created); returns it, to prepend to ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(PLUGIN)
    info = folder / f"{MODULE}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {MODULE}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dagfusion]\ntestslow = {MODULE}\n")
    return folder


def environ(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the plugin's folder on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(install(folder)), env.get("PYTHONPATH", "")) if p)
    return env

"""A real job server on loopback, started in a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

SLOW = """\
format_version: 1
nodes:
  n: {type: dagfusion.tensor.Noise, inputs: {height: 1024, width: 1024, channels: 3}}
  b1: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: n.tensor}, sigma: 20}}
  b2: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: b1.tensor}, sigma: 20}}
  s: {type: dagfusion.tensor.Stats, inputs: {tensor: {from: b2.tensor}}}
"""
TINY = """\
format_version: 1
nodes:
  n: {type: dagfusion.tensor.Noise, inputs: {height: 8, width: 8, channels: 3}}
  save: {type: dagfusion.io.SaveTensorPNG, inputs: {tensor: {from: n.tensor}, filename: noise.png}}
"""


@dataclass
class Running:
    url: str
    token: str
    state: Path
    root: Path
    proc: subprocess.Popen[str]

    def client(self, **kwargs: object):  # type: ignore[no-untyped-def]
        from dagfusion.client import Client

        return Client(self.url, self.token, **kwargs)  # type: ignore[arg-type]


def server_env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DAGFUSION_OUTPUT_DIR": str(root / "outputs"),
        "DAGFUSION_CACHE_DIR": str(root / "cache"),
        "DAGFUSION_THREADS": "1",
    }


def start_server(
    root: Path, *extra: str, port: int = 0, timeout: float = 60, env: dict[str, str] | None = None
) -> Running:
    """``dagfusion serve`` in a subprocess; returns once it prints its address. ``env`` is added
    to :func:`server_env`."""
    state = root / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagfusion.cli", "serve", "--port", str(port), "--state-dir", str(state), *extra],
        cwd=root, env={**server_env(root), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    url = ""
    for line in proc.stdout:
        if line.startswith("dagfusion server: "):
            url = line.split(": ", 1)[1].strip()
        if line.strip().startswith("slots:"):
            break
        if time.monotonic() > deadline:
            break
    if not url:
        proc.kill()
        raise RuntimeError(f"the server did not start: {proc.stdout.read()}")
    token = (state / "token").read_text().strip()
    return Running(url, token, state, root, proc)


def stop_server(running: Running, sig: int = signal.SIGTERM) -> None:
    if running.proc.poll() is None:
        running.proc.send_signal(sig)
        try:
            running.proc.wait(20)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("server")
    running = start_server(root, "--max-request-bytes", "200000")
    yield running
    stop_server(running)

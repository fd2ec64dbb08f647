"""A worker process of the job server: runs the jobs it is sent, one at a time.

``python -m dagfusion.server.worker --device DEVICE [--settings JSON]`` keeps one
:class:`~dagfusion.Engine` (so consecutive jobs share its cache) and speaks JSON lines: it
reads ``{"op": "run", "job": {...}}`` and ``{"op": "cancel", "job": ID}`` on stdin and writes
``{"op": "ready"}``, ``{"op": "event", "job": ID, "data": {...}}`` and one
``{"op": "done", "job": ID, "status": ..., "error": ..., "result": [...]}`` per job on its
original stdout. Anything else written to stdout (a node's ``print``) goes to stderr instead.
When stdin closes — the server stopped, or was killed — the worker exits at once; Ctrl-C in
the server's terminal does not reach it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any

EXIT_PARENT_GONE = 3


class _Channel:
    """The protocol's output: JSON lines on a private copy of the original stdout."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class _Events:
    """A progress handler forwarding each event to the channel; a ``NodePreview``'s picture
    travels as a small data URL (:func:`dagfusion.server.previews.preview_data`)."""

    def __init__(self, channel: Any, job_id: str) -> None:
        self.channel = channel
        self.job_id = job_id

    def handle(self, event: Any) -> None:
        data = event.to_dict()
        data.pop("preview", None)
        if data.get("event") == "NodePreview":
            from dagfusion.server.previews import preview_data

            data["preview"] = preview_data(getattr(event, "preview", None))
        self.channel.send({"op": "event", "job": self.job_id, "data": data})


def run_job(engine: Any, job: dict[str, Any], channel: Any, token: Any) -> dict[str, Any]:
    """Run one job message with ``engine``; the ``done`` message's fields. ``channel`` has
    ``send(message)`` (the ``event`` messages go there)."""
    from dagfusion.errors import ValidationError, WorkflowError

    source = base64.b64decode(job["source"])
    out = Path(job["output_dir"])
    try:
        results = engine.run_sweep(
            source, overrides=list(job.get("overrides", ())), out=out, handler=_Events(channel, job["id"]), cancel_token=token
        )
    except ValidationError as exc:
        return {"status": "failed", "error": "\n".join(str(p) for p in exc.problems), "result": []}
    except WorkflowError as exc:
        return {"status": "failed", "error": str(exc), "result": []}
    except Exception as exc:  # a framework bug: report it, keep serving
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "result": []}
    runs = [
        {
            "run_id": r.run_id,
            "status": r.status,
            "output_dir": os.path.relpath(r.output_dir, out) if r.output_dir is not None else None,
            "seconds": round(r.seconds, 4),
            "executed": len(r.executed),
            "cached": len(r.cached),
            "errors": {node: str(err) for node, err in r.errors.items()},
        }
        for r in results
    ]
    if token.cancelled or any(r.status == "cancelled" for r in results):
        return {"status": "cancelled", "error": None, "result": runs}
    failed = [f"{node}: {err}" for r in results for node, err in r.errors.items()]
    if failed:
        return {"status": "failed", "error": "; ".join(failed)[:4000], "result": runs}
    return {"status": "done", "error": None, "result": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dagfusion.server.worker")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="{}", help="settings overrides as a JSON object")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _Channel(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)  # whatever else writes to stdout lands on stderr
    sys.stdout = sys.stderr

    from dagfusion.context import CancelToken
    from dagfusion.engine import Engine
    from dagfusion.settings import Settings

    overrides = json.loads(args.settings)
    settings = Settings.load({**overrides, "device": args.device})
    engine = Engine(settings=settings)
    jobs: queue.Queue[dict[str, Any]] = queue.Queue()
    tokens: dict[str, Any] = {}
    lock = threading.Lock()

    def read_commands() -> None:
        for line in sys.stdin:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("op") == "run":
                with lock:
                    tokens[message["job"]["id"]] = CancelToken()
                jobs.put(message["job"])
            elif message.get("op") == "cancel":
                with lock:
                    token = tokens.get(message.get("job"))
                if token is not None:
                    token.cancel()
        os._exit(EXIT_PARENT_GONE)  # the server is gone: stop now, whatever runs

    threading.Thread(target=read_commands, name="dagfusion-worker-stdin", daemon=True).start()
    channel.send({"op": "ready", "pid": os.getpid()})
    while True:
        job = jobs.get()
        with lock:
            token = tokens[job["id"]]
        done = run_job(engine, job, channel, token)
        with lock:
            tokens.pop(job["id"], None)
        channel.send({"op": "done", "job": job["id"], **done})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

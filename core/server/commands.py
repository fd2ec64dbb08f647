"""The job server's command-line verbs: ``serve``, ``submit``, ``jobs``, ``cancel``.

:func:`add_parsers` registers them on ``dagfusion``'s sub-command parser; :func:`run` runs
one. Importing this module imports only :mod:`argparse`: the web framework and the client's
HTTP library are imported by the verb that needs them. ``submit --wait`` follows the job's
events and exits as ``dagfusion run`` does: 0 done, 1 failed, 2 invalid workflow or no
server, 130 cancelled (the first Ctrl-C cancels the job on the server, a second stops following).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="URL", help="the server (default: $DAGFUSION_SERVER, else the local server's address)")
    p.add_argument("--token", help="access token (default: $DAGFUSION_TOKEN, else the local server's token file)")
    p.add_argument("--state-dir", metavar="DIR", help="the local server's state folder (default: the server_dir setting)")


def add_parsers(sub: Any) -> None:
    """Add ``serve``, ``submit``, ``jobs`` and ``cancel`` to ``sub`` (an argparse sub-parsers object)."""
    serve = sub.add_parser("serve", help="run the job server: a persistent queue of workflows behind an HTTP API")
    serve.add_argument("--port", type=int, default=8765, help="port to serve on (default 8765; 0: any free port)")
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1); anything else needs allow_remote")
    serve.add_argument("--state-dir", metavar="DIR", help="queue, history and token folder (default: the server_dir setting)")
    serve.add_argument("--max-request-bytes", type=int, metavar="N", help="largest request body accepted")
    serve.add_argument("--cpu-jobs", type=int, metavar="N", help="jobs run at once on the CPU (default: server_cpu_jobs)")
    serve.add_argument("--new-token", action="store_true", help="replace the token in the state folder with a new one")
    serve.add_argument("--read-dir", action="append", default=[], metavar="DIR", help="also allow reading files under DIR")
    serve.add_argument("--model-dir", action="append", default=[], metavar="DIR", help="also search models in DIR")
    serve.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (unsafe)")
    serve.add_argument("--device", help="torch device (default: auto, one job per GPU)")
    serve.add_argument("--threads", metavar="N|auto", help="CPU threads torch computes with in each worker")
    serve.add_argument("--executor", choices=("process", "ray"), default="process",
                       help="run jobs in local worker processes (default) or on Ray workers")
    serve.add_argument("--ray-address", metavar="HOST:PORT", help="with --executor ray: a running Ray cluster (default: a local one)")
    serve.add_argument("--ray-workers", type=int, metavar="N", help="with --executor ray: Ray workers, one job each (default: the cluster's CPUs)")

    submit = sub.add_parser("submit", help="queue a workflow on a job server and print its job id")
    submit.add_argument("workflow", help="workflow YAML file or PNG written by dagfusion")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    submit.add_argument("--wait", action="store_true", help="follow the job's events and exit as `dagfusion run` does")
    submit.add_argument("--json-events", action="store_true", help="with --wait: print events as JSON lines")
    _client_flags(submit)

    jobs = sub.add_parser("jobs", help="list a job server's jobs, newest first")
    jobs.add_argument("--status", choices=("queued", "running", "done", "failed", "cancelled"))
    jobs.add_argument("--submitter")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--offset", type=int, default=0)
    jobs.add_argument("--json", action="store_true", help="print the server's JSON")
    _client_flags(jobs)

    cancel = sub.add_parser("cancel", help="cancel a job on a job server")
    cancel.add_argument("job", help="the job id")
    _client_flags(cancel)


def run(args: argparse.Namespace, settings: Callable[[argparse.Namespace], Any]) -> int:
    """Run the verb ``args.command``; ``settings`` resolves the settings from the flags."""
    verbs = {"serve": _serve, "submit": _submit, "jobs": _jobs, "cancel": _cancel}
    if args.command == "serve":
        return _serve(args, settings)
    try:
        import httpx
    except ImportError as exc:
        return _fail(f"the job server's client needs the serve extra (pip install 'dagfusion[serve]'): {exc}")
    try:
        return verbs[args.command](args, settings)
    except httpx.TransportError as exc:
        return _fail(f"cannot reach the job server: {exc}")


def _fail(message: str) -> int:
    from dagfusion.cli import _err

    _err(message)
    return EXIT_INVALID


def _serve(args: argparse.Namespace, settings: Callable[[argparse.Namespace], Any]) -> int:
    from pathlib import Path

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return _fail(f"the job server needs the serve extra (pip install 'dagfusion[serve]'): {exc}")
    from dagfusion.errors import UnsafeOperationError
    from dagfusion.server.serve import DEFAULT_MAX_REQUEST_BYTES, ServerOptions, serve

    resolved = settings(args)
    if args.cpu_jobs is not None:
        resolved = resolved.with_overrides(server_cpu_jobs=args.cpu_jobs)
    options = ServerOptions(
        host=args.host, port=args.port, state_dir=Path(args.state_dir) if args.state_dir else None,
        max_request_bytes=args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES, new_token=args.new_token,
        executor=args.executor, ray_address=args.ray_address, ray_workers=args.ray_workers,
    )
    try:
        return serve(resolved, options, out=lambda line: print(line, flush=True))
    except UnsafeOperationError as exc:
        return _fail(f"dagfusion serve: {exc}")
    except OSError as exc:
        return _fail(f"dagfusion serve: {exc}")
    except KeyboardInterrupt:
        return EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    from dagfusion.client import Client

    return Client(args.server, args.token, state_dir=args.state_dir)


def _submit(args: argparse.Namespace, settings: Callable[[argparse.Namespace], Any]) -> int:
    from pathlib import Path

    from dagfusion.cli import _err
    from dagfusion.client import ServerError
    from dagfusion.errors import Problem

    path = Path(args.workflow)
    if not path.is_file():
        return _fail(f"{args.workflow}: no such file")
    try:
        client = _client(args)
    except ValueError as exc:
        return _fail(str(exc))
    with client:
        try:
            job_id = client.submit(path, overrides=args.overrides, priority=args.priority, device=args.device)
        except ServerError as exc:
            if exc.problems:
                from dagfusion.cli import _print_problems

                _print_problems([Problem(**p) for p in exc.problems], args.workflow)
            else:
                _err(f"refused: {exc}")
            return EXIT_INVALID
        print(job_id, flush=True)
        if not args.wait:
            return EXIT_OK
        return _follow(client, job_id, json_events=args.json_events)


def _follow(client: Any, job_id: str, *, json_events: bool) -> int:
    from dagfusion.cli import _err, _JsonEventPrinter, _RichProgress

    cancelled = False
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: Any) -> None:
        nonlocal cancelled
        if cancelled:
            raise KeyboardInterrupt
        cancelled = True
        client.cancel(job_id)
        _err(f"cancelling job {job_id}… (press Ctrl-C again to stop following)")

    signal.signal(signal.SIGINT, on_interrupt)
    printer = _JsonEventPrinter() if json_events else _RichProgress()
    try:
        with printer:
            for event in client.events(job_id):
                if json_events:
                    print(json.dumps(event, default=str), flush=True)
                elif not event.get("event", "").startswith("Job"):
                    printer.handle(SimpleNamespace(kind=event.get("event"), **{k: v for k, v in event.items() if k != "event"}))
        job = client.job(job_id)
    except KeyboardInterrupt:
        _err("stopped following (the job goes on unless it was cancelled)")
        return EXIT_CANCELLED
    finally:
        signal.signal(signal.SIGINT, previous)
    status = job["status"]
    if not json_events:
        _err(f"job {job_id}: {status}" + (f" — {job['error']}" if job.get("error") else "") + f" → {job['output_dir']}")
    return {"done": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status, EXIT_FAILED)


def _jobs(args: argparse.Namespace, settings: Callable[[argparse.Namespace], Any]) -> int:
    from dagfusion.client import ServerError

    try:
        with _client(args) as client:
            page = client.jobs(status=args.status, submitter=args.submitter, limit=args.limit, offset=args.offset)
    except (ServerError, ValueError) as exc:
        return _fail(f"refused: {exc}")
    if args.json:
        print(json.dumps(page, indent=2))
        return EXIT_OK
    for job in page["jobs"]:
        print(f"{job['id']}  {job['status']:9}  p{job['priority']:<4} {job['submitter'][:16]:16} {job['name'][:40]}")
    print(f"{len(page['jobs'])} of {page['total']} jobs", file=sys.stderr)
    return EXIT_OK


def _cancel(args: argparse.Namespace, settings: Callable[[argparse.Namespace], Any]) -> int:
    from dagfusion.client import ServerError

    try:
        with _client(args) as client:
            job = client.cancel(args.job)
    except (ServerError, ValueError) as exc:
        return _fail(f"refused: {exc}")
    print(f"{job['id']}: {job['status']}{' (cancel requested)' if job['status'] == 'running' else ''}")
    return EXIT_OK


__all__ = ["add_parsers", "run"]

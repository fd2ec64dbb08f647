"""Starting the job server: state folder, token, store, scheduler, workers, HTTP.

:func:`serve` refuses to bind anything but loopback unless ``allow_remote`` (as the canvas
does), takes the state folder's lock (one server per folder), recovers jobs a stopped server
left running, starts the scheduler and its workers, prints the address and token, and serves
until Ctrl-C or SIGTERM. On the way out the workers stop; a job they were running is found
``running`` at the next start and re-queued once (see :meth:`JobStore.recover`).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagfusion.errors import UnsafeOperationError
from dagfusion.httpguard import GuardPolicy, is_loopback, is_wildcard

#: Largest request body accepted: a PNG at the reader's limit, base64-encoded, with room to spare.
DEFAULT_MAX_REQUEST_BYTES = 96 * 1024 * 1024


def check_bind(host: str, *, allow_remote: bool) -> None:
    """Refuse (:class:`UnsafeOperationError`) anything but loopback unless ``allow_remote``."""
    if not is_loopback(host) and not allow_remote:
        raise UnsafeOperationError(
            f"refusing to serve the job server on {host or 'every interface'!r}: other machines could reach it. "
            "Bind 127.0.0.1, or set allow_remote (DAGFUSION_ALLOW_REMOTE=1) to serve it on the network "
            "(requests still need the token; put TLS in front with a reverse proxy)"
        )


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (``0``: any free port)."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is not between 0 and 65535")
    bare = host[1:-1] if host.startswith("[") else host
    family, _, _, _, address = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def worker_settings(settings: Any) -> dict[str, Any]:
    """The settings every worker applies on top of its own loading (what flags changed here)."""
    return {
        "model_dirs": [str(p) for p in settings.model_dirs],
        "read_dirs": [str(p) for p in settings.read_dirs],
        "output_dir": str(Path(settings.output_dir).absolute()),
        "cache_dir": str(settings.cache_dir),
        "allow_pickle": settings.allow_pickle,
        "threads": settings.threads,
    }


@dataclass
class ServerOptions:
    """How :func:`serve` runs: address, state folder, body cap, whether to make a new token, and
    what runs the jobs (``process``: local worker processes; ``ray``: Ray workers, on the cluster
    at ``ray_address`` or a local one, ``ray_workers`` of them) and how long a cancelled job may
    take to stop before its worker process is killed (``cancel_grace`` seconds)."""

    host: str = "127.0.0.1"
    port: int = 8765
    state_dir: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    new_token: bool = False
    executor: str = "process"
    ray_address: str | None = None
    ray_workers: int | None = None
    cancel_grace: float = 20.0


def serve(settings: Any, options: ServerOptions, *, out: Callable[[str], None] = print) -> int:
    """Run the job server until it is stopped; returns the exit code (see the module docstring)."""
    import uvicorn

    from dagfusion import __version__
    from dagfusion.engine import Engine
    from dagfusion.server.app import create_app
    from dagfusion.server.executor import detect_slots
    from dagfusion.server.guard import guarded
    from dagfusion.server.processes import ProcessExecutor
    from dagfusion.server.scheduler import Scheduler
    from dagfusion.server.service import JobService
    from dagfusion.server.state import (
        ADDRESS_FILE, DATABASE_FILE, TOKEN_FILE, FolderLock, load_or_create_token, prepare_folder, write_address,
    )
    from dagfusion.server.store import JobStore

    check_bind(options.host, allow_remote=settings.allow_remote)
    folder = prepare_folder(options.state_dir or settings.server_dir)
    with FolderLock(folder):
        token = load_or_create_token(folder, fresh=options.new_token)
        sock = bind(options.host, options.port)
        port = sock.getsockname()[1]
        sock.listen(2048)  # clients that connect once the address is printed wait, never refused
        policy = GuardPolicy.for_bind(options.host, port, token=token, max_body_bytes=options.max_request_bytes)
        output_root = Path(settings.output_dir).absolute() / "jobs"
        store = JobStore(folder / DATABASE_FILE, output_root)
        interrupted = store.recover(requeue=settings.server_requeue_interrupted)
        store.expire(settings.server_history_days)
        if options.executor == "ray":
            from dagfusion.server.ray_executor import RayExecutor

            executor: Any = RayExecutor(settings, address=options.ray_address, workers=options.ray_workers)
            slots = executor.slots
        else:
            slots = detect_slots(settings.device, settings.server_cpu_jobs)
            executor = ProcessExecutor(worker_settings(settings), cancel_grace=options.cancel_grace)
        scheduler = Scheduler(store, executor, slots, history_days=settings.server_history_days)
        engine = Engine(settings=settings)
        service = JobService(store, scheduler, engine, max_queue=settings.server_max_queue)
        app = guarded(create_app(service, version=__version__), policy)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", proxy_headers=False, server_header=False,
            timeout_graceful_shutdown=3,
        )
        server = uvicorn.Server(config)
        url = policy.url(options.host, "/").split("/?", 1)[0]
        write_address(folder, url)
        scheduler.start()
        out(f"dagfusion server: {url}")
        out(f"  token: {token}  (also in {folder / TOKEN_FILE}, readable by you only)")
        out(f"  slots: {', '.join(s.name for s in slots)}; jobs write into {output_root}")
        if interrupted:
            out(f"  {len(interrupted)} job(s) were running when the server last stopped: re-queued once or failed")
        if is_wildcard(options.host):
            out("  served on every interface (allow_remote): use TLS through a reverse proxy")
        sys.stdout.flush()
        try:
            server.run(sockets=[sock])
        finally:
            scheduler.stop()
            executor.close()
            store.close()
            sock.close()
            (folder / ADDRESS_FILE).unlink(missing_ok=True)
    return 0


__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "ServerOptions", "bind", "check_bind", "serve", "worker_settings"]

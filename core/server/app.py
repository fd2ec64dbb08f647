"""The job server's HTTP API (FastAPI); :func:`create_app` builds it around a :class:`JobService`.

Routes (all but ``GET /health`` need the token; see :mod:`dagfusion.server.guard`):

- ``GET /health`` — liveness and queue counts (``HEAD /health``: the same status, no body).
- ``POST /jobs`` — submit a workflow (JSON :class:`~dagfusion.server.models.SubmitRequest`);
  ``POST /jobs/upload`` — the same as a multipart form with a YAML or PNG ``file``.
- ``GET /jobs?status=&submitter=&limit=&offset=`` — jobs, newest first, paginated.
- ``GET /jobs/{id}`` — one job; ``POST /jobs/{id}/cancel``; ``DELETE /jobs/{id}`` (with outputs).
- ``GET /jobs/{id}/events?since=N`` — the job's events as Server-Sent Events, each with its
  index as ``id``; resumes after ``Last-Event-ID`` or from ``since``; ends after ``JobFinished``.
- ``GET /jobs/{id}/outputs`` — its files; ``GET /jobs/{id}/outputs/{name}`` — download one.

Every refusal is a JSON problem body (:class:`~dagfusion.server.models.ErrorOut`) naming the
field concerned; malformed requests are 4xx, never 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from dagfusion.server.files import list_outputs, resolve_output
from dagfusion.server.models import (
    ErrorOut,
    Health,
    JobList,
    JobOut,
    OutputList,
    SubmitRequest,
)
from dagfusion.server.service import JobService, Refused
from dagfusion.server.store import STATUSES, TERMINAL
from fastapi import FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

SUBMITTER_HEADER = "X-Dagfusion-Submitter"
#: Seconds between SSE keep-alive comments.
KEEPALIVE = 15.0
#: Seconds an SSE stream waits for a new event before it checks whether its client left.
POLL = 0.05
#: Largest offset or event index a request may name (SQLite integers are 64-bit; JSON clients
#: read numbers as doubles).
MAX_INDEX = 2**53 - 1
log = logging.getLogger("dagfusion.server")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in ((400, "malformed request"), (403, "refused by the guard"), (404, "no such job or file"),
                       (409, "conflict"), (413, "body too large"), (422, "invalid request or workflow"),
                       (429, "queue full"))
}


def _problem(status: int, title: str, detail: str = "", field: str | None = None, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "field": field, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_TYPE)


def _field_name(loc: Any) -> str:
    return ".".join(str(part) for part in loc)


def install_error_handlers(app: FastAPI) -> None:
    """Refusals, malformed requests, unknown routes and bugs all answer JSON problem bodies."""

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return _problem(exc.status, exc.title, exc.detail, exc.field, problems=[p.to_dict() for p in exc.problems])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field_name(e.get("loc", ())), "message": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        malformed = any(e["type"] == "json_invalid" for e in errors)
        first = errors[0] if errors else {"field": None, "message": "invalid request"}
        field = "body" if malformed else first["field"]
        title = "malformed JSON body" if malformed else "invalid request"
        return _problem(400 if malformed else 422, title, f"{field}: {first['message']}", field, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), str(exc.detail), None)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed: %s %s", request.method, request.url.path)
        return _problem(500, "internal error", "the server failed; see its log", None)


PROBLEM_TYPE = "application/problem+json"


def problem_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare every 4xx/5xx answer of ``schema`` as what the server sends: an
    ``application/problem+json`` :class:`~dagfusion.server.models.ErrorOut` body."""
    ref = {"$ref": "#/components/schemas/ErrorOut"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, response in (operation.get("responses") or {}).items():
                if str(code)[:1] in ("4", "5"):
                    response["content"] = {PROBLEM_TYPE: {"schema": ref}}
    components = schema.get("components", {}).get("schemas", {})
    text = json.dumps(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}" not in text:
            components.pop(unused, None)
    return schema


class EventBell:
    """Wakes the SSE streams following a job as soon as the store appends one of its events
    (rung from the writing thread; waited on in the event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def ring(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop has closed
                pass

    async def wait(self, job_id: str, timeout: float, ready: Any) -> None:
        """Return once ``job_id`` gets an event, ``ready()`` is true, or after ``timeout`` s."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            if not ready():  # checked once listening, so an event appended meanwhile is not missed
                try:
                    await asyncio.wait_for(waiter[1].wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self._waiters[job_id]


def _sse(index: int, data: dict[str, Any]) -> str:
    return f"id: {index}\nevent: {data.get('event', 'message')}\ndata: {json.dumps(data, default=str)}\n\n"


def create_app(service: JobService, *, version: str = "") -> FastAPI:
    """The API around ``service`` (not yet guarded: see :func:`dagfusion.server.guard.guarded`)."""
    app = FastAPI(
        title="dagfusion job server",
        version=version or "0",
        description="Queue dagfusion workflows, follow their events, fetch their outputs. "
        "Every route but /health needs the server's token (Authorization: Bearer TOKEN).",
        responses=_ERRORS,
    )
    install_error_handlers(app)
    store = service.store
    bell = EventBell()
    store.add_listener(bell.ring)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_responses(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    def job_out(job: Any) -> dict[str, Any]:
        return job.public()

    @app.api_route("/health", methods=["GET", "HEAD"], response_model=Health, tags=["server"])
    def health() -> dict[str, Any]:
        counts = store.counts()
        return {"status": "ok", "version": version, "queued": counts["queued"], "running": counts["running"]}

    @app.post("/jobs", response_model=JobOut, status_code=201, tags=["jobs"])
    def submit(
        body: SubmitRequest, submitter: Annotated[str | None, Header(alias=SUBMITTER_HEADER, max_length=100)] = None
    ) -> dict[str, Any]:
        if (body.workflow is None) == (body.workflow_png is None):
            raise Refused(422, "invalid request", "give exactly one of workflow (YAML text) and workflow_png", "workflow")
        if body.workflow is not None:
            source = body.workflow.encode("utf-8", "surrogatepass")
        else:
            try:
                source = base64.b64decode(body.workflow_png or "", validate=True)
            except (binascii.Error, ValueError):
                raise Refused(422, "invalid request", "workflow_png is not valid base64", "workflow_png") from None
        job = service.submit(
            source, name=body.name, overrides=body.overrides, priority=body.priority,
            submitter=body.submitter or submitter or "unknown", device=body.device,
        )
        return job_out(job)

    @app.post("/jobs/upload", response_model=JobOut, status_code=201, tags=["jobs"])
    def upload(
        file: Annotated[UploadFile, File(description="a workflow YAML file or a dagfusion PNG")],
        overrides: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI reads the default
        priority: Annotated[int, Form(ge=-1000, le=1000)] = 0,
        submitter: Annotated[str | None, Form(max_length=100)] = None,
        device: Annotated[str, Form()] = "auto",
        submitter_header: Annotated[str | None, Header(alias=SUBMITTER_HEADER, max_length=100)] = None,
    ) -> dict[str, Any]:
        source = file.file.read()
        name = Path(file.filename or "workflow.yaml").name[:200]
        job = service.submit(
            source, name=name, overrides=overrides, priority=priority,
            submitter=submitter or submitter_header or "unknown", device=device,
        )
        return job_out(job)

    @app.get("/jobs", response_model=JobList, tags=["jobs"])
    def jobs(
        status: Annotated[str | None, Query(description=f"one of {', '.join(STATUSES)}")] = None,
        submitter: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_INDEX)] = 0,
    ) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise Refused(422, "invalid request", f"status must be one of {', '.join(STATUSES)}", "status")
        page, total = store.query(status=status, submitter=submitter, limit=limit, offset=offset)
        following = offset + len(page)
        return {"jobs": [job_out(j) for j in page], "total": total, "offset": offset,
                "next_offset": following if following < total else None}

    @app.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def job(job_id: str) -> dict[str, Any]:
        return job_out(service.job(job_id))

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
    def cancel(job_id: str) -> dict[str, Any]:
        return job_out(service.cancel(job_id))

    @app.delete("/jobs/{job_id}", status_code=204, tags=["jobs"])
    def delete(job_id: str) -> None:
        service.delete(job_id)

    @app.get(
        "/jobs/{job_id}/events",
        tags=["events"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "the job's events, from index `since`"}},
    )
    async def events(
        request: Request,
        job_id: str,
        since: Annotated[int, Query(ge=0, le=MAX_INDEX, description="index of the first event to send")] = 0,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
    ) -> StreamingResponse:
        await run_in_threadpool(service.job, job_id)
        start = since
        if last_event_id is not None:
            if not last_event_id.strip().isdigit():
                raise Refused(422, "invalid request", "Last-Event-ID must be an event index", "Last-Event-ID")
            start = max(start, min(int(last_event_id) + 1, MAX_INDEX))
        return StreamingResponse(
            _follow(request, service, job_id, start, bell), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get("/jobs/{job_id}/outputs", response_model=OutputList, tags=["outputs"])
    def outputs(job_id: str) -> dict[str, Any]:
        found = service.job(job_id)
        return {"job_id": job_id, "files": list_outputs(Path(found.output_dir))}

    @app.get("/jobs/{job_id}/outputs/{name:path}", response_class=FileResponse, tags=["outputs"])
    def download(job_id: str, name: str) -> FileResponse:
        found = service.job(job_id)
        path = resolve_output(Path(found.output_dir), name)
        return FileResponse(path, filename=path.name, headers={"X-Content-Type-Options": "nosniff"})

    return app


async def _follow(
    request: Request, service: JobService, job_id: str, index: int, bell: EventBell
) -> AsyncIterator[str]:
    """SSE lines of the job's events from ``index``, until ``JobFinished`` or the client leaves."""
    store = service.store
    quiet_since = time.monotonic()
    while True:
        if store.event_count(job_id) > index:
            batch = await run_in_threadpool(store.events, job_id, index, 500)
            if not batch:  # counted but not yet committed
                await asyncio.sleep(0.001)
                continue
            for position, data in batch:
                yield _sse(position, data)
                index = position + 1
                if data.get("event") == "JobFinished":
                    return
            quiet_since = time.monotonic()
            continue
        if await request.is_disconnected():
            return
        job = await run_in_threadpool(store.get, job_id)
        if job is None or (job.status in TERMINAL and store.event_count(job_id) <= index):
            return
        if time.monotonic() - quiet_since > KEEPALIVE:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await bell.wait(job_id, POLL, lambda seen=index: store.event_count(job_id) > seen)


__all__ = ["SUBMITTER_HEADER", "EventBell", "create_app", "install_error_handlers", "problem_responses"]

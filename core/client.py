"""A Python client of the dagfusion job server (``dagfusion serve``); needs ``httpx``.

``Client(url, token=None)`` finds its token in the argument, else ``$DAGFUSION_TOKEN``, else
the token file of the server's state folder (``server_dir`` in the settings), re-reading that
file once if the server answers 403 (it restarted with a new token). ``url`` defaults to
``$DAGFUSION_SERVER``, else the address the local server wrote in its state folder. Every
method raises :class:`ServerError` (with the server's JSON problem) for a refusal::

    client = Client("http://127.0.0.1:8765")
    job_id = client.submit("workflows/quickstart.yaml", overrides=["noise.seed=3"])
    for event in client.events(job_id):
        print(event["event"])
    job = client.wait(job_id, timeout=600)
    for item in client.outputs(job_id):
        client.download(job_id, item["name"], "downloads/")
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

TERMINAL = frozenset({"done", "failed", "cancelled"})
SUBMITTER_HEADER = "X-Dagfusion-Submitter"


class ServerError(Exception):
    """The server refused a request: ``status`` and its JSON problem ``body``."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{status} {body.get('title', '')}: {body.get('detail', '')}".rstrip(": "))

    @property
    def problems(self) -> list[dict[str, Any]]:
        """An invalid workflow's problems (as ``dagfusion validate --json`` gives them)."""
        return list(self.body.get("problems") or [])


def _state_dir() -> Path:
    from dagfusion.settings import Settings

    return Path(Settings.load().server_dir)


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "unknown"


class Client:
    """Talks to one job server (see the module docstring); usable as a context manager."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        submitter: str | None = None,
        timeout: float = 30.0,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        import httpx

        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._token_from_file = False
        if url is None:
            url = os.environ.get("DAGFUSION_SERVER") or self._address()
        if not url:
            raise ValueError("no server address: pass url, or set DAGFUSION_SERVER, or start `dagfusion serve`")
        self.url = url.rstrip("/")
        self.token = token or os.environ.get("DAGFUSION_TOKEN") or self._file_token()
        self.submitter = submitter or _default_user()
        self._http = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    # --- plumbing ----------------------------------------------------------------------------

    def _folder(self) -> Path:
        return self._state_dir if self._state_dir is not None else _state_dir()

    def _address(self) -> str | None:
        from dagfusion.server.state import read_address

        return read_address(self._folder())

    def _file_token(self) -> str | None:
        from dagfusion.server.state import read_token

        token = read_token(self._folder())
        self._token_from_file = token is not None
        return token

    def _headers(self) -> dict[str, str]:
        headers = {SUBMITTER_HEADER: self.submitter}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, headers=self._headers(), **kwargs)
        if response.status_code == 403 and self._token_from_file:
            fresh = self._file_token()
            if fresh and fresh != self.token:
                self.token = fresh
                response = self._http.request(method, path, headers=self._headers(), **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"title": response.reason_phrase, "detail": response.text[:500]}
            raise ServerError(response.status_code, body if isinstance(body, dict) else {"detail": str(body)})
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the API -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/health").json()
        return result

    def submit(
        self,
        workflow: str | os.PathLike[str],
        overrides: Sequence[str] = (),
        priority: int = 0,
        *,
        device: str = "auto",
        name: str | None = None,
    ) -> str:
        """Queue a workflow — a YAML or dagfusion PNG path, or YAML text — and return its job id.

        :raises ServerError: 422 with ``problems`` for an invalid workflow, 429 when the queue is full.
        """
        text: str | None = None
        data: bytes | None = None
        if isinstance(workflow, os.PathLike) or (isinstance(workflow, str) and "\n" not in workflow and Path(workflow).is_file()):
            path = Path(workflow)
            data = path.read_bytes()
            name = name or path.name
        else:
            text = str(workflow)
        body: dict[str, Any] = {"overrides": list(overrides), "priority": priority, "submitter": self.submitter,
                                "device": device, "name": name or "workflow.yaml"}
        if data is not None and data.startswith(b"\x89PNG"):
            import base64

            body["workflow_png"] = base64.b64encode(data).decode("ascii")
        else:
            body["workflow"] = text if text is not None else (data or b"").decode("utf-8", "surrogateescape")
        job_id: str = self._request("POST", "/jobs", json=body).json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/jobs/{job_id}").json()
        return result

    def jobs(self, *, status: str | None = None, submitter: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """One page of jobs, newest first: ``{"jobs": [...], "total", "offset", "next_offset"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if submitter:
            params["submitter"] = submitter
        result: dict[str, Any] = self._request("GET", "/jobs", params=params).json()
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"/jobs/{job_id}/cancel").json()
        return result

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float | None = None, *, poll: float = 0.05) -> dict[str, Any]:
        """Poll until the job is ``done``, ``failed`` or ``cancelled``; returns it. Rides out a
        server restart. :raises TimeoutError: after ``timeout`` seconds."""
        import httpx

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            try:
                job = self.job(job_id)
                if job["status"] in TERMINAL:
                    return job
            except httpx.TransportError:
                pass  # restarting: try again
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def events(self, job_id: str, since: int = 0, *, reconnect: int = 30) -> Iterator[dict[str, Any]]:
        """The job's events from index ``since`` (each with its ``index``), until ``JobFinished``.
        Reconnects (up to ``reconnect`` times in a row) from the last index received."""
        import httpx

        index, failures = since, 0
        while True:
            try:
                with self._http.stream(
                    "GET", f"/jobs/{job_id}/events", params={"since": index}, headers=self._headers(), timeout=None
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ServerError(response.status_code, response.json())
                    for event in _parse_sse(response.iter_lines()):
                        failures = 0
                        index = event["index"] + 1
                        yield event
                        if event.get("event") == "JobFinished":
                            return
                if self.job(job_id)["status"] in TERMINAL and index >= self.job(job_id)["event_count"]:
                    return
            except httpx.TransportError:
                failures += 1
                if failures > reconnect:
                    raise
                time.sleep(min(0.2 * failures, 2.0))

    def outputs(self, job_id: str) -> list[dict[str, Any]]:
        """The job's files: ``[{"name", "size", "modified"}]``."""
        files: list[dict[str, Any]] = self._request("GET", f"/jobs/{job_id}/outputs").json()["files"]
        return files

    def download(self, job_id: str, name: str, dest: str | os.PathLike[str]) -> Path:
        """Save output ``name`` to ``dest`` (a folder: under the file's own name); returns the path."""
        target = Path(dest)
        if target.is_dir():
            target = target / Path(name).name
        response = self._request("GET", f"/jobs/{job_id}/outputs/{name}")
        target.write_bytes(response.content)
        return target


def _parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events lines → event dicts with their ``index`` (the SSE ``id``)."""
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                payload = json.loads("\n".join(data))
                payload["index"] = int(event_id) if event_id is not None else -1
                yield payload
            event_id, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


__all__ = ["Client", "ServerError", "TERMINAL"]

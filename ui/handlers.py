"""What the canvas asks the server: the catalogue, checking, saving, opening, running, polling and
cancelling. Plain methods taking and returning JSON data, so they are tested without a browser;
:mod:`dagfusion.ui.app` exposes each as a server function of the canvas component.

Opening a file (YAML, or a PNG carrying a ``dagfusion.workflow`` text chunk) is all or nothing:
a file that does not parse — malformed YAML, a newer ``format_version``, unknown keys — or that
the canvas cannot draw (unknown node types or inputs, links to missing nodes or outputs, links
between incompatible types, unsatisfiable versions) is refused with every problem listed, and
the canvas keeps what it had. Problems the canvas can show and the user can fix there (a missing
input, a value out of range, a cycle) are loaded and marked on their nodes.

Sizes are bounded before any work: a graph by :func:`dagfusion.ui.graph.size_problem` (nodes,
links, bytes of JSON), a file by its bytes and node count, a sweep by the ``max_sweep_points``
setting — counted from its group sizes (:func:`~dagfusion.workflow.sweep_points`), never
expanded, and reported as the validator's ``sweep-too-large`` problem.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagfusion import sources
from dagfusion.errors import Problem, ValidationError
from dagfusion.sources import read_text
from dagfusion.validation import check
from dagfusion.workflow import Link, Workflow, parse_workflow, sweep_points
from dagfusion.yamlsource import MAX_BYTES

from dagfusion.ui.graph import MAX_NODES, catalog, graph_to_workflow, workflow_to_graph
from dagfusion.ui.jobqueue import JobQueue
from dagfusion.ui.runs import RunQueue

#: Problems that leave nothing sensible to draw: a file with any of them is not opened. (A node
#: of an unknown type is drawn as a placeholder keeping its inputs and links.)
UNDRAWABLE = frozenset({"unknown-input", "dangling-reference", "version-unsatisfied", "bad-version", "migration-failed"})
#: What a run's results show: pictures and text files found in its output folders.
RESULT_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
RESULT_TEXTS = frozenset({".txt", ".csv", ".md", ".json"})
#: The run record's own files (listed as the folder, not shown as results).
RECORD_FILES = frozenset({"workflow.yaml", "events.jsonl", "manifest.json"})
#: Most result files sent for one run, largest picture and text, and all of them together.
MAX_RESULT_FILES = 48
MAX_RESULT_IMAGE_BYTES = 8 * 1024 * 1024
MAX_RESULT_TEXT_BYTES = 64 * 1024
MAX_RESULT_BYTES = 32 * 1024 * 1024
#: Folder levels searched below a run's output folder.
RESULT_DEPTH = 2
#: Largest PNG accepted for its embedded workflow (the shared reader's limit).
MAX_PNG_BYTES = sources.MAX_PNG_BYTES
#: Suggestions returned for a path being typed.
MAX_PATH_SUGGESTIONS = 50



def problems_json(problems: list[Problem]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in problems]


def _refusal(message: str, problems: list[Problem] | None = None) -> dict[str, Any]:
    problems = problems or []
    detail = "; ".join(str(p) for p in problems[:5])
    if len(problems) > 5:
        detail += f"; and {len(problems) - 5} more"
    return {"ok": False, "error": f"{message}: {detail}" if detail else message, "problems": problems_json(problems)}


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:60]
    return slug or "workflow"


class CanvasBackend:
    """The server side of one canvas app: one engine, one run queue, many browser sessions.

    Runs are jobs of the job server's queue (:class:`~dagfusion.ui.jobqueue.JobQueue`): by
    default the job service runs in this process on a temporary state folder;
    ``dagfusion ui`` passes the queue of the settings' ``server_dir`` or of a running server.
    """

    def __init__(self, engine: Any, *, queue: JobQueue | RunQueue | None = None) -> None:
        self.engine = engine
        self.registry = engine.registry
        self.settings = engine.settings
        self.queue = queue if queue is not None else JobQueue.local(engine)
        self._catalog: dict[str, Any] | None = None

    # --- palette -------------------------------------------------------------------------

    def catalog(self) -> dict[str, Any]:
        """Node types, socket types, colours, widgets and connection rules (see :func:`catalog`)."""
        if self._catalog is None:
            self._catalog = catalog(self.registry, self.settings)
        return self._catalog

    # --- checking and saving ---------------------------------------------------------------

    def _problems(self, workflow: Workflow, initial: list[Problem]) -> tuple[list[Problem], list[str], Any]:
        validated, problems, warnings = check(workflow, self.registry, self.settings, initial_problems=initial)
        return problems, warnings, validated

    def check(self, graph: Any) -> dict[str, Any]:
        """Every problem of the canvas's graph, as ``dagfusion validate`` would report it."""
        workflow, problems = graph_to_workflow(graph, registry=self.registry)
        if workflow is None:
            return {"ok": False, "problems": problems_json(problems), "warnings": []}
        problems, warnings, validated = self._problems(workflow, problems)
        return {
            "ok": validated is not None,
            "problems": problems_json(problems),
            "warnings": list(warnings),
            "points": len(workflow.sweep) and sweep_points(workflow),
        }

    def save(self, graph: Any) -> dict[str, Any]:
        """The workflow file of the graph: exactly what ``Workflow.dump()`` (and the CLI) writes.

        An incomplete workflow is still saved (problems are returned alongside, as a warning);
        only a graph that is not a workflow at all is refused.
        """
        workflow, problems = graph_to_workflow(graph, registry=self.registry)
        if workflow is None:
            return _refusal("cannot save", problems)
        problems, warnings, _ = self._problems(workflow, problems)
        return {
            "ok": True,
            "yaml": workflow.dump(),
            "filename": _slug(workflow.name) + ".yaml",
            "problems": problems_json(problems),
            "warnings": list(warnings),
        }

    # --- opening -------------------------------------------------------------------------

    def open_text(self, text: str | bytes, name: str | None = None) -> dict[str, Any]:
        """Open YAML text: ``{"ok": True, "graph", "problems", "warnings"}`` or a refusal."""
        size = len(text.encode("utf-8") if isinstance(text, str) else text)
        if size > MAX_BYTES:
            return _refusal(f"{name or 'the file'} is {size} bytes; the limit is {MAX_BYTES}")
        workflow, problems = parse_workflow(text, name)
        if workflow is None or problems:
            return _refusal(f"cannot open {name or 'this workflow'}", problems)
        if len(workflow.nodes) > MAX_NODES:
            return _refusal(f"{name or 'the workflow'} has {len(workflow.nodes):,} nodes; the canvas handles at most {MAX_NODES:,}")
        problems, warnings, validated = self._problems(workflow, [])
        undrawable = [p for p in problems if p.code in UNDRAWABLE or _is_link_mismatch(workflow, p)]
        if undrawable:
            return _refusal(f"cannot open {name or 'this workflow'}", undrawable)
        if validated is not None:
            workflow = validated.workflow  # migrations applied: saving keeps the upgrade
        return {
            "ok": True,
            "graph": workflow_to_graph(workflow),
            "name": workflow.name,
            "problems": problems_json(problems),
            "warnings": list(warnings),
        }

    def open_file(self, name: str, data: bytes) -> dict[str, Any]:
        """Open a dropped or chosen file: workflow YAML, or a PNG written by dagfusion."""
        found, problems = read_text(data, name)
        if found is None:
            return _refusal(f"cannot open {name}", problems)
        return self.open_text(found.text, name)

    def open_upload(self, payload: Any) -> dict[str, Any]:
        """``{"name": str, "data": base64}`` from the browser → :meth:`open_file`."""
        if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), str):
            return _refusal("the canvas sent no file")
        name = str(payload.get("name") or "dropped file")
        try:
            data = base64.b64decode(payload["data"], validate=True)
        except (binascii.Error, ValueError):
            return _refusal(f"{name}: the upload is damaged")
        return self.open_file(os.path.basename(name), data)

    # --- running ---------------------------------------------------------------------------

    def submit(self, graph: Any) -> dict[str, Any]:
        """Validate and queue a run; refused (with every problem) if the graph is invalid."""
        workflow, problems = graph_to_workflow(graph, registry=self.registry)
        if workflow is None:
            return _refusal("cannot run", problems)
        problems, warnings, validated = self._problems(workflow, problems)
        if validated is None:
            return _refusal("cannot run", problems)
        try:
            run = self.queue.submit(workflow)
        except ValidationError as exc:
            return _refusal("cannot run", list(exc.problems))
        return {"ok": True, "run": run.summary(self.queue.position(run)), "warnings": list(warnings)}

    def poll(self, run_id: str | None = None, since: int = 0) -> dict[str, Any]:
        """The followed run's state (previews numbered ``since`` and later) and the whole queue."""
        run = self.queue.get(run_id) if isinstance(run_id, str) else None
        snapshot = None
        if run is not None:
            snapshot = run.snapshot(since if isinstance(since, int) and since >= 0 else 0)
            snapshot["position"] = self.queue.position(run)
        return {"run": snapshot, "queue": self.queue.summary()}

    def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel exactly this run (queued or running); every other run is untouched."""
        run = self.queue.get(run_id) if isinstance(run_id, str) else None
        if run is None:
            return {"ok": False, "error": "no such run"}
        cancelled = self.queue.cancel(run_id)
        return {"ok": cancelled, "run": run.summary(self.queue.position(run))}

    def results(self, run_id: Any) -> dict[str, Any]:
        """A finished run's results, read from its output folders: pictures (as data URLs, at full
        size) and text files, each bounded (:data:`MAX_RESULT_FILES`, :data:`MAX_RESULT_IMAGE_BYTES`,
        :data:`MAX_RESULT_TEXT_BYTES`, :data:`MAX_RESULT_BYTES` in all). Only folders inside this
        canvas's output folder are read, and links are not followed."""
        run = self.queue.get(run_id) if isinstance(run_id, str) else None
        if run is None:
            return {"ok": False, "error": "no such run"}
        out: dict[str, Any] = {"ok": True, "run": run.id, "folders": list(run.output_dirs), "images": [], "texts": [], "notes": []}
        if run.active:
            out["notes"].append("the run has not finished")
            return out
        root = Path(self.settings.output_dir).resolve()
        budget = MAX_RESULT_BYTES
        files: list[tuple[Path, Path]] = []
        for folder in run.output_dirs:
            base = Path(folder)
            try:
                resolved = base.resolve()
                resolved.relative_to(root)
            except (OSError, ValueError):
                out["notes"].append(f"{folder} is not in this canvas's output folder")
                continue
            if not resolved.is_dir():
                out["notes"].append(f"{folder} is not on this machine")
                continue
            files.extend((resolved, f) for f in _result_files(resolved))
        for base, path in files:
            if len(out["images"]) + len(out["texts"]) >= MAX_RESULT_FILES:
                out["notes"].append(f"only the first {MAX_RESULT_FILES} result files are shown")
                break
            suffix = path.suffix.lower()
            try:
                size = path.lstat().st_size
            except OSError:
                continue
            name = path.relative_to(base).as_posix()
            if suffix in RESULT_IMAGES:
                if size > MAX_RESULT_IMAGE_BYTES or size > budget:
                    out["notes"].append(f"{name} is too large to show ({size:,} bytes)")
                    continue
                data = _read_regular(path, size)
                if data is None:
                    continue
                budget -= size
                url = f"data:{RESULT_IMAGES[suffix]};base64," + base64.b64encode(data).decode("ascii")
                out["images"].append({"name": name, "path": str(path), "url": url, "bytes": size})
            else:
                data = _read_regular(path, min(size, MAX_RESULT_TEXT_BYTES))
                if data is None:
                    continue
                budget -= len(data)
                text = data.decode("utf-8", errors="replace")
                out["texts"].append({"name": name, "path": str(path), "text": text, "truncated": size > MAX_RESULT_TEXT_BYTES})
        return out

    # --- file paths ------------------------------------------------------------------------

    def paths(self, prefix: str) -> list[str]:
        """Files and folders under the allowed read folders whose path starts with ``prefix``."""
        prefix = prefix if isinstance(prefix, str) else ""
        roots = list(self.settings.readable_roots)
        if not prefix:
            return sorted({_display(r) for r in roots})[:MAX_PATH_SUGGESTIONS]
        typed = Path(os.path.expanduser(prefix))
        folder, stem = (typed, "") if prefix.endswith(("/", os.sep)) else (typed.parent, typed.name)
        absolute = folder if folder.is_absolute() else Path.cwd() / folder
        try:
            self.settings.check_readable(absolute)
            entries = sorted(absolute.iterdir(), key=lambda p: p.name)
        except Exception:  # outside the allowed folders, missing, unreadable: nothing to suggest
            return []
        out = []
        for entry in entries:
            if not entry.name.startswith(stem) or entry.name.startswith("."):
                continue
            shown = prefix[: len(prefix) - len(stem)] + entry.name + ("/" if entry.is_dir() else "")
            out.append(shown)
            if len(out) >= MAX_PATH_SUGGESTIONS:
                break
        return out


def _display(path: Path) -> str:
    try:
        relative = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return "./" if str(relative) == "." else f"{relative}/"


def _result_files(folder: Path, depth: int = 0) -> list[Path]:
    """Pictures and text files under ``folder`` (sorted, links skipped, the run record left out)."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    found: list[Path] = []
    for entry in entries:
        if entry.is_symlink() or entry.name.startswith("."):
            continue
        if entry.is_dir():
            if depth < RESULT_DEPTH:
                found.extend(_result_files(entry, depth + 1))
        elif entry.is_file() and entry.name not in RECORD_FILES and (entry.suffix.lower() in RESULT_IMAGES or entry.suffix.lower() in RESULT_TEXTS):
            found.append(entry)
        if len(found) > 4 * MAX_RESULT_FILES:
            break
    return found


def _read_regular(path: Path, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of a regular file, opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            return handle.read(limit)
    except OSError:
        return None


def _is_link_mismatch(workflow: Workflow, problem: Problem) -> bool:
    """A type mismatch on a linked input: the canvas refuses such links, so it cannot draw one."""
    if problem.code != "type-mismatch" or problem.node not in workflow.nodes or problem.input is None:
        return False
    return isinstance(workflow.nodes[problem.node].inputs.get(problem.input), Link)


__all__ = ["CanvasBackend", "UNDRAWABLE", "problems_json"]

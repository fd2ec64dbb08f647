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

#: Problems that leave nothing sensible to draw: a file with any of them is not opened.
UNDRAWABLE = frozenset(
    {"unknown-node-type", "unknown-input", "dangling-reference", "version-unsatisfied", "bad-version", "migration-failed"}
)
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


def _is_link_mismatch(workflow: Workflow, problem: Problem) -> bool:
    """A type mismatch on a linked input: the canvas refuses such links, so it cannot draw one."""
    if problem.code != "type-mismatch" or problem.node not in workflow.nodes or problem.input is None:
        return False
    return isinstance(workflow.nodes[problem.node].inputs.get(problem.input), Link)


__all__ = ["CanvasBackend", "UNDRAWABLE", "problems_json"]

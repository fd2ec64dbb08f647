"""The engine: load → validate → plan → execute → record, with a cache shared across runs.

:class:`Engine` is what the CLI, the canvas and notebooks hold: one registry, one settings
object, one in-memory output cache, so repeated and swept runs reuse each other's work.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dagfusion.cache import DiskCache, OutputCache
from dagfusion.context import CancelToken
from dagfusion.errors import Problem, ValidationError
from dagfusion.events import FanOut, ProgressHandler
from dagfusion.executor import RunResult, execute
from dagfusion.outdir import OutputLock, check_output_dir, settings_folders
from dagfusion.plan import Plan, make_plan
from dagfusion.record import RunRecorder, provenance, write_record
from dagfusion.registry import Registry, default_registry
from dagfusion.settings import Settings
from dagfusion.validate import ValidatedWorkflow, check
from dagfusion.workflow import Workflow, apply_overrides, iter_sweep, load_workflow, parse_workflow, sweep_points

WorkflowSource = Workflow | str | os.PathLike[str]


class Engine:
    """Runs workflows against one registry, settings object and output cache."""

    def __init__(
        self,
        registry: Registry | None = None,
        settings: Settings | None = None,
        *,
        memory: OutputCache | None = None,
    ) -> None:
        self.registry = registry if registry is not None else default_registry()
        self.settings = settings if settings is not None else Settings.load()
        self.memory = memory if memory is not None else OutputCache(self.settings.cache_bytes)
        self.disk = DiskCache(self.settings.cache_dir)

    # --- loading and checking -------------------------------------------------------------

    def load(self, source: WorkflowSource) -> Workflow:
        """A :class:`Workflow` from a path (or the workflow itself)."""
        if isinstance(source, Workflow):
            return source
        return load_workflow(source)

    def check_source(self, source: WorkflowSource) -> tuple[ValidatedWorkflow | None, list[Problem], list[str]]:
        """Every problem of a file — structural and registry checks together — without raising."""
        if isinstance(source, Workflow):
            return check(source, self.registry, self.settings)
        path = Path(source)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            return None, [Problem("unreadable", f"cannot read workflow file: {exc.strerror or exc}")], []
        workflow, problems = parse_workflow(raw, str(path))
        if workflow is None:
            return None, problems, []
        return check(workflow, self.registry, self.settings, initial_problems=problems)

    def validate(self, workflow: WorkflowSource) -> ValidatedWorkflow:
        """Validate, raising :class:`ValidationError` with every problem."""
        validated, problems, _ = self.check_source(workflow)
        if validated is None:
            source = workflow.source if isinstance(workflow, Workflow) else str(workflow)
            raise ValidationError(problems, source)
        return validated

    def plan(
        self, validated: ValidatedWorkflow, *, run_id: str, targets: Iterable[str] | None = None, use_cache: bool = True
    ) -> Plan:
        return make_plan(
            validated,
            run_nonce=run_id,
            types=self.registry.types,
            memory=self.memory if use_cache else None,
            disk=self.disk if use_cache else None,
            targets=targets,
            use_cache=use_cache,
        )

    # --- running ----------------------------------------------------------------------

    def run(
        self,
        workflow: WorkflowSource,
        *,
        overrides: Sequence[str] = (),
        out: str | os.PathLike[str] | None = None,
        handler: ProgressHandler | None = None,
        cancel_token: CancelToken | None = None,
        use_cache: bool = True,
        targets: Iterable[str] | None = None,
        record: bool = True,
        check_mutation: bool = False,
        _sweep: dict[str, Any] | None = None,
    ) -> RunResult:
        """Run one workflow (no sweep) and return its :class:`RunResult`.

        :param overrides: ``node.input=value`` strings, as ``--set`` on the CLI.
        :param out: The run's output folder (default: a new folder under the settings' output dir).
        :param use_cache: Read cached outputs (results are still stored for later runs).
        :param targets: Node ids (or ``node.output``) to compute instead of the workflow's targets.
        :param record: Write the run record (workflow, events, manifest) into the output folder.
        :param check_mutation: Fail nodes that modify their inputs in place (slow; for tests).
        :raises ValidationError: listing every problem, before anything runs.
        """
        wf = self.load(workflow)
        if overrides:
            wf = apply_overrides(wf, list(overrides))
        if wf.sweep:
            raise ValidationError(
                [Problem("sweep", "this workflow has a sweep; run it with run_sweep() (or the CLI)")], wf.source
            )
        validated = self.validate(wf)
        run_id = uuid.uuid4().hex[:12]
        output_dir = Path(out) if out is not None else self._default_output_dir(wf, run_id)
        if record or out is not None:
            self.check_output_dir(output_dir)
        if use_cache and any(spec.persist for spec in validated.specs.values()):
            self._require_usable_cache(wf)
        plan = self.plan(validated, run_id=run_id, targets=targets, use_cache=use_cache)
        # The lock guards the record: two recorded runs never interleave in one folder.
        with OutputLock(output_dir) if record else nullcontext():
            return self._execute(
                plan,
                run_id=run_id,
                output_dir=output_dir,
                record=record,
                handler=handler,
                cancel_token=cancel_token,
                use_cache=use_cache,
                check_mutation=check_mutation,
                sweep=_sweep,
            )

    def _require_usable_cache(self, workflow: Workflow) -> None:
        """One clear error before anything runs when the disk cache folder cannot be used."""
        problem = self.disk.problem()
        if problem is not None:
            raise ValidationError([Problem("cache-dir", problem)], workflow.source)

    def check_output_dir(self, output_dir: Path) -> None:
        """Refuse an output folder that is (or contains) the working, settings or cache folder."""
        check_output_dir(output_dir, settings_folders(), (self.settings.cache_dir,))

    def _execute(
        self,
        plan: Plan,
        *,
        run_id: str,
        output_dir: Path,
        record: bool,
        handler: ProgressHandler | None,
        cancel_token: CancelToken | None,
        use_cache: bool,
        check_mutation: bool,
        sweep: dict[str, Any] | None,
    ) -> RunResult:
        recorder = None
        run_provenance = provenance(plan, self.registry, run_id, sweep)
        if record:
            write_record(output_dir, run_provenance)
            recorder = RunRecorder(output_dir)
        try:
            return execute(
                plan,
                registry=self.registry,
                settings=self.settings,
                run_id=run_id,
                output_dir=output_dir,
                handler=FanOut(recorder, handler) if recorder is not None else handler,
                cancel_token=cancel_token,
                memory=self.memory,
                disk=self.disk if use_cache else None,
                check_mutation=check_mutation,
                provenance=run_provenance,
            )
        finally:
            if recorder is not None:
                recorder.close()

    def run_sweep(
        self,
        workflow: WorkflowSource,
        *,
        overrides: Sequence[str] = (),
        out: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> list[RunResult]:
        """Run every point of the workflow's sweep (one run if it has none), sharing the cache.

        With ``out``, sweep point *k* writes to ``out/sweep-k`` (or ``out`` itself without a sweep).
        All points are validated before the first one runs.
        """
        wf = self.load(workflow)
        if overrides:
            wf = apply_overrides(wf, list(overrides))
        validated, problems, _ = check(wf, self.registry, self.settings)
        if validated is None:
            raise ValidationError(problems, wf.source)
        count = sweep_points(wf)  # within settings.max_sweep_points: check() refuses more
        results: list[RunResult] = []
        cancel_token = options.get("cancel_token")
        sweep_out = Path(out) if out is not None and count > 1 else None
        if sweep_out is not None:
            self.check_output_dir(sweep_out)
        with OutputLock(sweep_out) if sweep_out is not None else nullcontext():
            for index, (assignment, point) in enumerate(iter_sweep(wf)):
                if cancel_token is not None and cancel_token.cancelled:
                    break
                point_out = None
                if out is not None:
                    point_out = Path(out) if count == 1 else Path(out) / f"sweep-{index:03d}"
                results.append(self.run(point, out=point_out, _sweep=assignment or None, **options))
        return results

    def _default_output_dir(self, workflow: Workflow, run_id: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in workflow.name)[:40] or "workflow"
        return self.settings.output_dir / f"{stamp}-{safe}-{run_id[:6]}"


_default_engine: Engine | None = None


def default_engine() -> Engine:
    """The process-wide engine used by :func:`dagfusion.run` (built on first use)."""
    global _default_engine
    if _default_engine is None:
        _default_engine = Engine()
    return _default_engine


def set_default_engine(engine: Engine | None) -> Engine | None:
    """Make ``engine`` the process-wide one (``None``: rebuild on next use); return the previous."""
    global _default_engine
    previous, _default_engine = _default_engine, engine
    return previous


def run(workflow: WorkflowSource, **options: Any) -> RunResult:
    """Run a workflow with the process-wide engine (see :meth:`Engine.run`)."""
    return default_engine().run(workflow, **options)

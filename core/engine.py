"""The engine: read → validate → plan → execute → record, with a cache shared across runs.

:class:`Engine` is what the CLI, the canvas and notebooks hold: one registry, one settings
object, one in-memory output cache, so repeated and swept runs reuse each other's work.
:meth:`Engine.prepare` validates a workflow once (its sweep points included) and remembers
it by the hash of its text, so running an unchanged file again skips parsing and validation.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagfusion.cache import DiskCache, OutputCache
from dagfusion.context import CancelToken
from dagfusion.errors import Problem, UnsafeOperationError, ValidationError
from dagfusion.events import FanOut, ProgressHandler
from dagfusion.executor import RunResult, execute
from dagfusion.outdir import OutputLock, check_output_dir, settings_folders
from dagfusion.plan import Plan, make_plan
from dagfusion.record import RunRecorder, provenance, write_record
from dagfusion.registry import Registry, default_registry
from dagfusion.settings import Settings
from dagfusion.sources import SourceText, read_source, read_text
from dagfusion.sweeppoints import sweep_point_problems, with_constants
from dagfusion.validation import ValidatedWorkflow, check
from dagfusion.workflow import Link, Workflow, apply_overrides, parse_workflow, sweep_points

WorkflowSource = Workflow | str | os.PathLike[str]
"""A workflow, or the path of a YAML file or of a PNG that carries one."""


@dataclass(frozen=True)
class SweepPoint:
    """One run of a :class:`Prepared` workflow.

    Attributes:
        index: The point's position in the sweep (0 without a sweep).
        assignment: ``{"node.input": value}`` the sweep sets for it (empty without a sweep).
        validated: The point's validated workflow (constants replaced, no sweep), ready to plan.
    """

    index: int
    assignment: Mapping[str, Any]
    validated: ValidatedWorkflow


class Prepared:
    """A workflow validated once (with every sweep point checked), whose runs are built on demand.

    ``len()`` is the number of runs; iterating yields each :class:`SweepPoint` in order,
    building one at a time from the base validation, so a sweep of thousands of points holds
    one point in memory. Iterating again starts over. ``validated`` is the base validation
    (its workflow keeps the sweep); ``warnings`` are its warnings (migrations); ``registry``
    and ``settings`` are what it was validated against; ``paths`` the ``PATH`` constants.
    """

    def __init__(self, validated: ValidatedWorkflow, registry: Registry, settings: Settings) -> None:
        self.validated = validated
        self.registry = registry
        self.settings = settings
        self.warnings = validated.warnings
        self._count = sweep_points(validated.workflow)
        self.paths = _path_constants(validated)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[SweepPoint]:
        base = self.validated
        if not base.workflow.sweep:
            yield SweepPoint(0, {}, base)
            return
        per_group = []
        for group in base.workflow.sweep:
            keys = list(group)
            targets = [Link.parse(key) for key in keys]
            rows = [
                [(key, (t.node, t.output), value) for key, t, value in zip(keys, targets, combo) if t is not None]
                for combo in zip(*(group[k] for k in keys))
            ]
            per_group.append(rows)
        for index, combo in enumerate(itertools.product(*per_group)):
            assignment: dict[str, Any] = {}
            values: dict[tuple[str, str], Any] = {}
            for row in combo:
                for key, target, value in row:
                    assignment[key] = value
                    values[target] = value
            yield SweepPoint(index, assignment, with_constants(base, values))


def _path_constants(validated: ValidatedWorkflow) -> tuple[str, ...]:
    """Every text constant (or swept value) given to a ``PATH`` input."""
    found: list[str] = []
    for node_id, spec in validated.specs.items():
        given = validated.workflow.nodes[node_id].inputs
        for input_spec in spec.inputs:
            if input_spec.type_name == "PATH" and isinstance(given.get(input_spec.name), str):
                found.append(given[input_spec.name])
    for group in validated.workflow.sweep:
        for key, values in group.items():
            link = Link.parse(key)
            spec = validated.specs.get(link.node) if link is not None else None
            input_spec = spec.input(link.output) if spec is not None and link is not None else None
            if input_spec is not None and input_spec.type_name == "PATH":
                found.extend(v for v in values if isinstance(v, str))
    return tuple(dict.fromkeys(found))


def _source_name(source: WorkflowSource) -> str | None:
    return source.source if isinstance(source, Workflow) else str(source)


class _Memo:
    """The last few prepared workflows, by key (least recently used dropped first; thread-safe)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Prepared] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Prepared | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: Any, value: Prepared) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


MEMO_SIZE = 32
"""How many prepared workflows an engine remembers."""


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
        self._memo = _Memo(MEMO_SIZE)

    # --- loading and checking -------------------------------------------------------------

    def load(self, source: WorkflowSource) -> Workflow:
        """A :class:`Workflow` from a YAML or PNG path (or the workflow itself).

        :raises ValidationError: listing every structural problem of the file.
        """
        if isinstance(source, Workflow):
            return source
        workflow, problems = read_source(source)
        if workflow is None or problems:
            raise ValidationError(problems, str(source))
        return workflow

    def prepare(self, source: WorkflowSource, overrides: Sequence[str] = ()) -> Prepared:
        """Validate a workflow once and return its runs, ready to plan.

        ``source`` is a YAML or PNG path or a :class:`Workflow`; ``overrides`` are
        ``node.input=value`` strings. Everything is checked before this returns: the graph
        once, every swept value against its input, and each node check (``@node(check=)``)
        against every combination of values the sweep gives its node. The points themselves
        are built lazily, one at a time, from the base validation by replacing constants.

        Files are remembered by the hash of their text (with the overrides, registry and
        settings), so a file run again unchanged is not parsed or validated again; the file
        is still read on every call, and the folders its ``PATH`` inputs name are checked again.

        :raises ValidationError: listing every problem, before anything runs.
        """
        prepared, problems, _ = self._prepare(source, overrides)
        if prepared is None:
            raise ValidationError(problems, _source_name(source))
        return prepared

    def check_source(
        self, source: WorkflowSource, overrides: Sequence[str] = ()
    ) -> tuple[ValidatedWorkflow | None, list[Problem], list[str]]:
        """Every problem of a file — structural, registry and sweep checks together — without
        raising: ``(validated or None, problems, warnings)`` (see :meth:`prepare`)."""
        prepared, problems, warnings = self._prepare(source, overrides)
        return (prepared.validated if prepared is not None else None), problems, warnings

    def validate(self, workflow: WorkflowSource) -> ValidatedWorkflow:
        """Validate, raising :class:`ValidationError` with every problem."""
        return self.prepare(workflow).validated

    def _prepare(
        self, source: WorkflowSource, overrides: Sequence[str]
    ) -> tuple[Prepared | None, list[Problem], list[str]]:
        if isinstance(source, Workflow):
            return self._validate(source, overrides, [])
        found, problems = read_text(source)
        if found is None:
            return None, problems, []
        key = self._memo_key(found, overrides)
        prepared = self._memo.get(key)
        if (
            prepared is not None
            and prepared.registry is self.registry
            and prepared.settings is self.settings
            and self._still_readable(prepared)
        ):
            return prepared, [], list(prepared.warnings)
        workflow, problems = parse_workflow(found.text, found.name)
        if workflow is None:
            return None, problems, []
        prepared, problems, warnings = self._validate(workflow, overrides, problems)
        if prepared is not None:
            self._memo.put(key, prepared)
        return prepared, problems, warnings

    def _validate(
        self, workflow: Workflow, overrides: Sequence[str], problems: list[Problem]
    ) -> tuple[Prepared | None, list[Problem], list[str]]:
        if overrides:
            try:
                workflow = apply_overrides(workflow, list(overrides))
            except ValidationError as exc:
                return None, [*problems, *exc.problems], []
        validated, problems, warnings = check(workflow, self.registry, self.settings, initial_problems=problems)
        if validated is not None and validated.workflow.sweep:
            problems = sweep_point_problems(validated, limit=100)
            if problems:
                return None, problems, warnings
        if validated is None:
            return None, problems, warnings
        return Prepared(validated, self.registry, self.settings), [], warnings

    def _memo_key(self, found: SourceText, overrides: Sequence[str]) -> tuple[Any, ...]:
        raw = found.text.encode("utf-8", "surrogatepass") if isinstance(found.text, str) else found.text
        digest = hashlib.blake2b(raw, digest_size=20).digest()
        return (digest, found.kind, found.name, tuple(overrides), id(self.registry), id(self.settings))

    def _still_readable(self, prepared: Prepared) -> bool:
        """Whether the ``PATH`` constants of a remembered workflow may still be read."""
        try:
            for path in prepared.paths:
                self.settings.check_tree_readable(path)
        except UnsafeOperationError:
            return False
        return True

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
        prepared = self.prepare(workflow, overrides)
        if prepared.validated.workflow.sweep:
            raise ValidationError(
                [Problem("sweep", "this workflow has a sweep; run it with run_sweep() (or the CLI)")],
                prepared.validated.workflow.source,
            )
        (point,) = prepared
        return self.run_point(
            point,
            out=out,
            handler=handler,
            cancel_token=cancel_token,
            use_cache=use_cache,
            targets=targets,
            record=record,
            check_mutation=check_mutation,
        )

    def run_point(
        self,
        point: SweepPoint,
        *,
        out: str | os.PathLike[str] | None = None,
        handler: ProgressHandler | None = None,
        cancel_token: CancelToken | None = None,
        use_cache: bool = True,
        targets: Iterable[str] | None = None,
        record: bool = True,
        check_mutation: bool = False,
    ) -> RunResult:
        """Plan and execute one point of a :class:`Prepared` workflow (options as :meth:`run`)."""
        validated = point.validated
        wf = validated.workflow
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
                sweep=dict(point.assignment) or None,
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
        Every point is validated (by :meth:`prepare`) before the first one runs; points are
        built one at a time as they run.
        """
        prepared = self.prepare(workflow, overrides)
        count = len(prepared)  # within settings.max_sweep_points: check() refuses more
        results: list[RunResult] = []
        cancel_token = options.get("cancel_token")
        sweep_out = Path(out) if out is not None and count > 1 else None
        if sweep_out is not None:
            self.check_output_dir(sweep_out)
        with OutputLock(sweep_out) if sweep_out is not None else nullcontext():
            for point in prepared:
                if cancel_token is not None and cancel_token.cancelled:
                    break
                point_out = None
                if out is not None:
                    point_out = Path(out) if count == 1 else Path(out) / f"sweep-{point.index:03d}"
                results.append(self.run_point(point, out=point_out, **options))
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

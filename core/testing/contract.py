"""The node contract every node must pass (see :mod:`dagfusion.testing` for the checks):
:func:`check_node_contract`, :func:`assert_node_contract` and :func:`example_inputs`."""

from __future__ import annotations

import copy
import inspect
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagfusion.node import NodeSpec
    from dagfusion.registry import Registry
    from dagfusion.settings import Settings

from dagfusion.testing.harness import _FEEDER_ID, _IMMUTABLE, _TESTED_ID, EXAMPLE_FEEDER, make_settings

# --- the node contract -----------------------------------------------------------------------


def assert_node_contract(spec: NodeSpec | str, registry: Registry, **options: Any) -> None:
    """Raise ``AssertionError`` listing every contract problem of ``spec`` (see the module docstring)."""
    problems = check_node_contract(spec, registry, **options)
    if problems:
        type_id = spec if isinstance(spec, str) else spec.type_id
        listing = "\n".join(f"  - {p}" for p in problems)
        raise AssertionError(f"{type_id} breaks the node contract:\n{listing}")


def check_node_contract(
    spec: NodeSpec | str,
    registry: Registry,
    *,
    tmp_path: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    run_examples: bool = True,
    require_input_docs: bool = False,
) -> list[str]:
    """Every contract problem of ``spec`` as a sentence; empty when it passes.

    :param spec: The node, or a type id registered in ``registry``.
    :param registry: Types and nodes to check against (and run the examples with).
    :param tmp_path: Scratch folder for example files and outputs (default: a temporary one,
        removed afterwards).
    :param settings: Settings to run the examples with (default :func:`make_settings`); the
        scratch folder is added to their read folders.
    :param run_examples: Run the examples (otherwise only the declaration is checked).
    :param require_input_docs: Every input and output must have a description too.
    """
    if isinstance(spec, str):
        found = registry.get(spec)
        if found is None:
            return [f"node type {spec!r} is not registered"]
        spec = found
    problems = _declaration_problems(spec, registry, require_input_docs)
    if not run_examples or any("unregistered type" in p for p in problems):
        return problems
    with _scratch(tmp_path) as folder:
        problems += _example_problems(spec, registry, folder, settings)
    return problems


@contextmanager
def _scratch(tmp_path: str | os.PathLike[str] | None) -> Iterator[Path]:
    if tmp_path is not None:
        folder = Path(tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="dagfusion-contract-") as name:
        yield Path(name)


def _declaration_problems(spec: NodeSpec, registry: Registry, require_input_docs: bool) -> list[str]:
    from dagfusion.node import REQUIRED

    types = registry.types
    problems: list[str] = []
    if not spec.description.strip():
        problems.append("no description: give the run function a docstring or pass description=")
    if not spec.category.strip():
        problems.append("no category")
    for kind, sockets in (("input", spec.inputs), ("output", spec.outputs)):
        for socket in sockets:
            unknown = types.unknown_names(socket.type)
            if unknown:
                problems.append(f"{kind} {socket.name!r} has unregistered type(s) {unknown}")
            if require_input_docs and not socket.description.strip():
                problems.append(f"{kind} {socket.name!r} has no description")
    for inp in spec.inputs:
        if types.unknown_names(inp.type):
            continue
        where = f"input {inp.name!r} ({inp.type_name})"
        if inp.min is not None and inp.max is not None and inp.min > inp.max:
            problems.append(f"{where}: min {inp.min} is greater than max {inp.max}")
        if (inp.min is not None or inp.max is not None) and not (
            types.value_matches(inp.type, 0) or types.value_matches(inp.type, 0.0)
        ):
            problems.append(f"{where}: min/max are set but the type is not numeric")
        if inp.choices is not None:
            if not inp.choices:
                problems.append(f"{where}: choices is empty")
            for choice in inp.choices:
                if not types.value_matches(inp.type, choice):
                    problems.append(f"{where}: choice {choice!r} is not a {inp.type_name} value")
        if inp.default is not REQUIRED and inp.default is not None:
            if not types.value_matches(inp.type, inp.default):
                problems.append(
                    f"{where}: default {inp.default!r} is {types.describe_value(inp.default)}, not {inp.type_name}"
                )
            else:
                why = inp.bound_problem(inp.default)
                if why:
                    problems.append(f"{where}: default {why}")
    if spec.persist:
        for out in spec.outputs:
            if out.type_name not in types or types.get(out.type_name).serializer is None:
                problems.append(
                    f"persist=True but output {out.name!r} has type {out.type_name}, which has no serializer"
                )
    return problems


def example_inputs(spec: NodeSpec, folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The node's examples as input mappings; callables are called (with ``folder`` if they take an argument).

    :raises TypeError: an example is neither a mapping nor a callable returning one.
    """
    return [_resolve_example(example, Path(folder)) for example in spec.examples]


def _resolve_example(example: Any, folder: Path) -> dict[str, Any]:
    if callable(example) and not isinstance(example, Mapping):
        folder.mkdir(parents=True, exist_ok=True)
        value = example(folder) if _wants_argument(example) else example()
    else:
        value = example
    if not isinstance(value, Mapping):
        raise TypeError(f"an example must be a mapping of input names to values (or a callable returning one), got {type(value).__name__}")
    return dict(value)


def _wants_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )


def _fresh(example: Any, first: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A second, independent copy of an example's inputs (for the determinism run)."""
    if callable(example) and not isinstance(example, Mapping):
        return _resolve_example(example, folder)
    try:
        return copy.deepcopy(first)
    except Exception:  # uncopyable values: reuse them (mutation is checked separately)
        return dict(first)


def _example_problems(spec: NodeSpec, registry: Registry, folder: Path, settings: Settings | None) -> list[str]:
    problems: list[str] = []
    examples: list[Any] = list(spec.examples)
    label_prefix = "example"
    if not examples:
        if all(not inp.required for inp in spec.inputs):
            examples = [{}]
            label_prefix = "run with defaults"
        elif spec.pure:
            required = [inp.name for inp in spec.inputs if inp.required]
            return [
                f"no examples: a pure node with required inputs {required} must declare examples=[...] "
                "(a mapping, or a callable returning one so tensors are built lazily)"
            ]
        else:
            return []
    if settings is None:
        settings = make_settings(folder)
    else:
        settings = settings.with_overrides(read_dirs=[*settings.read_dirs, folder])
    contract = _contract_registry(registry, spec)
    patched: list[tuple[str, str | None, dict[str, str | None]]] = []
    for index, example in enumerate(examples, 1):
        label = label_prefix if label_prefix != "example" else f"example {index}"
        example_dir = folder / "examples" / f"{index}"
        try:
            inputs = _resolve_example(example, example_dir)
        except Exception as exc:
            problems.append(f"{label}: could not be built: {type(exc).__name__}: {exc}")
            continue
        unknown = sorted(set(inputs) - {inp.name for inp in spec.inputs})
        if unknown:
            problems.append(f"{label}: names undeclared inputs {unknown}")
            continue
        first = _run_example(spec, contract, inputs, settings, folder / "runs" / f"{index}-a", label, problems)
        if first is None:
            continue
        if spec.pure:
            patched.append((label, _fingerprint_or_none(inputs), _patched_handles(first)))
        if spec.pure:
            try:
                again = _fresh(example, inputs, example_dir)
            except Exception as exc:
                problems.append(f"{label}: could not be built a second time: {type(exc).__name__}: {exc}")
                continue
            second = _run_example(spec, contract, again, settings, folder / "runs" / f"{index}-b", label, problems)
            if second is not None:
                problems += _determinism_problems(first, second, label)
        if spec.persist:
            problems += _persist_problems(spec, registry, first, folder / "persist" / f"{index}", label)
    return problems + _patch_key_problems(patched)


def _fingerprint_or_none(value: Any) -> str | None:
    from dagfusion.fingerprint import fingerprint

    try:
        return fingerprint(value)
    except Exception:  # a value whose fingerprint fails is simply not compared
        return None


def _patched_handles(outputs: Mapping[str, Any]) -> dict[str, str | None]:
    """``{output: fingerprint}`` of the outputs that are handles carrying patches."""
    return {
        name: _fingerprint_or_none(value)
        for name, value in outputs.items()
        if isinstance(getattr(value, "patches", None), tuple) and value.patches
        and hasattr(value, "__dagfusion_fingerprint__")
    }


def _patch_key_problems(runs: list[tuple[str, str | None, dict[str, str | None]]]) -> list[str]:
    """Examples with different inputs whose patched handles fingerprint the same: a setting is
    missing from a patch's key, so the engine's cache would serve one handle for the other."""
    problems = []
    for i, (label_a, inputs_a, handles_a) in enumerate(runs):
        for label_b, inputs_b, handles_b in runs[i + 1:]:
            if inputs_a is None or inputs_b is None or inputs_a == inputs_b:
                continue
            for name, fp in handles_a.items():
                if fp is not None and handles_b.get(name) == fp:
                    problems.append(
                        f"{label_a} and {label_b}: different inputs give output {name!r} the same fingerprint "
                        "(a setting is missing from a patch's key, so caches would mix the two handles up)"
                    )
    return problems


def _contract_registry(registry: Registry, spec: NodeSpec) -> Registry:
    """``registry`` plus ``spec`` (if not registered as is); the feeder node is added per run."""
    if registry.get(spec.type_id) is spec:
        return registry
    return _registry_with(registry, [spec])


def _registry_with(registry: Registry, specs: Sequence[NodeSpec]) -> Registry:
    """A shallow copy of ``registry`` that also knows ``specs`` (types and plugins are shared)."""
    return registry.with_nodes(specs, "dagfusion.testing")


def _feeder(values: Mapping[str, Any]) -> NodeSpec:
    from dagfusion.node import NodeSpec, OutputSpec

    def emit(ctx: Any) -> dict[str, Any]:
        return dict(values)

    return NodeSpec(
        type_id=EXAMPLE_FEEDER,
        version="1.0.0",
        category="testing",
        description="Emits a contract example's non-constant input values (dagfusion.testing).",
        inputs=(),
        outputs=tuple(OutputSpec(name, "ANY") for name in values),
        fn=emit,
        pure=False,
    )


def _run_example(
    spec: NodeSpec,
    registry: Registry,
    inputs: Mapping[str, Any],
    settings: Settings,
    out: Path,
    label: str,
    problems: list[str],
) -> dict[str, Any] | None:
    """Run the node once on ``inputs``; its outputs, or ``None`` after adding the problems."""
    from dagfusion.engine import Engine
    from dagfusion.errors import ValidationError
    from dagfusion.workflow import Link, NodeInstance, Workflow

    by_name = {inp.name: inp for inp in spec.inputs}
    constants: dict[str, Any] = {}
    fed: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, _IMMUTABLE) and not by_name[name].link_only:
            constants[name] = value
        else:
            fed[name] = value
    nodes = {}
    run_registry = registry
    if fed:
        run_registry = _registry_with(registry, [_feeder(fed)])
        nodes[_FEEDER_ID] = NodeInstance(_FEEDER_ID, EXAMPLE_FEEDER)
    links = {name: Link(_FEEDER_ID, name) for name in fed}
    nodes[_TESTED_ID] = NodeInstance(_TESTED_ID, spec.type_id, inputs={**constants, **links})
    workflow = Workflow(nodes=nodes, metadata={"name": f"contract-{spec.type_id}"}, outputs=(_TESTED_ID,))
    try:
        result = Engine(run_registry, settings).run(
            workflow, out=out, use_cache=False, record=False, check_mutation=True
        )
    except ValidationError as exc:
        problems.append(f"{label}: invalid inputs: " + "; ".join(p.message if not p.input else f"{p.input}: {p.message}" for p in exc.problems))
        return None
    if not result.ok:
        error = result.errors.get(_TESTED_ID) or next(iter(result.errors.values()), None)
        if error is None:
            problems.append(f"{label}: the run ended {result.status}")
        else:
            original = error.original
            problems.append(f"{label}: failed: {type(original).__name__}: {original}")
        return None
    outputs = dict(result.outputs[_TESTED_ID])
    types = registry.types
    for out_spec in spec.outputs:
        value = outputs.get(out_spec.name)
        if value is None and not types.value_matches(out_spec.type, None):
            problems.append(f"{label}: output {out_spec.name!r} is None, which is not a {out_spec.type_name} value")
    if spec.pure and out.exists() and any(out.iterdir()):
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) or sorted(
            str(p.relative_to(out)) for p in out.rglob("*")
        )
        problems.append(f"{label}: a pure node wrote files {written[:5]} into the output folder; declare pure=False")
    return outputs


def _determinism_problems(first: Mapping[str, Any], second: Mapping[str, Any], label: str) -> list[str]:
    from dagfusion.fingerprint import fingerprint

    problems = []
    for name, value in first.items():
        a, b = fingerprint(value), fingerprint(second.get(name))
        if a is not None and b is not None and a != b:
            problems.append(
                f"{label}: not deterministic: output {name!r} differs between two runs on the same inputs "
                "(seed the randomness from an input, or declare pure=False)"
            )
    return problems


def _persist_problems(spec: NodeSpec, registry: Registry, outputs: Mapping[str, Any], folder: Path, label: str) -> list[str]:
    from dagfusion.fingerprint import fingerprint

    problems = []
    folder.mkdir(parents=True, exist_ok=True)
    for out_spec in spec.outputs:
        if out_spec.type_name not in registry.types:
            continue
        serializer = registry.types.get(out_spec.type_name).serializer
        value = outputs.get(out_spec.name)
        if serializer is None or value is None:
            continue
        path = str(folder / out_spec.name)
        try:
            serializer.save(value, path)
            loaded = serializer.load(path)
        except Exception as exc:
            problems.append(f"{label}: output {out_spec.name!r} cannot be persisted: {type(exc).__name__}: {exc}")
            continue
        if fingerprint(loaded) != fingerprint(value):
            problems.append(f"{label}: output {out_spec.name!r} changes when saved and loaded by its serializer")
    return problems



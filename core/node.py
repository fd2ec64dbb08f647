"""Declaring nodes: :class:`InputSpec`, :class:`OutputSpec`, :class:`NodeSpec` and :func:`node`.

A node is declared once, as data plus a function::

    from dagfusion import node, Input, Output

    @node(
        "mypack.Scale",
        version="1.0.0",
        category="math",
        inputs=[Input("x", "FLOAT"), Input("factor", "FLOAT", default=2.0, min=0.0)],
        outputs=[Output("y", "FLOAT")],
    )
    def scale(ctx, x: float, factor: float) -> float:
        '''Multiply ``x`` by ``factor``.'''
        return x * factor

The function receives the run context first and then its inputs as keyword arguments. It
returns a mapping from output name to value, or — for convenience — a single value when it
declares one output, or a tuple in declared output order. The description defaults to the
function's docstring. The specs are frozen: the registry, validator, planner, docs generator
and canvas read them; nothing mutates them.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagfusion.errors import NodeDefinitionError, Problem
from dagfusion.semver import Version, parse_version
from dagfusion.types import SocketType, TypeSpec, UnionType, type_name

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class _Required:
    """Sentinel for an input without a default."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of an input that must be connected or given a constant."""


@dataclass(frozen=True)
class InputSpec:
    """One input of a node.

    Attributes:
        name: Identifier, unique among the node's inputs.
        type: Socket type (object, union, or registered name).
        default: Value used when the workflow gives none; ``REQUIRED`` if none.
        min, max: Inclusive numeric bounds, checked for constants and at run time.
        exclusive_min, exclusive_max: Exclusive numeric bounds (``exclusive_min=0.0``: strictly
            positive), checked the same way.
        choices: Allowed values (checked for constants and at run time).
        optional: If true and no value is given, the function receives ``None``.
        description: One sentence for the docs and the canvas tooltip.
        ui: Widget hints for the canvas (``{"widget": "slider", "step": 0.5, "multiline": True}``).
        mutates: The node modifies this input in place. The executor then hands it a deep
            copy, so cached upstream outputs are never changed. Prefer returning new objects.
        link_only: The value must come from another node (models, tensors); constants refused.
    """

    name: str
    type: TypeSpec
    default: Any = REQUIRED
    min: float | None = None
    max: float | None = None
    exclusive_min: float | None = None
    exclusive_max: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    description: str = ""
    ui: Mapping[str, Any] = field(default_factory=dict)
    mutates: bool = False
    link_only: bool = False

    def __post_init__(self) -> None:
        for bound in ("min", "max", "exclusive_min", "exclusive_max"):
            value = getattr(self, bound)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise NodeDefinitionError(f"input {self.name!r}: {bound} must be a number, got {value!r}")

    @property
    def required(self) -> bool:
        """Whether the workflow must supply this input."""
        return self.default is REQUIRED and not self.optional

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    def bound_problem(self, value: Any) -> str | None:
        """Why ``value`` violates this input's bounds or choices, or ``None`` if it does not."""
        if self.choices is not None and value not in self.choices:
            return f"expected one of {list(self.choices)!r}, got {value!r}"
        bounded = any(b is not None for b in (self.min, self.max, self.exclusive_min, self.exclusive_max))
        if bounded and isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                return "expected a number, got NaN"
            if self.min is not None and value < self.min:
                return f"expected a value >= {self.min}, got {value!r}"
            if self.max is not None and value > self.max:
                return f"expected a value <= {self.max}, got {value!r}"
            if self.exclusive_min is not None and value <= self.exclusive_min:
                return f"expected a value > {self.exclusive_min}, got {value!r}"
            if self.exclusive_max is not None and value >= self.exclusive_max:
                return f"expected a value < {self.exclusive_max}, got {value!r}"
        return None


@dataclass(frozen=True)
class OutputSpec:
    """One output of a node: a name, a socket type and a description."""

    name: str
    type: TypeSpec
    description: str = ""

    @property
    def type_name(self) -> str:
        return type_name(self.type)


#: Upgrades a node's inputs from one major version to the next.
Migration = Callable[[dict[str, Any]], dict[str, Any]]

#: Example inputs for the node contract (:mod:`dagfusion.testing`): a mapping, or a callable
#: returning one (built lazily, so declaring a node imports no torch); a callable taking one
#: argument receives a scratch folder inside the allowed read folders.
Example = Mapping[str, Any] | Callable[..., Mapping[str, Any]]

#: A validation-time check of a node's constant inputs: receives ``{input: value}`` for every
#: input given as a constant or by default (linked inputs are absent) and returns the problems
#: it finds (:class:`~dagfusion.errors.Problem`; the validator fills in node and line).
NodeCheck = Callable[[Mapping[str, Any]], "Iterable[Problem]"]


@dataclass(frozen=True)
class NodeSpec:
    """A node type: its identity, interface and run function.

    Attributes:
        type_id: Namespaced id, ``package.Name`` (``dagfusion.sampling.Sample``).
        version: Semantic version ``MAJOR.MINOR.PATCH``; part of every cache key. Bump the
            major version when existing workflows would break, and add a migration.
        category: Palette group (``"sampling"``, ``"cache/deepcache"``).
        description: What the node does, first line used as summary.
        inputs, outputs: The interface, in display order.
        fn: ``fn(ctx, **inputs)`` returning the outputs (see the module docstring).
        pure: Same inputs give the same outputs and nothing else happens. Impure nodes
            (saving files, unseeded randomness, training that mutates state) are never cached
            and give their outputs a fresh cache key every run.
        persist: Pure and expensive (seeded training): its outputs are also written to the
            on-disk cache when every output type has a serializer.
        examples: Inputs (or callables making them) the node contract test runs the node with.
        migrations: ``{major: fn}`` upgrades inputs written for ``major`` to ``major + 1``.
        ui: Node-level hints for the canvas (colour, width, preview output).
        output_node: The node exists for its effects (saving, previews): always a target.
        check: Validation-time check of the constant inputs (relations between inputs that
            bounds cannot express); run by ``dagfusion validate``, the canvas and every run.
        former_ids: Type ids this node had before it was renamed or moved to another pack;
            workflow files naming one load as this node (with a warning), and are saved with
            the current id.
    """

    type_id: str
    version: str
    category: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    fn: Callable[..., Any] = field(compare=False, repr=False)
    pure: bool = True
    persist: bool = False
    examples: tuple[Example, ...] = ()
    migrations: Mapping[int, Migration] = field(default_factory=dict, compare=False, repr=False)
    ui: Mapping[str, Any] = field(default_factory=dict)
    output_node: bool = False
    check: NodeCheck | None = field(default=None, compare=False, repr=False)
    former_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not _TYPE_ID.match(self.type_id):
            problems.append(f"type id {self.type_id!r} must be namespaced, like 'mypack.Blur'")
        if parse_version(self.version) is None:
            problems.append(f"version {self.version!r} is not semantic (MAJOR.MINOR.PATCH)")
        for former in self.former_ids:
            if not _TYPE_ID.match(former) or former == self.type_id:
                problems.append(f"former type id {former!r} must be namespaced and differ from {self.type_id!r}")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            seen: set[str] = set()
            for spec in specs:
                if not _IDENT.match(spec.name):
                    problems.append(f"{kind} name {spec.name!r} is not an identifier")
                if spec.name in seen:
                    problems.append(f"{kind} {spec.name!r} is declared twice")
                seen.add(spec.name)
                if not isinstance(spec.type, (str, SocketType, UnionType)):
                    problems.append(f"{kind} {spec.name!r} has type {spec.type!r}, not a socket type")
        for spec in self.inputs:
            if spec.default is not REQUIRED:
                why = spec.bound_problem(spec.default)
                if why:
                    problems.append(f"default of input {spec.name!r}: {why}")
        if self.persist and not self.pure:
            problems.append("only pure nodes can persist their outputs")
        if problems:
            raise NodeDefinitionError(f"node {self.type_id!r}: " + "; ".join(problems))

    @property
    def parsed_version(self) -> Version:
        version = parse_version(self.version)
        assert version is not None  # checked in __post_init__
        return version

    @property
    def summary(self) -> str:
        """The first line of the description."""
        return self.description.strip().splitlines()[0] if self.description.strip() else ""

    def input(self, name: str) -> InputSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> OutputSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None

    def normalize_outputs(self, result: Any) -> dict[str, Any]:
        """Turn what ``fn`` returned into ``{output name: value}``.

        Raises :class:`TypeError` with a precise message when the shape is wrong.
        """
        names = [o.name for o in self.outputs]
        if isinstance(result, Mapping):
            got = set(result)
            if got != set(names):
                missing = sorted(set(names) - got)
                extra = sorted(got - set(names))
                parts = []
                if missing:
                    parts.append(f"missing {missing}")
                if extra:
                    parts.append(f"undeclared {extra}")
                raise TypeError(f"returned outputs do not match the declaration: {', '.join(parts)}")
            return dict(result)
        if len(names) == 0:
            if result is not None:
                raise TypeError(f"declares no outputs but returned {type(result).__name__}")
            return {}
        if len(names) == 1:
            return {names[0]: result}
        if isinstance(result, tuple) and len(result) == len(names):
            return dict(zip(names, result))
        raise TypeError(
            f"declares outputs {names}; return a mapping with those keys or a tuple of {len(names)} values"
        )


def Input(name: str, type: TypeSpec, default: Any = REQUIRED, **options: Any) -> InputSpec:  # noqa: N802
    """Shorthand for :class:`InputSpec` (``Input("steps", "INT", 20, min=1)``)."""
    if "choices" in options and options["choices"] is not None:
        options["choices"] = tuple(options["choices"])
    return InputSpec(name=name, type=type, default=default, **options)


def Output(name: str, type: TypeSpec, description: str = "") -> OutputSpec:  # noqa: N802
    """Shorthand for :class:`OutputSpec`."""
    return OutputSpec(name=name, type=type, description=description)


def node(
    type_id: str,
    *,
    version: str,
    category: str,
    inputs: Sequence[InputSpec] = (),
    outputs: Sequence[OutputSpec] = (),
    description: str | None = None,
    pure: bool = True,
    persist: bool = False,
    examples: Sequence[Example] = (),
    migrations: Mapping[int, Migration] | None = None,
    ui: Mapping[str, Any] | None = None,
    output_node: bool = False,
    check: NodeCheck | None = None,
    former_ids: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], NodeSpec]:
    """Declare a node from a function; the decorated name becomes its :class:`NodeSpec`.

    The function's signature must accept ``ctx`` first and every declared input by name
    (``**kwargs`` also works); this is checked here, so a typo fails at import, not mid-run.
    """

    def decorate(fn: Callable[..., Any]) -> NodeSpec:
        _check_signature(type_id, fn, [i.name for i in inputs])
        doc = description if description is not None else inspect.getdoc(fn) or ""
        return NodeSpec(
            type_id=type_id,
            version=version,
            category=category,
            description=doc,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            fn=fn,
            pure=pure,
            persist=persist,
            examples=tuple(examples),
            migrations=dict(migrations or {}),
            ui=dict(ui or {}),
            output_node=output_node,
            check=check,
            former_ids=tuple(former_ids),
        )

    return decorate


def _check_signature(type_id: str, fn: Callable[..., Any], input_names: list[str]) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without signatures: trust the author
        return
    values = list(params.values())
    if not values or values[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise NodeDefinitionError(f"node {type_id!r}: the run function must take the context first")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in values):
        return
    accepted = {p.name for p in values[1:] if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    missing = [n for n in input_names if n not in accepted]
    if missing:
        raise NodeDefinitionError(f"node {type_id!r}: the run function does not accept inputs {missing}")
    extra = [
        p.name
        for p in values[1:]
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in input_names
    ]
    if extra:
        raise NodeDefinitionError(f"node {type_id!r}: the run function requires undeclared parameters {extra}")

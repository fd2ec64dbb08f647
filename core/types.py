"""Socket types: what may flow along an edge, and what may connect to what.

A :class:`SocketType` is pure data: a name, its parent types, the Python classes its values
are instances of, and an optional serializer for on-disk caching. Types form an explicit
hierarchy that :class:`TypeSystem` answers questions about:

- ``ANY`` accepts every type and is accepted everywhere (values from an ``ANY`` output are
  checked against the receiving input when they arrive).
- A subtype is accepted where its parent is expected (``INT`` is declared a subtype of
  ``FLOAT``, which is the ``INT`` → ``FLOAT`` widening).
- A :class:`UnionType` input accepts any of its members; a union output fits an input only
  if every member does.

Node packs add their own types (``MODEL``, ``LATENT``, ``IMAGE`` …) through the
``register_types`` hook. Python classes may be given as strings (``"torch.Tensor"``) so that
declaring a type never imports a heavy library; they are resolved on first use, and a value
whose module was never imported cannot be an instance of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dagfusion import persist
from dagfusion.errors import NodeDefinitionError

#: A class, or the dotted path of one that is imported only when needed.
ClassRef = type | str


@dataclass(frozen=True)
class Serializer:
    """How values of a type are written to and read from disk (for persistent caching).

    ``save(value, path)`` writes one file at ``path``; ``load(path)`` returns an equal value.
    Formats must be safe to load (safetensors, JSON), never pickle.
    """

    save: Callable[[Any, str], None]
    load: Callable[[str], Any]


@dataclass(frozen=True)
class SocketType:
    """A named socket type.

    Attributes:
        name: Upper-case identifier, unique in a registry (``"LATENT"``).
        parents: Names of the types this one is a subtype of.
        python_types: Classes (or dotted paths) a value must be an instance of; empty means
            no runtime check.
        description: One sentence shown in the palette and the docs.
        color: CSS colour for sockets on the canvas.
        serializer: Optional on-disk form for persistent caching.
        exclude: Classes that must *not* match even though they are instances of
            ``python_types`` (``bool`` is an ``int`` in Python, but not an ``INT`` here).
    """

    name: str
    parents: tuple[str, ...] = ()
    python_types: tuple[ClassRef, ...] = ()
    description: str = ""
    color: str = "#9e9e9e"
    serializer: Serializer | None = field(default=None, compare=False)
    exclude: tuple[ClassRef, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or not self.name.isupper():
            raise NodeDefinitionError(
                f"socket type name {self.name!r} must be upper-case letters, digits and '_'"
            )

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class UnionType:
    """Any one of several socket types (``union(IMAGE, LATENT)``)."""

    members: tuple[str, ...]

    @property
    def name(self) -> str:
        return " | ".join(self.members)

    def __str__(self) -> str:
        return self.name


TypeSpec = SocketType | UnionType | str
"""What a declaration may name as a type: a type object, a union, or a registered name."""


def union(*types: TypeSpec) -> UnionType:
    """The union of the given types (nested unions are flattened, duplicates dropped)."""
    members: list[str] = []
    for t in types:
        names = t.members if isinstance(t, UnionType) else (type_name(t),)
        for n in names:
            if n not in members:
                members.append(n)
    if len(members) < 2:
        raise NodeDefinitionError("a union needs at least two distinct member types")
    return UnionType(tuple(members))


def type_name(t: TypeSpec) -> str:
    """The registry name of a type reference."""
    if isinstance(t, str):
        return t
    return t.name


def _resolve_class(ref: ClassRef) -> type | None:
    """The class a reference names, or ``None`` if its module has not been imported.

    A value can only be an instance of a class whose module is loaded, so an unimported
    module means "no match" and resolving never triggers a heavy import.
    """
    if isinstance(ref, type):
        return ref
    module_name, _, attr = ref.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        return None
    obj: Any = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    return obj if isinstance(obj, type) else None


def _instance_of(value: Any, refs: tuple[ClassRef, ...]) -> bool:
    for ref in refs:
        cls = _resolve_class(ref)
        if cls is not None and isinstance(value, cls):
            return True
    return False


class TypeSystem:
    """The registered socket types and the rules connecting them."""

    def __init__(self, types: Iterable[SocketType] = ()) -> None:
        self._types: dict[str, SocketType] = {}
        self._ancestors: dict[str, frozenset[str]] = {}
        for t in types:
            self.add(t)

    def add(self, socket_type: SocketType) -> None:
        """Register a type; its parents must already be registered."""
        for parent in socket_type.parents:
            if parent not in self._types:
                raise NodeDefinitionError(
                    f"socket type {socket_type.name} names unknown parent type {parent}"
                )
        self._types[socket_type.name] = socket_type
        ancestors = {socket_type.name}
        for parent in socket_type.parents:
            ancestors |= self._ancestors[parent]
        self._ancestors[socket_type.name] = frozenset(ancestors)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self):
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def get(self, name: str) -> SocketType:
        return self._types[name]

    def unknown_names(self, t: TypeSpec) -> list[str]:
        """Names in ``t`` that are not registered."""
        names = t.members if isinstance(t, UnionType) else (type_name(t),)
        return [n for n in names if n not in self._types]

    def accepts(self, expected: TypeSpec, got: TypeSpec) -> bool:
        """Whether an output of type ``got`` may connect to an input of type ``expected``."""
        if isinstance(got, UnionType):
            return all(self.accepts(expected, m) for m in got.members)
        if isinstance(expected, UnionType):
            return any(self.accepts(m, got) for m in expected.members)
        exp, src = type_name(expected), type_name(got)
        if exp == ANY.name or src == ANY.name:
            return True
        ancestors = self._ancestors.get(src)
        return ancestors is not None and exp in ancestors

    def _checks(self, name: str) -> tuple[tuple[ClassRef, ...], tuple[ClassRef, ...]]:
        """``(python_types, exclude)`` of a type: its own, or else inherited from its parents."""
        socket_type = self._types[name]
        if socket_type.python_types:
            return socket_type.python_types, socket_type.exclude
        classes: list[ClassRef] = []
        excluded: list[ClassRef] = []
        for parent in socket_type.parents:
            parent_classes, parent_excluded = self._checks(parent)
            classes += parent_classes
            excluded += parent_excluded
        return tuple(classes), tuple(excluded)

    def value_matches(self, expected: TypeSpec, value: Any) -> bool:
        """Whether a Python value is a valid value of ``expected``.

        A type without ``python_types`` checks its parents' classes; a value of a subtype with
        classes of its own is a value of the parent too (``3`` is a ``FLOAT`` because ``INT``).
        """
        if isinstance(expected, UnionType):
            return any(self.value_matches(m, value) for m in expected.members)
        name = type_name(expected)
        if name == ANY.name:
            return True
        if name not in self._types:
            return False
        classes, excluded = self._checks(name)
        if not classes:
            return True
        if _instance_of(value, classes) and not _instance_of(value, excluded):
            return True
        return any(
            self.value_matches(child.name, value)
            for child in self._types.values()
            if name in child.parents and child.python_types
        )

    def describe_value(self, value: Any) -> str:
        """A short description of a value's type for error messages."""
        for t in self._types.values():
            if t.name != ANY.name and t.python_types and self.value_matches(t.name, value):
                return f"{t.name} ({type(value).__name__})"
        return type(value).__name__


_JSON = Serializer(persist.save_json, persist.load_json)
_TENSOR = Serializer(persist.save_tensor, persist.load_tensor)

# --- the core types every registry has -------------------------------------------------

ANY = SocketType("ANY", description="Any value; checked when it arrives.", color="#bdbdbd")
FLOAT = SocketType(
    "FLOAT",
    python_types=(float,),
    exclude=(bool,),
    description="A real number.",
    color="#90caf9",
    serializer=_JSON,
)
INT = SocketType(
    "INT",
    parents=("FLOAT",),
    python_types=(int,),
    exclude=(bool,),
    description="An integer; accepted where a FLOAT is expected.",
    color="#64b5f6",
    serializer=_JSON,
)
SEED = SocketType(
    "SEED",
    parents=("INT",),
    python_types=(int,),
    exclude=(bool,),
    description="A random seed (an INT recorded in the run manifest).",
    color="#42a5f5",
    serializer=_JSON,
)
BOOLEAN = SocketType("BOOLEAN", python_types=(bool,), description="True or false.", color="#ffcc80", serializer=_JSON)
STRING = SocketType("STRING", python_types=(str,), description="Text.", color="#a5d6a7", serializer=_JSON)
PATH = SocketType(
    "PATH",
    python_types=(str,),
    description="A file or folder path; read only under the allowed folders and fingerprinted by content.",
    color="#c5e1a5",
)
LIST = SocketType("LIST", python_types=(list, tuple), description="A list of values.", color="#ce93d8")
DICT = SocketType("DICT", python_types=(dict,), description="A mapping of names to values.", color="#b39ddb")
TENSOR = SocketType(
    "TENSOR",
    python_types=("torch.Tensor",),
    description="A torch tensor.",
    color="#ef9a9a",
    serializer=_TENSOR,
)
MODULE = SocketType(
    "MODULE",
    python_types=("torch.nn.Module",),
    description="A torch module (weights and code).",
    color="#f48fb1",
)

CORE_TYPES: tuple[SocketType, ...] = (ANY, FLOAT, INT, SEED, BOOLEAN, STRING, PATH, LIST, DICT, TENSOR, MODULE)
"""Registered in every registry before any plugin's types."""

"""Safe, bounded YAML reading that remembers where every key was written.

Only ``yaml.SafeLoader`` is used. A document is refused, with a
:class:`~dagfusion.errors.ValidationError`, when it is larger than :data:`MAX_BYTES`, nests
deeper than :data:`MAX_DEPTH`, or expands (through aliases) to more than :data:`MAX_VALUES`
values — so hostile files fail in bounded time and memory. Keys must be strings and unique.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from dagfusion.errors import Problem, ValidationError

MAX_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_VALUES = 2_000_000

Path = tuple[str | int, ...]
# libyaml's parser when available (several times faster); the constructor is always the safe one.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CONTAINER_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


@dataclass
class SourceMap:
    """1-based line of each key or list item, by its path in the document."""

    lines: dict[Path, int] = field(default_factory=dict)

    def line(self, *path: str | int) -> int | None:
        """The line of ``path``, or of its nearest recorded ancestor."""
        p: Path = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)


class _Budget:
    def __init__(self) -> None:
        self.values = 0
        self.problems: list[Problem] = []


def load_yaml(text: str | bytes, source: str | None = None) -> tuple[Any, SourceMap, list[Problem]]:
    """Parse one YAML document safely; return the data, its :class:`SourceMap` and problems.

    Problems that still leave a usable document (a key written twice: the first is kept) are
    returned; anything else raises :class:`ValidationError` (``yaml-syntax``, ``yaml-too-large``).
    """
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise _too_large(f"the file is {len(text)} bytes; the limit is {MAX_BYTES}", source)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError([Problem("yaml-syntax", f"the file is not UTF-8 text: {exc}")], source) from None
    text = str(text)  # the C parser accepts only exact str (not, e.g., PIL's iTXt subclass)
    if len(text) > MAX_BYTES:
        raise _too_large(f"the document has {len(text)} characters; the limit is {MAX_BYTES}", source)
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        message = " ".join(str(x) for x in (exc.context, exc.problem) if x) or str(exc)
        raise ValidationError([Problem("yaml-syntax", f"YAML syntax error: {message}", line=line)], source) from None
    except yaml.YAMLError as exc:
        raise ValidationError([Problem("yaml-syntax", f"YAML error: {exc}")], source) from None
    except RecursionError:
        raise _too_large(f"the document nests too deeply (limit {MAX_DEPTH} levels)", source) from None
    source_map = SourceMap()
    if root is None:
        return None, source_map, []
    constructor = yaml.SafeLoader("")
    budget = _Budget()
    try:
        data = _build(root, (), source_map, constructor, budget, 0, source)
    except RecursionError:
        raise _too_large(f"the document nests too deeply (limit {MAX_DEPTH} levels)", source) from None
    finally:
        constructor.dispose()
    return data, source_map, budget.problems


def _too_large(message: str, source: str | None) -> ValidationError:
    return ValidationError([Problem("yaml-too-large", message)], source)


def _build(
    node: yaml.Node,
    path: Path,
    smap: SourceMap,
    constructor: yaml.SafeLoader,
    budget: _Budget,
    depth: int,
    source: str | None,
) -> Any:
    budget.values += 1
    if budget.values > MAX_VALUES:
        raise _too_large(f"the document expands to more than {MAX_VALUES} values (aliases?)", source)
    if depth > MAX_DEPTH:
        raise _too_large(f"the document nests deeper than {MAX_DEPTH} levels", source)
    line = node.start_mark.line + 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _CONTAINER_TAGS:
        raise ValidationError([Problem("yaml-syntax", f"unsupported YAML tag {node.tag!r}", line=line)], source)
    if isinstance(node, yaml.MappingNode):
        try:
            constructor.flatten_mapping(node)  # resolves '<<' merge keys
        except yaml.YAMLError as exc:
            raise ValidationError([Problem("yaml-syntax", f"YAML error: {exc}", line=line)], source) from None
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ValidationError(
                    [Problem("yaml-syntax", "keys must be plain text, not lists or mappings", line=key_node.start_mark.line + 1)],
                    source,
                )
            key = _scalar(key_node, constructor, source)
            if not isinstance(key, str):
                key = str(key) if isinstance(key, (int, float, bool)) or key is None else None
                if key is None:
                    raise ValidationError(
                        [Problem("yaml-syntax", "keys must be text", line=key_node.start_mark.line + 1)], source
                    )
            key_line = key_node.start_mark.line + 1
            if key in out:
                first = smap.lines.get(path + (key,))
                budget.problems.append(
                    Problem(
                        "duplicate-id" if path == ("nodes",) else "duplicate-key",
                        f"{'node id' if path == ('nodes',) else 'key'} {key!r} appears twice (first at line {first})",
                        node=key if path == ("nodes",) else None,
                        line=key_line,
                    )
                )
                continue
            smap.lines[path + (key,)] = key_line
            out[key] = _build(value_node, path + (key,), smap, constructor, budget, depth + 1, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            smap.lines[path + (index,)] = item.start_mark.line + 1
            items.append(_build(item, path + (index,), smap, constructor, budget, depth + 1, source))
        return items
    return _scalar(node, constructor, source)


def _scalar(node: yaml.Node, constructor: yaml.SafeLoader, source: str | None) -> Any:
    try:
        return constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise ValidationError(
            [Problem("yaml-syntax", f"cannot read value {node.value!r}: {exc}", line=node.start_mark.line + 1)],
            source,
        ) from None

"""Safe, bounded YAML reading that remembers where every key was written.

Only ``yaml.SafeLoader`` is used. A document is refused, with a
:class:`~dagfusion.errors.ValidationError`, when it is larger than :data:`MAX_BYTES`, nests
deeper than :data:`MAX_DEPTH`, or expands (through aliases) to more than :data:`MAX_VALUES`
values — so hostile files fail in bounded time and memory. Keys must be strings and unique.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
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


class SourceMap:
    """1-based line of each key or list item, by its path in the document.

    Made from the document's ``text``, the lines are found on first use (only problems need
    them, so reading a valid file never pays for them); or given as ``lines``.
    """

    __slots__ = ("_lines", "_text")

    def __init__(self, lines: dict[Path, int] | None = None, *, text: str | None = None) -> None:
        self._lines = lines if lines is not None or text is None else None
        if self._lines is None and text is None:
            self._lines = {}
        self._text = text if self._lines is None else None

    @property
    def lines(self) -> dict[Path, int]:
        """``{path: line}``; computed from the text when first asked for."""
        if self._lines is None:
            self._lines = _lines_of(self._text or "")
            self._text = None
        return self._lines

    def __repr__(self) -> str:
        return f"SourceMap({len(self.lines)} lines)"

    def line(self, *path: str | int) -> int | None:
        """The line of ``path``, or of its nearest recorded ancestor."""
        lines = self.lines
        p: Path = tuple(path)
        while p:
            if p in lines:
                return lines[p]
            p = p[:-1]
        return lines.get((), None)


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
    with paused_gc():
        try:
            try:
                data, problems = _load_streamed(text, source, None)
                return data, SourceMap(text=text), problems
            except _NeedLines:
                lines: dict[Path, int] = {}
                data, problems = _load_streamed(text, source, lines)
                return data, SourceMap(lines), problems
        except _Unusual:
            return _load_composed(text, source)


def _lines_of(text: str) -> dict[Path, int]:
    """The line of every key and list item of a document :func:`load_yaml` accepted."""
    with paused_gc():
        lines: dict[Path, int] = {}
        try:
            _load_streamed(text, None, lines)
        except _Unusual:
            return _load_composed(text, None)[1].lines
        return lines


def _load_composed(text: str, source: str | None) -> tuple[Any, SourceMap, list[Problem]]:
    """The exact path: compose PyYAML's node tree, then build values (anchors, tags, merges)."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from None
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


def _syntax_error(exc: yaml.YAMLError, source: str | None) -> ValidationError:
    if isinstance(exc, yaml.MarkedYAMLError):
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        message = " ".join(str(x) for x in (exc.context, exc.problem) if x) or str(exc)
        return ValidationError([Problem("yaml-syntax", f"YAML syntax error: {message}", line=line)], source)
    return ValidationError([Problem("yaml-syntax", f"YAML error: {exc}")], source)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Suspend the cyclic garbage collector for the block (restored after, if it was on).

    Parsing and validating allocate many objects that all survive; without the pause the
    collector rescans the growing heap again and again, which makes large files cost more
    than linear time. Nothing built in such a block forms reference cycles that need it.
    """
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Unusual(Exception):
    """The document uses anchors, aliases, explicit tags or merge keys: read it the exact way."""


_MISSING: Any = object()


def _load_streamed(text: str, source: str | None, lines: dict[Path, int] | None) -> tuple[Any, list[Problem]]:
    """One pass over libyaml's events that builds the values (and, given ``lines``, records the
    line of every key and list item into it).

    Handles plain documents (mappings, sequences, untagged scalars); raises :class:`_Unusual`
    for anything else, which :func:`_load_composed` reads exactly as PyYAML does, and
    :class:`_NeedLines` when a problem must name a line that was not recorded.
    """
    problems: list[Problem] = []
    scalars = _PlainScalars(source)
    memo = scalars.memo
    loader = _Loader(text)
    scalar_event, mapping_start, sequence_start = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
    ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    # Each open container: [container, depth, is_mapping, pending key or _MISSING, path].
    stack: list[list[Any]] = []
    frame: list[Any] | None = None
    root: Any = None
    values = 0
    try:
        get = loader.get_event
        get()  # stream start
        event = get()
        if type(event) is yaml.StreamEndEvent:
            return None, []
        while True:
            event = get()
            kind = type(event)
            if kind in ends:
                stack.pop()
                frame = stack[-1] if stack else None
                continue
            if kind is yaml.DocumentEndEvent:
                break
            if kind is yaml.AliasEvent or event.anchor is not None or event.tag is not None:
                raise _Unusual
            if kind is scalar_event:
                value = event.value
                if event.implicit[0]:
                    resolved = memo.get(value, _MISSING)
                    if resolved is _MISSING:
                        if value == "<<":
                            raise _Unusual  # a merge key
                        resolved = scalars.resolve(value, event.start_mark)
                    value = resolved
                is_container = False
            elif kind is mapping_start:
                value, is_container = {}, True
            elif kind is sequence_start:
                value, is_container = [], True
            else:  # pragma: no cover - no other event occurs inside a document
                raise _Unusual
            if frame is None:
                root, depth, path = value, 0, ()
            else:
                container = frame[0]
                depth = frame[1] + 1
                if frame[2]:
                    key = frame[3]
                    if key is _MISSING:
                        key = _key(value, is_container, event, source)
                        if key in container:
                            if lines is None:
                                raise _NeedLines
                            _duplicate(problems, frame[4], key, lines, event)
                            _skip_value(get)
                        else:
                            frame[3] = key
                            if lines is not None:
                                lines[frame[4] + (key,)] = event.start_mark.line + 1
                        continue
                    frame[3] = _MISSING
                    container[key] = value
                    if lines is not None:
                        path = frame[4] + (key,)
                else:
                    if lines is not None:
                        path = frame[4] + (len(container),)
                        lines[path] = event.start_mark.line + 1
                    container.append(value)
            values += 1
            if values > MAX_VALUES:
                raise _too_large(f"the document expands to more than {MAX_VALUES} values (aliases?)", source)
            if depth > MAX_DEPTH:
                raise _too_large(f"the document nests deeper than {MAX_DEPTH} levels", source)
            if is_container:
                frame = [value, depth, kind is mapping_start, _MISSING, path if lines is not None else None]
                stack.append(frame)
        event = get()
        if type(event) is not yaml.StreamEndEvent:
            raise _syntax_error(
                yaml.composer.ComposerError(
                    "expected a single document in the stream", None, "but found another document", event.start_mark
                ),
                source,
            )
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from None
    finally:
        loader.dispose()
        scalars.dispose()
    return root, problems


class _NeedLines(Exception):
    """A problem needs the line of an earlier key: read again, recording lines."""


def _duplicate(problems: list[Problem], parent: Path, key: str, lines: dict[Path, int], event: Any) -> None:
    nodes = parent == ("nodes",)
    first = lines.get(parent + (key,))
    problems.append(
        Problem(
            "duplicate-id" if nodes else "duplicate-key",
            f"{'node id' if nodes else 'key'} {key!r} appears twice (first at line {first})",
            node=key if nodes else None,
            line=event.start_mark.line + 1,
        )
    )


def _key(value: Any, is_container: bool, event: Any, source: str | None) -> str:
    """A mapping key as text (numbers, booleans and null written as keys become their text)."""
    line = event.start_mark.line + 1
    if is_container:
        raise ValidationError([Problem("yaml-syntax", "keys must be plain text, not lists or mappings", line=line)], source)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    raise ValidationError([Problem("yaml-syntax", "keys must be text", line=line)], source)


def _skip_value(get: Any) -> None:
    """Consume the events of one value (the value of a duplicate key, which is dropped)."""
    depth = 0
    while True:
        kind = type(get())
        if kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            depth += 1
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            depth -= 1
        elif kind is yaml.AliasEvent or kind is yaml.ScalarEvent:
            pass
        else:  # pragma: no cover - a value never spans a document boundary
            raise _Unusual
        if depth == 0:
            return


class _PlainScalars:
    """Plain (unquoted) scalars resolved as ``yaml.SafeLoader`` resolves them, each text once."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.memo: dict[str, Any] = {}
        self.resolvers = _Loader.yaml_implicit_resolvers
        self.wildcard = self.resolvers.get(None, [])
        self.constructor: yaml.SafeLoader | None = None

    def resolve(self, text: str, mark: yaml.Mark) -> Any:
        value = self.memo.get(text, _MISSING)
        if value is not _MISSING:
            return value
        for tag, regexp in (*self.resolvers.get(text[:1], ()), *self.wildcard):
            if regexp.match(text):
                break
        else:
            self.memo[text] = text
            return text
        if self.constructor is None:
            self.constructor = yaml.SafeLoader("")
        value = _scalar(yaml.ScalarNode(tag, text, mark, mark), self.constructor, self.source)
        self.memo[text] = value  # every plain scalar resolves to an immutable value
        return value

    def dispose(self) -> None:
        if self.constructor is not None:
            self.constructor.dispose()


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

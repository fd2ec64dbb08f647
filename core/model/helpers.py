"""Small helpers every accelerator needs: the module behind ``torch.compile``, and parameters
swapped for the duration of a ``with`` block and always put back.

Importing this module does not import torch; the functions import it when they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


def unwrap_compiled(module: Any) -> Any:
    """The module a ``torch.compile`` wrapper runs (its ``_orig_mod``), else ``module`` itself.

    Use it before reading a module's class, config or submodules: a compiled denoiser is an
    ``OptimizedModule`` whose own attributes are not the model's.
    """
    return getattr(module, "_orig_mod", module)


@dataclass
class ParameterPlaces:
    """One distinct parameter of a module and every ``(owner module, attribute)`` that holds it
    (more than one when weights are tied).

    Attributes:
        value: The ``Parameter`` object.
        places: ``[(owner, attribute name)]``; ``owner._parameters[attribute] is value`` for each.
    """

    value: Any
    places: list[tuple[Any, str]] = field(default_factory=list)


def parameter_places(module: Any) -> dict[str, ParameterPlaces]:
    """Every distinct parameter of ``module`` (looking through ``torch.compile``) by its first name,
    as ``named_parameters()`` names it, with all the places that hold it."""
    found: dict[int, tuple[str, ParameterPlaces]] = {}
    for prefix, owner in unwrap_compiled(module).named_modules(remove_duplicate=False):
        for attr, value in owner._parameters.items():
            if value is None:
                continue
            entry = found.get(id(value))
            if entry is None:
                entry = found[id(value)] = (f"{prefix}.{attr}" if prefix else attr, ParameterPlaces(value))
            entry[1].places.append((owner, attr))
    return {name: param for name, param in found.values()}


@contextlib.contextmanager
def swap_parameters(
    module: Any,
    values: Mapping[str, Any],
    *,
    requires_grad: bool = False,
    places: Mapping[str, ParameterPlaces] | None = None,
) -> Iterator[Any]:
    """Use ``values`` as ``module``'s parameters inside the ``with`` block; yields ``module``.

    Each name (as ``named_parameters()`` gives it) is replaced in every place that holds that
    parameter (tied weights included). A tensor is wrapped in a new ``Parameter``
    (``requires_grad`` as given); a ``Parameter`` is installed as it is. On exit — also after an
    error inside the block — the original ``Parameter`` objects are put back, so the module is
    the same objects with the same values as before: the originals are never written.

    Passing a parameter's own original value "pins" it: whatever code inside the block puts in
    its place (forward pre-hooks swapping weights per call, say), the original is back on exit.

    :param places: :func:`parameter_places` of ``module`` when the caller has it already.
    :raises KeyError: ``module`` has no parameter of one of the names (nothing is swapped).
    :raises ValueError: a value's shape differs from the parameter's (nothing is swapped).
    """
    import torch

    places = parameter_places(module) if places is None else places
    missing = [name for name in values if name not in places]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KeyError(f"the module has no parameter {missing[0]!r}{more}")
    for name, value in values.items():
        if tuple(value.shape) != tuple(places[name].value.shape):
            raise ValueError(
                f"cannot swap parameter {name!r}: it has shape {tuple(places[name].value.shape)}, "
                f"the new value {tuple(value.shape)}"
            )
    saved: list[tuple[Any, str, Any]] = []
    try:
        for name, value in values.items():
            if not isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=requires_grad)
            for owner, attr in places[name].places:
                saved.append((owner, attr, owner._parameters[attr]))
                owner._parameters[attr] = value
        yield module
    finally:
        for owner, attr, original in reversed(saved):
            owner._parameters[attr] = original

"""Which parameters a training run changes.

Three choices:

- ``"all"``: every floating-point parameter of the denoiser.
- ``"match"``: the denoiser's parameters whose name — or the name of a module containing
  them — matches one of the glob patterns (``fnmatch``; comma- or space-separated), e.g.
  ``"*attn2*"`` or ``"up_blocks.1.*, conv_out"``.
- ``"patches"``: parameters owned by the model's patches (adapters, gates). A patch takes part
  by defining ``trainable_parameters()`` returning ``{name: torch.nn.Parameter}`` (a patch that
  is itself a ``torch.nn.Module`` offers its ``named_parameters()``). The denoiser stays frozen.
  Trainable patches on the text-encoder bundle (a textual-inversion embedding being learnt) train
  with this choice too; the loop passes their parameters as ``extra``.

Every other parameter is frozen (``requires_grad = False``). Names are what checkpoints store:
the denoiser's own parameter names, ``@patch<i>.<name>`` for the i-th patch and ``@clip<i>.<name>``
for the i-th patch of the text-encoder bundle (``@`` never occurs in torch parameter names).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TRAINABLE_CHOICES = ("all", "match", "patches")
PATCH_PREFIX = "@patch"


def patterns(text: str) -> list[str]:
    """The glob patterns in ``text`` (separated by commas and/or whitespace)."""
    return [p for p in re.split(r"[,\s]+", text.strip()) if p]


def matches(name: str, globs: Sequence[str]) -> bool:
    """Whether parameter ``name`` or one of its enclosing module names matches a pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes for glob in globs)


def patch_name(index: int, name: str) -> str:
    """The checkpoint name of parameter ``name`` of the ``index``-th patch."""
    return f"{PATCH_PREFIX}{index}.{name}"


def patch_parameters(patch: Any) -> dict[str, Any] | None:
    """A patch's trainable parameters, or ``None`` if it has none to offer."""
    import torch

    offer = getattr(patch, "trainable_parameters", None)
    if callable(offer):
        return dict(offer())
    if isinstance(patch, torch.nn.Module):
        return dict(patch.named_parameters())
    return None


def select(
    module: Any, patches: Sequence[Any], trainable: str, match: str = "", extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Freeze everything, then enable and return ``{name: parameter}`` of what trains.

    ``extra``: already-named parameters of other trainable patches (the text encoder's), chosen
    with ``"patches"`` only.

    :raises ValueError: an unknown choice, or a choice that selects nothing (the message lists
        what could have been chosen).
    """
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"expected trainable in {list(TRAINABLE_CHOICES)}, got {trainable!r}")
    own = [(n, p) for n, p in module.named_parameters() if p.is_floating_point()]
    offered = [(i, patch_parameters(patch)) for i, patch in enumerate(patches)]
    for _, p in module.named_parameters():
        p.requires_grad_(False)
    for _, params in offered:
        for p in (params or {}).values():
            p.requires_grad_(False)
    extra = dict(extra or {})
    for p in extra.values():
        p.requires_grad_(False)

    if trainable == "all":
        chosen = dict(own)
    elif trainable == "match":
        globs = patterns(match)
        if not globs:
            raise ValueError("trainable is 'match' but no pattern was given; set match to globs like '*attn2*, conv_out'")
        chosen = {n: p for n, p in own if matches(n, globs)}
        if not chosen:
            raise ValueError(
                f"no parameter matches {globs}; module names look like {_sample_names(module.named_modules())}"
            )
    else:
        chosen = {}
        for i, params in offered:
            for name, p in (params or {}).items():
                chosen[patch_name(i, name)] = p
        chosen.update(extra)
        if not chosen:
            kinds = [type(p).__name__ for p in patches] or ["none"]
            raise ValueError(
                f"trainable is 'patches' but the model's patches ({', '.join(kinds)}) offer no parameters; "
                "a trainable patch defines trainable_parameters() -> {name: Parameter}"
            )
    for p in chosen.values():
        if not p.is_floating_point():
            raise ValueError("only floating-point parameters can train")
        p.requires_grad_(True)
    return chosen


def _sample_names(named_modules: Iterable[tuple[str, Any]], limit: int = 8) -> list[str]:
    names = [n for n, _ in named_modules if n and n.count(".") <= 1]
    return names[:limit]

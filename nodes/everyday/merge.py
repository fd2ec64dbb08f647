"""Model merging: ``dagfusion.models.Merge``.

Two merges of denoisers with the same layout (every parameter name and shape equal):

- ``weighted_sum``: ``(1 - alpha) * A + alpha * B`` (``alpha = 0`` is A, ``alpha = 1`` is B, exactly);
- ``add_difference``: ``A + alpha * (B - C)``, computed as ``(A - alpha * C) + alpha * B`` (with
  ``C = A`` and ``alpha = 1`` it is B, exactly): adds what fine-tuning C into B changed to A.

The result is A's handle with a :class:`MergePatch`: while the model runs, every parameter is
replaced by a private merged copy (:func:`~dagfusion.model.swap_parameters`) and the originals
are put back on exit, so A's, B's and C's shared weights are never written. The merged copies are
computed (in float32, cast to A's dtype, on A's device) on first use and kept in the patch; a
parameter of A that changed since (another object, an in-place update, another device) is merged
again. The patch's key is the mode, ``alpha`` and B's (and C's) fingerprints; A's identity is in
the handle's own fingerprint.

B and C are read without their patches, so patched B or C handles are refused. A merged model
carries a patch, which a diffusers folder cannot hold: bake it first (``dagfusion.models.Bake``,
:mod:`~dagfusion.nodes.everyday.bake`), then export the baked model.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion import FLOAT, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.model import (
    ModelHandle,
    ModelPatch,
    parameter_places,
    swap_parameters,
    unwrap_compiled,
)
from dagfusion.nodes.diffusion.types import MODEL

MODES = ("weighted_sum", "add_difference")
"""Merge modes of ``dagfusion.models.Merge``."""


def layout(module: Any) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of ``module`` (looking through ``torch.compile``; tied weights once)."""
    return {name: tuple(place.value.shape) for name, place in parameter_places(unwrap_compiled(module)).items()}


def layout_mismatches(reference: Mapping[str, tuple[int, ...]], other: Mapping[str, tuple[int, ...]]) -> str:
    """How ``other``'s layout differs from ``reference``'s, or ``""`` if they match: counts of keys
    missing from ``other``, keys only ``other`` has and shape differences, each with its first names."""

    def first(names: list[str], show: Any = repr) -> str:
        listed = ", ".join(show(n) for n in names[:3])
        return listed + (f" … (+{len(names) - 3} more)" if len(names) > 3 else "")

    missing = [n for n in reference if n not in other]
    extra = [n for n in other if n not in reference]
    shapes = [n for n in reference if n in other and tuple(reference[n]) != tuple(other[n])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {first(missing)}")
    if extra:
        parts.append(f"{len(extra)} extra key(s): {first(extra)}")
    if shapes:
        parts.append(f"{len(shapes)} shape difference(s): "
                     f"{first(shapes, lambda n: f'{n!r} {tuple(other[n])} instead of {tuple(reference[n])}')}")
    return "; ".join(parts)


class MergePatch(ModelPatch):
    """Swaps in merged weights of the module it is applied to (A) and other models' weights while
    applied; A, B and C are never written.

    :param b: The second model's handle (unpatched).
    :param alpha: The merge factor.
    :param mode: ``"weighted_sum"`` or ``"add_difference"``.
    :param c: The third model's handle (unpatched), for ``add_difference``.
    """

    def __init__(self, b: ModelHandle, alpha: float, mode: str = "weighted_sum", c: ModelHandle | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"expected a merge mode in {MODES}, got {mode!r}")
        if (mode == "add_difference") != (c is not None):
            raise ValueError("add_difference needs a third model c; weighted_sum takes none")
        self.b, self.c = b, c
        self.alpha = float(alpha)
        self.mode = mode
        others = [b.__dagfusion_fingerprint__()] + ([c.__dagfusion_fingerprint__()] if c is not None else [])
        self.key = f"dagfusion.merge:{mode}|alpha={self.alpha!r}|" + "|".join(others)
        # name -> (weakref to the A parameter merged from, its version, device, dtype, merged tensor)
        self._merged: dict[str, tuple[Any, int, Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def merge(self, a: Any, b: Any, c: Any | None) -> Any:
        """The merged value of one parameter (float32 arithmetic, in ``a``'s dtype and device)."""
        a32 = a.detach().float()
        b32 = b.detach().to(device=a.device, dtype=a32.dtype)
        if self.mode == "weighted_sum":
            out = (1.0 - self.alpha) * a32 + self.alpha * b32
        else:
            c32 = c.detach().to(device=a.device, dtype=a32.dtype)
            out = (a32 - self.alpha * c32) + self.alpha * b32
        return out.to(a.dtype)

    def _values(self, places: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        others = [parameter_places(unwrap_compiled(self.b.denoiser))]
        if self.c is not None:
            others.append(parameter_places(unwrap_compiled(self.c.denoiser)))
        for which, other in zip(("b", "c"), others):
            problems = layout_mismatches({n: tuple(p.value.shape) for n, p in places.items()},
                                         {n: tuple(p.value.shape) for n, p in other.items()})
            if problems:
                raise ValueError(f"model merge: model {which} does not have the layout of the merged module: {problems}")
        values = {}
        with self._lock, torch.no_grad():
            for name, place in places.items():
                a = place.value
                entry = self._merged.get(name)
                if entry is None or entry[0]() is not a or entry[1:4] != (a._version, a.device, a.dtype):
                    merged = self.merge(a, others[0][name].value, others[1][name].value if self.c is not None else None)
                    entry = (weakref.ref(a), a._version, a.device, a.dtype, merged)
                    self._merged[name] = entry
                values[name] = entry[4]
        return values

    @contextlib.contextmanager
    def _swapped(self, module: Any) -> Iterator[Any]:
        places = parameter_places(module)
        with swap_parameters(module, self._values(places), places=places):
            yield module

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        return self._swapped(module)

    def __repr__(self) -> str:
        return f"MergePatch({self.mode}, alpha={self.alpha})"


def merged(a: ModelHandle, b: ModelHandle, alpha: float, mode: str = "weighted_sum", c: ModelHandle | None = None) -> ModelHandle:
    """``a`` with a :class:`MergePatch` of ``b`` (and ``c``), after checking every layout.

    :raises NodeInputError: on ``b`` or ``c``: a patched handle, or a layout unlike ``a``'s (the
        first mismatches, with counts); on ``c``: missing for ``add_difference``.
    """
    if mode not in MODES:
        raise NodeInputError("mode", f"expected one of {list(MODES)}, got {mode!r}")
    if mode == "add_difference" and c is None:
        raise NodeInputError("c", "add_difference merges A + alpha * (B - C): connect the model C that B was fine-tuned from")
    reference = layout(a.denoiser)
    for name, handle in (("b", b), ("c", c if mode == "add_difference" else None)):
        if handle is None:
            continue
        if not isinstance(handle, ModelHandle):
            raise NodeInputError(name, f"expected a MODEL, got {type(handle).__name__}")
        if handle.patches:
            raise NodeInputError(
                name, f"the model carries patches ({handle._patch_names()}), which a merge cannot read; merge the unpatched model"
            )
        problems = layout_mismatches(reference, layout(handle.denoiser))
        if problems:
            raise NodeInputError(
                name, f"expected a denoiser with model A's layout ({len(reference)} parameters), got one with {problems}"
            )
    return a.with_patch(MergePatch(b, alpha, mode, c if mode == "add_difference" else None))


def _example(mode: str) -> Any:
    def make() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        handles = tiny.sd_handles()
        other = ModelHandle.from_module(tiny._cached_pipeline("sd", 1).unet, vae_scale_factor=2)
        inputs = {"model": handles["model"], "b": other, "mode": mode, "alpha": 0.3}
        if mode == "add_difference":
            inputs.update(c=handles["model"], alpha=1.0)
        return inputs

    return make


@node(
    "dagfusion.models.Merge",
    version="1.0.0",
    category="model",
    inputs=[
        Input("model", MODEL, link_only=True, description="Model A: the merged model keeps its scheduler, info and patches."),
        Input("b", MODEL, link_only=True, description="Model B, with A's layout (unpatched)."),
        Input("c", MODEL, optional=True, link_only=True,
              description="Model C for add_difference (the model B was fine-tuned from), with A's layout (unpatched)."),
        Input("mode", STRING, "weighted_sum", choices=MODES,
              description="weighted_sum: (1 - alpha)·A + alpha·B; add_difference: A + alpha·(B - C)."),
        Input("alpha", FLOAT, 0.5, min=-1.0, max=2.0, ui={"step": 0.05},
              description="Merge factor: 0 is A; 1 is B (weighted_sum) or A plus all of B - C (add_difference)."),
    ],
    outputs=[Output("model", MODEL, "Model A with the merged weights while it runs (no shared weight is written).")],
    examples=[_example("weighted_sum"), _example("add_difference")],
)
def merge_node(
    ctx: RunContext, model: ModelHandle, b: ModelHandle, mode: str, alpha: float, c: ModelHandle | None = None
) -> ModelHandle:
    """Merge denoisers of the same layout: a weighted sum of A and B, or A plus alpha times the
    difference B - C. The merged weights are private copies swapped in while the model runs; the
    inputs' shared weights are never written. Layouts (parameter names and shapes) must match."""
    return merged(model, b, alpha, mode, c)


NODES = (merge_node,)

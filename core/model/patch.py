"""Patches: immutable descriptions of how to change a model while it runs.

A patch is attached to a handle (:class:`~dagfusion.model.ModelHandle`,
:class:`~dagfusion.model.VAEHandle`, :class:`~dagfusion.model.TextEncoderBundle`) with
``handle.with_patch(patch)``. It never changes the shared weights for good: its ``apply(module)``
is a context manager that changes the module for the duration of one use (a sampling run, one
text encoding, one VAE decode) and restores it on exit, and its ``begin(run)`` (denoiser patches
only) returns the per-run :class:`~dagfusion.model.StepHook`. See :mod:`dagfusion.model.hooks`
for the step hook.

While a patch is applied through :func:`apply_patches` (the sampler, the text encoder, the VAE
and the training loop all use it) or :func:`applying`, :func:`applied_patch` finds it from the
module: a loss or a nested hook can ask "which patch of this kind is on this module right now?"
without any global state of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from dagfusion.errors import NodeDefinitionError
from dagfusion.model.helpers import unwrap_compiled

if TYPE_CHECKING:
    from dagfusion.model.hooks import DenoiserCall, Forward, SamplingRun, StepHook

P = TypeVar("P")


class ModelPatch:
    """Base class of patches. Subclasses give a key and override ``apply`` and/or ``begin``.

    ``key`` is a string identifying the patch *and its settings*: it goes into the handle's
    fingerprint, so two handles with equal keys are treated as equal by caches, and a setting
    left out of it makes differently configured handles collide. A patch gets its key in one
    of three ways:

    - a frozen dataclass ``config`` holding every setting: the key is the patch class's
      qualified name and the config's fields (as JSON) — nothing to keep in sync;
    - ``self.key = ...`` in ``__init__``, built from the settings (or ``key = "..."`` on a class
      whose instances have no settings);
    - a ``key`` property (for keys that hash tensors, say).

    A patch without a key is refused by ``handle.with_patch`` (:func:`patch_key`).
    """

    config: Any = None

    @property
    def key(self) -> str:
        """The key set on the instance, else the one derived from ``config``, else ``""`` (no key)."""
        explicit = self.__dict__.get("_key")
        if explicit:
            return str(explicit)
        if self.config is not None:
            return config_key(type(self), self.config)
        return ""

    @key.setter
    def key(self, value: str) -> None:
        self.__dict__["_key"] = value

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        """Change ``module`` for the duration of a use; restore it on exit (also after an error)."""
        return contextlib.nullcontext()

    def begin(self, run: SamplingRun) -> StepHook | None:
        """A fresh hook for this sampling run, or ``None`` (called for denoiser patches only)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"


def config_key(cls: type, config: Any) -> str:
    """The key of a patch of class ``cls`` built from the frozen dataclass ``config``:
    ``"<module>.<class>:"`` and the config's fields as sorted JSON.

    :raises NodeDefinitionError: ``config`` is not a frozen dataclass instance.
    """
    params = getattr(config, "__dataclass_params__", None)
    if not dataclasses.is_dataclass(config) or isinstance(config, type) or params is None or not params.frozen:
        raise NodeDefinitionError(
            f"patch {cls.__qualname__}: config must be a frozen dataclass instance (its fields form the patch's key), "
            f"got {type(config).__name__}"
        )
    fields = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str, separators=(",", ":"))
    return f"{cls.__module__}.{cls.__qualname__}:{type(config).__name__}{fields}"


class FunctionPatch(ModelPatch):
    """A patch from a plain function ``fn(call, forward) -> output`` (stateless hooks).

    The key defaults to the function's qualified name; a lambda or a function defined inside
    another one (a closure, whose behaviour may depend on captured values) needs ``key``.
    """

    def __init__(self, fn: Callable[[DenoiserCall, Forward], Any], key: str | None = None) -> None:
        self.fn = fn
        qualname = getattr(fn, "__qualname__", None)
        if key is None and (qualname is None or "<" in qualname):
            raise NodeDefinitionError(
                f"FunctionPatch over {qualname or repr(fn)} needs key=...: a lambda or local function has no name "
                "that tells its behaviour apart from another one's"
            )
        self.key = key or f"function:{getattr(fn, '__module__', '?')}.{qualname}"

    def begin(self, run: SamplingRun) -> StepHook:
        from dagfusion.model.hooks import StepHook

        fn = self.fn

        class _Hook(StepHook):
            def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
                return fn(call, forward)

        return _Hook()


def check_patch(patch: Any) -> None:
    """Check that ``patch`` can be attached to a handle: it offers ``apply`` or ``begin`` like
    :class:`ModelPatch`, and it has a key (:func:`patch_key`).

    A subclass's own ``key`` property is not evaluated here (it may hash weights); an empty
    one fails in :func:`patch_key` when the handle is fingerprinted.

    :raises TypeError: ``patch`` has neither ``apply`` nor ``begin``.
    :raises NodeDefinitionError: ``patch`` has no key (naming its class).
    """
    if not (callable(getattr(patch, "apply", None)) or callable(getattr(patch, "begin", None))):
        raise TypeError(
            f"expected a model patch (an object with apply(module) and/or begin(run), see "
            f"dagfusion.model.ModelPatch), got {type(patch).__name__}"
        )
    declared = inspect.getattr_static(type(patch), "key", None)
    if isinstance(declared, property) and declared is not ModelPatch.__dict__["key"]:
        return  # a subclass's own key property (it may hash weights): evaluated when fingerprinting
    patch_key(patch)


def patch_key(patch: Any) -> str:
    """The string that identifies ``patch`` and its settings in a handle's fingerprint:
    ``patch.key`` (called if it is a method).

    :raises NodeDefinitionError: the key is missing or empty (naming the patch's class and how
        to give it one).
    """
    key = getattr(patch, "key", None)
    if callable(key):
        key = key()
    if not isinstance(key, str) or not key.strip():
        cls = type(patch)
        raise NodeDefinitionError(
            f"patch {cls.__module__}.{cls.__qualname__} has no key: set self.key from its settings in __init__, give it "
            "a frozen dataclass 'config', or define a 'key' property (the key tells differently configured handles "
            "apart in caches)"
        )
    return key


# --- which patches are on a module right now --------------------------------------------------------

_ON_MODULE: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@contextlib.contextmanager
def applying(module: Any, patch: Any) -> Iterator[Any]:
    """Record ``patch`` as applied to ``module`` (looking through ``torch.compile`` wrappers) for
    the duration, so :func:`applied_patch` finds it. Changes nothing else.

    :func:`apply_patches` records every patch it enters; a patch whose ``apply`` may also be
    entered directly uses this inside its own ``apply`` to be found either way.
    """
    key = unwrap_compiled(module)
    recorded = _record(key, patch)
    try:
        yield module
    finally:
        if recorded:
            _forget(key, patch)


def _record(key: Any, patch: Any) -> bool:
    with _LOCK:
        try:
            _ON_MODULE.setdefault(key, []).append(patch)
        except TypeError:  # not weak-referenceable or not hashable: nothing can look it up
            return False
    return True


def _forget(key: Any, patch: Any) -> None:
    with _LOCK:
        stack = _ON_MODULE.get(key)
        if stack is None:
            return
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is patch:
                del stack[i]
                break
        if not stack:
            del _ON_MODULE[key]


@contextlib.contextmanager
def apply_patches(patches: Sequence[Any], module: Any) -> Iterator[Any]:
    """Enter every patch's ``apply(module)`` in order and exit them in reverse (also after an
    error); while inside, each patch is recorded as applied to ``module`` (:func:`applied_patch`).
    Patches without ``apply`` are skipped. Yields ``module``.
    """
    with contextlib.ExitStack() as stack:
        for patch in patches:
            apply = getattr(patch, "apply", None)
            if apply is not None:
                stack.enter_context(apply(module))
            stack.enter_context(applying(module, patch))
        yield module


def _is_handle(target: Any) -> bool:
    return isinstance(getattr(target, "patches", None), tuple) and not hasattr(target, "named_modules")


def patches_of(handle: Any, cls: type[P] | tuple[type, ...]) -> list[P]:
    """The patches of ``handle`` that are instances of ``cls``, in the handle's order (outermost first)."""
    return [p for p in handle.patches if isinstance(p, cls)]


def applied_patch(target: Any, cls: type[P] | tuple[type, ...]) -> P | None:
    """The patch of type ``cls`` that ``target`` carries, or ``None``.

    - ``target`` a handle (anything with a ``patches`` tuple that is not a module): the first
      (outermost) of its patches that is an instance of ``cls``.
    - ``target`` a module: the patch of type ``cls`` applied to it *right now* — entered through
      :func:`apply_patches` or :func:`applying`, by this or another thread — the most recently
      entered one if several; a ``torch.compile`` wrapper and the module it wraps are the same.
    """
    if _is_handle(target):
        found = patches_of(target, cls)
        return found[0] if found else None
    with _LOCK:
        try:
            stack = list(_ON_MODULE.get(unwrap_compiled(target), ()))
        except TypeError:
            return None
    for patch in reversed(stack):
        if isinstance(patch, cls):
            return patch
    return None

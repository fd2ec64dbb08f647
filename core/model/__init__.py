"""``dagfusion.model``: the public seam for everything that changes a model.

Caches, quantizers, adapters, guidance and fine-tuning all work the same way: a node takes a
handle and returns a **new** handle carrying a patch. This package is what they import — the
built-in node packs exactly as a third-party plugin does.

Handles (:mod:`~dagfusion.model.handle`)
    :class:`ModelHandle` (a denoiser), :class:`VAEHandle`, :class:`TextEncoderBundle`,
    :class:`ImageEncoderHandle`: a reference
    to shared weights (:class:`ComponentRef` into the model cache, or :class:`StaticRef`) plus an
    immutable tuple of patches; ``handle.with_patch(patch)`` copies no weights.
Patches (:mod:`~dagfusion.model.patch`)
    :class:`ModelPatch` (``apply(module)`` around each use, ``begin(run)`` per sampling run; a
    key from its settings or its frozen ``config``), :class:`FunctionPatch`, :func:`apply_patches`, and :func:`applied_patch` to find a patch of a
    class on a handle or on a module while it is applied.
The step hook (:mod:`~dagfusion.model.hooks`)
    :class:`StepHook`, :class:`DenoiserCall` (with ``select``/``split``/``merge`` for the
    guidance halves), :class:`StepInfo`, :class:`SamplingRun`, :data:`Forward`, :func:`chain`.
Run reports (:mod:`~dagfusion.model.report`)
    :class:`RunReport` and :class:`StepRecord`: what a sampling run computed per step (denoiser
    calls, MACs, seconds) and what each patch's hook reported from ``end()``.
Denoiser families (:mod:`~dagfusion.model.families`)
    :class:`Family` (how a sampler calls one kind of denoiser), :func:`register_family`,
    :func:`family_for`, :class:`FamilyRegistry`.
The model cache (:mod:`~dagfusion.model.cache`)
    :class:`ModelCache`, :func:`default_cache`: one process-wide LRU of loaded weights.
Helpers (:mod:`~dagfusion.model.helpers`, :mod:`~dagfusion.model.macs`)
    :func:`unwrap_compiled`, :func:`swap_parameters`, :func:`parameter_places`,
    :func:`count_macs` (multiply-accumulates a module really computes).
CPU kernels (:mod:`~dagfusion.model.kernels`)
    :func:`use_time_only_convs`: time-only ``Conv3d`` layers of video models computed as the
    ``Conv2d`` they equal, two to three times faster on the CPU; loaders apply it.

Importing this package imports neither torch nor diffusers; functions import them when they run.
"""

from __future__ import annotations

from dagfusion.model.cache import DEFAULT_BUDGET_BYTES, CacheStats, Loader, ModelCache, default_cache, nbytes_of
from dagfusion.model.families import (
    ConditioningLike,
    Family,
    FamilyRegistry,
    Prepared,
    RegisterFamily,
    class_names,
    config_of,
    default_families,
    expand,
    family_for,
    register_family,
    require_kind,
    rescale_guidance,
)
from dagfusion.model.handle import (
    ComponentRef,
    Handle,
    ImageEncoderHandle,
    ModelHandle,
    Ref,
    SchedulerSpecLike,
    StaticRef,
    TextEncoderBundle,
    VAEHandle,
    as_ref,
    loaded,
    placed,
    tokenizer_fingerprint,
)
from dagfusion.model.helpers import ParameterPlaces, parameter_places, swap_parameters, unwrap_compiled
from dagfusion.model.hooks import HOOK_METHODS, DenoiserCall, Forward, SamplingRun, StepHook, StepInfo, chain
from dagfusion.model.kernels import is_time_only_conv, use_time_only_convs
from dagfusion.model.macs import CallCosts, MacCounter, MacRecord, call_layout, count_macs
from dagfusion.model.patch import (
    FunctionPatch,
    ModelPatch,
    applied_patch,
    applying,
    apply_patches,
    check_patch,
    config_key,
    patch_key,
    patches_of,
)
from dagfusion.model.report import RunReport, StepRecord, plain_report

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "HOOK_METHODS",
    "CacheStats",
    "CallCosts",
    "ComponentRef",
    "ConditioningLike",
    "DenoiserCall",
    "Family",
    "FamilyRegistry",
    "Forward",
    "FunctionPatch",
    "Handle",
    "Loader",
    "MacCounter",
    "MacRecord",
    "ModelCache",
    "ModelHandle",
    "ModelPatch",
    "ParameterPlaces",
    "Prepared",
    "Ref",
    "RegisterFamily",
    "RunReport",
    "SamplingRun",
    "SchedulerSpecLike",
    "StaticRef",
    "StepHook",
    "StepInfo",
    "StepRecord",
    "TextEncoderBundle",
    "VAEHandle",
    "ImageEncoderHandle",
    "applied_patch",
    "applying",
    "apply_patches",
    "as_ref",
    "call_layout",
    "chain",
    "check_patch",
    "class_names",
    "config_key",
    "config_of",
    "count_macs",
    "default_cache",
    "default_families",
    "expand",
    "family_for",
    "is_time_only_conv",
    "loaded",
    "nbytes_of",
    "parameter_places",
    "patch_key",
    "patches_of",
    "placed",
    "plain_report",
    "register_family",
    "require_kind",
    "rescale_guidance",
    "swap_parameters",
    "tokenizer_fingerprint",
    "unwrap_compiled",
    "use_time_only_convs",
]

"""Deprecated: moved to :mod:`dagfusion.model`; this alias is removed in dagfusion 0.2.0."""

from __future__ import annotations

import warnings

from dagfusion.model import apply_patches as applied  # noqa: F401 - the old name
from dagfusion.model import (  # noqa: F401 - re-exported
    DenoiserCall,
    Forward,
    FunctionPatch,
    ModelPatch,
    SamplingRun,
    StepHook,
    StepInfo,
    chain,
    check_patch,
)

warnings.warn(
    "dagfusion.nodes.diffusion.hooks is deprecated and will be removed in dagfusion 0.2.0; import from dagfusion.model instead",
    DeprecationWarning,
    stacklevel=2,
)

"""Deprecated: moved to :mod:`dagfusion.model`; this alias is removed in dagfusion 0.2.0."""

from __future__ import annotations

import warnings

from dagfusion.model import (  # noqa: F401 - re-exported
    ComponentRef,
    ModelHandle,
    Ref,
    StaticRef,
    TextEncoderBundle,
    VAEHandle,
    as_ref,
    loaded,
    patch_key,
    placed,
    tokenizer_fingerprint,
)

warnings.warn(
    "dagfusion.nodes.diffusion.handle is deprecated and will be removed in dagfusion 0.2.0; import from dagfusion.model instead",
    DeprecationWarning,
    stacklevel=2,
)

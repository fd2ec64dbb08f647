"""Deprecated: moved to :mod:`dagfusion.model`; this alias is removed in dagfusion 0.2.0."""

from __future__ import annotations

import warnings

from dagfusion.model import (  # noqa: F401 - re-exported
    CallCosts,
    MacCounter,
    MacRecord,
    call_layout,
    count_macs,
)

warnings.warn(
    "dagfusion.nodes.cache.macs is deprecated and will be removed in dagfusion 0.2.0; import from dagfusion.model instead",
    DeprecationWarning,
    stacklevel=2,
)

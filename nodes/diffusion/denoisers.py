"""Deprecated: moved to :mod:`dagfusion.model`; this alias is removed in dagfusion 0.2.0.

The built-in families (``UNetFamily`` …) live in :mod:`dagfusion.nodes.diffusion.families`."""

from __future__ import annotations

import warnings

from dagfusion.nodes.diffusion.families import DiTFamily, PixArtFamily, SVDFamily, UNetFamily, guidance_embedding  # noqa: F401
from dagfusion.model import (  # noqa: F401 - re-exported
    Family,
    Prepared,
    class_names,
    config_of,
    expand,
    family_for,
    register_family,
    rescale_guidance,
)

warnings.warn(
    "dagfusion.nodes.diffusion.denoisers is deprecated and will be removed in dagfusion 0.2.0; import from dagfusion.model instead",
    DeprecationWarning,
    stacklevel=2,
)

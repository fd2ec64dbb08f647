"""Deprecated: moved to :mod:`dagfusion.testing.models`; this alias is removed in dagfusion 0.2.0."""

from __future__ import annotations

import warnings

from dagfusion.testing.models import (  # noqa: F401 - re-exported
    BUILDERS,
    build_dit,
    build_pixart,
    build_sd,
    build_sdxl,
    build_svd_unet,
    clip_text_config,
    clip_tokenizer,
    clip_vocab,
    dit_model,
    pixart_handles,
    save,
    sd_handles,
    sd_scheduler_config,
    t5_tokenizer,
    tiny_vae,
    write_hf_cache,
    write_model,
    write_single_file,
)

warnings.warn(
    "dagfusion.nodes.diffusion.tiny is deprecated and will be removed in dagfusion 0.2.0; import dagfusion.testing.models instead",
    DeprecationWarning,
    stacklevel=2,
)

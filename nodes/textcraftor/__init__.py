"""TextCraftor: reward fine-tuning of a diffusion model's text encoder (Li et al., CVPR 2024).

Node ids (all version 1.0.0):

- ``dagfusion.textcraftor.Train`` — fine-tune the text encoder against a ``REWARD`` with prompts
  only (denoiser and VAE frozen), in the *direct* (one-step x̂0) or *prompt-based* (DDIM chain,
  gradients through the last K steps) variant, with an embedding-alignment penalty;
- ``dagfusion.textcraftor.InterpolateEncoders`` — embeddings ``α·e_a + (1 − α)·e_b`` of two bundles;
- ``dagfusion.textcraftor.SaveEncoder`` — the encoder as a diffusers ``text_encoder/`` folder.

See docs/textcraftor.md. Registering this pack imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.textcraftor.nodes import NODES


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)

"""Re-export of the image metrics, which live in :mod:`dagfusion.nodes.metrics`.

Kept so ``from dagfusion.nodes.shapes.metrics import psnr`` keeps working; new code imports
:mod:`dagfusion.nodes.metrics.fidelity` and :mod:`dagfusion.nodes.metrics.frechet`.
"""

from __future__ import annotations

from dagfusion.nodes.metrics.fidelity import psnr, relative_l1, ssim
from dagfusion.nodes.metrics.frechet import frechet_distance

__all__ = ["frechet_distance", "psnr", "relative_l1", "ssim"]

"""Socket types of the training pack.

Classes are named by dotted strings, so registering these types imports no torch.

- ``OBJECTIVE``: what a training run minimises — an instance of
  :class:`~dagfusion.nodes.training.objectives.Objective` (epsilon, v-prediction, rectified
  flow here; later packs add gate, distillation and reward objectives by subclassing it).
- ``TRAINING_DATA``: a data source for the training loop — an instance of
  :class:`~dagfusion.nodes.training.data.TrainingData`. Other packs make their dataset types
  subtypes of it (``parents=("TRAINING_DATA",)``) so their datasets connect to the Train node;
  the shapes pack's ``SHAPES_DATASET`` is accepted directly.
"""

from __future__ import annotations

from dagfusion import SocketType

_PKG = "dagfusion.nodes.training"

OBJECTIVE = SocketType(
    "OBJECTIVE",
    python_types=(f"{_PKG}.objectives.Objective",),
    description="A training objective: the loss of a denoiser on a batch (epsilon, v-prediction, flow matching …).",
    color="#ff8a65",
)
TRAINING_DATA = SocketType(
    "TRAINING_DATA",
    python_types=(f"{_PKG}.data.TrainingData",),
    description="A training data source: images in [0, 1] with captions, addressed by sample index.",
    color="#fff59d",
)

TYPES: tuple[SocketType, ...] = (OBJECTIVE, TRAINING_DATA)
"""Every socket type this pack registers, in registration order."""

"""Everyday generation nodes: textual-inversion embeddings, conditioning blends, image batches,
grids and geometry, text lists.

Node ids (see :doc:`/everyday` for the guide):

- conditioning: ``dagfusion.text.LoadEmbedding``, ``dagfusion.text.TrainableEmbedding`` and
  ``dagfusion.text.SaveEmbedding`` (learn a textual-inversion embedding with ``dagfusion.train.Train``
  and write it), ``dagfusion.conditioning.Average``,
  ``dagfusion.conditioning.Concat``, ``dagfusion.conditioning.Region`` (area conditioning)
- image: ``dagfusion.image.Batch``, ``dagfusion.image.Unbatch``, ``dagfusion.image.Select``,
  ``dagfusion.image.Concat``, ``dagfusion.image.Grid``, ``dagfusion.image.Resize``, ``dagfusion.image.Crop``,
  ``dagfusion.image.Pad``, ``dagfusion.image.Composite``
- latent: ``dagfusion.latent.Upscale``
- inpaint: ``dagfusion.inpaint.Blend``, ``dagfusion.inpaint.Condition``; mask: ``dagfusion.mask.Grow``,
  ``dagfusion.mask.Feather``, ``dagfusion.mask.Invert``, ``dagfusion.mask.FromImage``, ``dagfusion.mask.Rectangle``
- text: ``dagfusion.text.List``, ``dagfusion.text.Join``, ``dagfusion.text.FormatMany``
- model: ``dagfusion.models.Merge``, ``dagfusion.models.Bake`` (weight patches into a private copy, e.g. to export a merge)
- edit: ``dagfusion.edit.EDICTInvert``, ``dagfusion.edit.EDICTGenerate`` (exact inversion, :mod:`~dagfusion.nodes.everyday.edict`);
  ``dagfusion.edit.BrushBase``, ``dagfusion.edit.BrushLayer`` (Layered Diffusion Brushes: stackable region edits from
  an intermediate step of a recorded generation, :mod:`~dagfusion.nodes.everyday.brushes`; type ``BRUSH_BASE``)

The pack uses the diffusion pack's types (``CLIP``, ``IMAGE``, ``LATENT`` …) and registers after
it; it registers one type of its own, ``BRUSH_BASE``. Registering it imports neither torch nor
transformers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.everyday import (
    bake,
    batches,
    brushes,
    brushes_nodes,
    conditioning_ops,
    edict,
    embedding_train,
    embeddings,
    grid,
    inpaint,
    lists,
    merge,
    regions,
    resize,
    upscale,
)

NODES = (*embeddings.NODES, *embedding_train.NODES, *conditioning_ops.NODES, *regions.NODES, *batches.NODES, *grid.NODES, *resize.NODES, *upscale.NODES,
         *inpaint.NODES, *edict.NODES, *brushes_nodes.NODES, *lists.NODES, *merge.NODES, *bake.NODES)
"""Every node of the pack, in palette order."""


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in brushes.TYPES:
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)

"""Everyday generation nodes: textual-inversion embeddings, image batches and grids, text lists.

Node ids (see :doc:`/everyday` for the guide):

- conditioning: ``dagfusion.text.LoadEmbedding``
- image: ``dagfusion.image.Batch``, ``dagfusion.image.Unbatch``, ``dagfusion.image.Select``,
  ``dagfusion.image.Concat``, ``dagfusion.image.Grid``
- text: ``dagfusion.text.List``, ``dagfusion.text.Join``, ``dagfusion.text.FormatMany``

The pack uses the diffusion pack's types (``CLIP``, ``IMAGE``) and registers after it. Registering
it imports neither torch nor transformers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.everyday import batches, embeddings, grid, lists

NODES = (*embeddings.NODES, *batches.NODES, *grid.NODES, *lists.NODES)
"""Every node of the pack, in palette order."""


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)

"""The tuner: search step counts × cache schedulers × weight formats for the fastest setting above a quality floor.

Node ids (version 1.0.0):

- ``dagfusion.tune.Reference`` — the full run every point is compared with (images, counted MACs);
- ``dagfusion.tune.Measure`` — one point (``steps=25 cache=deepcache:5 quant=int8``) against it:
  MAC speedup, weight bits, PSNR, SSIM and — on shapes-world prompts — the ShapeEval drop;
- ``dagfusion.tune.Tune`` — a whole search in one node: the Pareto set, the chosen point, the
  chosen point as a workflow, and a plot.

``dagfusion tune`` (the command line) writes a workflow that sweeps Measure over the search space
and runs it through the engine's sweep machinery (or on Ray with ``--executor ray``). See
docs/tune.md. Registering this pack imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.tune.nodes import NODES


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)

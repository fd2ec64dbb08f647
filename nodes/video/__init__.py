"""The video pack: save and load MP4, animated WebP and GIF files; frames to and from clips.

Nodes:

- ``dagfusion.video.SaveVideo`` — write each clip of a ``VIDEO`` as MP4 (H.264 through PyAV),
  animated WebP or GIF (through Pillow) in the run's output folder, the workflow embedded (or in
  a ``NAME.EXT.json`` sidecar); a format that cannot be written falls back to PNG frames with a
  warning.
- ``dagfusion.video.LoadVideo`` — read an MP4, WebP or GIF from the allowed read folders, its
  frames × pixels checked against ``max_video_pixels`` from the header before any decoding.
- ``dagfusion.video.ExtractFrames`` — selected frames of a clip as an ``IMAGE`` batch.
- ``dagfusion.video.FramesToVideo`` — an ``IMAGE`` batch grouped into clips.
- ``dagfusion.video.VideoInfo`` — shape, duration and value range of a ``VIDEO``.
- ``dagfusion.video.LoadSVD``, ``ImageToVideoConditioning``, ``SampleVideo``, ``DecodeVideo`` —
  image-to-video with Stable Video Diffusion's layout (:mod:`~dagfusion.nodes.video.svd`).
- ``dagfusion.video.LoadSVDSingleFile`` — the same model from one Stability-layout file
  (``svd_xt.safetensors``) with shipped configs (:mod:`~dagfusion.nodes.video.single_file`).
- ``dagfusion.video.NewModel``, ``ShapesClips``, ``RenderShapesClip``, ``EDMObjective`` — an
  untrained SVD-layout model (:mod:`~dagfusion.nodes.video.build`), the shapes-video world as
  training data and ground truth (:mod:`~dagfusion.nodes.video.shapes_data`), and the EDM
  objective ``dagfusion.train.Train`` trains it with.
- ``dagfusion.video.SaveSVD``, ``LoadEmbeddedVideo`` — a Stable Video Diffusion folder (one-step
  generators keep their mark) and the shipped shapes-video models (:mod:`~dagfusion.nodes.video.export`).
- ``dagfusion.video.TrainSFV``, ``SampleOneStep`` — SF-V's adversarial tuning to one forward
  pass (:mod:`~dagfusion.nodes.video.sfv`); the EDM objective it starts from is
  :mod:`~dagfusion.nodes.video.edm`.

Modules: :mod:`~dagfusion.nodes.video.containers` (headers read without decoding),
:mod:`~dagfusion.nodes.video.metadata` (the embedded workflow and sidecars),
:mod:`~dagfusion.nodes.video.codecs` (encoders and decoders). The ``VIDEO`` type is the
diffusion pack's (float32 ``(B, F, C, H, W)`` in [0, 1]).

Registering this pack imports neither torch nor PyAV: each node imports them when it runs. MP4
needs the optional dependency ``av`` (``pip install 'dagfusion[video]'``); WebP and GIF need only
Pillow.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.video import build, edm, export, nodes, sfv, shapes_data, single_file, svd

NODES = (*nodes.NODES, *svd.NODES, *single_file.NODES, *build.NODES, *shapes_data.NODES, *edm.NODES, *sfv.NODES,
         *export.NODES)
"""Every node of the pack, in palette order."""
TYPES = (*svd.TYPES, *sfv.TYPES)
"""The socket types this pack registers."""


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in TYPES:
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)

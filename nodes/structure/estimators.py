"""Depth estimators loaded from local folders (transformers), and depth estimation to ``DEPTH``.

``LoadDepthEstimator`` reads a transformers depth-estimation folder (``config.json``,
``model.safetensors``, ``preprocessor_config.json`` — DPT, Depth Anything, GLPN …) through
``AutoModelForDepthEstimation`` and ``AutoImageProcessor``, offline (``local_files_only=True``)
and from safetensors only (``use_safetensors=True``). The folder must lie under the allowed read
folders (``ctx.input_path``), like every loader's.

``EstimateDepth`` runs the estimator on images in [0, 1] (the processor resizes and normalises;
``do_rescale=False`` because IMAGE values are already in [0, 1]), resizes the prediction back to
the image size (bilinear) and normalises it per image to the ``DEPTH`` convention: min–max to
[0, 1] with 1 = nearest. Most such models (DPT, Depth Anything) predict relative inverse depth —
larger is nearer — which is kept as is (``prediction="disparity"``); models that predict a
distance (larger is farther, e.g. GLPN, ZoeDepth) need ``prediction="distance"``, which flips
it. The normalisation makes maps comparable across images but loses absolute scale.
"""

from __future__ import annotations

import functools
from typing import Any

from dagfusion import PATH, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.nodes.diffusion.types import IMAGE
from dagfusion.nodes.structure.maps import check_image, normalise_depth
from dagfusion.nodes.structure.types import DEPTH


@functools.cache
def estimator_class() -> type:
    """The :class:`DepthEstimator` class (built on first use, so importing this module does not
    import torch)."""
    import torch

    class DepthEstimator(torch.nn.Module):
        """A transformers depth-estimation model with its image processor (a ``MODULE``).

        Attributes:
            model: The ``AutoModelForDepthEstimation`` model (eval mode).
            processor: Its ``AutoImageProcessor``.
            source: The folder it was loaded from.
        """

        def __init__(self, model: Any, processor: Any, source: str = "") -> None:
            super().__init__()
            self.model = model.eval()
            self.processor = processor
            self.source = source

        def predict(self, images: Any) -> Any:
            """Raw predictions (B, 1, H, W) at the images' size (bilinear), as the model gives them."""
            from torch.nn import functional as F

            device = next(self.model.parameters()).device
            inputs = self.processor(images=[im.float().cpu() for im in images], return_tensors="pt", do_rescale=False)
            with torch.no_grad():
                out = self.model(pixel_values=inputs["pixel_values"].to(device))
            predicted = out.predicted_depth.float()
            if predicted.dim() == 3:
                predicted = predicted.unsqueeze(1)
            return F.interpolate(predicted.cpu(), size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)

    DepthEstimator.__module__ = __name__
    DepthEstimator.__qualname__ = "DepthEstimator"
    return DepthEstimator


def __getattr__(name: str) -> Any:
    """``DepthEstimator`` is built on first access (it subclasses ``torch.nn.Module``)."""
    if name == "DepthEstimator":
        return estimator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_depth_estimator(folder: Any, device: str = "cpu") -> Any:
    """Load a transformers depth-estimation folder offline, safetensors only (one warm-up
    prediction on a black 32 × 32 image is made while loading)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    estimator = estimator_class()(model.to(device), processor, str(folder))
    # transformers installs its output-capturing hooks on a model's first forward pass: run it
    # here, so that estimating depth later leaves the estimator exactly as it was handed over
    import torch

    estimator.predict(torch.zeros(1, 3, 32, 32))
    return estimator


def estimate_depth(estimator: Any, images: Any, prediction: str = "disparity") -> Any:
    """``DEPTH`` (B, 1, H, W) of images: the estimator's prediction, flipped if it is a distance,
    min–max normalised per image (1 = nearest)."""
    raw = estimator.predict(images)
    if prediction == "distance":
        raw = -raw
    elif prediction != "disparity":
        raise ValueError(f"prediction must be 'disparity' or 'distance', got {prediction!r}")
    return normalise_depth(raw)


def write_tiny_dpt(folder: Any, image_size: int = 32, seed: int = 0) -> Any:
    """Write a tiny, randomly initialised DPT depth estimator (for tests and examples) to ``folder``."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=image_size,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False,
    )
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config).eval()
    processor = DPTImageProcessor(size={"height": image_size, "width": image_size}, keep_aspect_ratio=False, ensure_multiple_of=8)
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))
    return folder


def _load_example(folder: Any) -> dict[str, Any]:
    return {"path": str(write_tiny_dpt(folder / "tiny-dpt")), "device": "cpu"}


def _estimate_example(folder: Any) -> dict[str, Any]:
    from dagfusion.nodes.structure.maps import _solid_structure

    return {
        "estimator": load_depth_estimator(write_tiny_dpt(folder / "tiny-dpt")),
        "image": _solid_structure()["image"],
    }


@node(
    "dagfusion.structure.LoadDepthEstimator",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("path", PATH, description="A transformers depth-estimation folder (safetensors) under the allowed read folders."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"), description="Where to compute; 'auto' takes the settings' device."),
    ],
    outputs=[Output("estimator", "MODULE", "The depth estimator and its image processor.")],
    examples=[_load_example],
)
def load_depth_estimator_node(ctx: RunContext, path: str, device: str) -> Any:
    """Load a depth estimator (DPT, Depth Anything …) from a local transformers folder, offline."""
    folder = ctx.input_path(path)
    if folder.is_dir():  # every file inside, links followed, must lie under the read folders too
        ctx.settings.check_tree_readable(folder)
    if not folder.is_dir():
        raise NodeInputError("path", f"expected a transformers model folder, got {path!r} (not a folder)")
    if not (folder / "config.json").is_file():
        raise NodeInputError("path", f"expected a transformers model folder with config.json, got {path!r}")
    return load_depth_estimator(folder, ctx.device if device == "auto" else device)


@node(
    "dagfusion.structure.EstimateDepth",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("estimator", "MODULE", link_only=True, description="A depth estimator from LoadDepthEstimator."),
        Input("image", IMAGE, description="Images (B, 3, H, W) in [0, 1]."),
        Input("prediction", STRING, "disparity", choices=("disparity", "distance"),
              description="What the model predicts: 'disparity' (larger is nearer: DPT, Depth Anything) or 'distance' (larger is farther)."),
    ],
    outputs=[Output("depth", DEPTH, "(B, 1, H, W) per image min–max normalised, 1 = nearest.")],
    examples=[_estimate_example],
)
def estimate_depth_node(ctx: RunContext, estimator: Any, image: Any, prediction: str) -> Any:
    """Estimate depth with a loaded estimator, as DEPTH (normalised per image, 1 = nearest)."""
    if not isinstance(estimator, estimator_class()):
        raise NodeInputError("estimator", f"expected a depth estimator from LoadDepthEstimator, got {type(estimator).__name__}")
    check_image(image)
    return estimate_depth(estimator, image, prediction)


NODES = (load_depth_estimator_node, estimate_depth_node)

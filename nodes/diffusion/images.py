"""Image nodes: load a picture, save pictures with their provenance, preview pictures.

Saved PNGs carry two compressed text chunks (:mod:`dagfusion.pngmeta`): ``dagfusion.workflow``,
the run's resolved workflow YAML, and ``dagfusion.manifest``, the run manifest (dagfusion,
torch, diffusers versions, plugins, input file fingerprints — model folders included — and
seeds) plus this image's place in its batch and its lineage (model source and fingerprint,
sampler, seed, prompt). ``dagfusion inspect picture.png`` prints them and ``dagfusion run
picture.png`` re-runs the workflow.
"""

from __future__ import annotations

from typing import Any

from dagfusion import BOOLEAN, LIST, PATH, STRING, Input, Output, RunContext, node
from dagfusion.nodes.diffusion.types import IMAGE, MASK
from dagfusion.nodes.diffusion.vae import LINEAGE_ATTR


def to_pil(image: Any) -> Any:
    """One image ``(C, H, W)`` in [0, 1] as a PIL image (C = 1, 3 or 4)."""
    import numpy as np
    from PIL import Image

    t = image.detach().float().cpu().clamp(0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image (C, H, W) with 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    array = (t.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def from_pil(picture: Any) -> tuple[Any, Any]:
    """``(image (1, 3, H, W), mask (1, 1, H, W))`` from a PIL image; the mask is 1 where it is transparent."""
    import numpy as np
    import torch
    from PIL import ImageOps

    picture = ImageOps.exif_transpose(picture)
    rgba = np.asarray(picture.convert("RGBA"), dtype=np.float32) / 255.0
    image = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
    mask = torch.from_numpy(1.0 - rgba[..., 3].copy()).unsqueeze(0).unsqueeze(0).contiguous()
    return image, mask


def _plain(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@node(
    "dagfusion.image.LoadImage",
    version="1.0.0",
    category="image",
    inputs=[Input("path", PATH, description="A PNG, JPEG or WebP file under the allowed read folders.")],
    outputs=[
        Output("image", IMAGE, "The picture as (1, 3, H, W) in [0, 1]."),
        Output("mask", MASK, "1 where the picture is transparent (all zeros without alpha)."),
    ],
    examples=[lambda folder: {"path": str(_write_example_png(folder))}],
)
def load_image(ctx: RunContext, path: str) -> tuple[Any, Any]:
    """Load a picture file as an image and a mask from its alpha channel.

    Pictures larger than the settings' max_image_pixels are refused from their header, before
    any pixel is decoded.
    """
    from PIL import UnidentifiedImageError

    from dagfusion.imagelimits import open_image

    resolved = ctx.input_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"expected an image file, but {str(resolved)!r} does not exist")
    try:
        with open_image(resolved, ctx.settings.max_image_pixels) as picture:
            picture.load()
            return from_pil(picture)
    except UnidentifiedImageError as exc:
        raise ValueError(f"expected a PNG, JPEG or WebP picture, but {resolved.name} is not one Pillow can read") from exc


def _write_example_png(folder: Any) -> Any:
    from PIL import Image

    path = folder / "example.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(path)
    return path


def _save_example() -> dict[str, Any]:
    import torch

    return {"images": torch.linspace(0, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8), "filename_prefix": "example"}


@node(
    "dagfusion.image.SaveImage",
    version="1.0.0",
    category="image",
    inputs=[
        Input("images", IMAGE, link_only=True, description="Images (B, C, H, W) in [0, 1]; one file each."),
        Input("filename_prefix", STRING, "dagfusion",
              description="File names are PREFIX_00000.png, ... inside the run's output folder (subfolders allowed)."),
        Input("embed_workflow", BOOLEAN, True,
              description="Store the workflow and manifest in the PNG so 'dagfusion run picture.png' can re-run it."),
    ],
    outputs=[Output("paths", LIST, "Paths of the written files.")],
    pure=False,
    output_node=True,
    examples=[_save_example],
)
def save_image(ctx: RunContext, images: Any, filename_prefix: str, embed_workflow: bool) -> list[str]:
    """Save images as PNG files with the workflow and a reproducibility manifest embedded."""
    from dagfusion.pngmeta import png_info

    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
    if not filename_prefix.strip():
        raise ValueError("filename_prefix must not be empty")
    lineage = _plain(getattr(images, LINEAGE_ATTR, None) or {})
    workflow = str(ctx.provenance.get("workflow") or "")
    base_manifest = _plain(ctx.provenance.get("manifest") or {})
    paths = []
    index = 0
    for i in range(images.shape[0]):
        picture = to_pil(images[i])
        while True:
            path = ctx.output_path(f"{filename_prefix}_{index:05d}.png")
            index += 1
            if not path.exists():
                break
        info = None
        if embed_workflow:
            manifest = {
                **base_manifest,
                "image": {"node": ctx.node_id, "index": i, "batch_size": int(images.shape[0]),
                          "width": picture.width, "height": picture.height, "file": path.name},
                "lineage": lineage,
            }
            info = png_info(workflow, manifest)
        picture.save(path, format="PNG", pnginfo=info)
        ctx.preview(picture, label=path.name)
        paths.append(str(path))
    return paths


@node(
    "dagfusion.image.PreviewImage",
    version="1.0.0",
    category="image",
    inputs=[Input("images", IMAGE, link_only=True, description="Images (B, C, H, W) in [0, 1] to show on the canvas.")],
    outputs=[],
    pure=False,
    output_node=True,
    examples=[lambda: {"images": _save_example()["images"]}],
)
def preview_image(ctx: RunContext, images: Any) -> None:
    """Show images on the canvas (as preview events) without writing files."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    for i in range(images.shape[0]):
        ctx.preview(to_pil(images[i]), label=f"{ctx.node_id} {i}")


NODES = (load_image, save_image, preview_image)

"""The shared VAE of latent structural diffusion on two-object scenes (CPU): renders, depth and normals.

Latent structural diffusion encodes a render, its depth picture (grey) and its normal picture
(``(n + 1) / 2``) with one VAE. For ``--scenes`` held-out two-object scenes (the evaluation split
of the two-object shapes world, solid style, ``--resolution`` px, seeded), each picture makes the
round trip through shapes-sd's VAE and, with ``--vae``, a fine-tuned one (the posterior mean is
decoded, clamped to [0, 1]). Measured per VAE, in one process, one torch thread:

- **PSNR** (dB, of the mean squared error over all pictures, values in [0, 1]) of the renders,
  the depth pictures and the normal pictures separately;
- **objects lost**: the scenes whose reconstruction has fewer objects than the original, per
  kind of picture, objects segmented against the plain background with
  :func:`dagfusion.nodes.structure.maps.segment_objects` (the segmentation of ``MaskIoU``: border
  median colour, RGB distance above 0.2, 8-connected components of at least 0.2 % of the image).
  The headline is the renders' count;
- for reference, the PSNR of single-object flat renders (the evaluation split of the
  single-object world: what shapes-sd's VAE was trained on), the same number of pictures.

Usage::

    python benchmarks/structure_vae.py [--vae OUTPUT/shapes-sd-structure-vae] [--scenes 96] [--json out.json]

``--vae`` is a diffusers pipeline folder with a ``vae/`` folder (what
``workflows/train_structure_vae.yaml`` exports) or a VAE folder itself (``config.json`` and
safetensors weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

TARGETS = ("rgb", "depth", "normal")
"""The pictures of a structural sample, in the order of the table."""
MAX_OBJECTS = 4
"""Objects counted per picture at most (two-object scenes: a spare for fragments)."""
CHUNK = 16
"""Pictures per VAE call."""


def load_vae(path: Path) -> Any:
    """The ``AutoencoderKL`` of a diffusers pipeline folder (its ``vae/``) or of a VAE folder, in fp32, eval."""
    from diffusers import AutoencoderKL

    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"expected a diffusers pipeline folder with vae/ or a VAE folder with config.json, got {path}")
    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval().requires_grad_(False)


def shipped_vae() -> Any:
    """shapes-sd's own VAE."""
    from dagfusion.nodes.shapes.models import folder

    return load_vae(folder("shapes-sd"))


def two_object_pictures(scenes: int, resolution: int, seed: int) -> dict[str, torch.Tensor]:
    """The pictures ``(scenes, 3, H, W)`` in [0, 1] of each target of held-out two-object solid scenes."""
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.structure.structural_data import (
        StructuralShapesData,
        target_images,
    )

    data = StructuralShapesData(ShapesDataset("eval", 2, resolution, seed=seed, style="solid"), layout="none")
    examples = data.examples(0, scenes)
    return {name: target_images(name, examples.raw.target(name, examples.images)) for name in TARGETS}


def single_object_renders(count: int, resolution: int, seed: int) -> torch.Tensor:
    """Held-out single-object flat renders ``(count, 3, H, W)``."""
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return ShapesDataset("eval", 1, resolution, seed=seed).batch(0, count).rendered.image.float()[:, :3]


def round_trip(vae: Any, pictures: torch.Tensor) -> torch.Tensor:
    """``pictures`` in [0, 1] encoded (posterior mean) and decoded, clamped to [0, 1]."""
    out = []
    with torch.no_grad():
        for start in range(0, pictures.shape[0], CHUNK):
            x = pictures[start:start + CHUNK] * 2 - 1
            z = vae.encode(x).latent_dist.mode()
            out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of the mean squared error over all of ``a`` and ``b`` (values in [0, 1])."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def object_counts(pictures: torch.Tensor) -> list[int]:
    """Objects segmented against the plain background in each picture (at most :data:`MAX_OBJECTS`)."""
    from dagfusion.nodes.structure.maps import segment_objects

    _, counts = segment_objects(pictures, max_objects=MAX_OBJECTS)
    return counts


def objects_lost(original: torch.Tensor, reconstruction: torch.Tensor) -> int:
    """How many pictures' reconstructions have fewer objects than the originals."""
    return sum(r < o for o, r in zip(object_counts(original), object_counts(reconstruction)))


def evaluate(vae: Any, pictures: dict[str, torch.Tensor], single: torch.Tensor) -> dict[str, Any]:
    """One VAE's row: PSNR and objects lost per target, and the single-object render PSNR."""
    row: dict[str, Any] = {"psnr": {}, "objects_lost": {}}
    for name in TARGETS:
        recon = round_trip(vae, pictures[name])
        row["psnr"][name] = psnr(recon, pictures[name])
        row["objects_lost"][name] = objects_lost(pictures[name], recon)
    row["single_object_rgb_psnr"] = psnr(round_trip(vae, single), single)
    return row


def table(result: dict[str, Any]) -> str:
    """The results as a markdown table, one row per VAE."""
    scenes = result["scenes"]
    lines = [
        "| VAE | render PSNR | depth PSNR | normal PSNR | objects lost (render) | objects lost (depth / normal) | single-object render PSNR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["vaes"].items():
        p, lost = row["psnr"], row["objects_lost"]
        lines.append(
            f"| {name} | {p['rgb']:.2f} | {p['depth']:.2f} | {p['normal']:.2f} | {lost['rgb']} / {scenes} "
            f"| {lost['depth']} / {lost['normal']} | {row['single_object_rgb_psnr']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="the fine-tuned VAE: a diffusers pipeline folder (with vae/) or a VAE folder")
    parser.add_argument("--base", help="the VAE to compare against (default: shapes-sd's own)")
    parser.add_argument("--scenes", type=int, default=96, help="held-out two-object scenes")
    parser.add_argument("--resolution", type=int, default=64, choices=(32, 64))
    parser.add_argument("--seed", type=int, default=0, help="seeds the scene order and jitter")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    torch.set_num_threads(1)

    pictures = two_object_pictures(args.scenes, args.resolution, args.seed)
    single = single_object_renders(args.scenes, args.resolution, args.seed)
    base = load_vae(Path(args.base)) if args.base else shipped_vae()
    result: dict[str, Any] = {"scenes": args.scenes, "resolution": args.resolution, "seed": args.seed,
                              "original_objects": {name: sum(object_counts(pictures[name])) for name in TARGETS},
                              "vaes": {"base" if args.base else "shapes-sd": evaluate(base, pictures, single)}}
    if args.vae:
        result["vaes"]["fine-tuned"] = evaluate(load_vae(Path(args.vae)), pictures, single)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

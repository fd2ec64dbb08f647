"""Nominal and on-disk bits of shapes-sd's quantized files: what the docs' size columns quote.

For uniform int8 (per channel), int4/int3/int2 (groups of ``--group-size``) and mixed precision
at each ``--targets`` average and at the uniform formats' own averages, prints

- the nominal bits per UNet parameter (codes, scales, zero-points, 16-bit layers:
  :func:`~dagfusion.nodes.quant.patch.average_bits`),
- the bits per parameter of the file :func:`~dagfusion.nodes.quant.storage.save` writes (every
  byte, header and index included; checked against the file written),
- the file's size, its header's share, and the fp16 size over the nominal and the file size.

Mixed precision needs a sensitivity: ``--sensitivity sens.json`` (written by
``benchmarks/quant_quality.py --sensitivity sens.json``). Usage::

    python -m dagfusion.nodes.quant.sizes --sensitivity sens.json
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any


def measure(unet: Any, patch: Any, folder: Path) -> dict[str, Any]:
    """Nominal bits, file bits, bytes and header bytes of ``patch`` (its file written into ``folder``)."""
    from dagfusion.nodes.quant import storage
    from dagfusion.nodes.quant.patch import average_bits

    path = storage.save(patch, folder / "q.safetensors")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = 8 + struct.unpack("<Q", handle.read(8))[0]
    if size != storage.file_nbytes(patch):  # pragma: no cover - the prediction is tested
        raise AssertionError(f"file_nbytes predicted {storage.file_nbytes(patch)} bytes, the file has {size}")
    params = sum(p.numel() for p in unet.parameters())
    return {"nominal_bits": average_bits(unet, patch), "file_bits": size * 8 / params, "bytes": size,
            "header": header, "fp16_bytes": 2 * params}


def main(argv: list[str] | None = None) -> int:
    import torch

    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.quant.mixed import allocate, load_sensitivity, quantize_allocation, spec_for_bits
    from dagfusion.nodes.quant.patch import average_bits, quantize_module
    from dagfusion.nodes.shapes.models import folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sensitivity", help="a sensitivity JSON (benchmarks/quant_quality.py --sensitivity); without it, uniform formats only")
    parser.add_argument("--targets", type=float, nargs="+", default=[4.0, 3.0, 2.5, 2.0])
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    unet = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu").model.denoiser
    variants: list[tuple[str, Any]] = []
    uniform: dict[str, float] = {}
    for name in ("int8", "int4", "int3", "int2"):
        spec = spec_for_bits(int(name[3:]), args.group_size)
        patch = quantize_module(unet, spec)
        uniform[name] = average_bits(unet, patch)
        variants.append((f"uniform {name}" + (f" g{args.group_size}" if spec.group_size else " per channel"), patch))
    if args.sensitivity:
        sens = load_sensitivity(args.sensitivity)
        targets = [(f"mixed {t:g}", t) for t in args.targets]
        targets += [(f"mixed = {name} bits", uniform[name]) for name in ("int4", "int3", "int2")]
        for label, target in targets:
            variants.append((label, quantize_allocation(unet, sens, allocate(unet, sens, target))))
    print("| variant | nominal bits | file bits | file bytes | header bytes (share) | fp16 / nominal | fp16 / file |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for label, patch in variants:
            m = measure(unet, patch, Path(scratch))
            print(f"| {label} | {m['nominal_bits']:.3f} | {m['file_bits']:.3f} | {m['bytes']:,} | {m['header']:,} "
                  f"({100 * m['header'] / m['bytes']:.2f} %) | {16 / m['nominal_bits']:.2f}x | {m['fp16_bytes'] / m['bytes']:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

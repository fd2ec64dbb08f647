"""Weight memory and latency of weight-only quantization on real-size denoisers, on a CUDA GPU.

For a PixArt-α-size transformer (1024 px, Linear-dominated) and an SD 1.5-size UNet (512 px,
convolution-heavy), random weights, fp16: the fp16 model against torchao's int8 and fp8 (e4m3)
weight-only kernels (``dagfusion.quant.WeightOnly`` with backend ``torchao``, which converts the
Linear layers; everything else stays fp16), and dagfusion's own packed format (the bytes
``dagfusion.quant.Save`` writes: int8 and int4 g64, covering convolutions too — file size only,
since the torch backend computes in fp16). Measured in one process:

- **weight memory**: CUDA memory held by the module's parameters and buffers (allocated after
  building it minus before), and its ratio to fp16;
- **latency**: median wall-clock of one denoiser call with classifier-free guidance (batch 2),
  after warm-up, and its ratio to fp16 (above 1: slower).

Usage::

    python benchmarks/quant_speed.py --json quant_speed.json
    python benchmarks/quant_speed.py --dry-run     # the same code on the CPU with tiny configs (no speed numbers)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_speed import pixart, sd15  # noqa: E402

BUILDERS = {"pixart": pixart, "sd15": sd15}


def inputs(name: str, built: dict[str, Any], device: Any, dtype: Any) -> tuple[Any, Any, dict[str, Any]]:
    """One CFG batch of denoiser inputs (batch 2) at the model's size."""
    size = built["size"] // built["scale"]
    x = torch.randn(2, 4, size, size, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    cond = built["conditioning"]
    kwargs = {k: torch.cat([cond.negative[k], cond.positive[k]]).to(device) for k in cond.positive}
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    if name == "pixart":
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return x, t, kwargs


def sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def latency(module: Any, args: tuple[Any, Any, dict[str, Any]], repeats: int) -> float:
    x, t, kwargs = args
    with torch.no_grad():
        for _ in range(3):
            module(x, timestep=t, **kwargs)
        times = []
        for _ in range(repeats):
            sync(x.device)
            began = time.perf_counter()
            module(x, timestep=t, **kwargs)
            sync(x.device)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def held_bytes(device: Any, build: Any) -> tuple[Any, int]:
    """``(build(), bytes it holds)``: CUDA memory allocated while building, or (CPU) its tensors' bytes."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        value = build()
        return value, torch.cuda.memory_allocated(device) - before
    value = build()
    module = value["module"] if isinstance(value, dict) else value
    tensors = [*module.parameters(), *module.buffers()]
    return value, sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> int:
    from dagfusion.nodes.quant.backend import linear_layers, torchao_available, torchao_quantize
    from dagfusion.nodes.quant.formats import QuantSpec
    from dagfusion.nodes.quant.patch import DEFAULT_KEEP, average_bits, plan_layers, quantize_module

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same code on the CPU with tiny configs (checks the script; no speed numbers)")
    args = parser.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        print("# DRY RUN on the CPU with tiny configs: these are not memory or speed numbers")
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU memory and latency; GPU numbers pending")
        return 0
    else:
        device = torch.device("cuda")
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}; random weights, fp16, CFG batch 2, one process")
    use_torchao = torchao_available()
    if not use_torchao:
        if not args.dry_run:
            print("torchao is not installed (pip install dagfusion[gpu]); GPU numbers pending")
            return 0
        print("# torchao is not installed: its rows are left out of the dry run")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {}
    for name in args.models:
        built, fp16_bytes = held_bytes(device, lambda: BUILDERS[name](device, tiny=args.dry_run))
        module = built["module"].to(dtype).eval()
        call = inputs(name, built, device, dtype)
        fp16_s = latency(module, call, args.repeats)
        rows = [{"variant": "fp16", "weight_bytes": fp16_bytes, "memory_ratio": 1.0, "latency_s": fp16_s, "latency_ratio": 1.0}]
        layers = plan_layers(module, DEFAULT_KEEP).quantize
        linear = linear_layers(module, layers)
        for fmt in ("int8", "fp8_e4m3") if use_torchao else ():
            quantized, held = held_bytes(device, lambda fmt=fmt, source=module: torchao_quantize(source, QuantSpec.parse(fmt), linear))
            seconds = latency(quantized, call, args.repeats)
            rows.append({"variant": f"torchao {fmt} weight-only ({len(linear)} Linear layers)", "weight_bytes": held,
                         "memory_ratio": fp16_bytes / held, "latency_s": seconds, "latency_ratio": seconds / fp16_s})
            del quantized
        cpu = copy.deepcopy(module).float().cpu()
        for fmt in ("int8", "int4"):
            patch = quantize_module(cpu, fmt)
            bits = average_bits(cpu, patch)
            rows.append({"variant": f"dagfusion packed {fmt} ({len(layers)} Linear+Conv layers; file size)",
                         "weight_bytes": patch.nbytes, "memory_ratio": fp16_bytes / patch.nbytes, "latency_s": None,
                         "latency_ratio": None, "average_bits": round(bits, 3)})
        del cpu
        results[name] = rows
        params = sum(p.numel() for p in module.parameters()) / 1e6
        print(f"\n## {name}: {params:.0f} M parameters, {built['size']} px")
        print("| variant | weight MB | fp16 / variant memory | latency ms | latency vs fp16 |")
        print("|---|---|---|---|---|")
        for r in rows:
            ms = f"{r['latency_s'] * 1000:.2f}" if r["latency_s"] is not None else "—"
            ratio = f"{r['latency_ratio']:.2f}x" if r["latency_ratio"] is not None else "—"
            print(f"| {r['variant']} | {r['weight_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f}x | {ms} | {ratio} |")
        del module, built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

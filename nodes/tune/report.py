"""What a search hands back: a plot of the measured points and the chosen point as a workflow.

:func:`plot_svg` draws MAC speedup against quality (PSNR, or the ShapeEval drop) as a
self-contained SVG (no plotting library needed): every measured point, the Pareto set joined by a
line, the floor as a dashed line and the chosen point ringed. :func:`chosen_workflow` writes the
chosen point as a workflow of the ordinary nodes (load, quantize, cache, sample, decode, save),
ready for ``dagfusion run``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

from dagfusion.nodes.tune.pareto import Floor
from dagfusion.nodes.tune.space import parse_setting

_W, _H, _PAD = 640, 420, 60


def _scale(values: Sequence[float]) -> tuple[float, float]:
    """The finite values' range, widened by 5 % (and to 1 when they are all equal)."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    margin = 0.05 * (hi - lo)
    return lo - margin, hi + margin


def plot_svg(results: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], floor: Floor,
             chosen: Mapping[str, Any] | None, title: str = "") -> str:
    """An SVG scatter of MAC speedup (x) against the floor's quality (y) of every result."""
    cap = 60.0  # an uncached point's PSNR is infinite: draw it at the top
    quality = [min(floor.quality(r), cap) if floor.kind == "psnr" else floor.quality(r) for r in results]
    speed = [float(r["mac_speedup"]) for r in results]
    x_lo, x_hi = _scale(speed)
    y_lo, y_hi = _scale([*quality, floor.bound()])

    def x(v: float) -> float:
        return _PAD + (v - x_lo) / (x_hi - x_lo) * (_W - 2 * _PAD)

    def y(v: float) -> float:
        v = min(v, cap) if floor.kind == "psnr" else v
        return _H - _PAD - (v - y_lo) / (y_hi - y_lo) * (_H - 2 * _PAD)

    y_name = "PSNR vs the full run (dB)" if floor.kind == "psnr" else "−ShapeEval drop (points)"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" font-size="11">',
             f'<rect width="{_W}" height="{_H}" fill="white"/>',
             f'<text x="{_W / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
             f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="black"/>',
             f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="black"/>',
             f'<text x="{_W / 2}" y="{_H - 20}" text-anchor="middle">MAC speedup over the full run (×)</text>',
             f'<text x="16" y="{_H / 2}" text-anchor="middle" transform="rotate(-90 16 {_H / 2})">{escape(y_name)}</text>']
    for i in range(5):
        vx = x_lo + (x_hi - x_lo) * i / 4
        vy = y_lo + (y_hi - y_lo) * i / 4
        parts.append(f'<text x="{x(vx):.1f}" y="{_H - _PAD + 15}" text-anchor="middle">{vx:.2f}</text>')
        parts.append(f'<text x="{_PAD - 6}" y="{y(vy) + 4:.1f}" text-anchor="end">{vy:.1f}</text>')
    parts.append(f'<line x1="{_PAD}" y1="{y(floor.bound()):.1f}" x2="{_W - _PAD}" y2="{y(floor.bound()):.1f}" '
                 f'stroke="#c62828" stroke-dasharray="5,4"/>')
    parts.append(f'<text x="{_W - _PAD}" y="{y(floor.bound()) - 4:.1f}" text-anchor="end" fill="#c62828">{escape(str(floor))}</text>')
    ordered = sorted(front, key=lambda r: float(r["mac_speedup"]))
    if len(ordered) > 1:
        path = " ".join(f"{x(float(r['mac_speedup'])):.1f},{y(floor.quality(r)):.1f}" for r in ordered)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#1565c0"/>')
    on_front = {r["setting"] for r in front}
    for result, q in zip(results, quality):
        colour = "#1565c0" if result["setting"] in on_front else "#9e9e9e"
        parts.append(f'<circle cx="{x(float(result["mac_speedup"])):.1f}" cy="{y(q):.1f}" r="4" fill="{colour}">'
                     f'<title>{escape(str(result["label"]))}</title></circle>')
    if chosen is not None:
        cx, cy = x(float(chosen["mac_speedup"])), y(floor.quality(chosen))
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#2e7d32" stroke-width="2"/>')
        parts.append(f'<text x="{cx + 12:.1f}" y="{cy - 8:.1f}" fill="#2e7d32">{escape(str(chosen["label"]))}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def chosen_workflow(result: Mapping[str, Any], *, loader: Mapping[str, Any], prompt: str,
                    calibration_prompts: Sequence[str], guidance: float, seed: int, resolution: int,
                    name: str = "tuned") -> dict[str, Any]:
    """The chosen point as a workflow (a plain dict to write as YAML) of the ordinary nodes.

    :param loader: The model loader node, ``{"type": ..., "inputs": {...}}`` (e.g.
        ``dagfusion.models.LoadEmbedded`` with ``{"model": "shapes-sd"}``).
    :param prompt: The prompt the workflow samples (edit it, or override ``prompt.prompt``).
    """
    point = parse_setting(str(result["setting"]))
    nodes: dict[str, Any] = {"load": {"type": loader["type"], "inputs": dict(loader.get("inputs", {}))}}
    model = {"from": "load.model"}
    if point.quant != "none":
        inputs: dict[str, Any] = {"model": model, "format": point.quant}
        if point.quant == "int4":
            inputs["group_size"] = 64
        nodes["quant"] = {"type": "dagfusion.quant.WeightOnly", "inputs": inputs}
        model = {"from": "quant.model"}
    if point.cache == "deepcache":
        nodes["cache"] = {"type": "dagfusion.cache.DeepCache", "inputs": {"model": model, "interval": point.interval}}
        model = {"from": "cache.model"}
    elif point.cache == "blockcache":
        nodes["cache"] = {"type": "dagfusion.cache.BlockCache", "inputs": {"model": model, "interval": point.interval}}
        model = {"from": "cache.model"}
    elif point.cache == "cachequant":
        nodes["calibration_prompts"] = {"type": "dagfusion.text.Encode",
                                        "inputs": {"clip": {"from": "load.clip"}, "prompt": list(calibration_prompts)}}
        nodes["calibration_latent"] = {"type": "dagfusion.latent.EmptyLatent",
                                       "inputs": {"model": {"from": "load.model"}, "width": resolution, "height": resolution,
                                                  "batch_size": len(calibration_prompts)}}
        calibrate: dict[str, Any] = {"model": model, "conditioning": {"from": "calibration_prompts.conditioning"},
                                     "latent": {"from": "calibration_latent.latent"}, "steps": point.steps,
                                     "interval": point.interval, "guidance_scale": guidance, "seed": seed}
        if point.quant != "none":
            calibrate["reference"] = {"from": "load.model"}
        nodes["calibrate"] = {"type": "dagfusion.cache.CacheQuantCalibrate", "inputs": calibrate}
        nodes["cache"] = {"type": "dagfusion.cache.CacheQuant", "inputs": {"model": model, "schedule": {"from": "calibrate.schedule"}}}
        model = {"from": "cache.model"}
    nodes["prompt"] = {"type": "dagfusion.text.Encode", "inputs": {"clip": {"from": "load.clip"}, "prompt": prompt}}
    nodes["latent"] = {"type": "dagfusion.latent.EmptyLatent",
                       "inputs": {"model": {"from": "load.model"}, "width": resolution, "height": resolution, "batch_size": 1}}
    nodes["sample"] = {"type": "dagfusion.sampling.Sample",
                       "inputs": {"model": model, "conditioning": {"from": "prompt.conditioning"}, "latent": {"from": "latent.latent"},
                                  "steps": point.steps, "guidance_scale": guidance, "seed": seed}}
    nodes["decode"] = {"type": "dagfusion.vae.Decode", "inputs": {"vae": {"from": "load.vae"}, "latent": {"from": "sample.latent"}}}
    nodes["save"] = {"type": "dagfusion.image.SaveImage", "inputs": {"images": {"from": "decode.image"}, "filename_prefix": name}}
    quality = f"PSNR {result['psnr']} dB vs the full run"
    if result.get("shapeeval_drop") is not None:
        quality += f", ShapeEval drop {result['shapeeval_drop']} points"
    description = (f"Chosen by dagfusion tune: {result['label']} — {result['mac_speedup']}× fewer denoiser MACs, "
                   f"{float(result['weight_bits']):.2f} weight bits, {quality} (measured on the tuning prompts).")
    return {"format_version": 1, "metadata": {"name": name, "description": description}, "nodes": nodes}

"""One-step vs multi-step image-to-video on a real-size Stable Video Diffusion architecture (GPU).

Random weights (seeded): a one-step generator costs one UNet call whatever its weights, so the
speed ratio is measured faithfully without trained weights. Measured in one process, fp16:

- ``teacher``: 25 Euler steps with classifier-free guidance (both halves in one batched call,
  guidance ramped across frames) + temporal decoding of the 14 frames (chunks of 14);
- ``one-step``: one UNet call without guidance (what an SF-V-tuned UNet runs) + the same decoding;
- ``unet``: the UNet calls alone (25 guided calls vs 1 call), beside the end-to-end ratio.

Each variant's median of ``--repeats`` runs after a warm-up, the variants alternated, ratios
against the teacher. Architecture: the default ``UNetSpatioTemporalConditionModel`` (SVD's:
320/640/1280/1280 channels, 1024-d image embeddings), the temporal-decoder VAE at SVD's size
(128/256/512/512), 14 frames at 576 x 1024 (72 x 128 latents).

Usage (needs CUDA; prints a note and exits 0 without it)::

    python benchmarks/video_speed.py [--repeats 3] [--frames 14] [--json out.json]
    python benchmarks/video_speed.py --dry-run   # the same code on the CPU with tiny configs (no speed numbers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch


def build(device: Any, dtype: Any, tiny: bool) -> dict[str, Any]:
    """The video UNet, the temporal-decoder VAE and handles over them (random weights, seeded)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    from dagfusion.model import ModelHandle, VAEHandle
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.testing.models import build_svd_unet, svd_scheduler_config

    torch.manual_seed(0)
    with torch.device(device):
        if tiny:
            unet = build_svd_unet(0).to(device)
            vae = AutoencoderKLTemporalDecoder(
                block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2, layers_per_block=1,
            )
        else:
            unet = UNetSpatioTemporalConditionModel()
            vae = AutoencoderKLTemporalDecoder(
                block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=2,
            )
    unet = unet.to(device=device, dtype=dtype).eval()
    vae = vae.to(device=device, dtype=dtype).eval()
    spec = SchedulerSpec("EulerDiscreteScheduler", svd_scheduler_config())
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return {"model": ModelHandle.from_module(unet, scheduler=spec, vae_scale_factor=scale),
            "vae": VAEHandle.from_module(vae), "scale": scale, "embed": int(unet.config.cross_attention_dim)}


def inputs(parts: dict[str, Any], frames: int, height: int, width: int) -> tuple[Any, Any]:
    """A random ``svd`` conditioning and an empty video latent of ``frames`` frames."""
    from dagfusion.nodes.diffusion.data import Conditioning, Latent

    g = torch.Generator().manual_seed(1)
    h, w = height // parts["scale"], width // parts["scale"]
    cond = Conditioning("svd", {
        "encoder_hidden_states": torch.randn(1, 1, parts["embed"], generator=g),
        "image_latents": torch.randn(1, 1, 4, h, w, generator=g),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]),
    })
    return cond, Latent(torch.zeros(1, frames, 4, h, w))


def timed(fn: Any, device: Any) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU: checks the code, no speed numbers")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.video.svd import decode_video

    if args.dry_run:
        device, dtype, height, width, frames, steps = torch.device("cpu"), torch.float32, 32, 32, 3, 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("video_speed: no CUDA GPU here; GPU numbers pending (run with --dry-run to check the code on the CPU)")
            return 0
        device, dtype, height, width, frames, steps = torch.device("cuda"), torch.float16, 576, 1024, args.frames, args.steps
    parts = build(device, dtype, tiny=args.dry_run)
    cond, latent = inputs(parts, frames, height, width)
    model, vae = parts["model"], parts["vae"]
    unet = model.denoiser
    chunk = 14

    def teacher() -> None:
        out, _ = run_sampling(model, cond, latent, steps=steps, guidance_scale=3.0, min_guidance_scale=1.0, seed=0,
                              count_macs=False)
        decode_video(vae, out.samples, chunk)

    def one_step() -> None:
        out, _ = run_sampling(model, cond, latent, steps=1, guidance_scale=1.0, seed=0, count_macs=False)
        decode_video(vae, out.samples, chunk)

    sample_cfg = torch.randn(2, frames, 8, *latent.samples.shape[-2:], device=device, dtype=dtype)
    states = torch.cat([cond.positive["encoder_hidden_states"]] * 2).to(device, dtype)
    ids = torch.cat([cond.positive["added_time_ids"]] * 2).to(device, dtype)
    t = torch.tensor(0.5, device=device)

    def unet_teacher() -> None:
        with torch.no_grad():
            for _ in range(steps):
                unet(sample_cfg, t, encoder_hidden_states=states, added_time_ids=ids, return_dict=False)

    def unet_one() -> None:
        with torch.no_grad():
            unet(sample_cfg[1:], t, encoder_hidden_states=states[1:], added_time_ids=ids[1:], return_dict=False)

    variants = {"teacher": teacher, "one-step": one_step, "unet-teacher": unet_teacher, "unet-one-step": unet_one}
    for fn in variants.values():  # warm-up (kernels, allocator)
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(1 if args.dry_run else args.repeats):
        for name, fn in variants.items():  # alternate the variants
            times[name].append(timed(fn, device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "frames": frames, "size": [height, width], "steps": steps, "dtype": str(dtype).replace("torch.", ""),
        "seconds": medians,
        "end_to_end_speedup": medians["teacher"] / medians["one-step"],
        "unet_speedup": medians["unet-teacher"] / medians["unet-one-step"],
    }
    if args.dry_run:
        print(f"video_speed --dry-run: the code ran on tiny configs ({frames} frames, {height}x{width}); "
              "no speed numbers are reported from a dry run")
    else:
        print(f"{result['device']}: {frames} frames {height}x{width} fp16 — teacher {steps} steps + decode "
              f"{medians['teacher']:.2f} s, one step + decode {medians['one-step']:.2f} s: "
              f"{result['end_to_end_speedup']:.1f}x end to end, {result['unet_speedup']:.1f}x UNet only")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

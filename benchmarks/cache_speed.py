"""Cache schedulers on real-size architectures on a CUDA GPU: wall-clock and MAC speedups.

Random weights (seeded) — fixed schedules compute the same amount of work whatever the weights,
so speed is measured faithfully; adaptive methods (First Block Cache, MagCache) decide from the
weights' own features and are left out here. fp16, classifier-free guidance (one batched call
per step), DDIM, measured in one process: each variant's median of ``--repeats`` timed runs
after a warm-up, the uncached run timed alternately with the others, ratios against it.

- ``sd15``: SD 1.5-size ``UNet2DConditionModel`` (the package's SD 1 config), 512 px (64 x 64
  latents), 25 steps: uncached, DeepCache N = 2, 3, 5 (branch 0), PAB (spatial every 2nd,
  cross every 6th).
- ``dit``: DiT-XL/2 (28 blocks, width 1152, patch 2), 256 px (32 x 32 latents), 50 steps:
  uncached, PAB 2/6, TaylorSeer interval 3.
- ``pixart``: PixArt-α XL size (28 blocks, width 1152, T5 4096-d captions, 120 tokens), 1024 px
  (128 x 128 latents), 25 steps: uncached, PAB 2/6, PAB 3/6, TaylorSeer interval 3.

Usage (needs CUDA; prints a note and exits 0 without it)::

    python benchmarks/cache_speed.py [--models sd15 dit pixart] [--repeats 3] [--json out.json]
    python benchmarks/cache_speed.py --dry-run     # the same code on the CPU with tiny configs (no speed numbers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch


def sd15(device: Any, tiny: bool = False) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from dagfusion.nodes.diffusion.data import Conditioning
    from dagfusion.nodes.diffusion.single_file import CONFIGS

    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(str(CONFIGS / "sd1" / "unet"))
    width = 768
    if tiny:
        width = 32
        config = {**config, "block_out_channels": [32, 32, 64, 64], "cross_attention_dim": width, "attention_head_dim": 4,
                  "layers_per_block": 1, "sample_size": 8, "norm_num_groups": 8}
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    cond = Conditioning("clip", {"encoder_hidden_states": torch.randn(1, 77, width)}, {"encoder_hidden_states": torch.randn(1, 77, width)})
    return {"module": unet, "conditioning": cond, "size": 64 if tiny else 512, "scale": 8, "steps": 6 if tiny else 25}


def dit(device: Any, tiny: bool = False) -> dict[str, Any]:
    from diffusers import DiTTransformer2DModel

    from dagfusion.nodes.diffusion.data import Conditioning

    torch.manual_seed(0)
    with torch.device(device):
        module = DiTTransformer2DModel(
            num_layers=4 if tiny else 28, num_attention_heads=2 if tiny else 16, attention_head_dim=8 if tiny else 72,
            in_channels=4, out_channels=8, patch_size=2, sample_size=8 if tiny else 32, num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero", activation_fn="gelu-approximate", norm_elementwise_affine=False,
        )
    cond = Conditioning("class", {"class_labels": torch.tensor([207])}, {"class_labels": torch.tensor([1000])})
    return {"module": module, "conditioning": cond, "size": 64 if tiny else 256, "scale": 8, "steps": 6 if tiny else 50}


def pixart(device: Any, tiny: bool = False) -> dict[str, Any]:
    from diffusers import PixArtTransformer2DModel

    from dagfusion.nodes.diffusion.data import Conditioning

    torch.manual_seed(0)
    caption = 32 if tiny else 4096
    heads, head_dim = (2, 8) if tiny else (16, 72)
    with torch.device(device):
        module = PixArtTransformer2DModel(
            sample_size=8 if tiny else 128, num_layers=4 if tiny else 28, attention_head_dim=head_dim,
            num_attention_heads=heads, caption_channels=caption, cross_attention_dim=heads * head_dim, in_channels=4,
            out_channels=8, patch_size=2, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        )
    mask = torch.ones(1, 120, dtype=torch.long)
    cond = Conditioning("t5", {"encoder_hidden_states": torch.randn(1, 120, caption), "encoder_attention_mask": mask},
                        {"encoder_hidden_states": torch.randn(1, 120, caption), "encoder_attention_mask": mask})
    return {"module": module, "conditioning": cond, "size": 64 if tiny else 1024, "scale": 8, "steps": 6 if tiny else 25}


BUILDERS = {"sd15": sd15, "dit": dit, "pixart": pixart}


def variants(name: str, calibrate: Any, blocks: int) -> list[tuple[str, Any]]:
    """``(label, patch)`` per scheduler; ``calibrate(**options)`` makes a CacheQuant schedule on the
    (random-weight) model itself — its full steps then differ from a trained model's, its cost does not."""
    from dagfusion.nodes.cache.blockcache import BlockCacheConfig, BlockCachePatch
    from dagfusion.nodes.cache.cachequant import schedule_patch
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch
    from dagfusion.nodes.cache.diffusers_caches import CacheSettings, DiffusersCachePatch

    pab = [("PAB 2/6", DiffusersCachePatch(CacheSettings("pyramid_attention_broadcast")))]
    if name == "sd15":
        return [*[(f"DeepCache N={n}", DeepCachePatch(DeepCacheConfig(interval=n), measure=False)) for n in (2, 3, 5)],
                ("CacheQuant DPS K=ceil(T/5) + DEC", schedule_patch(calibrate(interval=5))), *pab]
    extra = [("PAB 3/6", DiffusersCachePatch(CacheSettings("pyramid_attention_broadcast", spatial_attention_block_skip_range=3)))] if name == "pixart" else []
    span = (1, blocks - 1)
    cached = [(f"BlockCache N={n} blocks {span[0]}-{span[1]}", BlockCachePatch(BlockCacheConfig(span=span, interval=n), measure=False)) for n in (2, 3)]
    cached.append(("CacheQuant DPS K=ceil(T/3) + DEC", schedule_patch(calibrate(interval=3, span=span))))
    return [*pab, *extra, *cached, ("TaylorSeer 3", DiffusersCachePatch(CacheSettings("taylorseer", cache_interval=3, disable_cache_before_step=2)))]


def main(argv: list[str] | None = None) -> int:
    from dagfusion.model import ModelHandle, count_macs
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same code on the CPU with tiny configs in fp32 (checks the script; no speed numbers)")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        print("# DRY RUN on the CPU with tiny configs: these are not speed numbers")
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU wall-clock; GPU numbers pending")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.float16
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, fp16, CFG, DDIM; ratios vs uncached, one process")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
    results: dict[str, Any] = {}
    scheduler = SchedulerSpec("DDIMScheduler", {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False})
    for name in args.models:
        built = BUILDERS[name](device, tiny=args.dry_run)
        module = built["module"].to(dtype).eval()
        base = ModelHandle.from_module(module, scheduler=scheduler, vae_scale_factor=built["scale"])
        latent = empty_latent(base, built["size"], built["size"], 1)

        def once(handle: Any) -> float:
            sync()
            began = time.perf_counter()
            with torch.no_grad():
                sample(handle, built["conditioning"], latent, steps=built["steps"], guidance_scale=4.5, seed=0)
            sync()
            return time.perf_counter() - began

        def macs(handle: Any) -> int:
            with torch.no_grad(), count_macs(module, records=False) as counter:
                sample(handle, built["conditioning"], latent, steps=built["steps"], guidance_scale=4.5, seed=0)
            return counter.total

        once(base)
        full_macs = macs(base)
        rows = []
        def calibrate(**options: Any) -> Any:
            from dagfusion.nodes.cache.cachequant import calibrate as run_calibration

            with torch.no_grad():
                return run_calibration(base, built["conditioning"], latent, steps=built["steps"], guidance_scale=4.5,
                                       seed=1, **options)

        blocks = len(getattr(module, "transformer_blocks", ())) or 0
        for label, patch in variants(name, calibrate, blocks):
            handle = base.with_patch(patch)
            once(handle)
            ours, theirs = [], []
            for _ in range(args.repeats):
                theirs.append(once(base))
                ours.append(once(handle))
            full, cached = statistics.median(theirs), statistics.median(ours)
            rows.append({"scheduler": label, "uncached_s": round(full, 3), "cached_s": round(cached, 3),
                         "wall_speedup": round(full / cached, 3), "mac_speedup": round(full_macs / max(macs(handle), 1), 3)})
        results[name] = rows
        print(f"\n## {name}: {sum(p.numel() for p in module.parameters()) / 1e6:.0f} M parameters, {built['size']} px, {built['steps']} steps")
        print("| scheduler | uncached s | cached s | wall-clock speedup | MAC speedup |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['scheduler']} | {r['uncached_s']} | {r['cached_s']} | {r['wall_speedup']:.2f}x | {r['mac_speedup']:.2f}x |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

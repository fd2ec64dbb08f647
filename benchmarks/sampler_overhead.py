"""Sampler loop overhead: dagfusion's sampler vs the diffusers pipeline, same model, same everything.

Both sides get the same UNet, VAE, scheduler class, prompt embeddings, seed (a CPU generator),
guidance and step count; their outputs are compared (max abs difference is printed), then
timed alternately (after warm-up runs), and the median wall-clock of each is reported with
the ratio dagfusion / diffusers, plus the peak memory of one run of each.

Measured variants:

- ``loop``: denoising only — dagfusion's ``sample()`` (called as the Sample node calls it,
  with a run context that reports progress and checks for cancel every step) vs
  ``StableDiffusionPipeline(prompt_embeds=..., output_type="latent")``.
- ``loop+decode``: the same plus VAE decoding to [0, 1] images (``vae.decode`` node function vs
  ``output_type="pt"``).

Modes::

    python benchmarks/sampler_overhead.py            # CPU: the tiny SD model of dagfusion.testing.models
    python benchmarks/sampler_overhead.py --stub     # CPU: a no-op denoiser, to isolate each loop's per-step cost
    python benchmarks/sampler_overhead.py --gpu      # CUDA: SD 1.5-size UNet + VAE, random weights, fp16,
                                                     # 512 x 512, 25 steps (configs shipped in the package)

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the memory held before the run
(weights excluded); on CPU the peak resident set size above the one before the run, sampled
every millisecond from /proc (approximate). Runs on torch 2.11+ and diffusers 0.35+.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parent.parent


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return 0


class PeakMemory:
    """Peak memory of a block, above what was in use when it started."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()
            self._high = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._high = max(self._high, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, _rss_bytes()) - self.base


def build_gpu_models(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """SD 1.5-size UNet and VAE from the shipped configs, random weights (seeded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dagfusion.nodes.diffusion.single_file import CONFIGS

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "sd1" / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIGS / "sd1" / "vae")))
    unet = unet.to(dtype).eval()
    vae = vae.to(dtype).eval()
    scheduler_config = json.loads((CONFIGS / "sd1" / "scheduler" / "scheduler_config.json").read_text())
    return {"unet": unet, "vae": vae, "scheduler_config": scheduler_config, "hidden": 768, "scale": 8}


def build_stub_models() -> dict[str, Any]:
    """The tiny SD VAE with a denoiser that costs (almost) nothing: isolates the loops' own overhead."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class UNet2DConditionModel(ModelMixin, ConfigMixin):  # the name makes both sides treat it as a UNet
        @register_to_config
        def __init__(self, in_channels: int = 4, out_channels: int = 4, sample_size: int = 16,
                     time_cond_proj_dim: Any = None, addition_embed_type: Any = None) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((), 0.5))

        def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any = None, timestep_cond: Any = None,
                    cross_attention_kwargs: Any = None, added_cond_kwargs: Any = None, return_dict: bool = True) -> Any:
            return (sample * self.scale,)

    models = build_cpu_models()
    models["unet"] = UNet2DConditionModel().eval()
    return models


def build_cpu_models() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    pipe = tiny.build_sd(0)
    return {"unet": pipe.unet, "vae": pipe.vae, "scheduler_config": dict(pipe.scheduler.config), "hidden": 32, "scale": 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="SD 1.5-size random UNet on CUDA, fp16, 512 px")
    parser.add_argument("--full", action="store_true", help="SD 1.5-size random models on the CPU (fp32; slow)")
    parser.add_argument("--stub", action="store_true",
                        help="a denoiser that does nothing, to measure each loop's own per-step overhead")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 on GPU, 32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 5 GPU, 9 CPU)")
    parser.add_argument("--sampler", default="euler", help="dagfusion sampler name (same class on both sides)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on small machines)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import diffusers
    from diffusers import StableDiffusionPipeline

    from dagfusion import CancelToken, RunContext, Settings
    from dagfusion.model import ModelHandle, VAEHandle
    from dagfusion.nodes.diffusion.data import Conditioning, Latent, SchedulerSpec
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.schedulers import SAMPLERS, spec_for
    from dagfusion.nodes.diffusion.vae import decode

    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu given but torch sees no CUDA device", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.float16
        torch.backends.cudnn.benchmark = True
        models = build_gpu_models(dtype, device)
        size, repeats = args.size or 512, args.repeats or 5
    else:
        torch.set_num_threads(args.threads)
        device, dtype = torch.device("cpu"), torch.float32
        models = build_gpu_models(dtype, device) if args.full else build_stub_models() if args.stub else build_cpu_models()
        size, repeats = args.size or (512 if args.full else 32), args.repeats or (41 if args.stub else 9)
    unet, vae, scale = models["unet"], models["vae"], models["scale"]

    spec = spec_for(SchedulerSpec("PNDMScheduler", models["scheduler_config"]), args.sampler)
    class_name, overrides = SAMPLERS[args.sampler]
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=getattr(diffusers, class_name).from_config(models["scheduler_config"], **overrides),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(1)
    positive = torch.randn(1, 77, models["hidden"], generator=g).to(device, dtype)
    negative = torch.randn(1, 77, models["hidden"], generator=g).to(device, dtype)
    model = ModelHandle.from_module(unet, scheduler=spec, vae_scale_factor=scale)
    vae_handle = VAEHandle.from_module(vae)
    conditioning = Conditioning("clip", {"encoder_hidden_states": positive}, {"encoder_hidden_states": negative})
    latent = Latent(torch.zeros(1, 4, size // scale, size // scale))
    settings = Settings(device=str(device), source="benchmark")
    seed = 0

    def context() -> RunContext:
        return RunContext(node_id="sample", run_id="bench", settings=settings, output_dir=Path("."), cancel_token=CancelToken())

    def ours(with_decode: bool) -> torch.Tensor:
        out = sample(model, conditioning, latent, steps=args.steps, guidance_scale=args.guidance, seed=seed, ctx=context())
        return decode(vae_handle, out) if with_decode else out.samples

    def theirs(with_decode: bool) -> torch.Tensor:
        return pipe(
            prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=args.steps,
            guidance_scale=args.guidance, height=size, width=size, generator=torch.Generator().manual_seed(seed),
            output_type="pt" if with_decode else "latent",
        ).images

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": str(dtype).replace("torch.", ""),
        "size": size, "steps": args.steps, "sampler": args.sampler, "repeats": repeats,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
    }
    with torch.no_grad():
        for name, with_decode in (("loop", False), ("loop+decode", True)):
            a, b = ours(with_decode), theirs(with_decode)  # warm-up and equivalence
            diff = (a.float().cpu() - b.float().cpu()).abs().max().item()
            ours(with_decode), theirs(with_decode)
            with PeakMemory(device) as mem_ours:
                ours(with_decode)
            with PeakMemory(device) as mem_theirs:
                theirs(with_decode)
            times: dict[str, list[float]] = {"dagfusion": [], "diffusers": []}
            for i in range(repeats):
                order = (("dagfusion", ours), ("diffusers", theirs)) if i % 2 == 0 else (("diffusers", theirs), ("dagfusion", ours))
                for label, fn in order:
                    sync()
                    t0 = time.perf_counter()
                    fn(with_decode)
                    sync()
                    times[label].append(time.perf_counter() - t0)
            t_ours, t_theirs = statistics.median(times["dagfusion"]), statistics.median(times["diffusers"])
            results[name] = {
                "dagfusion_s": t_ours, "diffusers_s": t_theirs, "time_ratio": t_ours / t_theirs,
                "dagfusion_peak_bytes": mem_ours.peak, "diffusers_peak_bytes": mem_theirs.peak,
                "memory_ratio": mem_ours.peak / mem_theirs.peak if min(mem_ours.peak, mem_theirs.peak) >= 2**20 else None,
                "max_abs_diff": diff, "times": times,
            }

    print(f"sampler overhead on {results['device']} (torch {results['torch']}, diffusers {results['diffusers']}), "
          f"{results['dtype']}, {size}x{size}, {args.steps} steps, {args.sampler}, CFG {args.guidance}, "
          f"median of {repeats}, UNet {results['unet_parameters'] / 1e6:.1f}M params")
    for name in ("loop", "loop+decode"):
        r = results[name]
        mem = f"{r['memory_ratio']:.3f}" if r["memory_ratio"] is not None else "n/a (below 1 MiB)"
        print(f"  {name:12s} time dagfusion {r['dagfusion_s'] * 1000:9.2f} ms  diffusers {r['diffusers_s'] * 1000:9.2f} ms"
              f"  ratio {r['time_ratio']:.3f} | peak dagfusion {r['dagfusion_peak_bytes'] / 2**20:8.1f} MiB"
              f"  diffusers {r['diffusers_peak_bytes'] / 2**20:8.1f} MiB  ratio {mem} | max |diff| {r['max_abs_diff']:.3g}")
    if args.stub:
        per_step = (results["loop"]["dagfusion_s"] - results["loop"]["diffusers_s"]) / args.steps
        results["loop_overhead_per_step_us"] = per_step * 1e6
        print(f"  loop overhead per step (dagfusion - diffusers, no-op denoiser): {per_step * 1e6:+.1f} us; "
              f"dagfusion {results['loop']['dagfusion_s'] / args.steps * 1e6:.1f} us/step, "
              f"diffusers {results['loop']['diffusers_s'] / args.steps * 1e6:.1f} us/step")
    print("RESULT " + json.dumps({k: v for k, v in results.items()}, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

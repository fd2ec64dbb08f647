"""Quality and CPU time of the shapes-video models: the 25-step base model against its SF-V one-step generator.

Every clip is a **held-out combination** of the shapes-video world (colour, shape, size,
background, lane and speed never trained on), rendered with ``--seeds`` jitter seeds; each model
gets the clip's first frame and the motion bucket id of its speed, and must make the shape move in
the direction its kind implies at that speed. Measured on the same clips, with the same
conditioning and noise seeds:

- ``real``: the rendered clips themselves (the metrics' ceiling), and their VAE round trip;
- ``teacher``: the base model, ``--steps`` Euler steps (25), guidance ramped 1 → 3 across frames;
- ``one-step``: the SF-V generator, one UNet call, no guidance.

Metrics (:mod:`dagfusion.nodes.metrics.video`): motion accuracy (direction and speed from the
centroid track of the object segmented against the plain background), per-frame ShapeEval-frames
all-correct (colour, shape, size and background stay the clip's), and FD-shapes-video against the
real clips (a Fréchet distance over the project's own ShapeEval features — **not FVD**). The
one-step model's differences from the teacher come with paired-bootstrap 95 % intervals over clips.

CPU time per clip end to end (first-frame conditioning, sampling, temporal decoding), batch 1, one
thread, each variant's median of ``--repeats`` runs after a warm-up, the variants alternated, MAC
counting off. Decoding is a fixed cost the one step does not shrink, so both are timed twice: with
the VAE in fp32 and in bf16 (oneDNN's bf16 kernels; the UNet stays fp32). ``--vae-dtype`` picks the
VAE the quality metrics use.

Usage::

    python benchmarks/video_shapes.py [--base DIR] [--one-step DIR] [--seeds 2] [--vae-dtype bf16] [--json out.json] [--gif-dir docs]
    python benchmarks/video_shapes.py --time-only   # only the CPU time per clip
    python benchmarks/video_shapes.py --parts   # where a clip's CPU time goes (conditioning, sampling, decoding)

Without ``--base``/``--one-step`` the embedded ``shapes-video`` and ``shapes-video-1step`` models are used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

FPS = 7
NOISE_AUG = 0.02


def load(folder: str | None, name: str, vae_dtype: str = "fp32") -> dict[str, Any]:
    """The four SVD handles of a saved folder (``None``: the embedded model ``name``) on the CPU,
    fp32 but the VAE, which is ``vae_dtype``."""
    from dagfusion.nodes.video.export import embedded_folder, read_svd_folder

    path = Path(folder) if folder else embedded_folder(name)
    parts = {**read_svd_folder(path, source=f"benchmark:{path}"), "path": str(path)}
    if vae_dtype != "fp32":
        parts["vae"] = read_svd_folder(path, dtype=vae_dtype, source=f"benchmark:{path}")["vae"]
    return parts


def held_out(seeds: int, limit: int, resolution: int, frames: int) -> tuple[Any, list[str], list[int]]:
    """Every held-out combination rendered with jitter seeds ``0 … seeds-1``: clips, descriptions, bucket ids."""
    from dagfusion.nodes.shapes.motion import clips as split_clips
    from dagfusion.nodes.shapes.motion import render_clip
    from dagfusion.nodes.shapes.render import _sample_seed

    combos = split_clips("eval")
    if limit:
        combos = combos[:limit]
    videos, texts, buckets = [], [], []
    for seed in range(seeds):
        for i, clip in enumerate(combos):
            rendered = render_clip(clip, resolution, frames, torch.Generator().manual_seed(_sample_seed(1000 + seed, i)))
            videos.append(rendered.video)
            texts.append(clip.description)
            buckets.append(clip.motion_bucket_id)
    return torch.cat(videos), texts, buckets


def generate(parts: dict[str, Any], first: Any, bucket: int, *, steps: int, seed: int, one_step: bool, frames: int) -> Any:
    """Clips ``(B, F, 3, H, W)`` from first frames ``(B, 3, H, W)`` sharing one motion bucket id."""
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.video.sfv import one_step_sample
    from dagfusion.nodes.video.svd import decode_video, svd_conditioning

    height, width = int(first.shape[-2]), int(first.shape[-1])
    cond, latent = svd_conditioning(parts["clip_vision"], parts["vae"], first, width=width, height=height, frames=frames,
                                    fps=FPS, motion_bucket_id=bucket, noise_aug_strength=NOISE_AUG, seed=seed)
    if one_step:
        out, _ = one_step_sample(parts["model"], cond, latent, seed=seed, count_macs=False)
    else:
        out, _ = run_sampling(parts["model"], cond, latent, steps=steps, guidance_scale=3.0, min_guidance_scale=1.0,
                              seed=seed, count_macs=False)
    return decode_video(parts["vae"], out.samples, decode_chunk_size=frames)


def generate_all(parts: dict[str, Any], video: Any, buckets: list[int], *, steps: int, one_step: bool, batch: int) -> Any:
    """Clips for every row of ``video`` (its first frame and bucket), ``batch`` rows of one bucket at a time."""
    out = torch.zeros_like(video)
    by_bucket: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(i)
    for bucket, rows in sorted(by_bucket.items()):
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            out[chunk] = generate(parts, video[chunk, 0], bucket, steps=steps, seed=start + bucket, one_step=one_step,
                                  frames=int(video.shape[1]))
    return out


def round_trip(vae: Any, video: Any) -> Any:
    """Clips encoded (posterior mode) and decoded by the VAE, the frames of a clip decoded together."""
    from dagfusion.nodes.video.edm import encode_clips
    from dagfusion.nodes.video.svd import decode_video

    return decode_video(vae, encode_clips(vae, video), decode_chunk_size=int(video.shape[1]))


def per_clip(video: Any, texts: list[str], frame_eval: Any) -> dict[str, list[float]]:
    """Per-clip scores: motion right (0/1), direction right, speed right, and the fraction of frames all-correct."""
    from dagfusion.nodes.metrics.frame_evaluator import predict_frames
    from dagfusion.nodes.metrics.video import FRAME_ATTRIBUTES, clip_motions
    from dagfusion.nodes.shapes.motion import parse_description

    clips = [parse_description(t) for t in texts]
    motions = clip_motions(video)
    frames = int(video.shape[1])
    predicted = predict_frames(frame_eval, video.flatten(0, 1).float())
    out: dict[str, list[float]] = {"motion": [], "direction": [], "speed": [], "frames_all_correct": []}
    for i, (clip, motion) in enumerate(zip(clips, motions)):
        out["direction"].append(float(motion.direction == clip.direction))
        out["speed"].append(float(motion.speed == clip.speed))
        out["motion"].append(float(motion.direction == clip.direction and motion.speed == clip.speed))
        right = [all(predicted[i * frames + f][a] == getattr(clip, a) for a in FRAME_ATTRIBUTES) for f in range(frames)]
        out["frames_all_correct"].append(sum(right) / frames)
    return out


def summary(scores: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in scores.items()}


def time_per_clip(variants: dict[str, Any], first: Any, bucket: int, repeats: int) -> dict[str, float]:
    """Median CPU seconds per clip (batch 1, conditioning + sampling + decoding) of each variant, alternated."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn(first, bucket)  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            began = time.perf_counter()
            fn(first, bucket)
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def parts_timing(base: dict[str, Any], one: dict[str, Any], first: Any, bucket: int, frames: int, steps: int,
                 repeats: int) -> dict[str, float]:
    """Median seconds of each part of a clip (batch 1, one thread): conditioning, one-step and
    ``steps``-step sampling, decoding, and bare UNet calls on one and on a doubled (guided) batch."""
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.video.sfv import one_step_sample
    from dagfusion.nodes.video.svd import decode_video, svd_conditioning

    height, width = int(first.shape[-2]), int(first.shape[-1])

    def condition() -> Any:
        return svd_conditioning(one["clip_vision"], one["vae"], first, width=width, height=height, frames=frames,
                                fps=FPS, motion_bucket_id=bucket, noise_aug_strength=NOISE_AUG, seed=0)

    cond, latent = condition()
    out, _ = one_step_sample(one["model"], cond, latent, seed=0)
    unet = one["model"].denoiser
    x = torch.randn(tuple(latent.samples.shape[:2]) + (int(unet.config.in_channels),) + tuple(latent.samples.shape[3:]))
    embeds, ids = cond.positive["encoder_hidden_states"], cond.positive["added_time_ids"]
    parts = {
        "conditioning": condition,
        "one-step sampling": lambda: one_step_sample(one["model"], cond, latent, seed=0, count_macs=False),
        f"{steps}-step sampling": lambda: run_sampling(base["model"], cond, latent, steps=steps, guidance_scale=3.0,
                                                       min_guidance_scale=1.0, seed=0, count_macs=False),
        "decoding": lambda: decode_video(one["vae"], out.samples, decode_chunk_size=frames),
        "UNet call, batch 1": lambda: unet(x, torch.tensor([1.0]), embeds, ids),
        "UNet call, batch 2": lambda: unet(x.repeat(2, 1, 1, 1, 1), torch.tensor([1.0]), embeds.repeat(2, 1, 1), ids.repeat(2, 1)),
    }
    out_times = {}
    for name, fn in parts.items():
        fn()
        runs = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - began)
        out_times[name] = statistics.median(runs)
    return out_times


def clip_timing(args: argparse.Namespace, frames: int, first: Any, bucket: int) -> dict[str, Any]:
    """CPU seconds per clip end to end (batch 1, one thread) of ``--steps`` steps and of one step,
    each with the VAE in fp32 and in bf16, alternated; prints them with the one step's speed-ups."""
    torch.set_num_threads(1)
    models = {(name, dtype): load(folder, name, dtype) for name, folder in
              (("shapes-video", args.base), ("shapes-video-1step", args.one_step)) for dtype in ("fp32", "bf16")}
    variants = {}
    for dtype in ("fp32", "bf16"):
        base, one = models["shapes-video", dtype], models["shapes-video-1step", dtype]
        variants[f"{args.steps} steps, VAE {dtype}"] = (
            lambda f, b, m=base: generate(m, f, b, steps=args.steps, seed=0, one_step=False, frames=frames))
        variants[f"one step, VAE {dtype}"] = (
            lambda f, b, m=one: generate(m, f, b, steps=1, seed=0, one_step=True, frames=frames))
    with torch.no_grad():
        timing = time_per_clip(variants, first, bucket, args.repeats)
    speedup = {dtype: timing[f"{args.steps} steps, VAE {dtype}"] / timing[f"one step, VAE {dtype}"]
               for dtype in ("fp32", "bf16")}
    print(f"\nCPU seconds per clip (batch 1, one thread, decode included, median of {args.repeats}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in timing.items()))
    print("one step is " + ", ".join(f"{v:.1f}x faster with the VAE in {k}" for k, v in speedup.items()))
    return {"seconds_per_clip": timing, "speedup": speedup}


def save_gif(video: Any, path: Path, columns: int = 4) -> None:
    """A grid of clips ``(B, F, 3, H, W)`` as one animated GIF (``columns`` clips a row)."""
    from PIL import Image

    batch, frames = int(video.shape[0]), int(video.shape[1])
    rows = (batch + columns - 1) // columns
    height, width = int(video.shape[-2]), int(video.shape[-1])
    images = []
    for f in range(frames):
        canvas = torch.zeros(3, rows * height, columns * width)
        for i in range(batch):
            r, c = divmod(i, columns)
            canvas[:, r * height:(r + 1) * height, c * width:(c + 1) * width] = video[i, f]
        array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        images.append(Image.fromarray(array).resize((columns * width * 2, rows * height * 2), Image.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // FPS, loop=0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the 25-step model's folder (default: the embedded shapes-video)")
    parser.add_argument("--one-step", help="the one-step generator's folder (default: the embedded shapes-video-1step)")
    parser.add_argument("--seeds", type=int, default=2, help="jitter seeds per held-out combination")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N held-out combinations (0: all)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per variant")
    parser.add_argument("--frames", type=int, default=0, help="frames per clip (0: the UNet's num_frames)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", action="store_true", help="only time the parts of a clip (conditioning, sampling, decoding, UNet calls)")
    parser.add_argument("--time-only", action="store_true", help="only time a clip end to end")
    parser.add_argument("--vae-dtype", choices=("fp32", "bf16"), default="fp32", help="the VAE the quality metrics use")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--gif-dir", help="write teacher/one-step GIF grids of the first 8 clips here")
    args = parser.parse_args(argv)
    if not 1 <= args.seeds <= 8 or not 1 <= args.steps <= 200 or not 1 <= args.batch <= 64:
        parser.error("expected --seeds in 1..8, --steps in 1..200 and --batch in 1..64")
    torch.set_num_threads(args.threads)

    from dagfusion.nodes.metrics.evaluator import SHIPPED as SHAPEEVAL
    from dagfusion.nodes.metrics.evaluator import load_shapeeval
    from dagfusion.nodes.metrics.frame_evaluator import load_frame_evaluator
    from dagfusion.nodes.metrics.video import fd_video

    base = load(args.base, "shapes-video", args.vae_dtype)
    one = load(args.one_step, "shapes-video-1step", args.vae_dtype)
    resolution = int(base["model"].denoiser.config.sample_size) * base["model"].vae_scale_factor
    frames = args.frames or int(base["model"].denoiser.config.num_frames)
    video, texts, buckets = held_out(args.seeds, args.limit, resolution, frames)
    if args.parts:
        torch.set_num_threads(1)
        with torch.no_grad():
            times = parts_timing(base, one, video[:1, 0], buckets[0], frames, args.steps, max(args.repeats, 3))
        guided = args.steps * times["UNet call, batch 2"] / times["UNet call, batch 1"]
        print("CPU seconds (batch 1, one thread, median): " + ", ".join(f"{k} {v:.4f}" for k, v in times.items()))
        print(f"sampling alone: {times[f'{args.steps}-step sampling'] / times['one-step sampling']:.1f}x; "
              f"UNet calls alone ({args.steps} guided against one): {guided:.1f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({"parts_seconds": times}, indent=2) + "\n", encoding="utf-8")
        return {"parts_seconds": times}
    results: dict[str, Any] = {"clips": int(video.shape[0]), "seeds": args.seeds, "steps": args.steps,
                               "vae_dtype": args.vae_dtype}
    if args.time_only:
        results.update(clip_timing(args, frames, video[:1, 0], buckets[0]))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return results
    frame_eval, still_eval = load_frame_evaluator(), load_shapeeval(SHAPEEVAL)
    print(f"{video.shape[0]} held-out clips ({video.shape[0] // args.seeds} combinations x {args.seeds} seeds), "
          f"{frames} frames at {resolution} px, VAE {args.vae_dtype}", flush=True)

    made: dict[str, Any] = {"real": video}
    with torch.no_grad():
        made["vae round trip"] = round_trip(base["vae"], video)
        began = time.process_time()
        made["teacher"] = generate_all(base, video, buckets, steps=args.steps, one_step=False, batch=args.batch)
        results["teacher_cpu_s"] = time.process_time() - began
        began = time.process_time()
        made["one-step"] = generate_all(one, video, buckets, steps=1, one_step=True, batch=args.batch)
        results["one_step_cpu_s"] = time.process_time() - began
    scores = {name: per_clip(v, texts, frame_eval) for name, v in made.items()}
    print("\n| clips | motion | direction | speed | frames all-correct | FD-shapes-video vs real |")
    print("|---|---|---|---|---|---|")
    for name, v in made.items():
        s = summary(scores[name])
        fd = fd_video(still_eval, v, video) if name != "real" else 0.0
        results[name] = {**s, "fd_shapes_video": fd}
        print(f"| {name} | {s['motion']:.3f} | {s['direction']:.3f} | {s['speed']:.3f} | {s['frames_all_correct']:.3f} | {fd:.2f} |")
    from dagfusion.nodes.metrics.intervals import paired_difference

    for metric in ("motion", "frames_all_correct"):
        mean, low, high = paired_difference(scores["one-step"][metric], scores["teacher"][metric])
        results[f"one_step_minus_teacher_{metric}"] = [mean, low, high]
        print(f"one-step − teacher, {metric}: {100 * mean:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]")

    if args.gif_dir:
        save_gif(made["teacher"][:8], Path(args.gif_dir) / f"video-shapes-{args.steps}-steps.gif")
        save_gif(made["one-step"][:8], Path(args.gif_dir) / "video-shapes-one-step.gif")
        save_gif(video[:8], Path(args.gif_dir) / "video-shapes-real.gif")

    results.update(clip_timing(args, frames, video[:1, 0], buckets[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

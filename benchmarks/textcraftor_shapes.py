"""TextCraftor on the shapes world (CPU): train an embedded model's text encoder with the ShapeEval
reward, then measure it on held-out prompts with a second, independently trained ShapeEval.

Three sub-commands, each in one process with one torch thread (``--threads``):

``train``
    Fine-tunes the shipped ``shapes-sd`` (CLIP) or, with ``--model shapes-dit``, T5 encoder with :func:`~dagfusion.nodes.textcraftor.loop.train_encoder`
    (the code behind ``dagfusion.textcraftor.Train``) on the training split's captions, the
    reward being the shipped ShapeEval classifier's log-probability of the prompt's attributes.
    Writes ``<out>/encoder`` (diffusers layout, ``SaveEncoder``'s format), ``<out>/train.json``
    (settings, reward curve, CPU seconds) and checkpoints under ``<out>/checkpoints`` (a second
    call resumes from the newest; ``export`` writes a checkpoint's encoder).

``eval``
    Samples ``--prompts`` held-out prompts (the evaluation split's single-object combinations,
    never trained on) × ``--seeds`` seeds at 25 steps with the original encoder and with every
    ``--encoder`` folder, from the same noise, and scores each image with **both** classifiers:
    the reward's (``shapeeval.safetensors``) and the independent one
    (``shapeeval-seed1.safetensors``, the same training workflow with ``train.seed=1``). The gain
    in all-correct is paired per (prompt, seed) and given with a bootstrap 95 % interval. Also
    the training split (``--train-prompts`` prompts, 1 seed) and FD-shapes against renders of the
    held-out prompts.

``interpolate``
    Two encoders tuned with different rewards, their embeddings interpolated
    (``InterpolateEncoders``) at α ∈ {0, 0.25, 0.5, 0.75, 1}; both rewards at each α on held-out
    prompts, and a PNG plot (matplotlib).

Usage::

    python benchmarks/textcraftor_shapes.py train --out runs/tc --steps 400 --lr 1e-5
    python benchmarks/textcraftor_shapes.py eval --encoder runs/tc/encoder --json runs/tc/eval.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

SECOND_EVALUATOR = "shapeeval-seed1.safetensors"


MODEL = "shapes-sd"


def embedded_model() -> Any:
    """The embedded model chosen with ``--model`` (shapes-sd: CLIP + UNet; shapes-dit: T5 + PixArt)."""
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.models import folder

    return load_diffusers_folder(folder(MODEL))


def evaluators() -> dict[str, Any]:
    """The reward's classifier and the independent one, by name."""
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval

    return {"reward_classifier": load_shapeeval(SHIPPED),
            "independent_classifier": load_shapeeval(SHIPPED.with_name(SECOND_EVALUATOR))}


def spread(pool: list[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``pool`` (all of it when count ≥ its size)."""
    if count >= len(pool):
        return list(pool)
    step = len(pool) / count
    return [pool[int(i * step)] for i in range(count)]


def captions(split: str, count: int = 0) -> list[str]:
    from dagfusion.nodes.shapes.world import scenes

    pool = [s.caption for s in scenes(split, 1)]
    return spread(pool, count) if count else pool


# --------------------------------------------------------------------------------------------- train


def train(args: argparse.Namespace) -> int:
    from dagfusion.nodes.textcraftor.loop import CraftConfig, train_encoder
    from dagfusion.nodes.textcraftor.save import save_encoder
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.loop import CheckpointPolicy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = embedded_model()
    reward = reward_for(args.reward, evaluators()["reward_classifier"])
    texts = captions("train")
    config = CraftConfig(variant=args.variant, sample_steps=args.sample_steps, grad_steps=args.grad_steps,
                         guidance=4.0, resolution=64, steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                         alignment_weight=args.alignment, trainable=args.trainable, lora_rank=args.lora_rank,
                         lora_alpha=float(args.lora_rank), unet_lora_rank=args.unet_lora_rank,
                         unet_learning_rate=args.unet_lr, seed=args.seed)
    folder = out / "checkpoints"
    resume = ckpt.latest(folder) if folder.is_dir() else None
    record_path = out / "train.json"
    earlier = json.loads(record_path.read_text(encoding="utf-8")) if resume is not None and record_path.is_file() else {}
    cpu, wall = time.process_time(), time.perf_counter()

    def progress(done: int, total: int, values: dict[str, float]) -> None:
        if done % 10 == 0:
            print(f"step {done}/{total} reward {values['reward']:.4f} alignment {values['alignment']:.2e}", flush=True)

    result = train_encoder(loaded.model, loaded.clip, loaded.vae, reward, texts, config,
                           checkpoints=CheckpointPolicy(folder=folder, every=args.checkpoint_every, keep=0),
                           resume=resume, progress=progress)
    if args.trainable != "none":
        save_encoder(result.clip, out / "encoder")
    if args.unet_lora_rank:
        from dagfusion.nodes.lora import layouts
        from dagfusion.nodes.lora.attach import extract

        layouts.save(extract(result.model, None), out / "unet_lora.safetensors")
    curve = result.rewards
    record = {"settings": {**config.plain(), "reward": args.reward}, "prompts": len(texts),
              "cpu_seconds": earlier.get("cpu_seconds", 0.0) + time.process_time() - cpu,
              "wall_seconds": earlier.get("wall_seconds", 0.0) + time.perf_counter() - wall,
              "threads": torch.get_num_threads(), "reward_curve": curve,
              "reward_first_50": statistics.fmean(curve[:50]), "reward_last_50": statistics.fmean(curve[-50:])}
    record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in record.items() if k != "reward_curve"}, indent=2))
    return 0


def export(args: argparse.Namespace) -> int:
    """Write the encoder of a training checkpoint (trainable 'all') in SaveEncoder's layout."""
    import copy

    from dagfusion.model import StaticRef, TextEncoderBundle
    from dagfusion.nodes.textcraftor.encoder import clip_parts
    from dagfusion.nodes.textcraftor.save import save_encoder
    from dagfusion.nodes.training import checkpoint as ckpt

    clip = embedded_model().clip
    module = copy.deepcopy(clip_parts(clip)[0])
    weights = ckpt.load(Path(args.checkpoint)).weights
    missing = module.load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise SystemExit(f"not a checkpoint of this encoder: {missing.unexpected_keys[:3]}")
    bundle = TextEncoderBundle(clip.kind, [StaticRef(module, None)], clip.tokenizers, options=clip.options)
    save_encoder(bundle, Path(args.out))
    print(args.out)
    return 0


def reward_for(name: str, classifier: Any) -> Any:
    """``shapeeval`` (every attribute weighted 1), ``shapeeval:colour=3`` (some attributes
    weighted otherwise), or a sum of rewards such as ``shapeeval+brightness`` (equal weights)."""
    from dagfusion.nodes.rewards.shapeeval import ShapeEvalReward
    from dagfusion.nodes.shapes.world import ATTRIBUTES

    parts = []
    for part in name.split("+"):
        if part.split(":")[0] == "shapeeval":
            weights = {a: 1.0 for a in ATTRIBUTES}
            for item in filter(None, part.partition(":")[2].split(",")):
                attribute, _, value = item.partition("=")
                if attribute not in weights:
                    raise SystemExit(f"--reward: unknown ShapeEval attribute {attribute!r}; expected one of {list(weights)}")
                weights[attribute] = float(value)
            parts.append(ShapeEvalReward(classifier, weights))
        else:
            from dagfusion.nodes.rewards.image_stats import ImageStatReward

            parts.append(ImageStatReward(part))
    if len(parts) == 1:
        return parts[0]
    from dagfusion.nodes.rewards.base import WeightedSum

    return WeightedSum([(r, 1.0) for r in parts])


# ---------------------------------------------------------------------------------------------- eval


def load_bundle(clip: Any, folder: str | None) -> Any:
    """``clip`` with the encoder of ``folder`` (an encoder folder, or a train run's folder holding
    ``encoder/``), or ``clip`` itself when the folder holds no encoder."""
    if folder is None:
        return clip
    from dagfusion.nodes.textcraftor.load import load_encoder

    path = Path(folder)
    if not (path / "text_encoder").is_dir():
        path = path / "encoder"
    return load_encoder(clip, path) if (path / "text_encoder").is_dir() else clip


def load_model(loaded: Any, folder: str | None) -> Any:
    """The model, with the UNet LoRA of a train run's folder when it holds one."""
    lora = Path(folder) / "unet_lora.safetensors" if folder else None
    if lora is None or not lora.is_file():
        return loaded.model
    import logging

    from dagfusion.nodes.lora import layouts
    from dagfusion.nodes.lora.attach import on_model

    return on_model(loaded.model, layouts.load(lora), 1.0, False, logging.getLogger("textcraftor_shapes"))


@torch.no_grad()
def generate(loaded: Any, clip: Any, prompts: list[str], seeds: list[int], steps: int, model: Any = None) -> torch.Tensor:
    """Images of ``prompts[i]`` from seed ``seeds[i]``: the prompts of one seed are sampled as one
    batch, so every encoder gets the same noise for the same (prompt, seed)."""
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode

    images = torch.zeros(len(prompts), 3, 64, 64)
    for seed in dict.fromkeys(seeds):
        rows = [i for i, s in enumerate(seeds) if s == seed]
        cond = encode_prompt(clip, [prompts[i] for i in rows], "")
        result = sample(model or loaded.model, cond, Latent(torch.zeros(len(rows), 4, 16, 16)), steps=steps,
                        guidance_scale=4.0, seed=seed)
        images[rows] = decode(loaded.vae, result).float()
    return images


def cached(cache: str | None, folder: str | None, prompts: list[str], seeds: list[int], steps: int,
           make: Any) -> torch.Tensor:
    """``make()``, kept in ``cache`` (safetensors) under a key of the encoder's content and the
    prompts, seeds and steps (a re-run with an unchanged encoder reuses the images)."""
    if not cache:
        return make()
    from safetensors.torch import load_file, save_file

    from dagfusion.fingerprint import fingerprint, fingerprint_path

    model = [] if MODEL == "shapes-sd" else [MODEL]
    key = fingerprint([*model, fingerprint_path(Path(folder)) if folder else "original", prompts, seeds, steps])
    path = Path(cache) / f"{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["images"]
    images = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous()}, str(path))
    return images


def correct(classifier: Any, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per image: 1.0 where each attribute (and all of them) is read as the prompt says."""
    from dagfusion.nodes.rewards.shapeeval import caption_targets

    targets = caption_targets(prompts)
    logits = classifier(images)
    hits = {name: (logits[name].argmax(1) == targets[name]).float() for name in targets}
    hits["all"] = torch.stack(list(hits.values())).prod(0)
    return hits


def bootstrap(diff: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diff, k=len(diff))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> int:
    from dagfusion.nodes.metrics.frechet import frechet_distance
    from dagfusion.nodes.shapes.render import render_batch
    from dagfusion.nodes.shapes.world import scenes

    loaded = embedded_model()
    classifiers = evaluators()
    held = captions("eval", args.prompts)
    prompts = [p for p in held for _ in range(args.seeds)]
    seeds = [1000 + s for _ in held for s in range(args.seeds)]
    trained = captions("train", args.train_prompts)
    train_seeds = [2000 + i for i in range(len(trained))]
    by_caption = {s.caption: s for s in scenes("eval", 1)}
    renders = render_batch([by_caption[p] for p in prompts], 64, seed=7, first_index=0).image
    variants = {"original": None, **{e: e for e in args.encoder}}
    results: dict[str, Any] = {"prompts": len(held), "seeds": args.seeds, "images": len(prompts), "steps": args.steps,
                               "train_prompts": len(trained), "variants": {}}
    hits_of: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, folder in variants.items():
        clip = load_bundle(loaded.clip, folder)
        model = load_model(loaded, folder)
        began = time.perf_counter()
        images = cached(args.cache, folder, prompts, seeds, args.steps,
                        lambda: generate(loaded, clip, prompts, seeds, args.steps, model))
        seconds = (time.perf_counter() - began) / len(prompts)
        train_images = cached(args.cache, folder, trained, train_seeds, args.steps,
                              lambda: generate(loaded, clip, trained, train_seeds, args.steps, model)) if trained else None
        row: dict[str, Any] = {"seconds_per_image": seconds}
        hits_of[name] = {}
        for judge, classifier in classifiers.items():
            hits = correct(classifier, images, prompts)
            hits_of[name][judge] = hits
            row[judge] = {"held_out": {k: float(v.mean()) for k, v in hits.items()}}
            if train_images is not None:
                row[judge]["train_split_all_correct"] = float(correct(classifier, train_images, trained)["all"].mean())
            row[judge]["fd_shapes_vs_renders"] = frechet_distance(classifier.embed(images), classifier.embed(renders))
        results["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    for name in variants:
        if name == "original":
            continue
        gains = {}
        for judge in classifiers:
            diff = (hits_of[name][judge]["all"] - hits_of["original"][judge]["all"]).tolist()
            low, high = bootstrap(diff)
            gains[judge] = {"all_correct_gain": statistics.fmean(diff), "ci95": [low, high]}
        results["variants"][name]["gain_over_original"] = gains
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------- interpolate


@torch.no_grad()
def interpolate(args: argparse.Namespace) -> int:
    from dagfusion.nodes.textcraftor.interpolate import interpolate as mix

    loaded = embedded_model()
    classifier = evaluators()["reward_classifier"]
    rewards = {name: reward_for(name, classifier) for name in args.rewards}
    held = captions("eval", args.prompts)
    prompts = [p for p in held for _ in range(args.seeds)]
    seeds = [1000 + s for _ in held for s in range(args.seeds)]
    a = load_bundle(loaded.clip, args.encoder_a)
    b = load_bundle(loaded.clip, args.encoder_b)
    rows = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        images = generate(loaded, mix(a, b, alpha), prompts, seeds, args.steps)
        row = {"alpha": alpha, **{name: float(r.score(images, prompts).mean()) for name, r in rewards.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"encoder_a": args.encoder_a, "encoder_b": args.encoder_b, "images": len(prompts), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    if args.plot:
        plot(rows, list(rewards), Path(args.plot))
    return 0


def plot(rows: list[dict[str, float]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    alphas = [r["alpha"] for r in rows]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(axes if len(names) > 1 else [axes], names):
        ax.plot(alphas, [r[name] for r in rows], marker="o")
        ax.set_xlabel("α (weight of encoder A)")
        ax.set_title(f"{name} reward")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def curves(args: argparse.Namespace) -> int:
    """Plot the training reward curves of train runs (moving average) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for spec in args.run:
        label, _, folder = spec.rpartition("=")
        curve = json.loads((Path(folder) / "train.json").read_text(encoding="utf-8"))["reward_curve"]
        window = min(args.window, len(curve))
        smooth = [statistics.fmean(curve[max(0, i - window + 1):i + 1]) for i in range(len(curve))]
        ax.plot(range(1, len(curve) + 1), smooth, label=label or Path(folder).name)
    ax.set_xlabel("optimizer step (batch of 4 prompts)")
    ax.set_ylabel(f"training reward (mean of {args.window} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="shapes-sd", choices=("shapes-sd", "shapes-dit"))
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune the encoder")
    t.add_argument("--out", required=True)
    t.add_argument("--reward", default="shapeeval", help="shapeeval, shapeeval:colour=3 (attribute weights), brightness, saturation, or a sum: shapeeval+brightness")
    t.add_argument("--variant", default="prompt", choices=("prompt", "direct"))
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--alignment", type=float, default=1.0)
    t.add_argument("--sample-steps", type=int, default=25)
    t.add_argument("--grad-steps", type=int, default=5)
    t.add_argument("--trainable", default="all", choices=("all", "lora", "none"))
    t.add_argument("--unet-lora-rank", type=int, default=0, help="also train a UNet LoRA of this rank")
    t.add_argument("--unet-lr", type=float, default=0.0, help="the UNet LoRA's learning rate (0: --lr)")
    t.add_argument("--lora-rank", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=50)
    x = sub.add_parser("export", help="write the encoder of a training checkpoint")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    e = sub.add_parser("eval", help="measure encoders on held-out prompts")
    e.add_argument("--encoder", action="append", default=[],
                   help="an encoder folder, or a train run's folder (its encoder and UNet LoRA) (repeatable)")
    e.add_argument("--prompts", type=int, default=96)
    e.add_argument("--seeds", type=int, default=8)
    e.add_argument("--train-prompts", type=int, default=96)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--json")
    e.add_argument("--cache", help="keep generated images here (safetensors) and reuse them")
    i = sub.add_parser("interpolate", help="interpolate two encoders tuned with different rewards")
    i.add_argument("--encoder-a", required=True)
    i.add_argument("--encoder-b", required=True)
    i.add_argument("--rewards", nargs="+", default=["shapeeval", "brightness"])
    i.add_argument("--prompts", type=int, default=32)
    i.add_argument("--seeds", type=int, default=2)
    i.add_argument("--steps", type=int, default=25)
    i.add_argument("--json")
    i.add_argument("--plot")
    c = sub.add_parser("curves", help="plot training reward curves")
    c.add_argument("--run", action="append", required=True, help="LABEL=FOLDER of a train run (repeatable)")
    c.add_argument("--window", type=int, default=50)
    c.add_argument("--plot", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global MODEL
    MODEL = args.model
    commands = {"train": train, "export": export, "eval": evaluate, "interpolate": interpolate, "curves": curves}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

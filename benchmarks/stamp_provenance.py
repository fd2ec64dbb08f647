"""Write training provenance into the safetensors metadata of every shipped weight file.

Each shipped file (``git ls-files '*.safetensors'``) gets the keys of :data:`REQUIRED`:

- ``training_workflow`` — the workflow that trained it (repository path);
- ``training_workflow_sha256`` — sha256 of that workflow file's bytes at ``project_commit``;
- ``project_commit`` — the commit that first shipped these weights (the training ran on the
  code of that commit's parent plus its changes);
- ``steps`` — optimizer steps that made the weights (``0``: never trained, a seeded initialisation);
- ``data_seed`` — the seed of the training data (``dagfusion.shapes.Dataset`` / the ShapeEval pool);
- ``stage`` — which training stage the weights are the end of;

plus ``provenance_notes`` in words. Values come from the git history and docs/shapes.md; a value
that is not known is written ``unknown``.

Only the JSON header is rewritten: the tensor data section is copied byte for byte, and the
script checks afterwards that every tensor (name, dtype, shape, bytes) is identical to before
and that the data section is unchanged. Metadata keys already present (``format``, the
ShapeEval vocabulary …) are kept. A ``config.json`` beside a file that records the file's digest
(a structural model folder's ``weights_sha256``) is updated to the new bytes. Running it again
changes nothing. Usage::

    python benchmarks/stamp_provenance.py            # stamp every shipped file
    python benchmarks/stamp_provenance.py --check    # exit 1 if a file lacks a key or differs from the table
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = ("training_workflow", "training_workflow_sha256", "project_commit", "steps", "data_seed", "stage")
"""The metadata keys every shipped weight file carries."""

_SHAPEEVAL = "29e7b816f9b663c57a82f53b7a3f8c3024c166c6"  # Ship the ShapeEval classifier
_SHIP = "6cfd8f17885914f18351d24c8e54e62cceec6a93"  # Ship the embedded shapes-sd and shapes-dit models
_DIT_STAGE2 = "ad39dc9246629308a515f392f69a799acdc3634b"  # shapes-dit after its second training stage
_DIT_STAGE3 = "32a73746b429cfd7e5760c6d5d788c7e2b1c796d"  # shapes-dit: a third training stage
_PAIR = "b7f2a129a0c8a6cba15ea657d232fc64ffb5733d"  # Structure world: ... the two-object evaluator
_FRAMES = "fc13bb0028ed9dd88498f10241c6b0ba8f4beb08"  # Video metrics: ... ShapeEval-frames
_SECOND_EVAL = "34401ac6bf688da639b92f5cda1dc0ee61cd7cfc"  # the independent ShapeEval (trained on this code)
_CONTROLNET = "ec635dc1d607d3c3c684b1c072cb0927e47a0c7f"  # the shapes ControlNet's training workflow (trained on this code)
_VIDEO = "e2bbc265dd4cbcaf580ce7ff5637c9ed1565cf6b"  # shapes-video: the base model's training workflow
_VIDEO_ONE_STEP = "ab702aa99e8935ee6df47a2b1dc624c89372ea02"  # shapes-video-1step: the SF-V workflow, trained on this code
_STRUCTURE_VAE = "a243d737ff97e9250e6d21d4b87856b37765df98"  # the structure VAE's training workflow (trained on this code)
_JOINT = "4b611c3663fdf26fd7591bb634d430759a167de2"  # the joint structural model's training workflow (trained on this code)
_REFINER = "94db7d4741dfff2715a194d2139121c27e6466c8"  # the refiner's training workflow: the two-object base and the refiner (trained on this code)
_VIDEO_RESUME = ("steps 0-1,515 ran before two fixes to input fingerprints (a trained VAE's measured scaling factor, "
                 "diffusers' hash-ordered scheduler keys) changed the training's checkpoint key; that checkpoint was "
                 "carried over to the new key (the same inputs) and the run continued from it")

_VAE_NOTE = ("dagfusion.train.TrainVAE (node train_vae): 1,500 steps x 16, lr 1e-3, training seed 0; "
             "final loss 0.0235, reconstruction PSNR 30.4 dB (docs/shapes.md)")

PROVENANCE: dict[str, dict[str, str]] = {
    "nodes/metrics/weights/shapeeval.safetensors": {
        "training_workflow": "workflows/train_shapeeval.yaml",
        "project_commit": _SHAPEEVAL,
        "steps": "1200",
        "data_seed": "0",
        "stage": "1 of 1",
        "provenance_notes": "dagfusion.metrics.TrainShapeEval: 1,200 steps x 128, lr 2e-3, a pool of 12,288 "
                            "training-split renders seeded 0; saved fp16. Moved byte-identical to "
                            "nodes/metrics/weights in f8f392a.",
    },
    "nodes/metrics/weights/shapeeval-seed1.safetensors": {
        "training_workflow": "workflows/train_shapeeval.yaml",
        "project_commit": _SECOND_EVAL,
        "steps": "1200",
        "data_seed": "1",
        "stage": "1 of 1",
        "provenance_notes": "the independent ShapeEval: workflows/train_shapeeval.yaml with --set train.seed=1 "
                            "(its own pool of training-split renders and initialisation), one thread; saved fp16; "
                            "0.999 all-correct on 2,000 held-out renders. Judges reward fine-tuning that used "
                            "shapeeval.safetensors as the reward.",
    },
    "nodes/shapes/models/shapes-sd/unet/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_shapes_sd.yaml",
        "project_commit": _SHIP,
        "steps": "3000",
        "data_seed": "0",
        "stage": "1 of 1",
        "provenance_notes": "dagfusion.train.Train (node train): v-prediction, zero-terminal SNR, 3,000 steps x 32, "
                            "lr 1e-3 cosine, EMA 0.998, training seed 0; final loss 0.086 (docs/shapes.md); exported fp16.",
    },
    "nodes/shapes/models/shapes-sd/vae/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_shapes_sd.yaml",
        "project_commit": _SHIP,
        "steps": "1500",
        "data_seed": "0",
        "stage": "1 of 1 (VAE)",
        "provenance_notes": _VAE_NOTE + "; exported fp16.",
    },
    "nodes/shapes/models/shapes-sd/text_encoder/model.safetensors": {
        "training_workflow": "workflows/train_shapes_sd.yaml",
        "project_commit": _SHIP,
        "steps": "0",
        "data_seed": "none (not trained)",
        "stage": "initialisation (frozen while training)",
        "provenance_notes": "dagfusion.train.NewModel (node build, config shapes-sd, seed 0): the seeded random "
                            "initialisation of the CLIP text encoder, never trained; exported fp16.",
    },
    "nodes/shapes/models/shapes-dit/transformer/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/finetune_shapes_dit.yaml",
        "project_commit": _DIT_STAGE3,
        "steps": "7500",
        "data_seed": "0",
        "stage": "3 of 3",
        "stage2_commit": _DIT_STAGE2,
        "stage2_workflow": "workflows/train_shapes_dit.yaml",
        "provenance_notes": "Stages 1-2: train_shapes_dit.yaml nodes train (3,000 steps x 32, lr 5e-4, seed 0) and "
                            "train_more (1,500 steps x 32, lr 3e-4, seed 1), shipped fp16 in stage2_commit; stage 3: "
                            "finetune_shapes_dit.yaml from that fp16 stage-2 folder (3,000 steps x 32, lr 3e-4 cosine, "
                            "EMA 0.998, seed 2; final loss 0.093, docs/shapes.md); exported fp16.",
    },
    "nodes/shapes/models/shapes-dit/vae/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_shapes_dit.yaml",
        "project_commit": _SHIP,
        "steps": "1500",
        "data_seed": "0",
        "stage": "1 of 1 (VAE)",
        "provenance_notes": _VAE_NOTE + "; the same training as train_shapes_sd.yaml's (same node and inputs, "
                                        "reused from its checkpoint): the tensors equal shapes-sd's VAE; exported fp16.",
    },
    "nodes/shapes/models/shapes-dit/text_encoder/model.safetensors": {
        "training_workflow": "workflows/train_shapes_dit.yaml",
        "project_commit": _SHIP,
        "steps": "0",
        "data_seed": "none (not trained)",
        "stage": "initialisation (frozen while training)",
        "provenance_notes": "dagfusion.train.NewModel (node build_dit, config shapes-dit, seed 0): the seeded random "
                            "initialisation of the T5 encoder, never trained; exported fp16.",
    },
    "nodes/metrics/weights/shapeeval_pair.safetensors": {
        "training_workflow": "benchmarks/train_pair_evaluator.py",
        "project_commit": _PAIR,
        "steps": "2000",
        "data_seed": "0",
        "stage": "1 of 1",
        "provenance_notes": "benchmarks/train_pair_evaluator.py: 2,000 steps x 96, lr 2e-3, 4,096 two-object renders "
                            "of both styles (training split, data seed 0), training seed 0, one thread; saved fp16; "
                            "held-out accuracy in the 'accuracy' key.",
    },
    "nodes/metrics/weights/shapeeval_frames.safetensors": {
        "training_workflow": "benchmarks/train_frame_evaluator.py",
        "project_commit": _FRAMES,
        "steps": "600",
        "data_seed": "0",
        "stage": "1 of 1",
        "provenance_notes": "benchmarks/train_frame_evaluator.py: 600 steps x 128, lr 2e-3, frames of 1,536 "
                            "shapes-video training clips (data seed 0), training seed 0, one thread; saved fp16; "
                            "held-out accuracy in the 'held_out_accuracy' key.",
    },
    "nodes/structure/models/shapes-controlnet-mask.safetensors": {
        "training_workflow": "workflows/train_controlnet_shapes.yaml",
        "project_commit": _CONTROLNET,
        "steps": "4000",
        "data_seed": "0",
        "stage": "2 of 2",
        "provenance_notes": "dagfusion.structure.TrainControlNet (nodes train, train_more) on shapes-sd frozen: ControlNetModel.from_unet, "
                            "1 conditioning channel (object mask), v-prediction zero-terminal-SNR objective, 10 % condition "
                            "dropout, 50 % caption dropout, 2,000 steps x 16 at lr 2e-4 cosine (seed 0), then 2,000 more at "
                            "lr 1e-4 cosine (seed 1), 50 warmup steps each, each stage in two 25-minute chunks, on 4,096 "
                            "flat training-split "
                            "renders (data seed 0); saved fp16 by SaveControlNet (its own provenance is in the "
                            "dagfusion.controlnet key). project_commit is the commit whose code and workflow trained it.",
    },
    "nodes/video/models/shapes-video/unet/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_shapes_video.yaml",
        "project_commit": _VIDEO,
        "steps": "4000",
        "data_seed": "0",
        "stage": "1 of 1 (multi-step base)",
        "provenance_notes": "dagfusion.train.Train (node train) with dagfusion.video.EDMObjective (SVD's EDM, "
                            "v-prediction, ln sigma ~ N(0.7, 1.6^2), 10 % image-condition dropout), 4,000 steps x 8 "
                            "clips of 8 frames at 32 px, lr 5e-4 cosine, 100 warmup steps, EMA 0.998, training seed 0, "
                            "two threads; " + _VIDEO_RESUME + "; exported fp16 by dagfusion.video.SaveSVD.",
    },
    "nodes/video/models/shapes-video/vae/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_shapes_video.yaml",
        "project_commit": _VIDEO,
        "steps": "1500",
        "data_seed": "1",
        "stage": "1 of 1 (VAE)",
        "provenance_notes": "dagfusion.train.TrainVAE (node train_vae): AutoencoderKLTemporalDecoder, 1,500 steps x 4 "
                            "clips of 4 frames at 32 px (data seed 1), lr 1e-3 cosine, KL weight 1e-4, training seed 0; "
                            "exported fp16.",
    },
    "nodes/video/models/shapes-video/image_encoder/model.safetensors": {
        "training_workflow": "workflows/train_shapes_video.yaml",
        "project_commit": _VIDEO,
        "steps": "0",
        "data_seed": "none (not trained)",
        "stage": "initialisation (frozen while training)",
        "provenance_notes": "dagfusion.video.NewModel (node build, config shapes-video, seed 0): the seeded random "
                            "initialisation of the CLIP vision encoder, never trained; exported fp16.",
    },
    "nodes/video/models/shapes-video-1step/unet/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/sfv_shapes.yaml",
        "project_commit": _VIDEO_ONE_STEP,
        "steps": "1000",
        "data_seed": "2",
        "stage": "2 of 2 (SF-V one-step, from the shipped fp16 base)",
        "provenance_notes": "dagfusion.video.TrainSFV (node sfv) from the embedded shapes-video: 1,000 steps x 8 clips "
                            "of 8 frames at 32 px (data seed 2, each clip's own motion bucket), generator lr 5e-5, "
                            "discriminator lr 1e-4, heads of 64 channels, sigma_G 700, seed 0, two threads; exported "
                            "fp16 with its one-step mark (dagfusion.json).",
    },
    "nodes/video/models/shapes-video-1step/vae/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_shapes_video.yaml",
        "project_commit": _VIDEO,
        "steps": "1500",
        "data_seed": "1",
        "stage": "1 of 1 (VAE)",
        "provenance_notes": "the shapes-video VAE, copied unchanged by workflows/sfv_shapes.yaml; exported fp16.",
    },
    "nodes/video/models/shapes-video-1step/image_encoder/model.safetensors": {
        "training_workflow": "workflows/train_shapes_video.yaml",
        "project_commit": _VIDEO,
        "steps": "0",
        "data_seed": "none (not trained)",
        "stage": "initialisation (frozen while training)",
        "provenance_notes": "the shapes-video image encoder (seeded initialisation, never trained), copied unchanged by "
                            "workflows/sfv_shapes.yaml; exported fp16.",
    },
    "nodes/structure/models/shapes-structural/structural.safetensors": {
        "training_workflow": "workflows/train_structure_shapes.yaml",
        "project_commit": _JOINT,
        "steps": "2000",
        "data_seed": "0",
        "stage": "2 of 2 (shapes-sd's UNet as trunk and branches, then this training)",
        "provenance_notes": "dagfusion.train.Train (node train_joint) on StructuralFromUNet of the shipped shapes-sd UNet "
                            "(targets rgb, depth, normal; 2 layout channels): v-prediction, zero-terminal SNR, 2,000 steps "
                            "x 16 two-object shaded-solid scenes at 64 px, lr 2e-4 cosine, EMA 0.995, caption and layout "
                            "dropout 0.1, training seed 0, two threads, 26.2 min; with the structure VAE of "
                            "train_structure_vae.yaml; saved fp16 (SaveStructural).",
    },
    "nodes/shapes/models/shapes-sd-two-objects/unet/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_structure_refiner.yaml",
        "project_commit": _REFINER,
        "steps": "2000",
        "data_seed": "0",
        "stage": "2 of 2 (shapes-sd, then this two-object fine-tune)",
        "provenance_notes": "dagfusion.train.Train (node train_base) from the shipped shapes-sd UNet: v-prediction, "
                            "zero-terminal SNR, 2,000 steps x 16 two-object shaded-solid scenes at 64 px (text only), "
                            "lr 2e-4 cosine, EMA 0.995, caption dropout 0.1, training seed 0, two threads, 17.8 min; "
                            "with the structure VAE; exported fp16.",
    },
    "nodes/shapes/models/shapes-sd-two-objects/vae/diffusion_pytorch_model.safetensors": {
        "training_workflow": "workflows/train_structure_vae.yaml",
        "project_commit": _STRUCTURE_VAE,
        "steps": "1500",
        "data_seed": "0",
        "stage": "2 of 2 (shapes-sd's VAE, then fine-tuned on two-object renders, depth and normal pictures)",
        "provenance_notes": "dagfusion.train.TrainVAE (node train_vae): 1,500 steps x 16 of two-object renders, depth and "
                            "normal pictures (64 px), lr 2e-4, KL weight 1e-4, training seed 0; the same node and inputs "
                            "in train_structure_shapes.yaml and train_structure_refiner.yaml, which reuse its checkpoint; "
                            "exported fp16.",
    },
    "nodes/shapes/models/shapes-sd-two-objects/text_encoder/model.safetensors": {
        "training_workflow": "workflows/train_shapes_sd.yaml",
        "project_commit": _SHIP,
        "steps": "0",
        "data_seed": "none (not trained)",
        "stage": "initialisation (frozen while training)",
        "provenance_notes": "shapes-sd's text encoder (the seeded initialisation of dagfusion.train.NewModel, never "
                            "trained), copied unchanged by workflows/train_structure_refiner.yaml; exported fp16.",
    },
    "nodes/structure/models/shapes-refiner.safetensors": {
        "training_workflow": "workflows/train_structure_refiner.yaml",
        "project_commit": _REFINER,
        "steps": "2000",
        "data_seed": "0",
        "stage": "1 of 1 (on the frozen shapes-sd-two-objects)",
        "provenance_notes": "dagfusion.structure.TrainControlNet (node train_refiner): ControlNetModel.from_unet of the "
                            "shapes-sd-two-objects UNet, 6 conditioning channels (depth, normals, 2-channel box layout), "
                            "2,000 steps x 16 on 4,096 two-object shaded-solid renders at 64 px (data seed 0), each "
                            "condition dropped 10 %, v-prediction zero-terminal SNR, lr 2e-4 cosine, training seed 0, "
                            "two threads, 14.0 min; saved fp16.",
    },
}
"""The provenance of each shipped file (``training_workflow_sha256`` is computed from git)."""


def shipped_files() -> list[str]:
    """Every tracked ``*.safetensors`` file, repository-relative."""
    out = subprocess.run(["git", "ls-files", "*.safetensors"], cwd=ROOT, check=True, capture_output=True, text=True)
    return sorted(line for line in out.stdout.splitlines() if line)


def workflow_sha256(workflow: str, commit: str) -> str:
    """sha256 of ``workflow``'s bytes at ``commit``, or ``unknown`` when git does not have it."""
    import hashlib

    done = subprocess.run(["git", "show", f"{commit}:{workflow}"], cwd=ROOT, capture_output=True)
    return hashlib.sha256(done.stdout).hexdigest() if done.returncode == 0 else "unknown"


def wanted_metadata(name: str) -> dict[str, str]:
    """The provenance keys for shipped file ``name`` (every :data:`REQUIRED` key; ``unknown`` where so)."""
    entry = dict(PROVENANCE.get(name, {}))
    entry.setdefault("training_workflow", "unknown")
    entry.setdefault("project_commit", "unknown")
    if entry["training_workflow"] != "unknown" and entry["project_commit"] != "unknown":
        entry["training_workflow_sha256"] = workflow_sha256(entry["training_workflow"], entry["project_commit"])
    else:
        entry["training_workflow_sha256"] = "unknown"
    for key in REQUIRED:
        entry.setdefault(key, "unknown")
    return entry


def read_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    """``(header, data section)`` of a safetensors file."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def write_metadata(path: Path, metadata: dict[str, str]) -> bool:
    """Replace ``path``'s header metadata with ``metadata`` (data section copied verbatim);
    returns whether the file changed."""
    header, data = read_parts(path)
    if header.get("__metadata__") == metadata:
        return False
    header = {"__metadata__": metadata, **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((-len(text)) % 8)  # safetensors pads the header to a multiple of 8
    scratch = path.with_name(path.name + ".stamping")
    scratch.write_bytes(struct.pack("<Q", len(text)) + text + data)
    scratch.replace(path)
    return True


def tensors_of(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """``{name: (dtype, shape, bytes)}`` of every tensor, read through safetensors."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key).contiguous()
            out[key] = (str(tensor.dtype), tuple(tensor.shape), tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def stamp(name: str) -> bool:
    """Add or update ``name``'s provenance keys; returns whether the file changed.

    :raises AssertionError: if any tensor or the data section differs afterwards (the file is
        then restored).
    """
    path = ROOT / name
    header, data = read_parts(path)
    before = tensors_of(path)
    original = path.read_bytes()
    metadata = {**header.get("__metadata__", {}), **wanted_metadata(name)}
    changed = write_metadata(path, metadata)
    try:
        after_header, after_data = read_parts(path)
        assert after_data == data, f"{name}: the data section changed"
        assert {k: v for k, v in after_header.items() if k != "__metadata__"} == {
            k: v for k, v in header.items() if k != "__metadata__"}, f"{name}: the tensor entries changed"
        assert tensors_of(path) == before, f"{name}: a tensor changed"
    except AssertionError:
        path.write_bytes(original)
        raise
    update_digest(path)
    return changed


def digest_document(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(config file, document)`` when a ``config.json`` beside ``path`` records its digest
    (``weights`` naming it and ``weights_sha256``, as a structural model folder does); else ``None``."""
    config = path.with_name("config.json")
    if not config.is_file():
        return None
    document = json.loads(config.read_text(encoding="utf-8"))
    if document.get("weights") != path.name or "weights_sha256" not in document:
        return None
    return config, document


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def update_digest(path: Path) -> None:
    """Rewrite the digest a ``config.json`` beside ``path`` records, after its header changed."""
    found = digest_document(path)
    if found is None:
        return
    config, document = found
    digest = file_sha256(path)
    if document["weights_sha256"] != digest:
        document["weights_sha256"] = digest
        config.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check(name: str) -> list[str]:
    """Problems with ``name``'s provenance metadata (empty when it is complete and current)."""
    from safetensors import safe_open

    with safe_open(str(ROOT / name), framework="pt") as handle:
        metadata = handle.metadata() or {}
    wanted = wanted_metadata(name)
    problems = [f"{name}: {key} is {metadata.get(key)!r}, expected {value!r}" for key, value in wanted.items()
                if metadata.get(key) != value]
    found = digest_document(ROOT / name)
    if found is not None and found[1]["weights_sha256"] != file_sha256(ROOT / name):
        problems.append(f"{name}: the weights_sha256 in {found[0].name} beside it is not the file's digest")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a file needs stamping")
    args = parser.parse_args(argv)
    files = shipped_files()
    if args.check:
        problems = [p for name in files for p in check(name)]
        print("\n".join(problems) or f"{len(files)} shipped files carry their provenance")
        return 1 if problems else 0
    for name in files:
        changed = stamp(name)
        print(f"{'stamped' if changed else 'unchanged'}: {name} (tensors verified identical)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

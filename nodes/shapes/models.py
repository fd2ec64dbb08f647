"""The embedded models: ``shapes-sd`` and ``shapes-dit``, trained by dagfusion, shipped in the package.

Each is a diffusers folder under ``models/<name>/`` of this package (fp16 safetensors), made by
``workflows/train_shapes_sd.yaml`` / ``train_shapes_dit.yaml``. :func:`folder` finds one;
the ``dagfusion.models.LoadEmbedded`` node loads one through the same code path (and the same
model cache) as ``dagfusion.models.LoadDiffusers`` — the folder is package data, so it needs no
read permission in the settings.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
EMBEDDED: dict[str, str] = {
    "shapes-sd": "Stable Diffusion 1 layout: UNet2DConditionModel + AutoencoderKL (x4) + CLIP text encoder, "
                 "v-prediction, zero terminal SNR, trailing DDIM; 64 px.",
    "shapes-dit": "PixArt-alpha layout: PixArtTransformer2DModel + T5 encoder + the shapes-sd VAE, "
                  "v-prediction, zero terminal SNR, trailing DDIM; 64 px.",
    "shapes-sd-two-objects": "shapes-sd fine-tuned on two-object scenes of shaded solids, with the structure VAE "
                             "(fine-tuned on two-object renders, depth and normal pictures): the structure-guided "
                             "refiner's base and the text encoder and VAE of the joint structural model; 64 px.",
}
"""Embedded model name → what it is."""

TRAINED_BY: dict[str, str] = {"shapes-sd-two-objects": "workflows/train_structure_refiner.yaml"}
"""The training workflow of an embedded model whose name does not say it."""


class EmbeddedModelMissing(FileNotFoundError):
    """The package holds no weights for an embedded model (a source checkout without them)."""


def folder(name: str) -> Path:
    """The diffusers folder of embedded model ``name``.

    :raises ValueError: ``name`` is not an embedded model.
    :raises EmbeddedModelMissing: its weights are not in this installation.
    """
    if name not in EMBEDDED:
        raise ValueError(f"expected an embedded model in {list(EMBEDDED)}, got {name!r}")
    path = MODELS_DIR / name
    if not (path / "model_index.json").is_file() or not any(path.glob("*/*.safetensors")):
        raise EmbeddedModelMissing(
            f"the embedded model {name!r} is not in this installation ({path} holds no weights); "
            f"train it with {TRAINED_BY.get(name, 'workflows/train_' + name.replace('-', '_') + '.yaml')} "
            "and copy the exported folder there"
        )
    return path

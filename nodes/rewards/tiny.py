"""Tiny random reward models written to folders, for node examples and tests (offline, seeded).

:func:`write_tiny_clip` saves a ``CLIPModel`` of a few hundred kilobytes (32 px images,
16-d embeddings) with a character-level tokenizer and a ``preprocessor_config.json``, in the
layout :func:`~dagfusion.nodes.rewards.clip.load_clip_reward` reads; :func:`write_tiny_head`
saves a random aesthetic-style head for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dagfusion.nodes.rewards.aesthetic import EmbeddingHead, save_head
from dagfusion.nodes.rewards.clip import OPENAI_MEAN, OPENAI_STD

TINY_IMAGE_SIZE = 32
TINY_PROJECTION = 16


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> Path:
    """Save a seeded random ``CLIPModel`` folder (safetensors) with tokenizer and preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    from dagfusion.testing.models import clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            image_size=image_size, patch_size=4,
        ),
        projection_dim=TINY_PROJECTION,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(folder), safe_serialization=True)
    clip_tokenizer().save_pretrained(str(folder))
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    return folder


def write_tiny_head(folder: str | Path, seed: int = 0, input_dim: int = TINY_PROJECTION, activation: str = "relu") -> Path:
    """Save a seeded random head ``input_dim → 8 → 1`` (normalised embeddings)."""
    torch.manual_seed(seed)
    save_head(EmbeddingHead([input_dim, 8, 1], activation=activation, normalize=True), folder)
    return Path(folder)

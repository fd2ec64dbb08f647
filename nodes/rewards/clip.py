"""CLIP-score rewards from a local ``CLIPModel`` folder (OpenAI CLIP, PickScore, HPSv2 converted).

The folder is what ``CLIPModel.save_pretrained(..., safe_serialization=True)`` writes plus the
tokenizer's files: ``config.json``, ``model.safetensors``, the tokenizer files and, optionally,
``preprocessor_config.json`` (without it the vision config's image size and OpenAI's mean and
std are used). Only safetensors weights are read, offline.

Image preprocessing is ``CLIPImageProcessor``'s, written in torch so gradients reach the images:
resize the shortest edge (bicubic, antialiased), center-crop, normalise. Images of any size
are accepted. The score is ``logit_scale.exp() * cosine(image embedding, text embedding)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from dagfusion.nodes.rewards.base import Reward, frozen, module_device

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocess:
    """The numbers of a ``CLIPImageProcessor`` (read from ``preprocessor_config.json``)."""

    shortest_edge: int
    crop: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    scale: float = 1.0
    """Factor from [0, 1] images to the model's range before normalising (``rescale_factor * 255``)."""

    @classmethod
    def from_folder(cls, folder: Path, image_size: int) -> ClipPreprocess:
        """Read ``preprocessor_config.json`` if present; defaults follow OpenAI CLIP at ``image_size``."""
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return cls(shortest_edge=image_size, crop=(image_size, image_size))
        raw = json.loads(path.read_text(encoding="utf-8"))
        size = raw.get("size", image_size)
        if isinstance(size, dict):
            edge = int(size.get("shortest_edge") or min(size.get("height", image_size), size.get("width", image_size)))
        else:
            edge = int(size)
        crop = raw.get("crop_size", edge)
        crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        do_rescale = bool(raw.get("do_rescale", True))
        return cls(
            shortest_edge=edge,
            crop=crop_hw,
            mean=tuple(float(v) for v in raw.get("image_mean", OPENAI_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in raw.get("image_std", OPENAI_STD)),  # type: ignore[arg-type]
            do_resize=bool(raw.get("do_resize", True)),
            do_center_crop=bool(raw.get("do_center_crop", True)),
            do_normalize=bool(raw.get("do_normalize", True)),
            scale=float(raw.get("rescale_factor", 1 / 255)) * 255 if do_rescale else 255.0,
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] → the vision model's pixel values (float32, differentiable)."""
        x = images.float()
        if self.do_resize:
            h, w = x.shape[-2:]
            edge = self.shortest_edge
            size = (edge, int(edge * w / h)) if h <= w else (int(edge * h / w), edge)
            if size != (h, w):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if self.do_center_crop:
            x = _center_crop(x, self.crop)
        x = x * self.scale
        if self.do_normalize:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Center crop as ``transformers.image_transforms.center_crop`` does (zero-padding a smaller image)."""
    ch, cw = crop
    h, w = x.shape[-2:]
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


class CLIPReward(Reward):
    """``logit_scale.exp() * cosine(image, text)`` under a frozen ``CLIPModel``.

    Text embeddings are computed without gradients (the prompts are data, not parameters).
    The model follows the images to their device.
    """

    def __init__(self, model: Any, tokenizer: Any, preprocess: ClipPreprocess, name: str, fingerprint: str) -> None:
        self.model = frozen(model)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self._fingerprint = fingerprint
        text_config = model.config.text_config
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), int(text_config.max_position_embeddings))

    @property
    def embedding_dim(self) -> int:
        """Size of the projected image and text embeddings."""
        return int(self.model.config.projection_dim)

    def _to(self, device: torch.device) -> torch.nn.Module:
        if module_device(self.model) != device:
            self.model.to(device)
        return self.model

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) image embeddings, (B, D) float32, differentiable."""
        model = self._to(images.device)
        dtype = next(model.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        return model.visual_projection(pooled).float()

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Projected (not normalised) text embeddings, (B, D) float32."""
        model = self._to(device)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        output = model.text_model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
        return model.text_projection(output.pooler_output).float()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = F.normalize(self.image_embeddings(images), dim=-1)
        text = F.normalize(self.text_embeddings(prompts, images.device), dim=-1)
        scale = self.model.logit_scale.detach().float().exp()
        return scale * (image * text).sum(dim=-1)


def load_clip_reward(folder: Path, dtype: str = "float32") -> CLIPReward:
    """Load a ``CLIPModel`` folder (safetensors only, offline) as a :class:`CLIPReward`.

    The caller checks the folder is readable (``ctx.settings.check_tree_readable``) first.
    """
    from transformers import AutoTokenizer, CLIPModel

    from dagfusion.fingerprint import fingerprint_path

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a CLIPModel folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{folder} has no safetensors weights; convert pickle checkpoints once (docs/rewards.md)"
        )
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).to(torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    preprocess = ClipPreprocess.from_folder(folder, int(model.config.vision_config.image_size))
    return CLIPReward(model, tokenizer, preprocess, name=f"clip:{folder.name}", fingerprint=f"{fingerprint_path(folder)}:{dtype}")

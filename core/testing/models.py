"""``dagfusion.testing.models``: tiny random diffusion models, built offline from configs, for node
examples, tests, benchmarks and documentation.

Importing this module is cheap; each builder imports torch, diffusers and transformers when
called (``pip install dagfusion[diffusion]``). ``import dagfusion.testing`` alone never loads it.

Nothing here downloads anything: tokenizers are made from a small vocabulary written below
(single characters plus a few merges), and every model is a few hundred kilobytes of random
weights from a fixed seed, so two builds are identical. Each ``build_*`` returns a diffusers
pipeline object; :func:`save` writes it as a diffusers folder (``model_index.json``,
safetensors weights) that the loader nodes read.

Shapes: SD/SDXL use 32 px images (VAE factor 2, 16 x 16 latents); DiT and PixArt 16 px.
"""

from __future__ import annotations

import functools
import os
import string
from pathlib import Path
from typing import Any

_CHARS = string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "r"), ("e", "r</w>"), ("i", "n"), ("in", "g</w>")]
_T5_WORDS = ["a", "the", "of", "red", "fox", "cat", "dog", "tiny", "photo", "painting", "blue", "sky", "squirrel"]


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: specials, each character (plain and word-final), a few merges."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = []
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
        merges.append((left, right))
    return vocab, merges


def clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> Any:
    """A CLIP tokenizer over :func:`clip_vocab` (ids < 200)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)


def t5_tokenizer(max_length: int = 120) -> Any:
    """A T5 (unigram) tokenizer: specials, a few words and every character, with and without '▁'."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for word in _T5_WORDS:
        pieces.append(("\u2581" + word, -1.0))
    for ch in _CHARS:
        pieces.append(("\u2581" + ch, -4.0))
        pieces.append((ch, -4.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_config(**overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    values = dict(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=77,
    )
    values.update(overrides)
    return CLIPTextConfig(**values)


def tiny_vae(seed: int = 0) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=32,
    ).eval()


def sd_scheduler_config() -> dict[str, Any]:
    return dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="leading",
    )


def build_sd(seed: int = 0) -> Any:
    """A tiny ``StableDiffusionPipeline`` (UNet 32/64 channels, 2-layer CLIP, VAE factor 2, PNDM)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    ).eval()
    vae = tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config()).eval()
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler(skip_prk_steps=True, **sd_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl(seed: int = 0) -> Any:
    """A tiny ``StableDiffusionXLPipeline`` (two CLIPs of width 32, added time conditions, Euler)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    ).eval()
    vae = tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config()).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(projection_dim=32, hidden_act="gelu")).eval()
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in sd_scheduler_config().items() if k != "set_alpha_to_one"}),
    )


def build_dit(seed: int = 0) -> Any:
    """A tiny ``DiTPipeline`` (2 layers, patch 2, 8 x 8 latents, learned sigma, DPM-Solver++)."""
    import torch
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=DPMSolverMultistepScheduler())


def build_pixart(seed: int = 0) -> Any:
    """A tiny ``PixArtAlphaPipeline`` (2 layers, 2-layer T5 of width 32, 8 x 8 latents, DDIM)."""
    import torch
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    config = T5Config(
        vocab_size=max(128, len(tokenizer)), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, is_encoder_decoder=False, use_cache=False,
    )
    text_encoder = T5EncoderModel(config).eval()
    return PixArtAlphaPipeline(
        transformer=transformer, vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(),
    )


def build_svd_unet(seed: int = 0) -> Any:
    """A tiny ``UNetSpatioTemporalConditionModel`` (8 input channels = 4 noisy + 4 image latents)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(8, 8), projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    ).eval()


def svd_scheduler_config() -> dict[str, Any]:
    """Stable Video Diffusion's scheduler settings: Euler on Karras sigmas, v-prediction, EDM-style timesteps."""
    return dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )


def build_svd(seed: int = 0) -> Any:
    """A tiny ``StableVideoDiffusionPipeline``: the tiny video UNet, a temporal-decoder VAE (factor 2),
    a 32-px CLIP vision encoder with projection and its image processor, Euler (Karras sigmas)."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = build_svd_unet(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], layers_per_block=1,
    ).eval()
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=4,
    )).eval()
    processor = CLIPImageProcessor(crop_size=32, size=32)
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=EulerDiscreteScheduler(**svd_scheduler_config()),
        feature_extractor=processor,
    )


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "dit": build_dit, "pixart": build_pixart, "svd": build_svd}


def save(pipe: Any, folder: str | os.PathLike[str]) -> Path:
    """Write ``pipe`` as a diffusers folder (safetensors) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_model(kind: str, folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny ``kind`` model (``sd``, ``sdxl``, ``dit``, ``pixart``, ``svd``) and save it into ``folder``."""
    return save(_cached_pipeline(kind, seed), folder)


@functools.lru_cache(maxsize=8)
def _cached_pipeline(kind: str, seed: int) -> Any:
    return BUILDERS[kind](seed)


@functools.lru_cache(maxsize=1)
def sd_handles() -> dict[str, Any]:
    """In-memory handles over the tiny SD model plus a conditioning, latent and image (node examples)."""
    import torch

    from dagfusion.model import ModelHandle, TextEncoderBundle, VAEHandle
    from dagfusion.nodes.diffusion.data import Latent, SchedulerSpec
    from dagfusion.nodes.diffusion.text import encode_prompt

    pipe = _cached_pipeline("sd", 0)
    scheduler = SchedulerSpec(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    model = ModelHandle.from_module(pipe.unet, scheduler=scheduler, vae_scale_factor=2)
    vae = VAEHandle.from_module(pipe.vae)
    clip = TextEncoderBundle.from_modules("clip", [pipe.text_encoder], [pipe.tokenizer])
    conditioning = encode_prompt(clip, "a tiny red fox", "")
    latent = Latent(torch.zeros(1, 4, 16, 16))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=generator)
    return {"model": model, "vae": vae, "clip": clip, "conditioning": conditioning, "latent": latent,
            "image": image, "scheduler": scheduler}


@functools.lru_cache(maxsize=1)
def pixart_handles() -> dict[str, Any]:
    """Handles over the tiny PixArt model (node examples and tests): ``model``, ``conditioning``
    (one prompt) and an 8 x 8 ``latent``."""
    import torch

    from dagfusion.model import TextEncoderBundle
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.text import encode_prompt

    pipe = _cached_pipeline("pixart", 0)
    clip = TextEncoderBundle.from_modules("t5", [pipe.text_encoder], [pipe.tokenizer],
                                          options={"max_length": 120, "lowercase": True})
    return {"model": _handle(pipe.transformer, pipe.scheduler), "conditioning": encode_prompt(clip, "a tiny red fox", ""),
            "latent": Latent(torch.zeros(1, 4, 8, 8))}


def dit_model() -> Any:
    """A handle over the tiny class-conditional DiT model (8 x 8 latents)."""
    pipe = _cached_pipeline("dit", 0)
    return _handle(pipe.transformer, pipe.scheduler)


def _handle(module: Any, scheduler: Any) -> Any:
    from dagfusion.model import ModelHandle
    from dagfusion.nodes.diffusion.data import SchedulerSpec

    spec = SchedulerSpec(type(scheduler).__name__, dict(scheduler.config))
    return ModelHandle.from_module(module, scheduler=spec, vae_scale_factor=2)


def write_single_file(kind: str, folder: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """The tiny SD 1 model as one original-layout ``.safetensors`` file plus a config folder.

    Returns ``{"checkpoint": file, "config": folder}``; the config folder is the diffusers folder
    without weights (``model_index.json``, component configs, tokenizer), as ``LoadSingleFile``
    takes for custom architectures.
    """
    from safetensors.torch import save_file

    from dagfusion.nodes.diffusion.ldm_layout import sd1_checkpoint

    if kind != "sd":
        raise ValueError(f"single-file export is implemented for the SD 1 layout ('sd'), not {kind!r}")
    folder = Path(folder)
    pipe = _cached_pipeline(kind, seed)
    config = save(pipe, folder / "config")
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    checkpoint = folder / f"tiny-{kind}.safetensors"
    save_file(sd1_checkpoint(pipe.unet, pipe.vae, pipe.text_encoder), str(checkpoint))
    return {"checkpoint": checkpoint, "config": config}


def write_hf_cache(kind: str, cache: str | os.PathLike[str], repo_id: str, seed: int = 0) -> Path:
    """Lay the tiny ``kind`` model out as ``repo_id`` in a Hugging Face hub cache folder (refs/main -> snapshot)."""
    cache = Path(cache)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_model(kind, repo / "snapshots" / commit, seed)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return cache

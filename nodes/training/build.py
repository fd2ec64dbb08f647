"""Untrained models from a config: the starting point of training from scratch.

Built-in configs:

- ``tiny-sd``: ``UNet2DConditionModel`` (32/64 channels, cross-attention at the low resolution,
  4 latent channels), a tiny ``AutoencoderKL`` (x2 downsampling: 32 px images, 16 x 16 latents),
  a 2-layer ``CLIPTextModel`` of width 32 with a character-level tokenizer (it spells any
  lower-case caption), and a DDIM scheduler with the SD noise schedule. For tests and examples.
- ``tiny-sd-pixel``: the same UNet on 3-channel pixels (32 x 32) and no VAE — train it without a
  VAE (pixel space); its ``vae`` output is empty.
- ``shapes-sd``: the architecture of the shipped ``shapes-sd`` model (Stable Diffusion 1 layout
  at 64 px): a 6.6 M-parameter ``UNet2DConditionModel`` (64/128/128 channels, cross-attention
  only at the 8 x 8 and 4 x 4 resolutions), an ``AutoencoderKL`` with x4 downsampling (16 x 16 x 4
  latents of 64 px images), a 2-layer ``CLIPTextModel`` of width 64 and the shapes world's
  word-level CLIP tokenizer (:mod:`~dagfusion.nodes.shapes.tokenizers`).
- ``shapes-dit``: the shipped ``shapes-dit`` architecture (PixArt-α layout): a 5.1 M-parameter
  ``PixArtTransformer2DModel`` (8 blocks of width 192, patch 2 over the 16 x 16 latents), a
  2-layer ``T5EncoderModel`` of width 64 with the shapes world's T5 tokenizer, and the same VAE
  architecture as ``shapes-sd`` (train the DiT on ``shapes-sd``'s trained VAE).

Or any diffusers folder of *configs* (``model_index.json`` with ``unet``/``transformer``,
``vae``, text encoder, tokenizer and scheduler folders): every model component is built from its
``config.json`` with fresh weights (weights in the folder are ignored); tokenizers are loaded.
Only diffusers and transformers model classes are built. Everything is seeded: the same config
and seed give identical weights. Every file under the folder must really lie under the allowed
read folders, symbolic links followed, before any is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagfusion import PATH, SEED, STRING, Input, Output, RunContext, node

_UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "sample_size": 32,
}
_TEXT = {
    "architectures": ["CLIPTextModel"],
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_size": 32, "intermediate_size": 37,
    "layer_norm_eps": 1e-05, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000,
    "max_position_embeddings": 77,
}
_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}

_SHAPES_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [16, 32, 32],
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "sample_size": 64,
}
_SHAPES_UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 32,
    "norm_num_groups": 32,
}
_SHAPES_DIT = {
    "_class_name": "PixArtTransformer2DModel",
    "sample_size": 16, "num_layers": 8, "patch_size": 2, "attention_head_dim": 64, "num_attention_heads": 3,
    "caption_channels": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 192, "attention_bias": True,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False, "norm_eps": 1e-6,
}
_SHAPES_CLIP = {
    "architectures": ["CLIPTextModel"],
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_size": 64, "intermediate_size": 256,
    "layer_norm_eps": 1e-05, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 256,
    "max_position_embeddings": 32,
}
_SHAPES_T5 = {
    "architectures": ["T5EncoderModel"],
    "vocab_size": 128, "d_model": 64, "d_kv": 16, "d_ff": 256, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 16, "dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0,
    "eos_token_id": 1, "is_encoder_decoder": False, "use_cache": False,
}
_PIXART_SCHEDULER = {**_SCHEDULER, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-sd": {"pipeline": "StableDiffusionPipeline", "unet": _UNET, "vae": _VAE, "text_encoder": _TEXT,
                "scheduler": _SCHEDULER, "tokenizer": "tiny-clip"},
    "tiny-sd-pixel": {"pipeline": "StableDiffusionPipeline", "unet": {**_UNET, "in_channels": 3, "out_channels": 3, "sample_size": 32},
                      "vae": None, "text_encoder": _TEXT, "scheduler": _SCHEDULER, "tokenizer": "tiny-clip"},
    "shapes-sd": {"pipeline": "StableDiffusionPipeline", "unet": _SHAPES_UNET, "vae": _SHAPES_VAE,
                  "text_encoder": _SHAPES_CLIP, "scheduler": _SCHEDULER, "tokenizer": "shapes-clip"},
    "shapes-dit": {"pipeline": "PixArtAlphaPipeline", "transformer": _SHAPES_DIT, "vae": _SHAPES_VAE,
                   "text_encoder": _SHAPES_T5, "scheduler": _PIXART_SCHEDULER, "tokenizer": "shapes-t5"},
}
"""Built-in configs: component name → diffusers/transformers config (``None``: absent)."""


def _tokenizer(name: str) -> Any:
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.shapes import tokenizers

    makers = {"tiny-clip": tiny.clip_tokenizer, "shapes-clip": tokenizers.clip_tokenizer,
              "shapes-t5": tokenizers.t5_tokenizer}
    return makers[name]()


def seeded(seed: int, offset: int, make: Any) -> Any:
    """``make()`` in eval mode, built under torch's global generator seeded with ``seed * 1000 + offset``
    (the caller's random state is kept): component ``offset`` of config seed ``seed``."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + offset)
        return make().eval()


def _diffusers_model(config: dict[str, Any]) -> Any:
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"the config names {name!r}, which is not a diffusers model class")
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _transformers_model(class_name: str, config: Any) -> Any:
    import transformers

    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"the config names {class_name!r}, which is not a transformers model class")
    return cls(config)


def build_builtin(name: str, seed: int) -> dict[str, Any]:
    """The components of built-in config ``name``: ``{"pipeline", "denoiser_name", "denoiser", "vae",
    "text_kind", "text_encoders", "tokenizers", "text_options", "scheduler"}`` (modules in eval
    mode, CPU, fp32)."""
    import transformers

    from dagfusion.nodes.diffusion.data import SchedulerSpec

    if name not in CONFIGS:
        raise ValueError(f"expected a config in {list(CONFIGS)}, got {name!r}")
    spec = CONFIGS[name]
    denoiser_name = "unet" if "unet" in spec else "transformer"
    denoiser = seeded(seed, 0, lambda: _diffusers_model(spec[denoiser_name]))
    vae = seeded(seed, 1, lambda: _diffusers_model(spec["vae"])) if spec["vae"] else None
    text_spec = spec["text_encoder"]
    class_name = text_spec["architectures"][0]
    config_class = transformers.T5Config if class_name.startswith("T5") else transformers.CLIPTextConfig
    text_config = config_class(**{k: v for k, v in text_spec.items() if k != "architectures"})
    text = seeded(seed, 2, lambda: _transformers_model(class_name, text_config))
    kind, options = ("t5", {"max_length": 120, "lowercase": True}) if class_name.startswith("T5") else ("clip", {})
    scheduler = SchedulerSpec(spec["scheduler"]["_class_name"], {k: v for k, v in spec["scheduler"].items() if k != "_class_name"})
    return {
        "pipeline": spec["pipeline"], "denoiser_name": denoiser_name, "denoiser": denoiser, "vae": vae, "text_kind": kind,
        "text_encoders": [text], "tokenizers": [_tokenizer(spec["tokenizer"])], "text_options": options, "scheduler": scheduler,
    }


def build_from_folder(folder: Path, seed: int) -> dict[str, Any]:
    """The components of a diffusers folder of configs, with fresh seeded weights (see the module docstring)."""
    import transformers

    from dagfusion.nodes.diffusion.loading import read_json, scheduler_spec, text_kind

    index = read_json(folder / "model_index.json", "a diffusers folder with model_index.json")
    pipeline = str(index.get("_class_name", ""))

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and bool(entry[0]) and bool(entry[1])

    denoiser_name = next((n for n in ("unet", "transformer") if present(n)), None)
    if denoiser_name is None:
        raise ValueError(f"{folder}/model_index.json lists no 'unet' or 'transformer'")

    def diffusers_component(name: str, offset: int) -> Any:
        config = read_json(folder / name / "config.json", f"the {name} config")
        config["_class_name"] = index[name][1]
        return seeded(seed, offset, lambda: _diffusers_model(config))

    denoiser = diffusers_component(denoiser_name, 0)
    vae = diffusers_component("vae", 1) if present("vae") else None
    kind, encoder_names, options = text_kind(index, pipeline)
    encoders, tokenizers = [], []
    for offset, name in enumerate(encoder_names, start=2):
        class_name = index[name][1]
        config = transformers.AutoConfig.from_pretrained(str(folder / name), local_files_only=True)
        encoders.append(seeded(seed, offset, lambda c=config, n=class_name: _transformers_model(n, c)))
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        tokenizer_cls = getattr(transformers, str(index.get(tokenizer_name, [None, ""])[1]), None)
        if not (isinstance(tokenizer_cls, type) and issubclass(tokenizer_cls, transformers.PreTrainedTokenizerBase)):
            raise ValueError(f"{folder}/model_index.json names no transformers tokenizer for {tokenizer_name!r}")
        tokenizers.append(tokenizer_cls.from_pretrained(str(folder / tokenizer_name), local_files_only=True))
    scheduler = scheduler_spec(folder, index["scheduler"][1] if present("scheduler") else None)
    return {
        "pipeline": pipeline, "denoiser_name": denoiser_name, "denoiser": denoiser, "vae": vae, "text_kind": kind,
        "text_encoders": encoders, "tokenizers": tokenizers, "text_options": options, "scheduler": scheduler,
    }


def handles(parts: dict[str, Any], ident: str, device: str) -> dict[str, Any]:
    """MODEL, CLIP, VAE and SCHEDULER outputs over built components (fingerprinted by ``ident``)."""
    from dagfusion.model import ModelHandle, StaticRef, TextEncoderBundle, VAEHandle, tokenizer_fingerprint

    vae = parts["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    info = {"source": f"new {ident}", "pipeline": parts["pipeline"], "dtype": "float32", "device": device,
            "vae_scale_factor": scale}
    denoiser = parts["denoiser"].to(device).eval()
    model = ModelHandle(StaticRef(denoiser, f"new:{ident}:denoiser"), scheduler=parts["scheduler"],
                        info={**info, "component": parts["denoiser_name"]})
    vae_handle = None
    if vae is not None:
        vae_handle = VAEHandle(StaticRef(vae.to(device).eval(), f"new:{ident}:vae"), info={**info, "component": "vae"})
    encoders = [StaticRef(e.to(device).eval(), f"new:{ident}:text{i}") for i, e in enumerate(parts["text_encoders"])]
    tokenizers = [StaticRef(t, tokenizer_fingerprint(t)) for t in parts["tokenizers"]]
    clip = TextEncoderBundle(parts["text_kind"], encoders, tokenizers, options=parts["text_options"],
                             info={**info, "component": "text_encoder"})
    return {"model": model, "clip": clip, "vae": vae_handle, "scheduler": parts["scheduler"]}


@node(
    "dagfusion.train.NewModel",
    version="1.0.0",
    category="training",
    inputs=[
        Input("config", STRING, "tiny-sd", choices=tuple(CONFIGS),
              description="A built-in architecture: 'tiny-sd' (latent, tiny VAE), 'tiny-sd-pixel' (pixel space, no VAE), 'shapes-sd' or 'shapes-dit' (the shipped shapes models' architectures)."),
        Input("config_folder", PATH, optional=True,
              description="A diffusers folder of configs to build instead (weights in it are ignored; tokenizers are loaded)."),
        Input("seed", SEED, 0, min=0, max=2**32 - 1, description="Seeds the initial weights."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"),
              description="Where the model computes; 'auto' takes the settings' device."),
    ],
    outputs=[
        Output("model", "MODEL", "The untrained denoiser with the config's scheduler."),
        Output("clip", "CLIP", "The text encoder (randomly initialised; trainings keep it frozen) and tokenizer."),
        Output("vae", "VAE", "The VAE (randomly initialised); empty for pixel-space configs."),
        Output("scheduler", "SCHEDULER", "The config's scheduler."),
    ],
    examples=[{"config": "tiny-sd", "seed": 1, "device": "cpu"}],
)
def new_model(ctx: RunContext, config: str, config_folder: str | None, seed: int, device: str) -> dict[str, Any]:
    """Build an untrained model (denoiser, text encoder, VAE, scheduler) from a config, with seeded weights."""
    from dagfusion.fingerprint import fingerprint, fingerprint_path
    from dagfusion.nodes.diffusion.loading import check_tree_readable, resolve_device

    resolved = resolve_device(device, ctx.device)
    if config_folder:
        folder = ctx.input_path(config_folder)
        check_tree_readable(folder, ctx.settings.readable_roots)
        parts = build_from_folder(folder, seed)
        ident = f"{folder.name}@{fingerprint_path(folder)[:16]} (seed {seed})"
    else:
        parts = build_builtin(config, seed)
        ident = f"{config}@{fingerprint(CONFIGS[config])[:16]} (seed {seed})"
    return handles(parts, ident, resolved)


NODES = (new_model,)

"""The text encoder as something to train: differentiable encoding, trainable copies, the result.

TextCraftor trains the one text encoder of a bundle of kind ``"clip"`` (Stable Diffusion
1.x/2.x, ``shapes-sd``) or ``"t5"`` (PixArt, ``shapes-dit``). :func:`encode` encodes a batch of
prompts exactly like :func:`~dagfusion.nodes.diffusion.text.encode_prompt` does but *with*
gradients: CLIP padded to the tokenizer's maximum length, textual-inversion tokens expanded, the
last hidden state; T5 lower-cased when the bundle says so, padded to the bundle's ``max_length``
(120 by default) with the attention mask, which the denoiser also receives.

:func:`prepare` never changes the input bundle: it trains a deep copy of the encoder (and copies
of patches that own parameters). What trains is one of:

- ``"all"``: every floating-point parameter of the encoder;
- ``"match"``: parameters whose (module) name matches the glob patterns (``"*layers.1.*"``);
- ``"lora"``: a fresh side-branch LoRA on the encoder's Linear layers named by ``targets``
  (the encoder itself frozen); the result is the input bundle plus the trained patch;
- ``"patches"``: the parameters of trainable patches already on the bundle;
- ``"none"``: nothing (the encoder stays as it is; for a run that trains a UNet LoRA alone).

:func:`result_bundle` turns the trained copy into a new :class:`~dagfusion.model.TextEncoderBundle`
(a new encoder module held by the handle, or the trained patch); the shared modules are untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

TRAINABLE = ("all", "match", "lora", "patches", "none")
KINDS = ("clip", "t5")
DEFAULT_TARGETS = "q_proj, k_proj, v_proj, out_proj"


def clip_parts(bundle: Any) -> tuple[Any, Any]:
    """``(encoder, tokenizer)`` of a bundle with one CLIP or one T5 encoder.

    :raises ValueError: the bundle is of another kind (SDXL's two encoders, none) or holds
        another number of encoders.
    """
    if getattr(bundle, "kind", None) not in KINDS or len(bundle.encoders) != 1:
        raise ValueError(
            f"TextCraftor trains one text encoder, CLIP (Stable Diffusion 1.x/2.x) or T5 (PixArt); got a "
            f"{getattr(bundle, 'kind', type(bundle).__name__)!r} bundle with {len(getattr(bundle, 'encoders', ()))} encoder(s)"
        )
    return bundle.encoders[0].get(), bundle.tokenizers[0].get()


def tokenize(bundle: Any, tokenizer: Any, prompts: Sequence[str]) -> Any:
    """Token ids ``(B, L)`` and attention mask, as :func:`encode_prompt` makes them (longer prompts cut)."""
    from dagfusion.nodes.diffusion.text import TEXTUAL_INVERSION, expand_tokens

    embeddings = dict(bundle.options.get(TEXTUAL_INVERSION) or {})
    texts = [expand_tokens(p, tokenizer, embeddings) if embeddings and p else p for p in prompts]
    if bundle.kind == "t5":
        if bool(bundle.options.get("lowercase", True)):
            texts = [t.lower().strip() for t in texts]
        return tokenizer(texts, padding="max_length", max_length=int(bundle.options.get("max_length", 120)),
                         truncation=True, add_special_tokens=True, return_tensors="pt")
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def uses_mask(encoder: Any) -> bool:
    """Whether the encoder reads the attention mask (T5 always; CLIP when its config says so)."""
    config = encoder.config
    return getattr(config, "model_type", "") == "t5" or bool(getattr(config, "use_attention_mask", False))


def embed(encoder: Any, tokens: Any, device: Any) -> Any:
    """The encoder's last hidden state ``(B, L, D)`` for ``tokens`` (gradients flow when enabled)."""
    mask = tokens.attention_mask.to(device) if uses_mask(encoder) else None
    return encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def encode(bundle: Any, encoder: Any, tokenizer: Any, prompts: Sequence[str], device: Any) -> dict[str, Any]:
    """The denoiser's text inputs for ``prompts`` (float32, gradients flow when enabled):
    ``encoder_hidden_states``, plus ``encoder_attention_mask`` for T5 (as PixArt takes it)."""
    tokens = tokenize(bundle, tokenizer, prompts)
    out = {"encoder_hidden_states": embed(encoder, tokens, device).float()}
    if bundle.kind == "t5":
        out["encoder_attention_mask"] = tokens.attention_mask.to(device)
    return out


@contextmanager
def frozen_flags(*modules: Any) -> Iterator[None]:
    """Turn ``requires_grad`` off on every parameter of ``modules`` for the duration, then restore
    each flag (so no gradient is ever accumulated into shared weights)."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass
class TrainableEncoder:
    """A trainable copy of a bundle's encoder.

    Attributes:
        mode: One of :data:`TRAINABLE`.
        module: The encoder copy (float32, on the training device).
        patches: The patches to apply to ``module`` while encoding (copies of owning ones).
        params: ``{name: parameter}`` of what trains (``@patch<i>.<name>`` for patch parameters).
        new_patch: The fresh LoRA (mode ``"lora"``), else ``None``.
        owning: Indices into ``patches`` of the copied parameter-owning patches.
    """

    mode: str
    module: Any
    patches: list[Any]
    params: dict[str, Any]
    new_patch: Any = None
    owning: list[int] = field(default_factory=list)

    @contextmanager
    def applied(self) -> Iterator[Any]:
        """The encoder with its patches applied."""
        from dagfusion.model import apply_patches

        with apply_patches(self.patches, self.module):
            yield self.module


def lora_targets(encoder: Any, targets: str, what: str = "the text encoder") -> list[str]:
    """Names of ``encoder``'s Linear layers matching ``targets`` (names, suffixes or globs).

    :raises ValueError: nothing matches (the message names ``what`` was searched).
    """
    import fnmatch

    import torch

    from dagfusion.model import unwrap_compiled
    from dagfusion.nodes.training.params import patterns

    globs = patterns(targets)
    names = [n for n, m in unwrap_compiled(encoder).named_modules() if isinstance(m, torch.nn.Linear)
             and any(n == g or n.endswith("." + g) or fnmatch.fnmatchcase(n, g) for g in globs)]
    if not names:
        raise ValueError(f"the LoRA targets {globs} match no Linear layer of {what} (e.g. {_linear_examples(encoder)})")
    return names


def _linear_examples(module: Any) -> str:
    import torch

    from dagfusion.model import unwrap_compiled

    names = [n.rsplit(".", 1)[-1] for n, m in unwrap_compiled(module).named_modules() if isinstance(m, torch.nn.Linear)]
    return ", ".join(list(dict.fromkeys(names))[:4]) or "no Linear layer at all"


def prepare(bundle: Any, mode: str, device: Any, *, match: str = "", rank: int = 4, alpha: float = 4.0,
            targets: str = DEFAULT_TARGETS, seed: int = 0) -> TrainableEncoder:
    """A trainable copy of ``bundle``'s encoder (see the module docstring); the bundle is unchanged.

    :raises ValueError: an unknown mode, or a selection that trains nothing.
    """
    import torch

    from dagfusion.model import unwrap_compiled
    from dagfusion.nodes.lora.patch import TrainableLoraPatch, module_id, new_layers
    from dagfusion.nodes.training.params import patch_parameters, select

    if mode not in TRAINABLE:
        raise ValueError(f"expected trainable in {list(TRAINABLE)}, got {mode!r}")
    encoder, _ = clip_parts(bundle)
    module = copy.deepcopy(unwrap_compiled(encoder))
    module.to(device=device, dtype=torch.float32)
    patches = list(bundle.patches)
    owning = [i for i, p in enumerate(patches) if patch_parameters(p) is not None]
    for i in owning:
        patches[i] = copy.deepcopy(patches[i])
        for p in patch_parameters(patches[i]).values():
            p.data = p.data.to(device=device, dtype=torch.float32)
    new_patch = None
    if mode == "lora":
        layers = new_layers(module, lora_targets(module, targets), rank, alpha, seed)
        new_patch = TrainableLoraPatch(layers, component="text_encoder", target=module_id(encoder))
        patches.append(new_patch)
        params = select(module, [new_patch], "patches")
        for p in (patch_parameters(q) or {} for q in patches[:-1]):
            for t in p.values():
                t.requires_grad_(False)
    elif mode == "patches":
        params = select(module, patches, "patches")
    elif mode == "none":
        module.requires_grad_(False)
        for p in (patch_parameters(q) or {} for q in patches):
            for t in p.values():
                t.requires_grad_(False)
        params = {}
    else:
        params = select(module, [], mode, match)
    module.train()
    return TrainableEncoder(mode, module, patches, params, new_patch, owning)


def result_bundle(bundle: Any, trained: TrainableEncoder, fingerprint: str | None, **info: Any) -> Any:
    """The output bundle: a new encoder module (``all``/``match``), or the input bundle with the
    trained patch(es) (``lora``/``patches``). Parameters end frozen, in eval mode, on the input
    encoder's device and dtype."""
    from dagfusion.model import StaticRef, TextEncoderBundle
    from dagfusion.nodes.diffusion.sampling import module_dtype
    from dagfusion.nodes.training.params import patch_parameters

    encoder, _ = clip_parts(bundle)
    device = next(encoder.parameters()).device
    for p in trained.params.values():
        p.requires_grad_(False)
    merged = {**dict(bundle.info), **info}
    if trained.mode == "none":
        return bundle
    if trained.mode == "lora":
        for p in patch_parameters(trained.new_patch).values():
            p.data = p.data.to(device=device)
        return _with_info(bundle.with_patch(trained.new_patch), merged)
    if trained.mode == "patches":
        for i in trained.owning:
            for p in patch_parameters(trained.patches[i]).values():
                p.data = p.data.to(device=device)
        return _with_info(bundle.with_patches(trained.patches), merged)
    module = trained.module.eval()
    module.requires_grad_(False)
    dtype = module_dtype(encoder)
    if dtype != module_dtype(module):
        module.to(dtype=dtype)
    module.to(device)
    return TextEncoderBundle(bundle.kind, [StaticRef(module, fingerprint)], bundle.tokenizers, options=bundle.options,
                             info=merged, offload=bundle.offload, patches=bundle.patches)


def _with_info(bundle: Any, info: dict[str, Any]) -> Any:
    from types import MappingProxyType

    bundle.info = MappingProxyType(info)
    return bundle

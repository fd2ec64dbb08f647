"""Text encoding: prompts to CONDITIONING through CLIP (SD 1/2), dual CLIP (SDXL) or T5 (PixArt).

Each path tokenizes and encodes like the matching diffusers pipeline, so embeddings are equal:

- ``clip``: padded to the tokenizer's maximum length; last hidden state (or, with
  ``clip_skip = k``, the hidden state ``k`` layers before the last, through the final layer norm);
  the negative prompt (``""`` if empty) is encoded the same way.
- ``sdxl``: both encoders' penultimate hidden states concatenated, pooled output of the second;
  an empty negative prompt gives zero embeddings when the model asks for it
  (``force_zeros_for_empty_prompt``), otherwise it is encoded.
- ``t5``: lower-cased and stripped (PixArt's convention), padded to ``max_length`` (120 by
  default) with an attention mask.

Prompts longer than the encoder takes are truncated, and a warning names what was cut. A list of
prompts gives one conditioning row per prompt, each encoded exactly as it would be alone (the
negative prompt is shared). With ``weighting`` ``comfy`` or ``a1111``, prompts use
Automatic1111's weight syntax and ``BREAK``; CLIP and SDXL prompts are encoded in windows instead
of truncated, T5 prompts in one chunk per ``BREAK`` section
(:mod:`dagfusion.nodes.everyday.weighted_encode`). Textual-inversion tokens added to the bundle (option
``textual_inversion``: ``{token: vectors}``) are expanded in every prompt first: a multi-vector
token ``<t>`` becomes ``<t> <t>_1 …``, as diffusers' ``maybe_convert_prompt`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from dagfusion import INT, LIST, STRING, Input, Output, RunContext, node, union
from dagfusion.errors import NodeInputError, Problem
from dagfusion.model import TextEncoderBundle
from dagfusion.nodes.diffusion.data import Conditioning
from dagfusion.nodes.diffusion.types import CLIP, CONDITIONING

_logger = logging.getLogger("dagfusion.node")

WEIGHTINGS = ("none", "comfy", "a1111")
"""Values of Encode's ``weighting`` input: none (text as written), comfy or a1111 weights."""

TEXTUAL_INVERSION = "textual_inversion"
"""Bundle option holding ``{token: number of vectors}`` for each textual-inversion embedding in it."""


def token_names(token: str, count: int) -> list[str]:
    """The tokens a ``count``-vector embedding adds: ``token``, ``token_1`` … ``token_{count-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def expand_tokens(prompt: str, tokenizer: Any, embeddings: Mapping[str, int]) -> str:
    """``prompt`` with each multi-vector token replaced by all its parts (diffusers' ``maybe_convert_prompt``)."""
    if not any(int(count) > 1 for count in embeddings.values()):
        return prompt
    for piece in set(tokenizer.tokenize(prompt)):
        count = int(embeddings.get(piece, 1))
        if count > 1:
            prompt = prompt.replace(piece, " ".join(token_names(piece, count)))
    return prompt


def _tokenize(tokenizer: Any, text: str, max_length: int, warn: Any, label: str, **extra: Any) -> Any:
    """Tokenize ``text`` padded/truncated to ``max_length``; warn (once) about what was cut."""
    tokens = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt", **extra)
    full = tokenizer(text, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > tokens.input_ids.shape[-1]:
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])[0]
        warn(
            f"the prompt is longer than the {label} text encoder takes ({full.shape[-1]} tokens, maximum "
            f"{max_length}); this part was cut: {removed!r}"
        )
    return tokens


def _device_of(module: Any) -> Any:
    return next(module.parameters()).device


def encode_prompt(
    bundle: TextEncoderBundle,
    prompt: str | Sequence[str],
    negative_prompt: str = "",
    *,
    prompt_2: str = "",
    clip_skip: int = 0,
    max_length: int = 0,
    logger: logging.Logger | None = None,
    weighting: str = "none",
    min_windows: int = 1,
) -> Conditioning:
    """Encode ``prompt`` (one string, or a list: one row each) and ``negative_prompt`` with ``bundle``
    (see the module docstring). ``weighting`` other than ``"none"`` parses weights and ``BREAK``
    (:mod:`dagfusion.nodes.everyday.weighted_encode`); ``min_windows`` pads such an encoding to at
    least that many windows. :raises PromptSyntaxError: unbalanced brackets (weighted modes)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"expected a weighting in {WEIGHTINGS}, got {weighting!r}")
    if weighting != "none" and bundle.kind not in ("clip", "sdxl", "t5"):
        raise ValueError(f"prompt weighting needs a CLIP, SDXL or T5 text encoder; this one is {bundle.kind!r}")
    if not isinstance(prompt, str):
        return _encode_many(bundle, list(prompt), negative_prompt, prompt_2=prompt_2, clip_skip=clip_skip,
                            max_length=max_length, logger=logger, weighting=weighting)
    import torch

    log = logger or _logger
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)
            log.warning(message)

    if bundle.kind == "none":
        raise ValueError(
            "this model has no text encoder (it is class-conditional, like DiT); "
            "use dagfusion.conditioning.ClassLabel instead of a text encode node"
        )
    encoders = [r.get() for r in bundle.encoders]
    tokenizers = [r.get() for r in bundle.tokenizers]
    embeddings = dict(bundle.options.get(TEXTUAL_INVERSION) or {})

    def convert(text: str, tokenizer: Any) -> str:
        return expand_tokens(text, tokenizer, embeddings) if embeddings and text else text

    meta: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt, "encoder": bundle.kind}
    if weighting != "none":
        meta["weighting"] = weighting
    with torch.no_grad():
        with _all_placed(bundle, encoders):
            if weighting != "none":
                positive, negative = _encode_weighted(
                    bundle, encoders, tokenizers, convert(prompt, tokenizers[0]), convert(prompt_2 or prompt, tokenizers[-1]),
                    convert(negative_prompt, tokenizers[0]), clip_skip, weighting, min_windows,
                    max_length=max_length, warn=warn,
                )
            elif bundle.kind == "clip":
                positive, negative = _encode_clip(
                    encoders[0], tokenizers[0], convert(prompt, tokenizers[0]), convert(negative_prompt, tokenizers[0]),
                    clip_skip, warn,
                )
            elif bundle.kind == "sdxl":
                positive, negative = _encode_sdxl(
                    encoders, tokenizers, prompt, prompt_2 or prompt, negative_prompt, clip_skip,
                    bool(bundle.options.get("force_zeros_for_empty_prompt", True)), warn, convert,
                )
            else:
                limit, lowercase = _t5_settings(bundle, max_length)
                positive, negative = _encode_t5(
                    encoders[0], tokenizers[0], convert(prompt, tokenizers[0]), convert(negative_prompt, tokenizers[0]),
                    limit, lowercase, warn,
                )
    meta["truncated"] = bool(warnings)
    if warnings:
        meta["warnings"] = warnings
    return Conditioning(bundle.kind, positive, negative, meta)


def _encode_many(
    bundle: TextEncoderBundle, prompts: list[Any], negative_prompt: str, **options: Any
) -> Conditioning:
    """One conditioning row per prompt, each encoded as it would be alone; the negative is shared."""
    import torch

    if not prompts:
        raise ValueError("expected at least one prompt, got an empty list")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"expected a list of prompt strings; item {bad[0]} is a {type(prompts[bad[0]]).__name__}")
    if options.get("weighting", "none") != "none":
        from dagfusion.nodes.everyday.weighted_encode import (
            t5_chunk_count,
            window_count,
        )

        tokenizers = [r.get() for r in bundle.tokenizers]
        texts = [*prompts, negative_prompt, options.get("prompt_2") or ""]
        if bundle.kind == "t5":
            limit, lowercase = _t5_settings(bundle, int(options.get("max_length") or 0))
            options["min_windows"] = t5_chunk_count(tokenizers[0], [*prompts, negative_prompt], limit, lowercase)
        else:
            options["min_windows"] = window_count(tokenizers, texts)
    parts = [encode_prompt(bundle, p, negative_prompt, **options) for p in prompts]

    def stack(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    negative = None if parts[0].negative is None else stack([p.negative for p in parts])  # type: ignore[misc]
    warnings = [w for p in parts for w in p.meta.get("warnings", ())]
    meta: dict[str, Any] = {"prompt": list(prompts), "negative_prompt": negative_prompt, "encoder": bundle.kind,
                            "truncated": bool(warnings)}
    if warnings:
        meta["warnings"] = list(dict.fromkeys(warnings))
    return Conditioning(bundle.kind, stack([p.positive for p in parts]), negative, meta)


def _t5_settings(bundle: TextEncoderBundle, max_length: int) -> tuple[int, bool]:
    """A T5 bundle's token limit (``max_length`` if set, else the bundle's, 120 by default) and lower-casing."""
    return max_length or int(bundle.options.get("max_length", 120)), bool(bundle.options.get("lowercase", True))


def _encode_weighted(
    bundle: TextEncoderBundle, encoders: list[Any], tokenizers: list[Any], prompt: str, prompt_2: str, negative: str,
    clip_skip: int, weighting: str, min_windows: int, max_length: int = 0, warn: Any = None,
) -> tuple[dict, dict]:
    from dagfusion.nodes.everyday import weighted_encode as weighted

    if bundle.kind == "t5":
        limit, lowercase = _t5_settings(bundle, max_length)
        return weighted.encode_t5_weighted(
            encoders[0], tokenizers[0], prompt, negative, limit, lowercase, weighting, warn, min_windows
        )
    if bundle.kind == "clip":
        return weighted.encode_clip_weighted(encoders[0], tokenizers[0], prompt, negative, clip_skip, weighting, min_windows)
    force_zeros = bool(bundle.options.get("force_zeros_for_empty_prompt", True))
    return weighted.encode_sdxl_weighted(
        encoders, tokenizers, prompt, prompt_2, negative, clip_skip, force_zeros, weighting, min_windows
    )


class _all_placed:
    """Put every encoder of the bundle on its compute device, with the bundle's patches applied to
    each, for the duration."""

    def __init__(self, bundle: TextEncoderBundle, encoders: list[Any]) -> None:
        self._contexts = [bundle.patched(e) for e in encoders]

    def __enter__(self) -> None:
        for context in self._contexts:
            context.__enter__()

    def __exit__(self, *exc: object) -> None:
        for context in reversed(self._contexts):
            context.__exit__(*exc)


def _clip_hidden(encoder: Any, ids: Any, mask: Any, clip_skip: int) -> Any:
    if clip_skip <= 0:
        return encoder(ids, attention_mask=mask)[0]
    out = encoder(ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    text_model = getattr(encoder, "text_model", encoder)
    return text_model.final_layer_norm(hidden)


def _encode_clip(encoder: Any, tokenizer: Any, prompt: str, negative: str, clip_skip: int, warn: Any) -> tuple[dict, dict]:
    device = _device_of(encoder)
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    tokens = _tokenize(tokenizer, prompt, tokenizer.model_max_length, warn, "CLIP")
    mask = tokens.attention_mask.to(device) if use_mask else None
    hidden = _clip_hidden(encoder, tokens.input_ids.to(device), mask, clip_skip)
    neg_tokens = _tokenize(tokenizer, negative, hidden.shape[1], warn, "CLIP")
    neg_mask = neg_tokens.attention_mask.to(device) if use_mask else None
    neg_hidden = _clip_hidden(encoder, neg_tokens.input_ids.to(device), neg_mask, clip_skip)
    return {"encoder_hidden_states": hidden}, {"encoder_hidden_states": neg_hidden}


def _encode_sdxl(
    encoders: list[Any],
    tokenizers: list[Any],
    prompt: str,
    prompt_2: str,
    negative: str,
    clip_skip: int,
    force_zeros: bool,
    warn: Any,
    convert: Any = None,
) -> tuple[dict, dict]:
    import torch

    def run(texts: list[str], lengths: list[int] | None, layer: int) -> tuple[Any, Any]:
        hidden_states, pooled = [], None
        for index, (text, tokenizer, encoder) in enumerate(zip(texts, tokenizers, encoders)):
            limit = tokenizer.model_max_length if lengths is None else lengths[index]
            text = convert(text, tokenizer) if convert is not None else text
            tokens = _tokenize(tokenizer, text, limit, warn, "CLIP")
            out = encoder(tokens.input_ids.to(_device_of(encoder)), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden_states.append(out.hidden_states[layer])
        if pooled is None:
            raise ValueError("the SDXL text encoders gave no pooled embedding (expected a CLIP with projection last)")
        return torch.concat(hidden_states, dim=-1), pooled

    texts = [prompt, prompt_2][: len(encoders)]
    hidden, pooled = run(texts, None, -(clip_skip + 2))
    if not negative and force_zeros:
        neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    else:
        neg_hidden, neg_pooled = run([negative] * len(encoders), [hidden.shape[1]] * len(encoders), -2)
    return (
        {"encoder_hidden_states": hidden, "text_embeds": pooled},
        {"encoder_hidden_states": neg_hidden, "text_embeds": neg_pooled},
    )


def _encode_t5(
    encoder: Any, tokenizer: Any, prompt: str, negative: str, max_length: int, lowercase: bool, warn: Any
) -> tuple[dict, dict]:
    device = _device_of(encoder)

    def clean(text: str) -> str:
        return text.lower().strip() if lowercase else text

    tokens = _tokenize(tokenizer, clean(prompt), max_length, warn, "T5", add_special_tokens=True)
    mask = tokens.attention_mask.to(device)
    hidden = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    neg_tokens = _tokenize(tokenizer, clean(negative), hidden.shape[1], warn, "T5", add_special_tokens=True)
    neg_mask = neg_tokens.attention_mask.to(device)
    neg_hidden = encoder(neg_tokens.input_ids.to(device), attention_mask=neg_mask)[0]
    return (
        {"encoder_hidden_states": hidden, "encoder_attention_mask": mask},
        {"encoder_hidden_states": neg_hidden, "encoder_attention_mask": neg_mask},
    )


def _encode_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"clip": tiny.sd_handles()["clip"], "prompt": "a red fox in the snow", "negative_prompt": "blurry"}


def _encode_list_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"clip": tiny.sd_handles()["clip"], "prompt": ["a red fox", "a blue cat"], "negative_prompt": ""}


def _encode_weighted_example() -> dict[str, Any]:
    return {**_encode_example(), "prompt": "a (red:1.3) fox BREAK in [the snow]", "weighting": "comfy"}


def _syntax_problems(texts: Mapping[str, Any]) -> list[Problem]:
    from dagfusion.nodes.everyday.weighting import PromptSyntaxError, parse_weights

    problems = []
    for name, value in texts.items():
        for index, text in enumerate([value] if isinstance(value, str) else list(value or ())):
            if not isinstance(text, str):
                continue
            try:
                parse_weights(text)
            except PromptSyntaxError as exc:
                where = f"item {index}: " if not isinstance(value, str) else ""
                problems.append(Problem("bad-prompt", f"{where}{exc} in {text!r}", input=name))
    return problems


def _check_encode(inputs: Mapping[str, Any]) -> list[Problem]:
    if inputs.get("weighting", "none") in (None, "none"):
        return []
    return _syntax_problems({k: inputs[k] for k in ("prompt", "negative_prompt", "prompt_2") if k in inputs})


@node(
    "dagfusion.text.Encode",
    version="1.3.0",
    category="conditioning",
    inputs=[
        Input("clip", CLIP, link_only=True, description="Text encoder bundle from a model loader."),
        Input("prompt", union(STRING, LIST), "", ui={"multiline": True},
              description="What the picture should show; a list of prompts gives one conditioning row each."),
        Input("negative_prompt", STRING, "", ui={"multiline": True},
              description="What to steer away from under guidance; empty means the model's unconditional embedding."),
        Input("prompt_2", STRING, "", ui={"multiline": True},
              description="SDXL only: prompt for the second text encoder (empty: same as prompt)."),
        Input("clip_skip", INT, 0, min=0, max=12,
              description="CLIP only: use the hidden state this many layers before the last (0 = last)."),
        Input("max_length", INT, 0, min=0, max=4096,
              description="T5 only: maximum tokens (0 = the model's default, 120 for PixArt-alpha)."),
        Input("weighting", STRING, "none", choices=WEIGHTINGS,
              description="'none' encodes the text as written; 'comfy' or 'a1111' read (word:1.3), (word), [word] "
                          "and BREAK. CLIP/SDXL: long prompts are encoded in windows instead of truncated; T5: "
                          "each BREAK section is its own chunk of max_length tokens, masks concatenated."),
    ],
    outputs=[Output("conditioning", CONDITIONING, "Prompt and negative-prompt embeddings for a sampler.")],
    examples=[_encode_example, _encode_list_example, _encode_weighted_example],
    check=_check_encode,
)
def encode_node(
    ctx: RunContext,
    clip: TextEncoderBundle,
    prompt: str | list[str],
    negative_prompt: str,
    prompt_2: str,
    clip_skip: int,
    max_length: int,
    weighting: str = "none",
) -> Conditioning:
    """Encode a prompt (or a list of prompts: a batch) and a negative prompt into conditioning
    (CLIP, SDXL dual CLIP or T5).

    With ``weighting = none`` prompts longer than the text encoder takes are truncated with a
    warning that names the cut text. ``comfy`` and ``a1111`` read Automatic1111's weight syntax
    and ``BREAK``; CLIP and SDXL encode long prompts in windows of the encoder's length, T5 encodes
    each ``BREAK`` section as its own chunk of ``max_length`` tokens (truncated with a warning) and
    concatenates the chunks and their attention masks (see :doc:`/everyday`); unbalanced brackets
    are an error naming the input and the position.
    """
    if weighting != "none":
        problems = _syntax_problems({"prompt": prompt, "negative_prompt": negative_prompt, "prompt_2": prompt_2})
        if problems:
            raise NodeInputError(problems[0].input or "prompt", problems[0].message)
        if clip.kind not in ("clip", "sdxl", "t5"):
            raise NodeInputError("weighting", f"expected a CLIP, SDXL or T5 text encoder for weighting {weighting!r}, "
                                              f"got a {clip.kind!r} one; use weighting 'none'")
    return encode_prompt(
        clip, prompt, negative_prompt, prompt_2=prompt_2, clip_skip=clip_skip, max_length=max_length,
        logger=ctx.logger, weighting=weighting,
    )


NODES = (encode_node,)

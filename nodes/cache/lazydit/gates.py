"""LazyDiT's gates and the transformers they fit: architecture checks, fresh gate weights, pooling.

The gated modules are the self-attention (``attn1``) and feed-forward (``ff``) modules of the
adaLN ``BasicTransformerBlock``\\ s of DiT and PixArt (see :mod:`~dagfusion.nodes.cache.lazydit`).
"""

from __future__ import annotations

from typing import Any

from dagfusion.model import unwrap_compiled

KINDS = ("attn", "mlp")
"""The gated modules of a block: ``attn`` = ``attn1`` (self-attention), ``mlp`` = ``ff``."""
MODES = ("off", "fill", "soft", "hard")
RULES = ("laziness", "threshold")
NORM_TYPES = ("ada_norm_zero", "ada_norm_single")
"""adaLN blocks: DiT (``ada_norm_zero``) and PixArt (``ada_norm_single``)."""
FILE_FORMAT = "dagfusion.lazydit-gates"
FILE_VERSION = "1"

# --- the transformer ----------------------------------------------------------------------------


def transformer_of(module: Any) -> Any:
    """The diffusion transformer behind ``module`` (looking through ``torch.compile``).

    :raises TypeError: for UNets (pointing to DeepCache) and for denoisers without adaLN
        ``BasicTransformerBlock``\\ s (DiT, PixArt).
    """
    inner = unwrap_compiled(module)
    names = {cls.__name__ for cls in type(inner).__mro__}
    if any("UNet" in name for name in names):
        raise TypeError(
            f"LazyDiT gates the attention and MLP modules of diffusion transformers (DiT, PixArt); this model's "
            f"denoiser is a {type(inner).__name__}, a UNet. For UNets use dagfusion.cache.DeepCache"
        )
    blocks = getattr(inner, "transformer_blocks", None)
    norms = {getattr(b, "norm_type", None) for b in blocks} if blocks is not None else set()
    if not blocks or not norms <= set(NORM_TYPES) or not all(_gateable(b) for b in blocks):
        raise TypeError(
            f"LazyDiT works on DiT and PixArt transformers (diffusers transformer_blocks of BasicTransformerBlock "
            f"with adaLN: norm_type {' or '.join(NORM_TYPES)}); this model's denoiser is a {type(inner).__name__}"
            + (f" with norm_type {sorted(str(n) for n in norms)}" if norms else "")
        )
    return inner


def _gateable(block: Any) -> bool:
    return "BasicTransformerBlock" in {c.__name__ for c in type(block).__mro__} and hasattr(block, "attn1") and hasattr(block, "ff")


def _in_features(module: Any) -> int:
    dim = getattr(module, "query_dim", None)
    if isinstance(dim, int):
        return dim
    for sub in module.modules():  # the first projection (duck-typed: quantized linears count too)
        width = getattr(sub, "in_features", None)
        if isinstance(width, int):
            return width
    raise TypeError(f"cannot tell the input width of {type(module).__name__}")  # pragma: no cover


def architecture(module: Any) -> dict[str, Any]:
    """What gates are shaped by: the transformer class, its norm type, its blocks and their widths."""
    inner = transformer_of(module)
    blocks = inner.transformer_blocks
    attn = [_in_features(b.attn1) for b in blocks]
    mlp = [_in_features(b.ff) for b in blocks]
    uniform = len(set(attn + mlp)) == 1
    return {
        "denoiser": type(inner).__name__,
        "norm_type": str(blocks[0].norm_type),
        "blocks": len(blocks),
        "dim": attn[0] if uniform else {"attn": attn, "mlp": mlp},
    }


def describe_architecture(arch: dict[str, Any]) -> str:
    width = arch["dim"] if isinstance(arch["dim"], int) else "mixed widths"
    return f"a {arch['denoiser']} with {arch['blocks']} blocks of width {width} (norm {arch['norm_type']})"


def _widths(arch: dict[str, Any], kind: str) -> list[int]:
    dim = arch["dim"]
    return [int(dim)] * int(arch["blocks"]) if isinstance(dim, int) else [int(d) for d in dim[kind]]


def check_architecture(expected: dict[str, Any], module: Any, what: str = "these gates") -> None:
    """:raises ValueError: naming both, when ``module``'s architecture is not ``expected``."""
    actual = architecture(module)
    if actual != expected:
        raise ValueError(
            f"{what} were made for {describe_architecture(expected)}, but this model is "
            f"{describe_architecture(actual)}; gates only fit the architecture they were made (and trained) for"
        )


# --- the gates -------------------------------------------------------------------------------------


def new_gates(arch: dict[str, Any], *, seed: int = 0, init_bias: float = 0.0, init_std: float = 0.01,
              steps: int = 1) -> Any:
    """Fresh gates for ``arch``: weights ``N(0, init_std²)`` from a CPU generator seeded with
    ``seed``, biases ``init_bias`` (0: every score starts near 0.5).

    Each gate is a ``Linear(width, steps)``: output ``k`` scores sampling step ``k`` (the paper's
    per-step gates); ``steps = 1`` is one gate shared by every step (what older files hold, drawn
    from the generator exactly as before).

    :raises ValueError: ``steps`` is below 1.
    """
    import torch

    if int(steps) < 1:
        raise ValueError(f"gates need at least one step, got steps={steps}")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    parts = {}
    for kind in KINDS:
        layers = []
        for width in _widths(arch, kind):
            layer = torch.nn.Linear(width, int(steps))
            with torch.no_grad():
                layer.weight.copy_(torch.randn((int(steps), width), generator=generator) * init_std)
                layer.bias.fill_(float(init_bias))
            layer.requires_grad_(False)
            layers.append(layer)
        parts[kind] = torch.nn.ModuleList(layers)
    return torch.nn.ModuleDict(parts)


def gate_steps(gates: Any) -> int:
    """How many sampling steps ``gates`` (from :func:`new_gates`) have their own parameters for:
    1 for step-independent gates."""
    return int(gates[KINDS[0]][0].weight.shape[0])


def gate_index(step: int, total: int, steps: int) -> int:
    """The gate row for step ``step`` of a ``total``-step run, for gates trained for ``steps`` steps.

    The step itself when the run has the gates' step count; otherwise the gate step at the same
    fraction of the run (``step · steps // total``, at most ``steps − 1``); always 0 for
    step-independent gates (``steps = 1``).
    """
    if steps <= 1:
        return 0
    if total == steps or total <= 0:
        return max(0, min(int(step), steps - 1))
    return max(0, min(int(step) * steps // int(total), steps - 1))


def pool(hidden: Any) -> Any:
    """``(B, tokens…, D)`` -> ``(B, D)``: the mean over the tokens, in float32."""
    x = hidden.float()
    return x.flatten(1, -2).mean(1) if x.ndim >= 3 else x


# --- the controller: what apply installs, and the switch objectives use ----------------------------

"""Validation-time checks of the quantization nodes' constant inputs (``@node(check=...)``).

Each check is a :data:`~dagfusion.node.NodeCheck`: it sees the inputs whose values are known
(linked inputs are absent at validation time) and returns :class:`~dagfusion.errors.Problem`\\ s
naming the offending input. The nodes run the same check on every value when they run
(:func:`~dagfusion.nodes.cache.checks.enforce`), so a linked bad value raises
:class:`~dagfusion.errors.NodeInputError` naming the input before any work is done.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion.errors import NodeInputError, Problem
from dagfusion.nodes.quant.backend import TORCHAO_FORMATS


def check_weight_only(values: Mapping[str, Any]) -> Iterator[Problem]:
    """The torchao backend is only asked for the formats it is used for (int8, fp8_e4m3)."""
    backend, format = values.get("backend"), values.get("format")
    if backend == "torchao" and isinstance(format, str) and format not in TORCHAO_FORMATS:
        yield Problem(
            "bad-backend",
            f"the torchao backend is used here for {list(TORCHAO_FORMATS)}, not {format}; use backend 'torch' (or 'auto')",
            input="backend",
        )


def check_error_profile(values: Mapping[str, Any]) -> Iterator[Problem]:
    """ErrorProfile: at most one timestep bin per training timestep (DistillLoss refuses more)."""
    bins, timesteps = values.get("bins"), values.get("train_timesteps")
    if _number(bins) and _number(timesteps) and bins > timesteps:
        yield Problem("bad-range", f"bins ({bins}) must be at most train_timesteps ({timesteps})", input="bins")


def check_prediction_schedule(values: Mapping[str, Any]) -> Iterator[Problem]:
    """Epsilon prediction is refused on a zero-terminal-SNR schedule (it is undefined at the last timestep)."""
    if values.get("prediction") == "epsilon" and values.get("zero_terminal_snr") is True:
        yield Problem(
            "bad-prediction",
            "epsilon prediction is undefined at zero terminal SNR; use v_prediction (or turn zero_terminal_snr off)",
            input="prediction",
        )


def check_distill(values: Mapping[str, Any]) -> Iterator[Problem]:
    """DistillLoss: ``guidance_min <= guidance_max``; ``timestep_weights`` parses, with at most
    ``train_timesteps`` bins; and the prediction fits the schedule."""
    low, high = values.get("guidance_min"), values.get("guidance_max")
    if _number(low) and _number(high) and low > high:
        yield Problem("bad-range", f"guidance_max ({high}) must be at least guidance_min ({low})", input="guidance_max")
    from dagfusion.nodes.quant.distill import parse_weights  # distill declares its node with this check

    text = values.get("timestep_weights")
    if isinstance(text, str):
        try:
            weights = parse_weights(text)
        except ValueError as exc:
            yield Problem("bad-weights", str(exc), input="timestep_weights")
        else:
            timesteps = values.get("train_timesteps")
            if _number(timesteps) and len(weights) > timesteps:
                yield Problem(
                    "bad-weights",
                    f"{len(weights)} timestep bins for {timesteps} train_timesteps; give at most one bin per timestep",
                    input="timestep_weights",
                )
    yield from check_prediction_schedule(values)


_INPUT_PREFIX = re.compile(r"input '(?P<input>[A-Za-z_][A-Za-z0-9_]*)': (?P<message>.*)", re.DOTALL)


def input_error(error: ValueError, default_input: str = "sensitivity") -> NodeInputError:
    """A library ``ValueError`` whose message starts ``"input 'name': …"`` as the
    :class:`NodeInputError` of that input (the rest of the message kept); any other message
    is laid on ``default_input``."""
    match = _INPUT_PREFIX.fullmatch(str(error))
    if match is None:
        return NodeInputError(default_input, str(error))
    return NodeInputError(match["input"], match["message"])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

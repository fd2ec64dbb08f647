"""Validation-time check of LazyGateLoss's constant inputs (``@node(check=...)``); the node runs
the same check on every value (:func:`~dagfusion.nodes.cache.checks.enforce`), so a linked bad
value raises :class:`~dagfusion.errors.NodeInputError` naming the input."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion.errors import Problem


def check_gate_loss(values: Mapping[str, Any]) -> Iterator[Problem]:
    """``sampling_steps`` is at most ``train_timesteps // 2`` (the previous step must be a later
    timestep), and epsilon prediction is not asked for on a zero-terminal-SNR schedule."""
    steps, timesteps = values.get("sampling_steps"), values.get("train_timesteps")
    if isinstance(steps, int) and isinstance(timesteps, int) and steps > timesteps // 2:
        yield Problem(
            "bad-range",
            f"sampling_steps ({steps}) must be at most train_timesteps // 2 ({timesteps // 2})",
            input="sampling_steps",
        )
    if values.get("prediction") == "epsilon" and values.get("zero_terminal_snr") is True:
        yield Problem(
            "bad-prediction",
            "epsilon prediction is undefined at zero terminal SNR; use v_prediction (or turn zero_terminal_snr off)",
            input="prediction",
        )

"""One optimisation step and the training state a checkpoint restores, shared by every training
loop of the product (the generic loop, TextCraftor): the same order of operations everywhere, so
resumed runs equal uninterrupted ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion.nodes.training import checkpoint as ckpt


def optimizer_step(
    loss: Any, optimizer: Any, scaler: Any, params: Mapping[str, Any], max_grad_norm: float, ema: Any = None
) -> float | None:
    """Backpropagate ``loss``, clip the gradient norm (when ``max_grad_norm > 0``), step the
    optimizer (through the fp16 gradient ``scaler`` when given), clear the gradients and update
    ``ema``. Returns the gradient norm before clipping, or ``None`` when not clipping."""
    import torch

    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = None
    if max_grad_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return norm


def rng_state(generator: Any, device: Any) -> dict[str, Any]:
    """The random state a checkpoint keeps: ``generator``'s, torch's CPU one and the device's."""
    import torch

    state = {"generator": ckpt.pack_bytes(generator.get_state()), "cpu": ckpt.pack_bytes(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = ckpt.pack_bytes(torch.cuda.get_rng_state(device))
    return state


def restore_state(loaded: Any, *, optimizer: Any, scaler: Any, ema: Any, generator: Any, device: Any) -> None:
    """Put a loaded checkpoint's EMA, optimizer, gradient-scaler and random state back (the
    weights are the caller's: each loop knows which parameters it trains).

    :raises ValueError: EMA is on but the checkpoint has no EMA state.
    """
    if ema is not None:
        if loaded.ema is None:
            raise ValueError("the checkpoint has no EMA state but EMA is on")
        ema.load(loaded.ema)
    ckpt.restore_optimizer(optimizer, loaded.optimizer, loaded.state["optimizer"])
    if scaler is not None and loaded.state.get("grad_scaler"):
        scaler.load_state_dict(loaded.state["grad_scaler"])
    set_rng_state(loaded.state["rng"], generator, device)


def set_rng_state(state: Mapping[str, Any], generator: Any, device: Any) -> None:
    """Put back what :func:`rng_state` kept."""
    import torch

    generator.set_state(ckpt.unpack_bytes(state["generator"]))
    torch.set_rng_state(ckpt.unpack_bytes(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(ckpt.unpack_bytes(state["cuda"]), device)

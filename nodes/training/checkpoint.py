"""Training checkpoints: safetensors and JSON only, written atomically.

A checkpoint is a folder ``step-00000100`` holding:

- ``model.safetensors`` — every weight of the denoiser (float32) plus trained patch parameters
  (``@patch<i>.<name>``); the raw (non-EMA) values.
- ``ema.safetensors`` — the EMA shadows of the trained parameters (only with EMA).
- ``optimizer.safetensors`` — the optimizer's per-parameter tensors (``state.<i>.<key>``).
- ``state.json`` — plain data: format, training key, step and total, the last losses, the
  random generators' states (base64 of their bytes), the optimizer's parameter groups and
  scalar state, the gradient scaler's state, the configuration and the objective's description.

Nothing is pickled, so loading a checkpoint cannot run code. A checkpoint is written into a
temporary folder and renamed into place, so a crash never leaves a half-written one that
looks complete; :func:`latest` finds the newest complete one.

Checkpoints of a run live in its *work folder*, ``<cache_dir>/training/<key>``, where the key is
the fingerprint of everything that determines the trained weights (see
:mod:`~dagfusion.nodes.training.loop`): rerunning the same training finds its own checkpoints.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "dagfusion.train.checkpoint/1"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def work_folder(cache_dir: str | os.PathLike[str], key: str) -> Path:
    """The folder holding the checkpoints of the training identified by ``key``."""
    return Path(cache_dir) / "training" / key[:32]


def pack_bytes(tensor: Any) -> str:
    """A uint8 tensor (a generator state) as base64 text."""
    return base64.b64encode(bytes(tensor.cpu().numpy().tobytes())).decode("ascii")


def unpack_bytes(text: str) -> Any:
    """The uint8 tensor :func:`pack_bytes` encoded."""
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _unshared(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Contiguous CPU tensors, cloning any that shares memory with an earlier one (safetensors refuses those)."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def optimizer_state(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, plain data)`` of an optimizer's ``state_dict()``."""
    import torch

    state = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: Any, tensors: Mapping[str, Any], plain: Mapping[str, Any]) -> None:
    """Load what :func:`optimizer_state` produced into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in plain.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in plain["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in group.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint (see the module docstring)."""

    path: Path
    state: Mapping[str, Any]
    weights: Mapping[str, Any]
    ema: Mapping[str, Any] | None
    optimizer: Mapping[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save(
    folder: Path,
    step: int,
    *,
    weights: Mapping[str, Any],
    ema: Mapping[str, Any] | None,
    optimizer: Mapping[str, Any],
    state: Mapping[str, Any],
) -> Path:
    """Write checkpoint ``step`` into ``folder`` atomically (replacing an existing one) and return its path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / step_name(step)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        meta = {"format": FORMAT, "step": str(step)}
        save_file(_unshared(weights), str(tmp / "model.safetensors"), metadata=meta)
        if ema is not None:
            save_file(_unshared(ema), str(tmp / "ema.safetensors"), metadata=meta)
        save_file(_unshared(optimizer), str(tmp / "optimizer.safetensors"), metadata=meta)
        document = {"format": FORMAT, "step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), **state}
        (tmp / STATE_FILE).write_text(json.dumps(document, indent=1, sort_keys=True), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def steps(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` as ``(step, path)``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, or ``None``."""
    found = steps(folder)
    return found[-1][1] if found else None


def resolve(path: Path) -> Path:
    """A checkpoint folder from ``path``: itself, or the newest checkpoint inside a work folder.

    :raises FileNotFoundError: ``path`` holds no checkpoint.
    """
    if (path / STATE_FILE).is_file():
        return path
    found = latest(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE}) and holds none")
    return found


def load(path: Path, device: Any = "cpu") -> Checkpoint:
    """Read a checkpoint folder (tensors onto ``device``).

    :raises ValueError: the folder is not a checkpoint of this format.
    """
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the checkpoint state {path / STATE_FILE}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dagfusion training checkpoint of format {FORMAT!r}")
    weights = load_file(str(path / "model.safetensors"), device=str(device))
    ema_file = path / "ema.safetensors"
    ema = load_file(str(ema_file), device=str(device)) if ema_file.is_file() else None
    optimizer = load_file(str(path / "optimizer.safetensors"), device="cpu")
    return Checkpoint(path, state, weights, ema, optimizer)


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` 0: keep all)."""
    if keep <= 0:
        return
    for _, path in steps(folder)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)

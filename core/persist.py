"""Safe on-disk forms of the core socket types (JSON and safetensors; never pickle)."""

from __future__ import annotations

import json
from typing import Any


def save_json(value: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh)


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def save_tensor(value: Any, path: str) -> None:
    from safetensors.torch import save_file

    save_file({"tensor": value.detach().contiguous().cpu()}, path)


def load_tensor(path: str) -> Any:
    from safetensors.torch import load_file

    return load_file(path)["tensor"]

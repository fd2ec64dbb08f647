"""File nodes: save text, tensors (safetensors) and tensor pictures (PNG); load tensors.

Every file is written inside the run's output folder (``../`` and absolute names refused)
and read only from the allowed read folders.
"""

from __future__ import annotations

from typing import Any

from dagfusion import PATH, STRING, TENSOR, Input, Output, RunContext, hookimpl, node


def _example_tensor() -> Any:
    """A small deterministic tensor for the node contract's examples (imports torch lazily)."""
    import torch

    return torch.linspace(0.0, 1.0, steps=48).reshape(3, 4, 4)


def _load_tensor_example(folder: Any) -> dict[str, Any]:
    """Write a safetensors file into the contract's scratch folder and load it back."""
    from safetensors.torch import save_file

    path = folder / "example.safetensors"
    save_file({"weights": _example_tensor()}, str(path))
    return {"path": str(path), "key": "weights"}


@node(
    "dagfusion.io.SaveText",
    version="1.0.0",
    category="io",
    inputs=[
        Input("text", STRING),
        Input("filename", STRING, "output.txt", description="Name inside the run's output folder."),
    ],
    outputs=[Output("path", STRING, "Where the file was written.")],
    pure=False,
    examples=[{"text": "a red circle", "filename": "notes/prompt.txt"}],
    output_node=True,
)
def save_text(ctx: RunContext, text: str, filename: str) -> str:
    """Write text to a file in the run's output folder."""
    path = ctx.output_path(filename)
    path.write_text(text, encoding="utf-8")
    return str(path)


@node(
    "dagfusion.io.SaveTensor",
    version="1.0.0",
    category="io",
    inputs=[
        Input("tensor", TENSOR),
        Input("filename", STRING, "tensor.safetensors", description="Name inside the run's output folder."),
        Input("key", STRING, "tensor", description="Name of the tensor inside the file."),
    ],
    outputs=[Output("path", STRING)],
    pure=False,
    examples=[lambda: {"tensor": _example_tensor()}],
    output_node=True,
)
def save_tensor(ctx: RunContext, tensor: Any, filename: str, key: str) -> str:
    """Save a tensor as safetensors in the run's output folder."""
    from safetensors.torch import save_file

    path = ctx.output_path(filename)
    save_file({key: tensor.detach().contiguous().cpu()}, str(path))
    return str(path)


@node(
    "dagfusion.io.LoadTensor",
    version="1.0.0",
    category="io",
    inputs=[
        Input("path", PATH, description="A .safetensors file under the allowed read folders."),
        Input("key", STRING, "tensor", description="Name of the tensor inside the file."),
    ],
    outputs=[Output("tensor", TENSOR)],
    examples=[_load_tensor_example],
)
def load_tensor(ctx: RunContext, path: str, key: str) -> Any:
    """Load one tensor from a safetensors file (pickle files are never read)."""
    from safetensors import safe_open

    resolved = ctx.input_path(path)
    with safe_open(str(resolved), framework="pt") as fh:
        keys = list(fh.keys())
        if key not in keys:
            raise KeyError(f"{resolved.name} has no tensor {key!r}; it holds {keys}")
        return fh.get_tensor(key)


@node(
    "dagfusion.io.SaveTensorPNG",
    version="1.0.0",
    category="io",
    inputs=[
        Input("tensor", TENSOR, description="(C, H, W) or (H, W) values in [0, 1]; C is 1, 3 or 4."),
        Input("filename", STRING, "image.png", description="Name inside the run's output folder."),
    ],
    outputs=[Output("path", STRING)],
    pure=False,
    examples=[lambda: {"tensor": _example_tensor()}, lambda: {"tensor": _example_tensor()[0], "filename": "gray.png"}],
    output_node=True,
)
def save_tensor_png(ctx: RunContext, tensor: Any, filename: str) -> str:
    """Save a tensor with values in [0, 1] as an 8-bit PNG, and show it as a preview."""
    import numpy as np
    from PIL import Image

    t = tensor.detach().float().cpu().clamp(0, 1)
    if t.dim() == 3:
        if t.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected 1, 3 or 4 channels, got shape {tuple(t.shape)}")
        t = t.permute(1, 2, 0)
        if t.shape[-1] == 1:
            t = t[..., 0]
    elif t.dim() != 2:
        raise ValueError(f"expected a (C, H, W) or (H, W) tensor, got shape {tuple(t.shape)}")
    array = (t.numpy() * 255.0 + 0.5).astype(np.uint8)
    image = Image.fromarray(array)
    path = ctx.output_path(filename)
    image.save(path, format="PNG")
    ctx.preview(image, label=filename)
    return str(path)


NODES = (save_text, save_tensor, load_tensor, save_tensor_png)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)

"""Aesthetic-style rewards: a small MLP over CLIP image embeddings (LAION aesthetic predictor style).

A head is a folder with two files:

- ``config.json``: ``{"format": "dagfusion.reward-head/1", "layers": [768, 1024, 128, 64, 16, 1],
  "activation": "identity", "normalize": true}`` — ``layers`` are the sizes from the embedding
  (first) to the score (last, 1); ``activation`` (``identity``, ``relu``, ``gelu``, ``silu``,
  ``tanh``) is applied between linear layers, not after the last; ``normalize`` scales the
  embedding to unit length first.
- ``model.safetensors``: ``linear.{i}.weight`` (out, in) and ``linear.{i}.bias`` (out) for each
  linear layer ``i``.

The reward is the head's output on the CLIP reward's projected image embeddings (the prompt is
not used). A head whose input size differs from the CLIP model's embedding size is refused,
naming both sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dagfusion.errors import NodeInputError
from dagfusion.nodes.rewards.base import Reward, frozen, module_device
from dagfusion.nodes.rewards.clip import CLIPReward

HEAD_FORMAT = "dagfusion.reward-head/1"
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
}


class EmbeddingHead(nn.Module):
    """Linear layers of the given sizes with an activation between them; output (B,)."""

    def __init__(self, layers: list[int], activation: str = "identity", normalize: bool = True) -> None:
        super().__init__()
        if len(layers) < 2 or layers[-1] != 1 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be at least two positive sizes ending in 1, got {layers}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.layers = [int(n) for n in layers]
        self.activation_name = activation
        self.normalize = bool(normalize)
        self.linear = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.layers, self.layers[1:]))
        self.activation = ACTIVATIONS[activation]()

    @property
    def input_dim(self) -> int:
        return self.layers[0]

    def config(self) -> dict[str, Any]:
        """The ``config.json`` contents."""
        return {"format": HEAD_FORMAT, "layers": self.layers, "activation": self.activation_name, "normalize": self.normalize}

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings, dim=-1) if self.normalize else embeddings
        for i, layer in enumerate(self.linear):
            x = layer(x)
            if i < len(self.linear) - 1:
                x = self.activation(x)
        return x[:, 0]


def save_head(head: EmbeddingHead, folder: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(head.config(), indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().float().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": HEAD_FORMAT})


def load_head(folder: str | Path) -> EmbeddingHead:
    """Read a head folder written by :func:`save_head` (or converted, see docs/rewards.md).

    The caller checks the folder is readable first. Raises ``ValueError`` for a wrong format,
    missing or unexpected tensors, or tensor shapes that disagree with the layer sizes.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a reward head folder (no {path.name})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != HEAD_FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}, expected {HEAD_FORMAT!r}")
    head = EmbeddingHead(list(config["layers"]), str(config.get("activation", "identity")), bool(config.get("normalize", True)))
    state = load_file(str(weights_path))
    expected = head.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"{weights_path}: tensors {sorted(state)} do not match the config's layers {sorted(expected)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{weights_path}: {key} has shape {tuple(value.shape)}, the config needs {tuple(expected[key].shape)}")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return frozen(head)  # type: ignore[return-value]


class AestheticReward(Reward):
    """An :class:`EmbeddingHead` over a :class:`CLIPReward`'s image embeddings (prompts unused)."""

    def __init__(self, clip: CLIPReward, head: EmbeddingHead, name: str, fingerprint: str) -> None:
        if head.input_dim != clip.embedding_dim:
            raise NodeInputError(
                "head",
                f"the head expects {head.input_dim}-d image embeddings but the CLIP model {clip.name!r} "
                f"gives {clip.embedding_dim}-d ones",
            )
        self.clip = clip
        self.head = head
        self.name = name
        self._fingerprint = f"{clip.__dagfusion_fingerprint__()}:{fingerprint}"

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if module_device(self.head) != images.device:
            self.head.to(images.device)
        return self.head(self.clip.image_embeddings(images))

"""The ShapeEval reward: how strongly the ShapeEval classifier reads a prompt's attributes.

For a single-object shapes caption ("a small blue square at the top on a white background")
the score of an image is ``sum_a w_a * log_softmax(logits_a)[true label of a]`` over the
attributes colour, shape, position, size and background: 0 is a perfect, confident render and
more negative is worse. Images of any size are resized to the classifier's 64×64 input
(bilinear, antialiased, differentiable).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch.nn import functional as F

from dagfusion.errors import NodeInputError
from dagfusion.fingerprint import fingerprint
from dagfusion.nodes.metrics.evaluator import ShapeEvalNet
from dagfusion.nodes.rewards.base import Reward, frozen, module_device
from dagfusion.nodes.shapes.world import ATTRIBUTES, parse_caption


def caption_targets(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Label indices per attribute for single-object captions.

    Raises :class:`NodeInputError` naming the first prompt that is not such a caption.
    """
    labels = []
    for prompt in prompts:
        scene = parse_caption(prompt)
        if scene is None:
            raise NodeInputError(
                "prompts",
                f"not a single-object shapes caption: {prompt!r} (the ShapeEval reward reads captions like "
                "'a small blue square at the top on a white background')",
            )
        labels.append(scene.labels())
    return {name: torch.tensor([values.index(l[name]) for l in labels]) for name, values in ATTRIBUTES.items()}


class ShapeEvalReward(Reward):
    """Weighted log-probability of the prompt's attribute labels under a ShapeEval classifier.

    The classifier is copied (the caller's object is never modified) and frozen; it follows
    the images to their device on each call.
    """

    def __init__(self, model: ShapeEvalNet, weights: Mapping[str, float]) -> None:
        unknown = sorted(set(weights) - set(ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown ShapeEval attributes {unknown}; expected some of {list(ATTRIBUTES)}")
        self.weights = {name: float(weights.get(name, 0.0)) for name in ATTRIBUTES}
        self.model = frozen(copy.deepcopy(model))
        self.name = "shapeeval"
        self._fingerprint = fingerprint([fingerprint(self.model), self.weights]) or ""

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = caption_targets(prompts)
        if module_device(self.model) != images.device:
            self.model.to(images.device)
        logits = self.model(images)
        total = torch.zeros(images.shape[0], device=images.device)
        for name, weight in self.weights.items():
            if weight == 0.0:
                continue
            log_probs = F.log_softmax(logits[name].float(), dim=1)
            total = total + weight * log_probs.gather(1, targets[name].to(images.device)[:, None])[:, 0]
        return total

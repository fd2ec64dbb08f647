"""Re-export of the ShapeEval classifier, which lives in :mod:`dagfusion.nodes.metrics.evaluator`
(with its shipped weights).

Kept so ``from dagfusion.nodes.shapes.evaluator import score`` keeps working; new code imports
:mod:`dagfusion.nodes.metrics.evaluator`.
"""

from __future__ import annotations

from dagfusion.nodes.metrics.evaluator import (
    FEATURES,
    INPUT_SIZE,
    SHIPPED,
    ShapeEvalNet,
    TrainReport,
    load_shapeeval,
    predict,
    save_shapeeval,
    score,
    train_shapeeval,
)

__all__ = [
    "FEATURES",
    "INPUT_SIZE",
    "SHIPPED",
    "ShapeEvalNet",
    "TrainReport",
    "load_shapeeval",
    "predict",
    "save_shapeeval",
    "score",
    "train_shapeeval",
]

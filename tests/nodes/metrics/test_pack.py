"""The metrics pack: its nodes and the SHAPE_EVALUATOR type come from ``dagfusion.builtin.metrics``,
the shipped classifier weights live beside its code, and the old import paths still work."""

from __future__ import annotations

import hashlib

from dagfusion.testing import make_registry

METRICS = (
    "dagfusion.metrics.LoadShapeEval",
    "dagfusion.metrics.TrainShapeEval",
    "dagfusion.metrics.SaveShapeEval",
    "dagfusion.metrics.ShapeEval",
    "dagfusion.metrics.Fidelity",
    "dagfusion.metrics.FDShapes",
    "dagfusion.metrics.LoadShapeEvalPair",
    "dagfusion.metrics.TrainShapeEvalPair",
    "dagfusion.metrics.SaveShapeEvalPair",
    "dagfusion.metrics.ShapeEvalPair",
    "dagfusion.metrics.LoadFrameEval",
    "dagfusion.metrics.VideoMotion",
    "dagfusion.metrics.VideoFrameEval",
    "dagfusion.metrics.FDShapesVideo",
    "dagfusion.metrics.ObjectColour",
)
#: sha256 of the shipped ShapeEval weights: the file carries provenance metadata and is never re-saved.
SHIPPED_SHA256 = "c46200057d9c8fff0d9c1209f7965c11b6ac7d567f7e01e3f68c4414aab6f2a4"


def test_metrics_nodes_come_from_the_metrics_pack() -> None:
    registry = make_registry()
    assert sorted(spec.type_id for spec in registry.nodes_of("dagfusion.builtin.metrics")) == sorted(METRICS)
    assert not [s.type_id for s in registry.nodes_of("dagfusion.builtin.shapes") if s.type_id.startswith("dagfusion.metrics.")]
    assert [t.name for t in registry.types_of("dagfusion.builtin.metrics")] == ["SHAPE_EVALUATOR", "PAIR_EVALUATOR"]
    assert registry.get("dagfusion.metrics.ShapeEval").version == "1.1.0"


def test_metrics_pack_registers_without_the_shapes_pack() -> None:
    # the structure and video packs build on shapes and training, so they go with them
    registry = make_registry(environ={"DAGFUSION_DISABLE_PLUGINS": "shapes,training,cache,quant,structure,video"})
    assert all(type_id in registry for type_id in METRICS)
    assert "dagfusion.shapes.Dataset" not in registry


def test_shipped_weights_sit_in_the_metrics_pack_unchanged() -> None:
    from dagfusion.nodes.metrics.evaluator import SHIPPED

    assert SHIPPED.parent.parent.name == "metrics"
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == SHIPPED_SHA256


def test_old_import_paths_re_export_the_metrics() -> None:
    from dagfusion.nodes.metrics import evaluator, fidelity, frechet
    from dagfusion.nodes.shapes import evaluator as old_evaluator
    from dagfusion.nodes.shapes import metrics as old_metrics

    assert old_evaluator.ShapeEvalNet is evaluator.ShapeEvalNet
    assert old_evaluator.SHIPPED == evaluator.SHIPPED
    assert old_metrics.psnr is fidelity.psnr and old_metrics.frechet_distance is frechet.frechet_distance
